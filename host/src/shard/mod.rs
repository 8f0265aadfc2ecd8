//! Shards: each owns a module instance and a series dictionary, on a thread
//! of its own.
//!
//! A shard turns keyed samples into id batches for its module, flushes
//! complete buckets to the [`Outbox`] as points, and snapshots its open
//! buckets for checkpoints. When its module fails (a trap, an exhausted
//! limit, bad output), the shard rebuilds the module's state from the last
//! snapshot (read back from the checkpoint on disk once it is written
//! there, see [`Command::Checkpointed`]) plus a log of what it did since,
//! and carries on; a module that
//! fails again on the same data is replaced by the fallback module (the
//! built-in hashmap). One shard's failure never stops another.
//!
//! A hot swap to another module builds the new instance on a thread of its
//! own while the old module keeps consuming, then replays into it what the
//! old one did meanwhile: the shard stands still only for the export and
//! that replay.

pub mod dictionary;
pub mod outbox;
pub mod shadow;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use dictionary::Dictionary;
pub use outbox::Outbox;
pub use shadow::{Difference, ShadowReport};

use shadow::Shadow;

use crate::router::{KeyBatch, RouterConfig, SeriesKey, SharedKey};
use crate::runtime::{
    Aggregates, Batch, Export, Instance, InstanceError, LoadedModule, ModuleStats, Runtime,
};
use crate::sink::{KeyLayout, Point, TOUCH_RUN, touch_key};
use crate::telemetry::{
    BatchPut, Metrics, ModuleFailed, ModuleFlushed, PointsFlushed, Recovery, ShardHalted,
    ShardQueueDepth, ShardSwapped, StateReadBack, SwapFailed,
};

/// One open bucket of one series, by key: the form of a shard's state in a
/// checkpoint, independent of ids and of the module that held it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRow {
    /// Series key: raw bytes in the binary checkpoint, hex in JSON. Shared
    /// with the shard's dictionary while the series is live.
    #[serde(with = "key_bytes")]
    pub key: SharedKey,
    /// Bucket start, seconds.
    pub bucket: u64,
    /// Samples aggregated.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// A series key as raw bytes where the format is binary, as hex where it is
/// text (JSON): keys are not always UTF-8.
mod key_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(key: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(key))
        } else {
            s.serialize_bytes(key)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<crate::router::SharedKey, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = crate::router::SharedKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a series key (bytes, or hex)")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
                let bytes =
                    hex::decode(v).map_err(|e| E::custom(format!("series key is not hex: {e}")))?;
                self.visit_bytes(&bytes)
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                crate::router::SharedKey::try_new(v)
                    .ok_or_else(|| E::custom(format!("a series key of {} bytes", v.len())))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(Key)
        } else {
            d.deserialize_bytes(Key)
        }
    }
}

/// What a shard is told to do, in order.
#[derive(Debug)]
pub enum Command {
    /// Aggregate these samples.
    Put(KeyBatch),
    /// Flush every bucket that ends at or before this watermark.
    Flush(u64),
    /// Reply with every open bucket (for a checkpoint).
    Snapshot(oneshot::Sender<Arc<Vec<StateRow>>>),
    /// Reply with the module's stats.
    Stats(oneshot::Sender<ShardStats>),
    /// Start (`Some`) or stop (`None`) a shadow module beside the incumbent.
    Shadow {
        /// The module to shadow with.
        to: Option<Assignment>,
        /// Whether it started.
        reply: oneshot::Sender<Result<(), InstanceError>>,
    },
    /// Reply with the shadow's report, if a shadow ran since the last start.
    ShadowReport(oneshot::Sender<Option<ShadowReport>>),
    /// Move the shard's open buckets to another module (a hot swap), between
    /// two batches.
    Swap {
        /// The module to run from now on.
        to: Assignment,
        /// What takes over if `to` fails twice on the same data.
        fallback: Assignment,
        /// The outcome; on an error the old module keeps running.
        reply: oneshot::Sender<Result<SwapReport, InstanceError>>,
    },
    /// A hot swap's new instance is ready. Only the shard's own builder
    /// thread can send this (see [`SwapBuilt`]).
    SwapBuilt(SwapBuilt),
    /// The checkpoint holding the shard's last snapshot is on disk. The
    /// shard drops its own copy of the snapshot's rows (56 B per open
    /// bucket) and reads them back from there only if it has to rebuild its
    /// module. Sent after the [`Command::Snapshot`] it refers to, with no
    /// other snapshot in between.
    Checkpointed(SavedState),
}

/// Reads a shard's rows back from the checkpoint on disk: given the shard
/// index, the rows of that shard's last snapshot, or why they cannot be
/// read.
pub type LoadState = dyn Fn(u32) -> Result<Vec<StateRow>, String> + Send + Sync;

/// Where a shard's last snapshot can be read back from (see
/// [`Command::Checkpointed`]).
#[derive(Clone)]
pub struct SavedState(Arc<LoadState>);

impl SavedState {
    /// Rows are read back with `load`.
    pub fn new(
        load: impl Fn(u32) -> Result<Vec<StateRow>, String> + Send + Sync + 'static,
    ) -> Self {
        SavedState(Arc::new(load))
    }

    /// The rows of shard `shard`'s last snapshot.
    ///
    /// # Errors
    ///
    /// Why they cannot be read.
    pub fn load(&self, shard: u32) -> Result<Vec<StateRow>, String> {
        (self.0)(shard)
    }
}

impl std::fmt::Debug for SavedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SavedState")
    }
}

/// The open buckets a rebuilt module starts from: the last snapshot.
#[derive(Debug)]
enum Base {
    /// In memory: shared with the checkpoint being written, or kept because
    /// no checkpoint on disk holds it yet.
    Held(Arc<Vec<StateRow>>),
    /// In the checkpoint on disk; the row count and [`checksum`] check
    /// what is read back.
    Saved {
        from: SavedState,
        rows: usize,
        checksum: u64,
    },
}

