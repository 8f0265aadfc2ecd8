//! `wagg bench`: modules compared offline on a recording or a generated
//! workload, through the host's real decoder, router, dictionary and
//! runtime; no broker, no sink.
//!
//! # What is measured
//!
//! The workload's messages are decoded, routed (every rollup, one shard) and
//! interned once, up front: that gives the stream of samples as a shard sees
//! it, series ids ranked by first appearance, and the host's own cost per
//! sample. Then, for each size N of the table (1 … 100 000 live series),
//! every module gets a fresh instance and `rounds` rounds of:
//!
//! 1. **put**: the whole stream, its series folded onto N (the series of
//!    rank r becomes the series of rank r mod N, so the workload's skew is
//!    kept and exactly min(N, distinct series) are live), every sample in
//!    the round's bucket, in batches of `batch_size`. With several modules
//!    the batches are **interleaved**: module A's batch, module B's batch,
//!    …, on the same batches, so a noisy neighbour or a frequency change hits
//!    all modules alike.
//! 2. **stats**: live series, heap bytes, linear memory (and its peak).
//! 3. **flush** of the round's bucket, timed per module; every module's rows
//!    are compared with the first module's (sorted by series; count, sum,
//!    min and max bit for bit).
//!
//! ns/op is the total time over the total operations: samples for put,
//! flushed rows for flush.
//!
//! # Regressions against a baseline
//!
//! Every put batch (ns per sample) and every flush (ns per row) is one
//! observation; a result keeps, per module, size and operation, the count,
//! mean and variance of their natural logs. Against a baseline, the
//! log-ratio `d = mean_now − mean_base` gets a Welch t-interval at 95 %
//! (`d ± t · √(var_now/n_now + var_base/n_base)`, `t` for the smaller sample
//! minus one degree of freedom). A figure is a **regression** when the whole
//! interval lies above `ln(1 + noise)`, an **improvement** when it lies below
//! `−ln(1 + noise)`, and unchanged otherwise; `noise` (default 15 % on the
//! command line) covers what varies between runs on one machine and no
//! batch-level interval sees (frequency scaling, another build on the other
//! core): two runs of one binary on a 2-core VM differed by up to 11 %.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::TrafficError;
use super::progress::Progress;
use super::recording::{RecordingReader, Tail};
use crate::router::{KeyBatch, Router, RouterConfig};
use crate::runtime::{self, Aggregates, Batch, Instance, LoadedModule, Runtime, RuntimeLimits};
use crate::shard::Dictionary;
use crate::source::generator::{Generator, GeneratorConfig};
use crate::source::json::{Decoder, JsonDecoder};

/// The table's sizes: live series.
pub const DEFAULT_SIZES: [u64; 6] = [1, 10, 100, 1_000, 10_000, 100_000];
/// Version of the saved result format.
pub const RESULT_VERSION: u32 = 1;
/// Event time of the first round's bucket (any time the decoder's limits
/// accept would do).
const BASE_TIME: u64 = 1_764_000_000;

/// Where the samples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// The messages of a recording.
    Recording(PathBuf),
    /// `messages` messages of the generator.
    Generated {
        /// Shape of the traffic.
        config: GeneratorConfig,
        /// Messages to generate.
        messages: u64,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Modules: built-in names or `.wasm` paths. The first is the reference
    /// for ratios and for the aggregates check.
    pub modules: Vec<String>,
    /// The samples.
    pub workload: Workload,
    /// Live-series sizes of the table.
    pub sizes: Vec<u64>,
    /// Rounds (put the stream, flush) per size.
    pub rounds: u32,
    /// Samples per put.
    pub batch_size: usize,
    /// Rollups (its `shards` is ignored: the bench runs one shard).
    pub router: RouterConfig,
    /// Limits every instance gets.
    pub limits: RuntimeLimits,
    /// Bucket width the modules are configured with.
    pub bucket_seconds: u32,
    /// Most samples taken from the workload (bounds memory).
    pub max_samples: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            modules: vec!["hashmap".into()],
            workload: Workload::Generated {
                config: default_workload(),
                messages: 2_000,
            },
            sizes: DEFAULT_SIZES.to_vec(),
            rounds: 5,
            batch_size: 1024,
            router: RouterConfig::default(),
            limits: RuntimeLimits::default(),
            bucket_seconds: 60,
            max_samples: 1_000_000,
        }
    }
}

