//! One running module instance: a store with its own limits, and typed calls.

use std::sync::Arc;

use wasmtime::{ResourceLimiter, Store, Trap};

use super::bindings::{Aggregates, Module};
use super::engine::{MAX_BATCH, RuntimeLimits};
use super::error::InstanceError;
use super::module::LoadedModule;
use super::output::{self, OutputRules};

/// A batch of samples in the columns the WIT's `put` takes. Built by
/// pushing, so its columns always have equal length.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    series: Vec<u64>,
    timestamps: Vec<u64>,
    values: Vec<f64>,
}

impl Batch {
    /// An empty batch with room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Batch {
            series: Vec::with_capacity(n),
            timestamps: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
        }
    }

    /// Appends one sample.
    #[inline]
    pub fn push(&mut self, series: u64, timestamp: u64, value: f64) {
        self.series.push(series);
        self.timestamps.push(timestamp);
        self.values.push(value);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Removes every sample, keeping the allocation.
    pub fn clear(&mut self) {
        self.series.clear();
        self.timestamps.clear();
        self.values.clear();
    }

    /// The three columns.
    pub fn columns(&self) -> (&[u64], &[u64], &[f64]) {
        (&self.series, &self.timestamps, &self.values)
    }
}

/// What a module reports about itself plus what the host measures of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModuleStats {
    /// Series with an open bucket, as the module reports it.
    pub live_series: u64,
    /// Open (series, bucket) rows, as the module reports it.
    pub live_buckets: u64,
    /// Heap bytes the module's allocator holds, as the module reports it.
    pub heap_bytes: u64,
    /// Size of the instance's linear memory now, measured by the host.
    pub memory_bytes: u64,
    /// Largest size the linear memory has had, measured by the host.
    pub memory_peak_bytes: u64,
}

/// Store data: only the limiter. Modules import nothing, so the host keeps
/// no other state a guest could reach.
#[derive(Debug)]
pub struct HostState {
    limiter: Limiter,
}

/// Caps linear memory and remembers how large it got, and whether (and how
/// far) the module tried to go beyond the cap.
#[derive(Debug)]
struct Limiter {
    limit: usize,
    current: usize,
    peak: usize,
    denied: Option<usize>,
}

/// Most table elements a module may have: aggregation code needs a handful
/// of function-pointer tables, never millions.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = Some(desired);
            // An error (not `Ok(false)`) traps at once: the guest's allocator
            // never sees a failed grow it might handle badly.
            return Err(wasmtime::format_err!(
                "memory limit of {} bytes",
                self.limit
            ));
        }
        self.current = desired;
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// An export whose ids are checked and whose rows are not yet
/// ([`Instance::export_ids_checked`]). The rows can only be had through
/// [`Export::check`].
#[derive(Debug)]
#[must_use]
pub struct Export {
    aggs: Aggregates,
    rules: OutputRules,
}

impl Export {
    /// Rows exported.
    pub fn len(&self) -> usize {
        self.aggs.len()
    }

    /// Whether nothing was exported.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finishes the output check ([`output::check_rows`]).
    ///
    /// # Errors
    ///
    /// [`InstanceError::BadOutput`] naming the first bad row: the exporting
    /// module's fault.
    pub fn check(self) -> Result<Aggregates, InstanceError> {
        output::check_rows("export-state", &self.aggs, &self.rules)?;
        Ok(self.aggs)
    }
}