/// The wake-up a shard's swap builder sends once the new instance is built.
/// It has no public constructor: nothing else can make a shard take over an
/// instance.
#[derive(Debug)]
pub struct SwapBuilt(());

/// A module and the options it is configured with.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The module.
    pub module: Arc<LoadedModule>,
    /// Options passed to its `configure`.
    pub options: Vec<(String, String)>,
    /// How logs and metrics name the module (`name@version`).
    pub label: Arc<str>,
}

impl Assignment {
    /// `module` with no options, labelled by the start of its id.
    pub fn plain(module: Arc<LoadedModule>) -> Self {
        let label = Arc::from(&module.id()[..12]);
        Assignment {
            module,
            options: Vec::new(),
            label,
        }
    }

    /// `module` with `options`, labelled `label`.
    pub fn new(module: Arc<LoadedModule>, options: Vec<(String, String)>, label: &str) -> Self {
        Assignment {
            module,
            options,
            label: Arc::from(label),
        }
    }

    fn same_as(&self, other: &Assignment) -> bool {
        self.module.id() == other.module.id() && self.options == other.options
    }
}

/// What a hot swap did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapReport {
    /// Open (series, bucket) rows carried over.
    pub rows: usize,
    /// Time the shard stood still: the old module's export, then the
    /// replay into the new instance of what the old one did meanwhile.
    pub pause: Duration,
    /// Time the new instance took to build (instantiate and merge the
    /// export), off the shard thread while the old module kept running.
    pub build: Duration,
    /// Puts and flushes the old module ran during the build, replayed into
    /// the new instance before it took over.
    pub replayed: usize,
}

/// Something a shard reports about its module, as it happens.
#[derive(Debug, Clone)]
pub enum ShardEvent {
    /// The module failed; the shard rebuilt its state (with the same module,
    /// or with the fallback if `fell_back`).
    ModuleFailed {
        /// Shard index.
        shard: u32,
        /// Id of the module that failed.
        module: String,
        /// [`InstanceError::kind`].
        kind: &'static str,
        /// The error.
        error: String,
        /// Whether the fallback module took over.
        fell_back: bool,
    },
    /// A shadow's flush disagreed with the incumbent's.
    ShadowDiverged {
        /// Shard index.
        shard: u32,
        /// The shadow's module id.
        module: String,
        /// Rows that differed or were missing on either side.
        rows: u64,
    },
    /// A shadow failed (trap, limit, bad output) and stopped on this shard;
    /// the incumbent is untouched.
    ShadowFailed {
        /// Shard index.
        shard: u32,
        /// The shadow's module id.
        module: String,
        /// [`InstanceError::kind`].
        kind: &'static str,
        /// The error.
        error: String,
    },
    /// A hot swap finished.
    Swapped {
        /// Shard index.
        shard: u32,
        /// Module running now.
        module: String,
        /// Its report.
        report: SwapReport,
    },
}

/// How a shard's module is configured.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    /// Shard index.
    pub index: u32,
    /// The module to run first.
    pub assignment: Assignment,
    /// Module that takes over when the running one fails twice on the same
    /// data (a hot swap sets a new one).
    pub fallback: Assignment,
    /// Bucket width, seconds.
    pub bucket_seconds: u32,
    /// Buckets without a sample after which a series is forgotten (at the
    /// first snapshot after the flush that makes it idle).
    pub forget_after_buckets: u64,
    /// Router configuration, to turn keys back into tags.
    pub router: Arc<RouterConfig>,
    /// Where module failures and swaps are reported.
    pub events: tokio::sync::broadcast::Sender<ShardEvent>,
    /// Where the shard's and its module's metrics go.
    pub metrics: Arc<Metrics>,
}

/// A snapshot of a shard's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardStats {
    /// Shard index.
    pub shard: u32,
    /// Module id (SHA-256) now running.
    pub module: String,
    /// Options it runs with.
    pub options: Vec<(String, String)>,
    /// The module's stats.
    #[serde(skip)]
    pub module_stats: ModuleStats,
    /// Live series in the dictionary.
    pub dictionary_series: usize,
    /// Approximate dictionary bytes.
    pub dictionary_bytes: usize,
}

/// Counters a shard updates and anyone may read.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// Samples put into the module.
    pub samples: AtomicU64,
    /// Batches put.
    pub batches: AtomicU64,
    /// Points flushed.
    pub points: AtomicU64,
    /// Module failures recovered from.
    pub failures: AtomicU64,
    /// Nanoseconds spent in `put`.
    pub put_nanos: AtomicU64,
    /// Live series the module reported at its last flush.
    pub live_series: AtomicU64,
    /// The module's linear memory after its last batch or flush, bytes.
    pub memory_bytes: AtomicU64,
}

/// The handle of a running shard.
#[derive(Debug)]
pub struct ShardHandle {
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<ShardCounters>,
}

/// Commands a shard may have queued before senders wait: the bound is the
/// backpressure from a slow module to the router.
const QUEUE: usize = 64;

impl ShardHandle {
    /// Starts a shard whose module first merges `restore` (from a
    /// checkpoint).
    ///
    /// # Errors
    ///
    /// If neither the module nor the fallback can be instantiated and
    /// restored.
    pub fn start(
        spec: ShardSpec,
        runtime: Runtime,
        outbox: Arc<Outbox>,
        restore: Vec<StateRow>,
    ) -> Result<Self, InstanceError> {
        let counters = Arc::new(ShardCounters::default());
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut shard = Shard {
            instance: None,
            current: spec.assignment.clone(),
            dict: Dictionary::new(),
            batch: Batch::with_capacity(1024),
            base: Base::Held(Arc::new(restore)),
            log: Vec::new(),
            forget_at: None,
            shadow: None,
            replaying: false,
            shadow_fed: false,
            queue_depth: 0,
            batches_seen: 0,
            pending_swap: None,
            deferred_swaps: VecDeque::new(),
            wake: tx.downgrade(),
            shape: PointShape::new(&spec.router),
            halted: None,
            spec,
            runtime,
            outbox,
            counters: counters.clone(),
        };
        shard.rebuild()?;
        let thread = std::thread::Builder::new()
            .name(format!("wagg-shard-{}", shard.spec.index))
            .spawn(move || shard.run(rx))
            .map_err(|e| InstanceError::Poisoned(format!("cannot start shard thread: {e}")))?;
        Ok(ShardHandle {
            tx,
            thread: Some(thread),
            counters,
        })
    }