/// The generated workload's default shape: wide enough that 2 000 messages
/// hold more than 100 000 distinct series, skewed like the demo's traffic.
pub fn default_workload() -> GeneratorConfig {
    GeneratorConfig {
        customers: 20_000,
        zones_per_customer: 4,
        records_per_zone: 8,
        pops: 25,
        metrics_per_message: 100,
        zipf_exponent: 0.9,
        seed: 1,
        ..GeneratorConfig::default()
    }
}

/// Count, mean and variance of the natural logs of per-batch figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LogStats {
    /// Observations.
    pub n: u64,
    /// Mean of ln(ns/op).
    pub mean: f64,
    /// Sample variance of ln(ns/op).
    pub var: f64,
}

impl LogStats {
    fn of(values: &[f64]) -> Self {
        let logs: Vec<f64> = values
            .iter()
            .filter(|v| v.is_finite() && **v > 0.0)
            .map(|v| v.ln())
            .collect();
        let n = logs.len();
        if n == 0 {
            return LogStats::default();
        }
        let mean = logs.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        LogStats {
            n: n as u64,
            mean,
            var,
        }
    }
}

/// One operation's figures at one size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OpFigures {
    /// Operations: samples put, or rows flushed.
    pub ops: u64,
    /// Nanoseconds per operation (total time / operations).
    pub ns_per_op: f64,
    /// Per-batch (put) or per-flush observations, for baseline comparison.
    pub log: LogStats,
}

/// One row of a module's table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeFigures {
    /// Live series asked for.
    pub series: u64,
    /// Live series the module reported before its last flush.
    pub live_series: u64,
    /// `put`.
    pub put: OpFigures,
    /// `flush`.
    pub flush: OpFigures,
    /// Heap bytes the module reports holding, per live series.
    pub heap_bytes_per_series: f64,
    /// Linear memory, per live series.
    pub memory_bytes_per_series: f64,
    /// Largest linear memory the instance had.
    pub peak_memory_bytes: u64,
    /// Rows flushed in all.
    pub rows: u64,
    /// Flushed rows that differ from the first module's (0 for the first).
    pub mismatched_rows: u64,
    /// Why this size could not be measured (the module failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One module's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleFigures {
    /// The name it was given (built-in name or path).
    pub module: String,
    /// Its id (SHA-256 of the component).
    pub id: String,
    /// One row per size.
    pub sizes: Vec<SizeFigures>,
}

/// The workload as measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadFigures {
    /// What it was.
    pub source: String,
    /// Messages decoded.
    pub messages: u64,
    /// Messages that did not decode (skipped, as the host dead-letters them).
    pub undecodable: u64,
    /// Samples in the stream (metrics × rollups).
    pub samples: u64,
    /// Distinct series in the stream.
    pub distinct_series: u64,
    /// The host's decode + route + intern cost, ns per sample.
    pub host_ns_per_sample: f64,
    /// Samples per put.
    pub batch_size: usize,
    /// Rounds per size.
    pub rounds: u32,
    /// Bytes of a torn recording tail that were ignored.
    pub ignored_tail_bytes: u64,
}

/// A bench run's results: what `--json` prints and `--save` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// [`RESULT_VERSION`].
    pub version: u32,
    /// The workload.
    pub workload: WorkloadFigures,
    /// One table per module, in the order given.
    pub modules: Vec<ModuleFigures>,
}

/// The sample stream as a shard sees it.
struct Stream {
    /// Per sample: the rank of its series (order of first appearance).
    ranks: Vec<u32>,
    values: Vec<f64>,
    /// Dictionary id of each rank.
    ids: Vec<u64>,
}

/// Loads a module by built-in name or path.
///
/// # Errors
///
/// [`TrafficError::UnknownModule`] if `name` is neither a built-in nor a
/// readable file, [`TrafficError::ModuleRefused`] if the runtime refuses it.
pub fn load_module(runtime: &Runtime, name: &str) -> Result<Arc<LoadedModule>, TrafficError> {
    let bytes = match runtime::builtin(name) {
        Some(b) => b.to_vec(),
        None => std::fs::read(name).map_err(|e| TrafficError::UnknownModule {
            name: name.to_owned(),
            builtins: runtime::builtin_names().join(", "),
            reason: e.to_string(),
        })?,
    };
    runtime
        .load(&bytes)
        .map_err(|e| TrafficError::ModuleRefused {
            name: name.to_owned(),
            reason: e.to_string(),
        })
}

