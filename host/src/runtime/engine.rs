//! Every wasmtime setting wagg uses, in one place.
//!
//! A module runs with two hard limits, both per instance: a cap on its linear
//! memory (enforced by the store's limiter on every `memory.grow`)
//! and a CPU budget per call, counted in fuel. Fuel costs ~4 % of `put`
//! throughput on this workload, an epoch deadline ~9 %, and fuel is
//! deterministic: the same batch costs the same fuel on a busy machine, so a
//! budget never trips because the box was loaded.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtime::{Config, Engine, OptLevel, ProfilingStrategy};

/// Default cap on one instance's linear memory: a shard holding half a
/// million open rows in the hashmap strategy uses about 60 MiB.
pub const DEFAULT_MEMORY_LIMIT: u64 = 256 << 20;
/// Default fuel granted to every call, whatever its size: about a second of
/// CPU. Not tight on purpose — one `put` may rehash a table of every open row
/// (measured: 71 M fuel was too little for a 1 056-sample batch at ~250 k
/// rows), and the budget exists to stop a module that never returns.
pub const DEFAULT_FUEL_PER_CALL: u64 = 1_000_000_000;
/// Default extra fuel granted per sample (or per merged row) in a call.
pub const DEFAULT_FUEL_PER_SAMPLE: u64 = 20_000;
/// Default time a compile may take before the module is refused.
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on the rows one `flush`, `export-state` returns.
pub const DEFAULT_MAX_OUTPUT_ROWS: usize = 4 << 20;
/// Largest batch the host passes to `put` (the WIT promises at most this).
pub const MAX_BATCH: usize = 65_536;

/// Limits and budgets applied to every module instance.
///
/// Every field is part of `[runtime]` in `wagg.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeLimits {
    /// Most bytes one instance's linear memory may grow to. A module that asks
    /// for more traps with a memory-limit error; its shard recovers.
    pub memory_limit_bytes: u64,
    /// Fuel granted to every call before its per-sample share. Fuel is
    /// roughly one unit per Wasm instruction.
    pub fuel_per_call: u64,
    /// Fuel granted per sample in `put`, per row in `merge`, and per open
    /// row in `flush` and `export-state`. A call that runs out traps with a
    /// CPU-budget error.
    pub fuel_per_sample: u64,
    /// Seconds a compile of an uploaded module may take.
    pub compile_timeout_secs: u64,
    /// Most rows a module may return from one `flush` or `export-state`.
    pub max_output_rows: usize,
    /// Whether to append the address and name of every compiled function of
    /// every module to `/tmp/perf-<pid>.map`, so that `perf` names guest
    /// code rather than showing anonymous JIT addresses. Off by default: the
    /// file grows with every module loaded, and perf's convention is to
    /// leave it behind when the process exits.
    pub perf_map: bool,
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        Self {
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT,
            fuel_per_call: DEFAULT_FUEL_PER_CALL,
            fuel_per_sample: DEFAULT_FUEL_PER_SAMPLE,
            compile_timeout_secs: DEFAULT_COMPILE_TIMEOUT.as_secs(),
            max_output_rows: DEFAULT_MAX_OUTPUT_ROWS,
            perf_map: false,
        }
    }
}

impl RuntimeLimits {
    /// Fuel for a call that handles `items` samples or rows.
    pub fn fuel_for(&self, items: usize) -> u64 {
        self.fuel_per_call
            .saturating_add(self.fuel_per_sample.saturating_mul(items as u64))
    }

    /// The compile timeout as a [`Duration`].
    pub fn compile_timeout(&self) -> Duration {
        Duration::from_secs(self.compile_timeout_secs)
    }
}

/// Builds the one [`Engine`] a wagg process uses.
///
/// - component model on, everything else a module could import off (the
///   crate is built with `default-features = false`: no WASI, no threads, no
///   GC);
/// - fuel on: the CPU budget (see the module docs);
/// - no parallel compilation (the `parallel-compilation` feature is left
///   out): compiles run on one low-priority thread ([`Runtime::load`](super::Runtime::load)),
///   because on 2 cores a parallel compile raised a busy shard's worst call
///   from 0.2 ms to 4–8 ms;
/// - no Wasm backtraces: a trap is reported by kind, and capturing frames
///   costs time on the error path that a hostile module controls;
/// - a perf map only if `limits.perf_map` asks for one.
///
/// # Errors
///
/// Fails if wasmtime refuses the configuration for this CPU, or cannot
/// open the perf map.
pub fn new_engine(limits: &RuntimeLimits) -> Result<Engine, wasmtime::Error> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .wasm_backtrace_max_frames(None)
        .cranelift_opt_level(OptLevel::Speed);
    if limits.perf_map {
        config.profiler(ProfilingStrategy::PerfMap);
    }
    Engine::new(&config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Runtime, builtin};

    /// Lines of this process's perf map naming the aggregator's `put`.
    fn put_lines(map: &std::path::Path) -> usize {
        std::fs::read_to_string(map)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with("aggregator@0.1.0#put"))
            .count()
    }

    #[test]
    fn a_perf_map_names_guest_functions_compiled_or_from_the_cache() {
        let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", std::process::id()));
        let cache = tempfile::tempdir().unwrap();
        let hashmap = builtin("hashmap").unwrap();
        let limits = RuntimeLimits {
            perf_map: true,
            ..RuntimeLimits::default()
        };
        let before = put_lines(&map);

        Runtime::new(limits.clone(), Some(cache.path()))
            .unwrap()
            .load(hashmap)
            .unwrap();
        let compiled = put_lines(&map);
        assert!(compiled > before, "a compiled module is named");

        // The second runtime takes the artifact from the cache.
        Runtime::new(limits, Some(cache.path()))
            .unwrap()
            .load(hashmap)
            .unwrap();
        assert!(put_lines(&map) > compiled, "a cached module is named too");
        let _ = std::fs::remove_file(&map);
    }
}