    /// Queues a command if the shard's queue has room; false if it has
    /// not, or the shard has stopped.
    pub fn try_send(&self, cmd: Command) -> bool {
        self.tx.try_send(cmd).is_ok()
    }

    /// Queues a command, waiting while the shard's queue is full.
    ///
    /// # Errors
    ///
    /// If the shard has stopped.
    pub async fn send(&self, cmd: Command) -> Result<(), ShardStopped> {
        self.tx.send(cmd).await.map_err(|_| ShardStopped)
    }

    /// The shard's counters.
    pub fn counters(&self) -> &Arc<ShardCounters> {
        &self.counters
    }

    /// Stops the shard after its queued commands and waits for its thread.
    pub fn stop(mut self) {
        drop(self.tx);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A shard's thread ended (only at shutdown, or after a bug).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the shard has stopped")]
pub struct ShardStopped;

/// What a shard did since its last snapshot, to rebuild a failed module.
#[derive(Debug)]
enum Logged {
    /// Samples by series id: 24 bytes a sample, where the routed batch
    /// with its keys took ~120 (`series-memory`). The ids stay valid until
    /// the log is cleared, because series are forgotten only then
    /// ([`Shard::forget_at`]).
    Put(Batch),
    Flush(u64),
}

struct Shard {
    spec: ShardSpec,
    runtime: Runtime,
    outbox: Arc<Outbox>,
    counters: Arc<ShardCounters>,
    instance: Option<Instance>,
    /// The module now running (assigned, or the fallback after failures).
    current: Assignment,
    dict: Dictionary,
    batch: Batch,
    /// Open buckets at the last snapshot.
    base: Base,
    /// Everything done since `base`.
    log: Vec<Logged>,
    /// The last flush's watermark, until the next snapshot forgets the
    /// series idle since before it. Forgetting waits for the snapshot that
    /// clears the log, so every id in the log is still in the dictionary
    /// when a rebuild replays it.
    forget_at: Option<u64>,
    /// A candidate fed the same batches, compared at every flush.
    shadow: Option<Shadow>,
    /// Set while a rebuild replays the log: nothing replayed reaches the
    /// shadow (it already had it).
    replaying: bool,
    /// Whether the shadow already got the current command's batch (a
    /// command that fails runs again after a rebuild).
    shadow_fed: bool,
    /// Commands waiting behind the current one.
    queue_depth: usize,
    /// Batches put, to alternate which module puts first.
    batches_seen: u64,
    /// A hot swap whose new instance is being built off this thread.
    pending_swap: Option<PendingSwap>,
    /// Swaps asked for while one was pending, started in order after it.
    deferred_swaps: VecDeque<SwapRequest>,
    /// The shard's own queue, for its swap builder's wake-up. Weak, so that
    /// the shard still stops when its handle is dropped.
    wake: mpsc::WeakSender<Command>,
    /// The metric name and tag layouts of the points it flushes.
    shape: PointShape,
    /// Set when a swap's recovery could not rebuild the running module: the
    /// shard halts, as after any command it cannot recover from.
    halted: Option<InstanceError>,
}

/// A `Command::Swap`, as the shard holds it until it can start.
struct SwapRequest {
    to: Assignment,
    fallback: Assignment,
    reply: oneshot::Sender<Result<SwapReport, InstanceError>>,
}

/// A hot swap waiting for its new instance.
///
/// Building the new instance (instantiate, then merge every open bucket) is
/// most of a swap's cost and grows with the open state: 10–40 ms at 100 000
/// rows (BENCHMARKS.md, session 8). A builder thread does it from the old
/// module's export while the shard keeps putting and flushing with the old
/// module; what the old module did meanwhile is kept in `since` and
/// replayed into the new instance before it takes over, so the shard stands
/// still only for the export and that replay.
struct PendingSwap {
    request: SwapRequest,
    rows: usize,
    /// How long the export stood the shard still.
    export: Duration,
    /// Puts and flushes since the export, in order.
    since: Vec<Logged>,
    /// Whether this is the swap's second try, after the old module's
    /// export failed the row check once.
    retried: bool,
    /// The new instance, and how long it took to build.
    builder: JoinHandle<Result<(Instance, Duration), SwapBuildError>>,
}

/// Why a swap's builder thread has no instance.
enum SwapBuildError {
    /// The old module's export failed the row check: the old module is at
    /// fault, and is rebuilt like after any failure.
    BadExport(InstanceError),
    /// The new module failed to instantiate or merge.
    Build(InstanceError),
}

/// Queue depth beyond which the shadow skips batches instead of slowing the
/// incumbent.
const SHADOW_SKIP_DEPTH: usize = QUEUE / 2;

/// The result of a command, applied by `Shard::finish` once it succeeded.
enum Outcome {
    Put,
    Flushed(Vec<Point>),
    Rows(Vec<StateRow>),
    Stats(ModuleStats),
}

/// Attempts at rebuilding with the configured module before the fallback
/// takes over: one rebuild covers a transient failure (a trap caused by one
/// batch that the rebuilt state then handles), a second failure on the same
/// command means the module cannot run this data.
const REBUILDS_BEFORE_FALLBACK: u32 = 1;

impl Shard {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            ShardQueueDepth {
                shard: self.spec.index,
                depth: rx.len(),
            }
            .emit(&self.spec.metrics);
            self.queue_depth = rx.len();
            self.shadow_fed = false;
            let cmd = match cmd {
                Command::Shadow { to, reply } => {
                    let _ = reply.send(self.set_shadow(to));
                    continue;
                }
                Command::ShadowReport(reply) => {
                    let _ = reply.send(self.shadow.as_ref().map(Shadow::report));
                    continue;
                }
                Command::Swap {
                    to,
                    fallback,
                    reply,
                } => {
                    let request = SwapRequest {
                        to,
                        fallback,
                        reply,
                    };
                    if self.pending_swap.is_some() {
                        self.deferred_swaps.push_back(request);
                    } else {
                        self.start_swap(request, false);
                    }
                    if self.halt(&mut rx) {
                        return;
                    }
                    continue;
                }
                Command::SwapBuilt(SwapBuilt(())) => {
                    self.finish_swap();
                    if self.halt(&mut rx) {
                        return;
                    }
                    continue;
                }
                Command::Checkpointed(from) => {
                    // An empty snapshot costs nothing to hold, and a rebuild
                    // then need not read the file.
                    if let Base::Held(rows) = &self.base
                        && !rows.is_empty()
                    {
                        self.base = Base::Saved {
                            rows: rows.len(),
                            checksum: checksum(rows),
                            from,
                        };
                    }
                    continue;
                }
                cmd => cmd,
            };
            let mut failures = 0;
            let outcome = loop {
                match self.execute(&cmd) {
                    Ok(outcome) => break outcome,
                    Err(err) => {
                        failures += 1;
                        if let Err(fatal) = self.recover(&err, failures) {
                            self.halted = Some(fatal);
                            self.halt(&mut rx);
                            return;
                        }
                    }
                }
            };
            self.finish(cmd, outcome);
        }
        // Stopping: finish the swaps asked for, so no builder thread
        // outlives the shard and every requester gets its answer.
        while self.pending_swap.is_some() {
            self.finish_swap();
        }
        // A swap that halted the shard meanwhile is reported, and the swaps
        // left behind it are answered.
        self.halt(&mut rx);
    }