/// Runs the bench.
///
/// # Errors
///
/// [`TrafficError::Config`] for no module, no size or an empty workload;
/// module loading errors; [`TrafficError::Recording`] for a bad recording.
/// A module that fails *during* a size is not an error: its row carries
/// the error and the run goes on.
pub fn bench(opts: &BenchOptions, progress: &Progress) -> Result<BenchResult, TrafficError> {
    if opts.modules.is_empty() || opts.sizes.is_empty() || opts.rounds == 0 {
        return Err(TrafficError::Config(
            "bench needs at least one module, one size and one round".into(),
        ));
    }
    let runtime =
        Runtime::new(opts.limits.clone(), None).map_err(|e| TrafficError::ModuleRefused {
            name: "(engine)".into(),
            reason: e.to_string(),
        })?;
    let modules: Vec<Arc<LoadedModule>> = opts
        .modules
        .iter()
        .map(|m| load_module(&runtime, m))
        .collect::<Result<_, _>>()?;
    let (stream, mut workload) = prepare(opts)?;
    if stream.ranks.is_empty() {
        return Err(TrafficError::Config(
            "the workload holds no sample (an empty recording?)".into(),
        ));
    }
    workload.batch_size = opts.batch_size.max(1);
    workload.rounds = opts.rounds;
    tracing::info!(
        samples = workload.samples,
        series = workload.distinct_series,
        "Workload ready."
    );

    let mut tables: Vec<ModuleFigures> = opts
        .modules
        .iter()
        .zip(&modules)
        .map(|(name, m)| ModuleFigures {
            module: name.clone(),
            id: m.id().to_owned(),
            sizes: Vec::new(),
        })
        .collect();
    for (i, &size) in opts.sizes.iter().enumerate() {
        let rows = run_size(opts, &runtime, &modules, &stream, size, progress, |r| {
            progress.update(
                i as u64 * u64::from(opts.rounds) + r,
                &format!("{size} series, round {}/{}", r + 1, opts.rounds),
            );
        });
        for (table, row) in tables.iter_mut().zip(rows) {
            table.sizes.push(row);
        }
        progress.update((i as u64 + 1) * u64::from(opts.rounds), "");
    }
    Ok(BenchResult {
        version: RESULT_VERSION,
        workload,
        modules: tables,
    })
}

/// Decodes, routes and interns the workload.
fn prepare(opts: &BenchOptions) -> Result<(Stream, WorkloadFigures), TrafficError> {
    let mut router_cfg = opts.router.clone();
    router_cfg.shards = 1;
    router_cfg
        .validate()
        .map_err(|e| TrafficError::Config(e.to_string()))?;
    let router = Router::new(Arc::new(router_cfg));
    let decoder = JsonDecoder::default();
    let mut dict = Dictionary::new();
    let mut rank_of: HashMap<u64, u32> = HashMap::new();
    let mut stream = Stream {
        ranks: Vec::new(),
        values: Vec::new(),
        ids: Vec::new(),
    };
    let mut figures = WorkloadFigures::default();
    let mut batches = vec![KeyBatch::with_capacity(4096)];
    let mut host_nanos = 0u128;
    let mut interned: Vec<(u64, f64)> = Vec::with_capacity(4096);
    let width = u64::from(opts.bucket_seconds.max(1));
    // Takes one message; returns whether the stream is full.
    let mut take = |body: &[u8], figures: &mut WorkloadFigures| -> bool {
        let started = Instant::now();
        let Ok(msg) = decoder.decode(body) else {
            figures.undecodable += 1;
            return stream.ranks.len() >= opts.max_samples;
        };
        figures.messages += 1;
        batches[0].clear();
        router.route(&msg, &mut batches);
        let batch = &batches[0];
        let room = opts.max_samples.saturating_sub(stream.ranks.len());
        interned.clear();
        // As a shard interns (the bucket width only matters for forgetting,
        // which this dictionary never does).
        let samples = &batch.samples()[..room.min(batch.len())];
        dict.intern_batch(batch, samples, width, |id, s| interned.push((id, s.value)));
        // Only decode, route and intern are the host's cost; the ranking
        // below is the bench's own bookkeeping.
        host_nanos += started.elapsed().as_nanos();
        for &(id, value) in &interned {
            let next = stream.ids.len() as u32;
            let rank = *rank_of.entry(id).or_insert_with(|| {
                stream.ids.push(id);
                next
            });
            stream.ranks.push(rank);
            stream.values.push(value);
        }
        stream.ranks.len() >= opts.max_samples
    };
    match &opts.workload {
        Workload::Recording(path) => {
            figures.source = format!("recording {}", path.display());
            let mut reader = RecordingReader::open(path)?;
            while let Some(record) = reader.next_record()? {
                if take(&record.body, &mut figures) {
                    break;
                }
            }
            if let Some(Tail { dropped_bytes, .. }) = reader.tail() {
                figures.ignored_tail_bytes = dropped_bytes;
            }
        }
        Workload::Generated { config, messages } => {
            figures.source = format!(
                "generated: {messages} messages, {} customers, zipf {}, seed {}",
                config.customers, config.zipf_exponent, config.seed
            );
            let mut generator = Generator::new(config.clone(), opts.bucket_seconds)
                .map_err(TrafficError::Config)?;
            for i in 0..*messages {
                let body = generator.message(BASE_TIME + i);
                if take(&body, &mut figures) {
                    break;
                }
            }
        }
    }
    figures.samples = stream.ranks.len() as u64;
    figures.distinct_series = stream.ids.len() as u64;
    figures.host_ns_per_sample = host_nanos as f64 / figures.samples.max(1) as f64;
    Ok((stream, figures))
}