/// A module instance with its own store, memory limit and fuel.
///
/// Each call gets a fresh CPU budget sized to its input. The first call that
/// fails poisons the instance: wasmtime refuses to re-enter a component
/// instance after a trap, and a module that misbehaved once is not trusted
/// with the next batch either.
pub struct Instance {
    store: Store<HostState>,
    bindings: Module,
    module: Arc<LoadedModule>,
    limits: RuntimeLimits,
    bucket_seconds: u64,
    poisoned: Option<InstanceError>,
    last_fuel: u64,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("module", &self.module.id())
            .field("bucket_seconds", &self.bucket_seconds)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Instantiates `module` in a fresh store and configures it.
    ///
    /// # Errors
    ///
    /// Any [`InstanceError`]: a trap or exhausted limit while starting, or
    /// the module's own refusal of `bucket_seconds` or `options`.
    pub fn new(
        module: Arc<LoadedModule>,
        limits: &RuntimeLimits,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<Self, InstanceError> {
        let limiter = Limiter {
            limit: usize::try_from(limits.memory_limit_bytes).unwrap_or(usize::MAX),
            current: 0,
            peak: 0,
            denied: None,
        };
        let mut store = Store::new(module.engine(), HostState { limiter });
        store.limiter(|state| &mut state.limiter);
        let fuel = limits.fuel_for(0);
        set_fuel(&mut store, fuel);
        let bindings = match module.pre().instantiate(&mut store) {
            Ok(bindings) => bindings,
            Err(err) => return Err(classify(&mut store, "instantiate", fuel, err)),
        };
        let mut instance = Instance {
            store,
            bindings,
            module,
            limits: limits.clone(),
            bucket_seconds: u64::from(bucket_seconds),
            poisoned: None,
            last_fuel: 0,
        };
        let result = instance.call("configure", 0, |b, s| {
            b.wagg_aggregator_aggregator()
                .call_configure(s, bucket_seconds, options)
        })?;
        if let Err(message) = result {
            return Err(instance.poison(InstanceError::Refused {
                call: "configure",
                message,
            }));
        }
        Ok(instance)
    }

    /// The module this instance runs.
    pub fn module(&self) -> &Arc<LoadedModule> {
        &self.module
    }

    /// Bucket width this instance was configured with, in seconds.
    pub fn bucket_seconds(&self) -> u64 {
        self.bucket_seconds
    }

    /// Fuel the last successful call used.
    pub fn last_fuel(&self) -> u64 {
        self.last_fuel
    }

    /// Whether an earlier call failed (the instance is then never entered).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Puts a batch, in chunks of at most [`MAX_BATCH`] samples. Returns the
    /// number of samples the module skipped as non-finite.
    ///
    /// # Errors
    ///
    /// Any [`InstanceError`]; the instance is poisoned afterwards.
    pub fn put(&mut self, batch: &Batch) -> Result<u32, InstanceError> {
        let (series, timestamps, values) = batch.columns();
        let mut skipped = 0u32;
        let mut fuel = 0;
        for start in (0..series.len()).step_by(MAX_BATCH) {
            let end = (start + MAX_BATCH).min(series.len());
            let (s, t, v) = (
                &series[start..end],
                &timestamps[start..end],
                &values[start..end],
            );
            let n = self.call("put", end - start, |b, st| {
                b.wagg_aggregator_aggregator().call_put(st, s, t, v)
            })?;
            fuel += self.last_fuel;
            if n as usize > end - start {
                return Err(self.poison(InstanceError::BadOutput {
                    call: "put",
                    reason: format!("skipped {n} of {} samples", end - start),
                }));
            }
            skipped += n;
        }
        self.last_fuel = fuel;
        Ok(skipped)
    }

    /// Flushes every bucket that ends at or before `watermark`. `known` says
    /// whether a series id is one the host gave this module; rows are checked
    /// (see [`output::check`]) before they are returned.
    ///
    /// # Errors
    ///
    /// Any [`InstanceError`]; the instance is poisoned afterwards.
    pub fn flush(
        &mut self,
        watermark: u64,
        known: &dyn Fn(u64) -> bool,
    ) -> Result<Aggregates, InstanceError> {
        let rows = self.open_rows_bound()?;
        let aggs = self.call("flush", rows, |b, s| {
            b.wagg_aggregator_aggregator().call_flush(s, watermark)
        })?;
        let rules = OutputRules {
            bucket_seconds: self.bucket_seconds,
            max_rows: self.limits.max_output_rows,
            watermark: Some(watermark),
        };
        self.checked("flush", aggs, &rules, known)
    }

    /// Exports every open bucket's partial aggregate without removing it.
    ///
    /// # Errors
    ///
    /// Any [`InstanceError`]; the instance is poisoned afterwards.
    pub fn export_state(
        &mut self,
        known: &dyn Fn(u64) -> bool,
    ) -> Result<Aggregates, InstanceError> {
        let export = self.export_ids_checked(known)?;
        export.check().map_err(|err| self.poison(err))
    }

    /// Exports every open bucket, like [`Instance::export_state`], but
    /// checks only what needs `known` here; [`Export::check`] does the
    /// rest, without the instance, on whatever thread will use the rows.
    ///
    /// # Errors
    ///
    /// Any [`InstanceError`]; the instance is poisoned afterwards.
    pub fn export_ids_checked(
        &mut self,
        known: &dyn Fn(u64) -> bool,
    ) -> Result<Export, InstanceError> {
        let rows = self.open_rows_bound()?;
        let aggs = self.call("export-state", rows, |b, s| {
            b.wagg_aggregator_aggregator().call_export_state(s)
        })?;
        let rules = OutputRules {
            bucket_seconds: self.bucket_seconds,
            max_rows: self.limits.max_output_rows,
            watermark: None,
        };
        match output::check_ids("export-state", &aggs, &rules, known) {
            Ok(()) => Ok(Export { aggs, rules }),
            Err(err) => Err(self.poison(err)),
        }
    }

    /// Merges partial aggregates (another instance's export) into this one.
    ///
    /// # Errors
    ///
    /// [`InstanceError::Refused`] if the module refuses the rows, or any
    /// other [`InstanceError`]; the instance is poisoned afterwards.
    pub fn merge(&mut self, state: &Aggregates) -> Result<(), InstanceError> {
        let result = self.call("merge", state.len(), |b, s| {
            b.wagg_aggregator_aggregator().call_merge(s, state)
        })?;
        result.map_err(|message| {
            self.poison(InstanceError::Refused {
                call: "merge",
                message,
            })
        })
    }

    /// The module's own counts plus the host's view of its memory.
    ///
    /// # Errors
    ///
    /// Any [`InstanceError`]; the instance is poisoned afterwards.
    pub fn stats(&mut self) -> Result<ModuleStats, InstanceError> {
        let stats = self.call("stats", 0, |b, s| {
            b.wagg_aggregator_aggregator().call_stats(s)
        })?;
        let limiter = &self.store.data().limiter;
        Ok(ModuleStats {
            live_series: stats.live_series,
            live_buckets: stats.live_buckets,
            heap_bytes: stats.heap_bytes,
            memory_bytes: limiter.current as u64,
            memory_peak_bytes: limiter.peak as u64,
        })
    }

    /// Linear memory size now and its high-water mark, without entering the
    /// module.
    pub fn memory(&self) -> (u64, u64) {
        let limiter = &self.store.data().limiter;
        (limiter.current as u64, limiter.peak as u64)
    }

    /// Rows a `flush` or `export-state` may have to walk, for its fuel. The
    /// module's own count is believed only up to the output cap: a module
    /// that overstates it cannot buy itself an unbounded budget.
    fn open_rows_bound(&mut self) -> Result<usize, InstanceError> {
        let stats = self.call("stats", 0, |b, s| {
            b.wagg_aggregator_aggregator().call_stats(s)
        })?;
        Ok(usize::try_from(stats.live_buckets)
            .unwrap_or(usize::MAX)
            .min(self.limits.max_output_rows))
    }

    fn checked(
        &mut self,
        call: &'static str,
        aggs: Aggregates,
        rules: &OutputRules,
        known: &dyn Fn(u64) -> bool,
    ) -> Result<Aggregates, InstanceError> {
        match output::check(call, &aggs, rules, known) {
            Ok(()) => Ok(aggs),
            Err(err) => Err(self.poison(err)),
        }
    }

    /// Runs one export with a fresh fuel budget for `items` samples or rows,
    /// and turns any failure into a typed error that poisons the instance.
    fn call<R>(
        &mut self,
        name: &'static str,
        items: usize,
        f: impl FnOnce(&Module, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, InstanceError> {
        if let Some(err) = &self.poisoned {
            return Err(InstanceError::Poisoned(err.to_string()));
        }
        let fuel = self.limits.fuel_for(items);
        set_fuel(&mut self.store, fuel);
        match f(&self.bindings, &mut self.store) {
            Ok(r) => {
                self.last_fuel = fuel.saturating_sub(self.store.get_fuel().unwrap_or(0));
                Ok(r)
            }
            Err(err) => {
                let err = classify(&mut self.store, name, fuel, err);
                Err(self.poison(err))
            }
        }
    }

    fn poison(&mut self, err: InstanceError) -> InstanceError {
        self.poisoned = Some(err.clone());
        err
    }
}

fn set_fuel(store: &mut Store<HostState>, fuel: u64) {
    // Fuel is enabled on every engine wagg builds (engine.rs), so this
    // cannot fail; if it ever did, the call would trap on its first
    // instruction and be reported as such.
    let _ = store.set_fuel(fuel);
}

/// Names what went wrong in a failed call: the limiter's record wins over
/// the trap it caused, fuel exhaustion is a CPU-budget error, everything else
/// (a trap, or an error lifting the module's results) is reported as it is.
fn classify(
    store: &mut Store<HostState>,
    call: &'static str,
    fuel: u64,
    err: wasmtime::Error,
) -> InstanceError {
    let limiter = &mut store.data_mut().limiter;
    if let Some(requested) = limiter.denied.take() {
        return InstanceError::MemoryLimit {
            call,
            limit: limiter.limit as u64,
            requested: requested as u64,
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => InstanceError::CpuBudget { call, fuel },
        Some(trap) => InstanceError::Trap {
            call,
            trap: trap.to_string(),
        },
        // Not a trap: wasmtime refused what the module returned (a list
        // outside its memory, invalid UTF-8, ...).
        None => InstanceError::BadOutput {
            call,
            reason: format!("{err:#}"),
        },
    }
}