    /// Runs one command against the module. Effects that must happen once
    /// (outbox, log, replies) wait for `finish`, so a command that failed
    /// can run again after a rebuild.
    fn execute(&mut self, cmd: &Command) -> Result<Outcome, InstanceError> {
        match cmd {
            Command::Put(keys) => self.put(keys).map(|()| Outcome::Put),
            Command::Flush(watermark) => self.flush(*watermark).map(Outcome::Flushed),
            Command::Snapshot(_) => self.export().map(Outcome::Rows),
            Command::Stats(_) => self.instance()?.stats().map(Outcome::Stats),
            Command::Swap { .. }
            | Command::SwapBuilt(_)
            | Command::Checkpointed(_)
            | Command::Shadow { .. }
            | Command::ShadowReport(_) => {
                unreachable!("handled in `run`")
            }
        }
    }

    fn finish(&mut self, cmd: Command, outcome: Outcome) {
        match (cmd, outcome) {
            // `self.batch` holds what the command's successful run put.
            (Command::Put(_), Outcome::Put) => {
                if let Some(swap) = &mut self.pending_swap {
                    swap.since.push(Logged::Put(self.batch.clone()));
                }
                self.log.push(Logged::Put(self.batch.clone()));
            }
            (Command::Flush(watermark), Outcome::Flushed(points)) => {
                PointsFlushed {
                    shard: self.spec.index,
                    points: points.len(),
                    watermark,
                }
                .emit(&self.spec.metrics, &self.counters);
                self.outbox.flushed(points);
                if let Some(swap) = &mut self.pending_swap {
                    swap.since.push(Logged::Flush(watermark));
                }
                self.log.push(Logged::Flush(watermark));
                self.forget_at = Some(watermark);
            }
            (Command::Snapshot(reply), Outcome::Rows(rows)) => {
                let rows = Arc::new(rows);
                self.base = Base::Held(rows.clone());
                self.log.clear();
                // A pending swap's export and `since` hold ids that must
                // stay known until its replay: forgetting waits for the
                // first snapshot after it.
                if self.pending_swap.is_none()
                    && let Some(watermark) = self.forget_at.take()
                {
                    self.forget(watermark);
                }
                let _ = reply.send(rows);
            }
            (Command::Stats(reply), Outcome::Stats(module_stats)) => {
                let _ = reply.send(ShardStats {
                    shard: self.spec.index,
                    module: self.current.module.id().to_string(),
                    options: self.current.options.clone(),
                    module_stats,
                    dictionary_series: self.dict.len(),
                    dictionary_bytes: self.dict.bytes(),
                });
            }
            _ => unreachable!("execute returns the outcome of its command"),
        }
    }

    fn instance(&mut self) -> Result<&mut Instance, InstanceError> {
        self.instance
            .as_mut()
            .ok_or_else(|| InstanceError::Poisoned("no instance".into()))
    }

    fn put(&mut self, keys: &KeyBatch) -> Result<(), InstanceError> {
        let batch_started = std::time::Instant::now();
        let width = u64::from(self.spec.bucket_seconds);
        self.batch.clear();
        let batch = &mut self.batch;
        self.dict
            .intern_batch(keys, keys.samples(), width, |id, s| {
                batch.push(id, s.timestamp, s.value)
            });
        self.put_batch(batch_started)
    }