/// Per-module accumulators of one size.
#[derive(Default)]
struct Acc {
    put_ns: u128,
    put_ops: u64,
    put_obs: Vec<f64>,
    flush_ns: u128,
    flush_ops: u64,
    flush_obs: Vec<f64>,
    live: u64,
    heap: u64,
    memory: u64,
    peak: u64,
    rows: u64,
    mismatched: u64,
    error: Option<String>,
}

fn run_size(
    opts: &BenchOptions,
    runtime: &Runtime,
    modules: &[Arc<LoadedModule>],
    stream: &Stream,
    size: u64,
    progress: &Progress,
    on_round: impl Fn(u64),
) -> Vec<SizeFigures> {
    let live = size.clamp(1, stream.ids.len() as u64);
    let known: HashSet<u64> = stream.ids[..live as usize].iter().copied().collect();
    let width = u64::from(opts.bucket_seconds.max(1));
    let mut accs: Vec<Acc> = modules.iter().map(|_| Acc::default()).collect();
    let mut instances: Vec<Option<Instance>> = modules
        .iter()
        .zip(accs.iter_mut())
        .map(|(m, acc)| {
            runtime
                .instantiate(m, opts.bucket_seconds, &[])
                .map_err(|e| acc.error = Some(format!("instantiate: {e}")))
                .ok()
        })
        .collect();
    let batch_size = opts.batch_size.max(1);
    let mut batches: Vec<Batch> = Vec::new();
    for round in 0..u64::from(opts.rounds) {
        on_round(round);
        let bucket = BASE_TIME - BASE_TIME % width + round * width;
        // The round's batches, built once and put into every module.
        batches.clear();
        for chunk in stream
            .ranks
            .chunks(batch_size)
            .zip(stream.values.chunks(batch_size))
        {
            let mut b = Batch::with_capacity(chunk.0.len());
            for (rank, value) in chunk.0.iter().zip(chunk.1) {
                let id = stream.ids[(u64::from(*rank) % live) as usize];
                b.push(id, bucket, *value);
            }
            batches.push(b);
        }
        for batch in &batches {
            for (inst, acc) in instances.iter_mut().zip(accs.iter_mut()) {
                let Some(i) = inst else { continue };
                let started = Instant::now();
                let result = i.put(batch);
                let ns = started.elapsed().as_nanos();
                match result {
                    Ok(_) => {
                        acc.put_ns += ns;
                        acc.put_ops += batch.len() as u64;
                        acc.put_obs.push(ns as f64 / batch.len() as f64);
                    }
                    Err(e) => {
                        acc.error = Some(format!("put: {e}"));
                        *inst = None;
                    }
                }
            }
        }
        let mut reference: Option<Vec<Row>> = None;
        for (k, (inst, acc)) in instances.iter_mut().zip(accs.iter_mut()).enumerate() {
            let Some(i) = inst else { continue };
            match i.stats() {
                Ok(s) => {
                    acc.live = s.live_series;
                    acc.heap = s.heap_bytes;
                    acc.memory = s.memory_bytes;
                    acc.peak = acc.peak.max(s.memory_peak_bytes);
                }
                Err(e) => {
                    acc.error = Some(format!("stats: {e}"));
                    *inst = None;
                    continue;
                }
            }
            let started = Instant::now();
            let result = i.flush(bucket + width, &|id| known.contains(&id));
            let ns = started.elapsed().as_nanos();
            match result {
                Ok(aggs) => {
                    let n = aggs.len() as u64;
                    acc.flush_ns += ns;
                    acc.flush_ops += n;
                    acc.rows += n;
                    if n > 0 {
                        acc.flush_obs.push(ns as f64 / n as f64);
                    }
                    let rows = sorted_rows(&aggs);
                    if k == 0 {
                        reference = Some(rows);
                    } else if let Some(reference) = &reference {
                        acc.mismatched += mismatches(reference, &rows);
                    }
                }
                Err(e) => {
                    acc.error = Some(format!("flush: {e}"));
                    *inst = None;
                }
            }
        }
    }
    for (m, acc) in modules.iter().zip(&accs) {
        if let Some(e) = &acc.error {
            progress.println(&format!("module {} at {size} series: {e}", m.id()));
        }
    }
    accs.into_iter()
        .map(|a| {
            let per = |bytes: u64| bytes as f64 / a.live.max(1) as f64;
            SizeFigures {
                series: size,
                live_series: a.live,
                put: OpFigures {
                    ops: a.put_ops,
                    ns_per_op: a.put_ns as f64 / a.put_ops.max(1) as f64,
                    log: LogStats::of(&a.put_obs),
                },
                flush: OpFigures {
                    ops: a.flush_ops,
                    ns_per_op: a.flush_ns as f64 / a.flush_ops.max(1) as f64,
                    log: LogStats::of(&a.flush_obs),
                },
                heap_bytes_per_series: per(a.heap),
                memory_bytes_per_series: per(a.memory),
                peak_memory_bytes: a.peak,
                rows: a.rows,
                mismatched_rows: a.mismatched,
                error: a.error,
            }
        })
        .collect()
}