    /// Puts `self.batch`, already interned, into the module (and the
    /// shadow, unless replaying).
    fn put_batch(&mut self, batch_started: std::time::Instant) -> Result<(), InstanceError> {
        let samples = self.batch.len();
        // The shadow gets each batch once (not on a retry, not when a
        // rebuild replays the log), first on every other batch.
        let mut shadow = self.shadow.take();
        let mut feed =
            !self.replaying && !self.shadow_fed && shadow.as_ref().is_some_and(Shadow::running);
        if feed && self.queue_depth > SHADOW_SKIP_DEPTH {
            if let Some(s) = shadow.as_mut() {
                s.skip(samples);
            }
            self.shadow_fed = true;
            feed = false;
        }
        let shadow_first = feed && self.batches_seen % 2 == 1;
        let mut shadow_time = None;
        if shadow_first && let Some(s) = shadow.as_mut() {
            shadow_time = s.put(&self.batch);
            self.shadow_fed = true;
        }
        let started = std::time::Instant::now();
        let put = match self.instance.as_mut() {
            Some(instance) => instance.put(&self.batch).map(|_| instance.last_fuel()),
            None => Err(InstanceError::Poisoned("no instance".into())),
        };
        let put_duration = started.elapsed();
        if put.is_ok()
            && feed
            && !shadow_first
            && let Some(s) = shadow.as_mut()
        {
            shadow_time = s.put(&self.batch);
            self.shadow_fed = true;
        }
        if let (Ok(fuel), Some(s), Some(t)) = (&put, shadow.as_mut(), shadow_time) {
            s.record_batch(samples, put_duration, t, *fuel);
        }
        if let Some(s) = shadow {
            self.keep_shadow(s);
        }
        put?;
        if !self.replaying {
            self.batches_seen += 1;
        }
        let instance = self
            .instance
            .as_mut()
            .ok_or_else(|| InstanceError::Poisoned("no instance".into()))?;
        BatchPut {
            shard: self.spec.index,
            module: &self.current.label,
            samples,
            batch_duration: batch_started.elapsed(),
            put_duration,
            fuel: instance.last_fuel(),
            memory: instance.memory(),
        }
        .emit(&self.spec.metrics, &self.counters);
        Ok(())
    }

    fn flush(&mut self, watermark: u64) -> Result<Vec<Point>, InstanceError> {
        let started = std::time::Instant::now();
        let dict = &self.dict;
        let instance = self
            .instance
            .as_mut()
            .ok_or_else(|| InstanceError::Poisoned("no instance".into()))?;
        let keys = RefCell::new(Vec::new());
        let aggs = instance.flush(watermark, &|id| known_key(dict, id, &keys))?;
        let flush_duration = started.elapsed();
        let stats = instance.stats()?;
        let points = self.shape.points(&row_keys(keys, &aggs, "flush")?, &aggs)?;
        if !self.replaying {
            self.shadow_flush(watermark, &aggs, flush_duration, stats);
        }
        ModuleFlushed {
            shard: self.spec.index,
            module: &self.current.label,
            flush_duration,
            duration: started.elapsed(),
            stats,
        }
        .emit(&self.spec.metrics, &self.counters);
        Ok(points)
    }

    /// Flushes the shadow at the same watermark, compares, reports a
    /// divergence, and reseeds a shadow that had skipped batches.
    fn shadow_flush(
        &mut self,
        watermark: u64,
        flushed: &Aggregates,
        took: std::time::Duration,
        stats: ModuleStats,
    ) {
        let Some(mut shadow) = self.shadow.take() else {
            return;
        };
        let dict = &self.dict;
        let router = &self.spec.router;
        let tags = |id: u64| {
            dict.key(id)
                .and_then(|k| SeriesKey::parse(k))
                .and_then(|k| k.tags(router))
                .unwrap_or_default()
        };
        let bad =
            shadow.flush_and_compare(watermark, flushed, took, &|id| dict.contains(id), &tags);
        if bad > 0 {
            let _ = self.spec.events.send(ShardEvent::ShadowDiverged {
                shard: self.spec.index,
                module: shadow.assignment.module.id().to_string(),
                rows: bad,
            });
        }
        let bucket_seconds = self.spec.bucket_seconds;
        let runtime = self.runtime.clone();
        shadow.after_flush(&runtime, bucket_seconds, || self.export_ids(), stats);
        self.keep_shadow(shadow);
    }

    /// Puts the shadow back, reporting the failure that stopped it, if any.
    fn keep_shadow(&mut self, mut shadow: Shadow) {
        if let Some((kind, error)) = shadow.take_failure() {
            let _ = self.spec.events.send(ShardEvent::ShadowFailed {
                shard: self.spec.index,
                module: shadow.assignment.module.id().to_string(),
                kind,
                error,
            });
        }
        self.shadow = Some(shadow);
    }

    /// Starts or stops the shadow. A new shadow starts from a copy of the
    /// incumbent's open buckets, so their flushes are comparable at once.
    fn set_shadow(&mut self, to: Option<Assignment>) -> Result<(), InstanceError> {
        let Some(to) = to else {
            self.shadow = None;
            return Ok(());
        };
        let state = self.export_ids()?;
        let report = ShadowReport {
            shard: self.spec.index,
            incumbent: self.current.label.to_string(),
            shadow: to.label.to_string(),
            shadow_id: to.module.id().to_string(),
            ..ShadowReport::default()
        };
        self.shadow = Some(Shadow::start(
            &self.runtime,
            to,
            self.spec.bucket_seconds,
            &state,
            report,
            self.spec.metrics.clone(),
        )?);
        Ok(())
    }

    /// Forgets series idle for `forget_after_buckets` whole buckets before
    /// `watermark`. Their buckets were flushed, so the module holds none;
    /// called only when the log is cleared (see [`Shard::forget_at`]).
    fn forget(&mut self, watermark: u64) {
        let width = u64::from(self.spec.bucket_seconds);
        let horizon =
            watermark.saturating_sub(width.saturating_mul(self.spec.forget_after_buckets + 1));
        self.dict.forget_before(horizon - horizon % width);
    }

    fn export(&mut self) -> Result<Vec<StateRow>, InstanceError> {
        let (instance, dict) = self.instance_and_dict()?;
        let keys = RefCell::new(Vec::new());
        let aggs = instance.export_state(&|id| known_key(dict, id, &keys))?;
        let keys = row_keys(keys, &aggs, "export-state")?;
        let mut rows = Vec::with_capacity(aggs.len());
        for (i, key) in keys.into_iter().enumerate() {
            rows.push(StateRow {
                key: key.clone(),
                bucket: aggs.bucket_start[i],
                count: aggs.count[i],
                sum: aggs.sum[i],
                min: aggs.min[i],
                max: aggs.max[i],
            });
        }
        Ok(rows)
    }

    /// Replaces a failed instance: the running module again on the first
    /// failure of a command, the fallback after that.
    fn recover(&mut self, err: &InstanceError, failures: u32) -> Result<(), InstanceError> {
        let failed = self.current.module.id().to_string();
        let fall_back =
            failures > REBUILDS_BEFORE_FALLBACK && !self.current.same_as(&self.spec.fallback);
        let give_up = !fall_back && failures > REBUILDS_BEFORE_FALLBACK + 1;
        ModuleFailed {
            shard: self.spec.index,
            module: &self.current.label,
            kind: err.kind(),
            error: err,
            recovery: if fall_back {
                Recovery::FallBack(&self.spec.fallback.label)
            } else if give_up {
                Recovery::GiveUp
            } else {
                Recovery::Rebuild
            },
        }
        .emit(&self.spec.metrics, &self.counters);
        if give_up {
            return Err(err.clone());
        }
        if fall_back {
            self.current = self.spec.fallback.clone();
        }
        let _ = self.spec.events.send(ShardEvent::ModuleFailed {
            shard: self.spec.index,
            module: failed,
            kind: err.kind(),
            error: err.to_string(),
            fell_back: fall_back,
        });
        match self.rebuild() {
            Ok(()) => Ok(()),
            // Not the module's fault: the fallback could not start from the
            // snapshot either.
            Err(unreadable @ InstanceError::StateUnreadable(_)) => Err(unreadable),
            // The module fails again on the data it has to replay (a module
            // that loops or traps on that data): the fallback takes over now,
            // rather than the shard halting on the module's first failure.
            Err(again) if !self.current.same_as(&self.spec.fallback) => {
                self.recover(&again, REBUILDS_BEFORE_FALLBACK + 1)
            }
            Err(again) => Err(again),
        }
    }

    /// Reports the halt if one is due (see [`Shard::halted`]); true if the
    /// shard must stop taking commands. The swaps asked for (pending,
    /// deferred or still queued) are answered with the error that halted
    /// it, and the pending one's builder is joined: no requester waits on a
    /// shard that no longer reads, and no builder outlives its shard.
    fn halt(&mut self, rx: &mut mpsc::Receiver<Command>) -> bool {
        let Some(fatal) = self.halted.take() else {
            return false;
        };
        // Nothing can run this shard's data any more: the shard stops
        // taking commands, so the pipeline stalls and acknowledges nothing
        // rather than lose data.
        ShardHalted {
            shard: self.spec.index,
            error: &fatal,
        }
        .emit(&self.spec.metrics);
        // A builder waiting for room in the queue for its wake-up is
        // refused at once, instead of waiting for a shard that no longer
        // reads.
        rx.close();
        if let Some(swap) = self.pending_swap.take() {
            if let Ok(Ok((built, _))) = swap.builder.join() {
                retire(Some(built));
            }
            self.swap_failed(swap.request, fatal.clone());
        }
        for request in std::mem::take(&mut self.deferred_swaps) {
            self.swap_failed(request, fatal.clone());
        }
        // So are swaps still queued; the other commands are dropped with the
        // queue, which is how their senders learn that the shard halted.
        while let Ok(cmd) = rx.try_recv() {
            if let Command::Swap {
                to,
                fallback,
                reply,
            } = cmd
            {
                let request = SwapRequest {
                    to,
                    fallback,
                    reply,
                };
                self.swap_failed(request, fatal.clone());
            }
        }
        true
    }