/// A flushed row: series, bucket, count, and the bits of sum, min, max.
type Row = (u64, u64, u64, u64, u64, u64);

fn sorted_rows(aggs: &Aggregates) -> Vec<Row> {
    let mut rows: Vec<Row> = (0..aggs.len())
        .map(|i| {
            (
                aggs.series[i],
                aggs.bucket_start[i],
                aggs.count[i],
                aggs.sum[i].to_bits(),
                aggs.min[i].to_bits(),
                aggs.max[i].to_bits(),
            )
        })
        .collect();
    rows.sort_unstable();
    rows
}

/// Rows of `b` not in `a` plus rows of `a` not in `b` (both sorted).
fn mismatches(a: &[Row], b: &[Row]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => {
                n += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                n += 1;
                j += 1;
            }
        }
    }
    n + (a.len() - i) as u64 + (b.len() - j) as u64
}

fn human_bytes(b: f64) -> String {
    if b >= f64::from(1 << 20) {
        format!("{:.1} MiB", b / f64::from(1 << 20))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// The talk's table, one per module, with ratios to the first module.
pub fn render(result: &BenchResult) -> String {
    use std::fmt::Write as _;
    let w = &result.workload;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workload: {}\n  {} messages ({} undecodable), {} samples, {} distinct series; host decode+route+intern {:.1} ns/sample; batches of {}, {} rounds per size",
        w.source,
        w.messages,
        w.undecodable,
        w.samples,
        w.distinct_series,
        w.host_ns_per_sample,
        w.batch_size,
        w.rounds
    );
    if w.ignored_tail_bytes > 0 {
        let _ = writeln!(
            out,
            "  (ignored a torn tail of {} bytes in the recording)",
            w.ignored_tail_bytes
        );
    }
    let first = result.modules.first();
    for m in &result.modules {
        let _ = writeln!(
            out,
            "\nmodule {} ({})",
            m.module,
            &m.id[..m.id.len().min(12)]
        );
        let compare = first.filter(|f| !std::ptr::eq(*f, m));
        let _ = write!(
            out,
            "{:>8} {:>8} | {:>11} {:>9} | {:>9} {:>8} | {:>9} {:>9} | {:>10}",
            "series",
            "live",
            "put ops",
            "ns/sample",
            "flush ops",
            "ns/row",
            "heap/ser",
            "mem/ser",
            "peak mem"
        );
        if let Some(f) = compare {
            let _ = write!(
                out,
                " | {:>10} {:>9} {:>6}",
                format!("put/{}", f.module),
                "flush",
                "diff"
            );
        }
        out.push('\n');
        for (k, s) in m.sizes.iter().enumerate() {
            if let Some(e) = &s.error
                && s.put.ops == 0
            {
                let _ = writeln!(out, "{:>8} failed: {e}", s.series);
                continue;
            }
            let _ = write!(
                out,
                "{:>8} {:>8} | {:>11} {:>9.1} | {:>9} {:>8.1} | {:>9} {:>9} | {:>10}",
                s.series,
                s.live_series,
                s.put.ops,
                s.put.ns_per_op,
                s.flush.ops,
                s.flush.ns_per_op,
                human_bytes(s.heap_bytes_per_series),
                human_bytes(s.memory_bytes_per_series),
                human_bytes(s.peak_memory_bytes as f64)
            );
            if let Some(f) = compare
                && let Some(r) = f.sizes.get(k)
            {
                let _ = write!(
                    out,
                    " | {:>9.2}x {:>8.2}x {:>6}",
                    s.put.ns_per_op / r.put.ns_per_op,
                    s.flush.ns_per_op / r.flush.ns_per_op,
                    s.mismatched_rows
                );
            }
            if let Some(e) = &s.error {
                let _ = write!(out, "  (failed later: {e})");
            }
            out.push('\n');
        }
    }
    out
}

/// A figure's verdict against a baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Slower beyond noise.
    Regression,
    /// Faster beyond noise.
    Improvement,
    /// Within noise, or too few observations to tell.
    Unchanged,
}