    /// Starts a hot swap: the running module exports its open buckets, and
    /// a builder thread makes a new instance of `to` that merges them (see
    /// [`PendingSwap`]); [`Shard::finish_swap`] completes it. If the old
    /// module fails to export, it is rebuilt from the last snapshot and the
    /// log (as after any failure) and the new module merges that.
    ///
    /// Only the ids are checked here, against the dictionary; the builder
    /// checks the rows (alignment, values, duplicates), which took about as
    /// long again at 100 000 rows.
    fn start_swap(&mut self, request: SwapRequest, retried: bool) {
        let started = Instant::now();
        let state = match self.export_for_swap() {
            Ok(state) => state,
            Err(err) => {
                if let Err(fatal) = self.recover(&err, 1) {
                    self.halted = Some(fatal.clone());
                    return self.swap_failed(request, fatal);
                }
                match self.export_for_swap() {
                    Ok(state) => state,
                    Err(err) => return self.swap_failed(request, err),
                }
            }
        };
        let export = started.elapsed();
        let rows = state.len();
        let runtime = self.runtime.clone();
        let module = request.to.module.clone();
        let options = request.to.options.clone();
        let bucket_seconds = self.spec.bucket_seconds;
        let wake = self.wake.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("wagg-swap-{}", self.spec.index))
            .spawn(move || {
                let started = Instant::now();
                let built = state
                    .check()
                    .map_err(SwapBuildError::BadExport)
                    .and_then(|state| {
                        runtime
                            .instantiate(&module, bucket_seconds, &options)
                            .and_then(|mut next| next.merge(&state).map(|()| next))
                            .map_err(SwapBuildError::Build)
                    })
                    .map(|next| (next, started.elapsed()));
                // The send waits while the shard's queue is full; the shard
                // drains it meanwhile. If the shard is stopping, it joins
                // this thread instead.
                if let Some(tx) = wake.upgrade() {
                    let _ = tx.blocking_send(Command::SwapBuilt(SwapBuilt(())));
                }
                built
            });
        match spawned {
            Ok(builder) => {
                self.pending_swap = Some(PendingSwap {
                    request,
                    rows,
                    export,
                    since: Vec::new(),
                    retried,
                    builder,
                });
            }
            Err(e) => self.swap_failed(
                request,
                InstanceError::Poisoned(format!("cannot start the swap's builder thread: {e}")),
            ),
        }
    }

    /// Completes the pending swap once its instance is built: replays what
    /// the old module did meanwhile into the new one, which then takes over.
    /// If the build or the replay failed, the old module keeps running.
    /// Starts the next swap asked for, if any.
    fn finish_swap(&mut self) {
        let Some(swap) = self.pending_swap.take() else {
            return;
        };
        let built = swap.builder.join().unwrap_or_else(|_| {
            Err(SwapBuildError::Build(InstanceError::Poisoned(
                "the swap's builder thread panicked".into(),
            )))
        });
        let request = swap.request;
        let built = match built {
            Ok(built) => Ok(built),
            Err(SwapBuildError::Build(err)) => Err(err),
            Err(SwapBuildError::BadExport(err)) => {
                // The old module's state is bad: rebuild it, as after any
                // failure, and swap from the rebuilt one (once).
                match self.recover(&err, 1) {
                    Ok(()) if !swap.retried => {
                        self.start_swap(request, true);
                        self.start_deferred_swaps();
                        return;
                    }
                    Ok(()) => Err(err),
                    Err(fatal) => {
                        self.halted = Some(fatal.clone());
                        Err(fatal)
                    }
                }
            }
        };
        let resumed = Instant::now();
        let replayed = built.and_then(|(mut next, build)| {
            self.replay_into(&mut next, &swap.since)?;
            Ok((next, build))
        });
        match replayed {
            Ok((next, build)) => {
                let old = self.instance.replace(next);
                let from = std::mem::replace(&mut self.current, request.to);
                self.spec.fallback = request.fallback;
                let report = SwapReport {
                    rows: swap.rows,
                    pause: swap.export + resumed.elapsed(),
                    build,
                    replayed: swap.since.len(),
                };
                ShardSwapped {
                    shard: self.spec.index,
                    from: &from.label,
                    to: &self.current.label,
                    rows: report.rows,
                    pause: report.pause,
                    build: report.build,
                    replayed: report.replayed,
                }
                .emit(&self.spec.metrics);
                let _ = self.spec.events.send(ShardEvent::Swapped {
                    shard: self.spec.index,
                    module: self.current.module.id().to_string(),
                    report,
                });
                let _ = request.reply.send(Ok(report));
                retire(old);
            }
            Err(err) => self.swap_failed(request, err),
        }
        self.start_deferred_swaps();
    }

    /// Starts the swaps asked for while one was pending, in order, until one
    /// is pending again (one that fails to start answers at once). Keeps the
    /// invariant that swaps wait only behind a pending one.
    fn start_deferred_swaps(&mut self) {
        while self.pending_swap.is_none() && self.halted.is_none() {
            let Some(next) = self.deferred_swaps.pop_front() else {
                return;
            };
            self.start_swap(next, false);
        }
    }

    /// Runs on a swap's new instance what the old module did during the
    /// build. The old module's flushes already reached the outbox; replaying
    /// them only removes their buckets, and their output is dropped.
    fn replay_into(&self, next: &mut Instance, since: &[Logged]) -> Result<(), InstanceError> {
        let dict = &self.dict;
        since.iter().try_for_each(|entry| match entry {
            Logged::Put(batch) => next.put(batch).map(drop),
            Logged::Flush(watermark) => next.flush(*watermark, &|id| dict.contains(id)).map(drop),
        })
    }

    fn swap_failed(&self, request: SwapRequest, error: InstanceError) {
        SwapFailed {
            shard: self.spec.index,
            module: &request.to.label,
            error: &error,
        }
        .emit(&self.spec.metrics);
        let _ = request.reply.send(Err(error));
    }

    fn export_for_swap(&mut self) -> Result<Export, InstanceError> {
        let (instance, dict) = self.instance_and_dict()?;
        instance.export_ids_checked(&|id| dict.contains(id))
    }

    fn export_ids(&mut self) -> Result<Aggregates, InstanceError> {
        let (instance, dict) = self.instance_and_dict()?;
        instance.export_state(&|id| dict.contains(id))
    }

    /// The instance and the dictionary its ids are checked against,
    /// borrowed together.
    fn instance_and_dict(&mut self) -> Result<(&mut Instance, &Dictionary), InstanceError> {
        let instance = self
            .instance
            .as_mut()
            .ok_or_else(|| InstanceError::Poisoned("no instance".into()))?;
        Ok((instance, &self.dict))
    }

    /// A fresh instance holding the state the failed one should have had:
    /// the last snapshot merged in, then the log replayed. Flushes in the log
    /// already reached the outbox; replaying them only removes their buckets
    /// again, and their output (the same totals) is dropped.
    fn rebuild(&mut self) -> Result<(), InstanceError> {
        self.instance = None;
        // Read first: without the base, no module can be rebuilt.
        let base = self.base_rows()?;
        let mut instance = self.runtime.instantiate(
            &self.current.module,
            self.spec.bucket_seconds,
            &self.current.options,
        )?;
        if !base.is_empty() {
            let mut aggs = Aggregates::empty();
            for row in base.iter() {
                aggs.series.push(self.dict.intern(&row.key, row.bucket));
                aggs.bucket_start.push(row.bucket);
                aggs.count.push(row.count);
                aggs.sum.push(row.sum);
                aggs.min.push(row.min);
                aggs.max.push(row.max);
            }
            instance.merge(&aggs)?;
        }
        self.instance = Some(instance);
        let log = std::mem::take(&mut self.log);
        self.replaying = true;
        let replayed = log.iter().try_for_each(|entry| match entry {
            Logged::Put(batch) => {
                self.batch.clone_from(batch);
                self.put_batch(std::time::Instant::now())
            }
            Logged::Flush(watermark) => self.flush(*watermark).map(drop),
        });
        self.replaying = false;
        self.log = log;
        replayed
    }
}

impl Shard {
    /// The last snapshot's rows, read back from the checkpoint if they are
    /// only there, and then held again until the next checkpoint is on
    /// disk: a rebuild that fails and falls back reads them once.
    fn base_rows(&mut self) -> Result<Arc<Vec<StateRow>>, InstanceError> {
        let (from, rows, sum) = match &self.base {
            Base::Held(rows) => return Ok(rows.clone()),
            Base::Saved {
                from,
                rows,
                checksum,
            } => (from, *rows, *checksum),
        };
        let started = Instant::now();
        let read = from
            .load(self.spec.index)
            .map_err(InstanceError::StateUnreadable)?;
        let read_sum = checksum(&read);
        if (read.len(), read_sum) != (rows, sum) {
            // Another checkpoint replaced it, or it was altered: merging it
            // would silently change the totals.
            return Err(InstanceError::StateUnreadable(format!(
                "the checkpoint holds {} rows for shard {} (checksum {read_sum:#x}), its last snapshot had {rows} (checksum {sum:#x})",
                read.len(),
                self.spec.index
            )));
        }
        StateReadBack {
            shard: self.spec.index,
            rows,
            duration: started.elapsed(),
        }
        .emit(&self.spec.metrics);
        let read = Arc::new(read);
        self.base = Base::Held(read.clone());
        Ok(read)
    }
}

/// A checksum of `rows`' buckets and aggregates, whatever their order. Keys
/// are left out: reading each one at every checkpoint would cost a cache
/// miss per row (BENCHMARKS.md, session 8). Wrapping: a module's counts are
/// only checked to be non-zero, and may add up past `u64::MAX`.
fn checksum(rows: &[StateRow]) -> u64 {
    rows.iter().fold(0, |n: u64, r| {
        n.wrapping_add(
            r.count
                ^ r.bucket.rotate_left(16)
                ^ r.sum.to_bits().rotate_left(24)
                ^ r.min.to_bits().rotate_left(40)
                ^ r.max.to_bits().rotate_left(56),
        )
    })
}

/// Drops a swapped-out instance off the shard thread: unmapping a large
/// linear memory took ~1 ms at 100 000 open rows (`swap-pause`).
fn retire(old: Option<Instance>) {
    let Some(old) = old else { return };
    if let Err(e) = std::thread::Builder::new()
        .name("wagg-retire".into())
        .spawn(move || drop(old))
    {
        // The closure, and the instance with it, is dropped here instead.
        tracing::debug!(error = %e, "dropping a swapped-out instance on the shard thread");
    }
}

/// The output check's `known` for the shard: whether `id` is live, noting
/// its key for the row being checked. The check calls it once per row in
/// row order, so `keys[i]` is row `i`'s key: one dictionary lookup per row
/// (a cache miss each, at hundreds of thousands of live series) instead of
/// one to check and one to use.
fn known_key<'d>(dict: &'d Dictionary, id: u64, keys: &RefCell<Vec<&'d SharedKey>>) -> bool {
    match dict.key(id) {
        Some(key) => {
            keys.borrow_mut().push(key);
            true
        }
        None => false,
    }
}

/// Brings `keys` into cache together, before a caller shares each of them
/// (an atomic increment that would wait on each key's miss in turn): see
/// [`touch_key`].
fn touch(keys: &[&SharedKey]) {
    keys.iter().for_each(|key| touch_key(key));
}

/// The keys [`known_key`] collected, one per row of `aggs`.
fn row_keys<'d>(
    keys: RefCell<Vec<&'d SharedKey>>,
    aggs: &Aggregates,
    call: &'static str,
) -> Result<Vec<&'d SharedKey>, InstanceError> {
    let keys = keys.into_inner();
    if keys.len() != aggs.len() {
        // The check calls `known` once per row; anything else is a host bug.
        return Err(InstanceError::BadOutput {
            call,
            reason: format!("{} keys for {} rows", keys.len(), aggs.len()),
        });
    }
    Ok(keys)
}

/// What every point a shard flushes shares: the metric name, and per
/// rollup the layout that reads a series key's values as tags.
#[derive(Debug)]
struct PointShape {
    metric: Arc<str>,
    /// By rollup index; `None` for a rollup whose tags cannot be a layout
    /// (a tag twice: [`RouterConfig::validate`] refuses that), so its keys
    /// are reported as bad output rather than written with wrong tags.
    layouts: Vec<Option<Arc<KeyLayout>>>,
}

impl PointShape {
    fn new(router: &RouterConfig) -> Self {
        let layouts = router
            .rollups
            .iter()
            .map(|r| {
                KeyLayout::new(
                    r.tags.iter().map(|t| t.name()),
                    [("rollup".to_string(), r.name.clone())],
                )
                .ok()
                .map(Arc::new)
            })
            .collect();
        PointShape {
            metric: router.metric.as_str().into(),
            layouts,
        }
    }

    /// The points of flushed rows, `keys[i]` being row `i`'s key: each
    /// shares its key and the metric name, nothing is copied.
    fn points(&self, keys: &[&SharedKey], aggs: &Aggregates) -> Result<Vec<Point>, InstanceError> {
        let mut points = Vec::with_capacity(aggs.len());
        for (r, run) in keys.chunks(TOUCH_RUN).enumerate() {
            touch(run);
            for (j, key) in run.iter().enumerate() {
                let i = r * TOUCH_RUN + j;
                // A key that does not parse would be a host bug (or a
                // corrupted checkpoint) and is reported as bad output.
                let tags = key
                    .first()
                    .and_then(|&rollup| self.layouts.get(usize::from(rollup))?.as_ref())
                    .and_then(|layout| layout.tags(key))
                    .ok_or_else(|| InstanceError::BadOutput {
                        call: "flush",
                        reason: format!("series {} has no valid key", aggs.series[i]),
                    })?;
                points.push(Point {
                    metric: self.metric.clone(),
                    timestamp: aggs.bucket_start[i],
                    value: aggs.sum[i],
                    tags,
                });
            }
        }
        Ok(points)
    }
}