/// One comparison of a figure with its baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Module name.
    pub module: String,
    /// Live-series size.
    pub series: u64,
    /// `put` or `flush`.
    pub op: &'static str,
    /// Geometric-mean ratio now / baseline.
    pub ratio: f64,
    /// 95 % interval of the ratio.
    pub low: f64,
    /// 95 % interval of the ratio.
    pub high: f64,
    /// What it means.
    pub verdict: Verdict,
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
fn t95(df: u64) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => T[df as usize - 1],
        31..=120 => 2.0,
        _ => 1.96,
    }
}

/// Compares `now` with `base` by the rule in the module docs; `noise` is
/// the relative change below which nothing is flagged (0.10 = 10 %).
/// Modules are matched by name, sizes by series.
pub fn compare(now: &BenchResult, base: &BenchResult, noise: f64) -> Vec<Comparison> {
    let band = (1.0 + noise.max(0.0)).ln();
    let mut out = Vec::new();
    for m in &now.modules {
        let Some(b) = base.modules.iter().find(|b| b.module == m.module) else {
            continue;
        };
        for s in &m.sizes {
            let Some(bs) = b.sizes.iter().find(|x| x.series == s.series) else {
                continue;
            };
            for (op, x, y) in [
                ("put", &s.put.log, &bs.put.log),
                ("flush", &s.flush.log, &bs.flush.log),
            ] {
                if x.n == 0 || y.n == 0 {
                    continue;
                }
                let d = x.mean - y.mean;
                let se = (x.var / x.n as f64 + y.var / y.n as f64).sqrt();
                let half = t95(x.n.min(y.n).saturating_sub(1)) * se;
                let (lo, hi) = (d - half, d + half);
                let verdict = if lo > band {
                    Verdict::Regression
                } else if hi < -band {
                    Verdict::Improvement
                } else {
                    Verdict::Unchanged
                };
                out.push(Comparison {
                    module: m.module.clone(),
                    series: s.series,
                    op,
                    ratio: d.exp(),
                    low: lo.exp(),
                    high: hi.exp(),
                    verdict,
                });
            }
        }
    }
    out
}

/// The comparison as text, regressions marked.
pub fn render_comparison(comparisons: &[Comparison], noise: f64) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "\nagainst the baseline (95 % interval of the ratio; flagged beyond ±{:.0} % noise):\n",
        noise * 100.0
    );
    for c in comparisons {
        let mark = match c.verdict {
            Verdict::Regression => "REGRESSION",
            Verdict::Improvement => "improvement",
            Verdict::Unchanged => "",
        };
        let _ = writeln!(
            out,
            "  {:<12} {:>8} {:<5} {:>6.3}x [{:.3}, {:.3}] {mark}",
            c.module, c.series, c.op, c.ratio, c.low, c.high
        );
    }
    out
}

/// Reads a saved result.
///
/// # Errors
///
/// [`TrafficError::Io`], or [`TrafficError::BadBaseline`] if it is not a
/// result of this version.
pub fn load_result(path: &Path) -> Result<BenchResult, TrafficError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrafficError::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    let result: BenchResult =
        serde_json::from_str(&text).map_err(|e| TrafficError::BadBaseline {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if result.version != RESULT_VERSION {
        return Err(TrafficError::BadBaseline {
            path: path.to_path_buf(),
            reason: format!(
                "result format version {}, this wagg writes {RESULT_VERSION}",
                result.version
            ),
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BenchOptions {
        BenchOptions {
            modules: vec!["hashmap".into(), "btree".into()],
            workload: Workload::Generated {
                config: GeneratorConfig {
                    customers: 50,
                    metrics_per_message: 20,
                    ..GeneratorConfig::default()
                },
                messages: 30,
            },
            sizes: vec![1, 10, 100],
            rounds: 2,
            batch_size: 256,
            ..BenchOptions::default()
        }
    }

    #[test]
    fn hashmap_and_btree_agree_and_figures_are_finite() {
        let result = bench(&small(), &Progress::hidden()).unwrap();
        assert_eq!(result.workload.samples, 30 * 20 * 3);
        assert_eq!(result.modules.len(), 2);
        for m in &result.modules {
            for s in &m.sizes {
                assert_eq!(s.error, None, "{}", m.module);
                assert_eq!(s.mismatched_rows, 0, "{} at {}", m.module, s.series);
                assert_eq!(s.live_series, s.series, "{}", m.module);
                assert_eq!(s.put.ops, 2 * 1800);
                assert_eq!(s.rows, 2 * s.series);
                for v in [
                    s.put.ns_per_op,
                    s.flush.ns_per_op,
                    s.memory_bytes_per_series,
                ] {
                    assert!(
                        v.is_finite() && v > 0.0,
                        "{} at {}: {v}",
                        m.module,
                        s.series
                    );
                }
            }
        }
        let text = render(&result);
        assert!(text.contains("module btree"), "{text}");
        // A run compared with itself is unchanged everywhere.
        let same = compare(&result, &result, 0.1);
        assert!(!same.is_empty());
        assert!(same.iter().all(|c| c.verdict == Verdict::Unchanged));
    }

    #[test]
    fn the_workload_stops_at_max_samples_within_a_message() {
        // 60 samples a message: the cap falls inside the 17th.
        let opts = BenchOptions {
            max_samples: 1000,
            sizes: vec![10],
            ..small()
        };
        let result = bench(&opts, &Progress::hidden()).unwrap();
        assert_eq!(result.workload.samples, 1000);
        assert_eq!(result.modules[0].sizes[0].error, None);
    }

    #[test]
    fn a_clear_slowdown_is_a_regression_and_noise_is_not() {
        let obs = |scale: f64, n: usize| {
            LogStats::of(
                &(0..n)
                    .map(|i| scale * (1.0 + 0.05 * ((i % 7) as f64 - 3.0) / 3.0))
                    .collect::<Vec<_>>(),
            )
        };
        let result = |scale: f64| BenchResult {
            version: RESULT_VERSION,
            workload: WorkloadFigures::default(),
            modules: vec![ModuleFigures {
                module: "m".into(),
                id: "x".into(),
                sizes: vec![SizeFigures {
                    series: 10,
                    put: OpFigures {
                        ops: 1,
                        ns_per_op: scale,
                        log: obs(scale, 200),
                    },
                    ..SizeFigures::default()
                }],
            }],
        };
        let base = result(30.0);
        let verdict = |now: f64| compare(&result(now), &base, 0.1)[0].verdict;
        assert_eq!(verdict(45.0), Verdict::Regression);
        assert_eq!(verdict(31.0), Verdict::Unchanged);
        assert_eq!(verdict(20.0), Verdict::Improvement);
    }

    #[test]
    fn an_unknown_module_is_named_with_the_builtins() {
        let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
        let err = load_module(&rt, "no-such-module").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no-such-module") && text.contains("hashmap"),
            "{text}"
        );
    }
}
