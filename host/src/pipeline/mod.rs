//! The pipeline: a source's messages through the router into shards, their
//! flushes to the sink, and acknowledgements tied to checkpoints.
//!
//! # Why acknowledgements follow checkpoints
//!
//! A bucket is complete only after its width plus the allowed lateness (a
//! minute or more), but AMQP lets a consumer hold at most 65 535 unacked
//! messages per channel: at 10 000 messages/s that is 6.5 s. Acking after
//! the flush would need buckets of a few seconds or dozens of channels. So
//! wagg acks at **checkpoints** instead, every `checkpoint_interval_ms`
//! (1 s by default): the checkpoint holds every shard's open buckets and
//! every flushed point the sink has not confirmed, so the messages before it
//! are durable and are acked with one `multiple` ack. Unacked messages are
//! then about one checkpoint interval of traffic, whatever the bucket width.
//!
//! # The loop
//!
//! One task takes deliveries, decodes them (dead-lettering what does not
//! decode), drops samples of already-flushed buckets (late, counted),
//! routes the rest into per-shard batches, and sends a batch when it is full
//! or `batch_max_delay_ms` old. On a tick it advances the watermark
//! (latest event time minus the allowed lateness, or everything after
//! `idle_flush_secs` without a message) and has every shard flush, and cuts
//! checkpoints. A sink task writes what shards flushed, retrying until the
//! sink confirms; while more than `max_pending_points` wait for it, no
//! deliveries are taken and nothing more is flushed (backpressure: the
//! broker keeps the rest). One flush is in flight at a time, so the outbox
//! never holds more than that bound plus the buckets one flush closes.

pub mod checkpoint;
pub mod data_dir;
pub mod dedup;
pub mod event_time;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::router::{KeyBatch, Router, RouterConfig};
use crate::runtime::{InstanceError, Runtime};
use crate::shard::{
    Assignment, Command, Outbox, SavedState, ShadowReport, ShardEvent, ShardHandle, ShardSpec,
    ShardStats, StateRow, SwapReport,
};
use crate::sink::Sink;
use crate::source::amqp::{Delivery, DeliveryTag, SourceError};
use crate::source::json::Decoder;
use crate::telemetry::{
    CheckpointWritten, DeliveriesAcked, DuplicateRecognised, MessageDeadLettered, MessageDecoded,
    MessageReceived, Metrics, PipelineStopped, PointsRefused, PointsWritten, SamplesLate,
    SamplesRouted, SinkWriteFailed, SourceOperationFailed, WatermarkAdvanced, WatermarkRestored,
};
use checkpoint::{Checkpoint, CheckpointError, CheckpointStore, Pending, Rows, VERSION};

/// `[pipeline]` in wagg.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Bucket width in seconds: points are written at bucket starts.
    pub bucket_seconds: u32,
    /// How far behind the latest event time a sample may arrive and still be
    /// counted. A bucket is flushed once the latest event time is past its
    /// end by this much; a sample for a flushed bucket is late: it is
    /// dropped and counted (`wagg_late_samples_total`), because OpenTSDB
    /// keeps the last write of a point and a second, partial write would
    /// replace the complete total.
    pub allowed_lateness_secs: u64,
    /// A message dated more than this many seconds past this host's wall
    /// clock is dead-lettered (`from_future`) instead of moving event time:
    /// one clock a day ahead would otherwise make a day of everyone's
    /// samples late.
    pub max_future_secs: u64,
    /// A source (`pop`/`host`) that sent nothing for this many seconds of
    /// wall time no longer holds the watermark back. The watermark is the
    /// lowest latest event time of the sources active within it, minus
    /// `allowed_lateness_secs` (see `pipeline::event_time`).
    pub source_idle_secs: u64,
    /// After this many seconds without a message, every open bucket is
    /// flushed (the stream is taken as complete up to its latest event). 0
    /// disables it.
    pub idle_flush_secs: u64,
    /// Samples per batch handed to a module.
    pub batch_size: usize,
    /// A batch not full after this long is sent anyway.
    pub batch_max_delay_ms: u64,
    /// Time between checkpoints, and so between acknowledgements.
    pub checkpoint_interval_ms: u64,
    /// Buckets without a sample after which a series leaves the dictionary
    /// (at the first checkpoint after the flush that makes it idle).
    pub forget_after_buckets: u64,
    /// Flushed points waiting for the sink beyond which no more deliveries
    /// are taken and no more buckets flushed (those already closed wait in
    /// the shards' state, which the checkpoint holds).
    pub max_pending_points: usize,
    /// Directory for the checkpoint, uploaded modules and compiled modules.
    pub data_dir: PathBuf,
    /// How long shutdown waits for the sink to confirm flushed points (what
    /// it does not confirm stays in the checkpoint and is written after the
    /// next start).
    pub shutdown_timeout_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            bucket_seconds: 60,
            allowed_lateness_secs: 30,
            max_future_secs: 300,
            source_idle_secs: 60,
            idle_flush_secs: 120,
            batch_size: 1024,
            batch_max_delay_ms: 50,
            checkpoint_interval_ms: 1000,
            forget_after_buckets: 2,
            max_pending_points: 1_000_000,
            data_dir: PathBuf::from("wagg-data"),
            shutdown_timeout_secs: 10,
        }
    }
}

/// Where deliveries come from: RabbitMQ, or the demo's generator.
pub trait Source: Send {
    /// The next delivery; `None` when the source is finished.
    fn next(&mut self) -> impl Future<Output = Option<Delivery>> + Send;
    /// Acknowledges every delivery up to `tag`.
    fn ack_upto(&self, tag: DeliveryTag) -> impl Future<Output = Result<bool, SourceError>> + Send;
    /// Sends one delivery to the dead-letter queue with a reason.
    fn dead_letter(
        &self,
        delivery: &Delivery,
        code: &str,
        reason: &str,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// Where the source reports what it does (reconnects); the pipeline
    /// calls it once at its start. The default ignores it.
    fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        let _ = metrics;
    }
    /// How many unacknowledged deliveries the source hands out before it
    /// waits for an ack (AMQP's prefetch), if it has such a limit.
    fn window(&self) -> Option<u64> {
        None
    }
}

impl Source for crate::source::amqp::AmqpSource {
    async fn next(&mut self) -> Option<Delivery> {
        crate::source::amqp::AmqpSource::next(self).await
    }
    async fn ack_upto(&self, tag: DeliveryTag) -> Result<bool, SourceError> {
        crate::source::amqp::AmqpSource::ack_upto(self, tag).await
    }
    async fn dead_letter(&self, d: &Delivery, code: &str, reason: &str) -> Result<(), SourceError> {
        crate::source::amqp::AmqpSource::dead_letter(self, d, code, reason)
            .await
            .map(drop)
    }
    fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        crate::source::amqp::AmqpSource::set_metrics(self, metrics);
    }
    fn window(&self) -> Option<u64> {
        Some(u64::from(self.config().prefetch))
    }
}

/// A command from the admin side to the running pipeline.
#[derive(Debug)]
pub enum ControlCmd {
    /// Hot-swap one shard to another module, at the next batch boundary.
    Swap {
        /// Shard index.
        shard: u32,
        /// The module to run.
        to: Assignment,
        /// What takes over if it fails twice on the same data.
        fallback: Assignment,
        /// The outcome.
        reply: oneshot::Sender<Result<SwapReport, InstanceError>>,
    },
    /// Every shard's stats.
    Stats {
        /// The stats, in shard order.
        reply: oneshot::Sender<Vec<ShardStats>>,
    },
    /// Start (`Some`) or stop (`None`) a shadow module on one shard.
    Shadow {
        /// Shard index.
        shard: u32,
        /// The shadow.
        to: Option<Assignment>,
        /// Whether it started.
        reply: oneshot::Sender<Result<(), InstanceError>>,
    },
    /// Every shard's shadow report (shards without a shadow are left out).
    ShadowReports {
        /// The reports.
        reply: oneshot::Sender<Vec<ShadowReport>>,
    },
    /// Flush every open bucket now: the operator says the stream is over
    /// (before a stop for good, at the end of a replay). A sample that
    /// arrives later for one of them is late.
    FlushOpen {
        /// The flushed watermark afterwards, Unix seconds.
        reply: oneshot::Sender<u64>,
    },
}

/// The admin side's handle on a running pipeline.
#[derive(Debug, Clone)]
pub struct PipelineControl {
    tx: mpsc::Sender<ControlCmd>,
    shards: u32,
}

/// The pipeline is not running (any more).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the pipeline is not running")]
pub struct NotRunning;

impl PipelineControl {
    /// A handle for a pipeline of `shards` shards, and the receiver that
    /// goes into its [`Parts::control`].
    pub fn new(shards: u32) -> (Self, mpsc::Receiver<ControlCmd>) {
        let (tx, rx) = mpsc::channel(64);
        (PipelineControl { tx, shards }, rx)
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Hot-swaps `shard` to `to`; on success the shard runs `to`, on an
    /// error it keeps its old module.
    ///
    /// # Errors
    ///
    /// `Err(NotRunning)` if the pipeline stopped; `Ok(Err(_))` if the new
    /// module failed to take over.
    pub async fn swap(
        &self,
        shard: u32,
        to: Assignment,
        fallback: Assignment,
    ) -> Result<Result<SwapReport, InstanceError>, NotRunning> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlCmd::Swap {
                shard,
                to,
                fallback,
                reply,
            })
            .await
            .map_err(|_| NotRunning)?;
        rx.await.map_err(|_| NotRunning)
    }

    /// Starts (`Some`) or stops (`None`) a shadow on `shard`.
    ///
    /// # Errors
    ///
    /// `Err(NotRunning)` if the pipeline stopped; `Ok(Err(_))` if the shadow
    /// could not start.
    pub async fn shadow(
        &self,
        shard: u32,
        to: Option<Assignment>,
    ) -> Result<Result<(), InstanceError>, NotRunning> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlCmd::Shadow { shard, to, reply })
            .await
            .map_err(|_| NotRunning)?;
        rx.await.map_err(|_| NotRunning)
    }

    /// Every shard's shadow report.
    ///
    /// # Errors
    ///
    /// If the pipeline stopped.
    pub async fn shadow_reports(&self) -> Result<Vec<ShadowReport>, NotRunning> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlCmd::ShadowReports { reply })
            .await
            .map_err(|_| NotRunning)?;
        rx.await.map_err(|_| NotRunning)
    }

    /// Flushes every open bucket (see [`ControlCmd::FlushOpen`]); returns
    /// the flushed watermark.
    ///
    /// # Errors
    ///
    /// If the pipeline stopped.
    pub async fn flush_open(&self) -> Result<u64, NotRunning> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlCmd::FlushOpen { reply })
            .await
            .map_err(|_| NotRunning)?;
        rx.await.map_err(|_| NotRunning)
    }

    /// Every shard's stats.
    ///
    /// # Errors
    ///
    /// If the pipeline stopped.
    pub async fn stats(&self) -> Result<Vec<ShardStats>, NotRunning> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ControlCmd::Stats { reply })
            .await
            .map_err(|_| NotRunning)?;
        rx.await.map_err(|_| NotRunning)
    }
}

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A shard could not start.
    #[error("shard {shard} cannot start: {error}")]
    Shard {
        /// Shard index.
        shard: u32,
        /// Why.
        error: crate::runtime::InstanceError,
    },
    /// A shard stopped (its module and the fallback both failed).
    #[error("a shard stopped; see the log")]
    ShardStopped,
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
}

/// Counters of the pipeline, readable while it runs.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    /// Messages taken from the source.
    pub messages: AtomicU64,
    /// Messages dead-lettered as malformed.
    pub dead_lettered: AtomicU64,
    /// Redelivered messages recognised as already counted.
    pub duplicates: AtomicU64,
    /// Samples routed to shards.
    pub samples: AtomicU64,
    /// Samples dropped as late.
    pub late_samples: AtomicU64,
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// Flushes (watermark advances).
    pub flushes: AtomicU64,
    /// Points the sink confirmed.
    pub points_written: AtomicU64,
    /// Points the sink refused individually.
    pub points_refused: AtomicU64,
    /// Sink writes that failed after their retries (and were tried again).
    pub sink_failures: AtomicU64,
    /// Each shard's counters, once the shards have started.
    pub shards: std::sync::OnceLock<Vec<Arc<crate::shard::ShardCounters>>>,
}

/// What the pipeline is made of.
#[derive(Debug)]
pub struct Parts {
    /// `[pipeline]`.
    pub config: PipelineConfig,
    /// `[router]`, validated.
    pub router: Arc<RouterConfig>,
    /// The module runtime.
    pub runtime: Runtime,
    /// The module every shard starts with, and its options.
    pub assignment: Assignment,
    /// The module that takes over a shard whose module keeps failing.
    pub fallback: Assignment,
    /// Where shards report module failures and swaps.
    pub events: broadcast::Sender<ShardEvent>,
    /// Commands from the admin side (hot swaps, stats); `None` when nothing
    /// steers this pipeline (the demo).
    pub control: Option<mpsc::Receiver<ControlCmd>>,
    /// The message decoder.
    pub decoder: Arc<dyn Decoder>,
    /// Where flushed points go.
    pub sink: Arc<Sink>,
    /// Where every stage's metrics go (serve [`Metrics::render`] on
    /// `/metrics`).
    pub metrics: Arc<Metrics>,
}

/// How the pipeline ends when told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Flush only complete buckets; the open ones stay in the checkpoint for
    /// the next start (`wagg run`).
    Complete,
    /// Flush every bucket (`wagg demo`, whose stream ends for good).
    Everything,
}

/// The pipeline's running state.
struct Coordinator<S: Source> {
    parts: Parts,
    /// Deliveries taken since the last ack.
    unacked: u64,
    source: S,
    router: Router,
    shards: Vec<ShardHandle>,
    batches: Vec<KeyBatch>,
    batch_started: Option<Instant>,
    outbox: Arc<Outbox>,
    store: CheckpointStore,
    /// Where shards read their snapshots back from once a checkpoint is on
    /// disk.
    saved: SavedState,
    counters: Arc<PipelineCounters>,
    metrics: Arc<Metrics>,
    flushed_watermark: u64,
    max_event_time: u64,
    last_tag: Option<DeliveryTag>,
    acked_tag: Option<DeliveryTag>,
    dedup: dedup::Dedup,
    last_delivery: Instant,
    open_data: bool,
    /// Malformed deliveries whose dead letter failed, oldest first, with
    /// their reason code and reason: retried at each checkpoint, and no ack
    /// goes past the first of them (a `multiple` ack past it would drop it
    /// without its dead letter).
    undead: Vec<(Delivery, &'static str, String)>,
    /// Each source's latest event time: the watermark's low mark.
    sources: event_time::Sources,
    late_log: event_time::LateLog,
    /// Open rows in the last checkpoint written.
    checkpointed_rows: usize,
}

/// Runs the pipeline until `shutdown` resolves or the source ends, then
/// drains as `drain` says, writes a last checkpoint and acks.
///
/// # Errors
///
/// A [`PipelineError`] if the checkpoint cannot be read or written, or a
/// shard cannot start or stops.
pub async fn run<S: Source>(
    parts: Parts,
    mut source: S,
    counters: Arc<PipelineCounters>,
    drain: Drain,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    let store = CheckpointStore::new(&parts.config.data_dir);
    let cp = store.load()?.unwrap_or(Checkpoint {
        version: VERSION,
        ..Checkpoint::default()
    });
    if !cp.rows.is_empty() || !cp.pending.is_empty() {
        tracing::info!(
            rows = cp.rows.len(),
            pending = cp.pending.len(),
            watermark = cp.flushed_watermark,
            "Resuming from checkpoint."
        );
    }
    let metrics = parts.metrics.clone();
    WatermarkRestored {
        watermark: cp.flushed_watermark,
        max_future_secs: parts.config.max_future_secs,
        now: event_time::wall_now(),
    }
    .emit(&metrics);
    source.set_metrics(metrics.clone());
    parts.sink.set_metrics(metrics.clone());
    let router = Router::new(parts.router.clone());
    let outbox = Outbox::new();
    outbox.push(cp.pending.into_vec());
    let shards = start_shards(&parts, &router, &outbox, cp.rows.into_vec())?;
    let _ = counters
        .shards
        .set(shards.iter().map(|s| s.counters().clone()).collect());
    let n = shards.len();
    let saved = saved_state(store.clone(), router.clone());
    let mut co = Coordinator {
        batches: (0..n)
            .map(|_| KeyBatch::with_capacity(parts.config.batch_size))
            .collect(),
        batch_started: None,
        source,
        router,
        shards,
        outbox: outbox.clone(),
        saved,
        store,
        counters: counters.clone(),
        metrics: metrics.clone(),
        flushed_watermark: cp.flushed_watermark,
        max_event_time: cp.max_event_time,
        last_tag: None,
        acked_tag: None,
        dedup: dedup::Dedup::restore(cp.recent_messages),
        last_delivery: Instant::now(),
        open_data: cp.max_event_time > cp.flushed_watermark,
        undead: Vec::new(),
        sources: event_time::Sources::new(
            Duration::from_secs(parts.config.source_idle_secs),
            event_time::MAX_SOURCES,
        ),
        late_log: event_time::LateLog::new(Duration::from_secs(10)),
        checkpointed_rows: 0,
        unacked: 0,
        parts,
    };
    let (stop_sink_tx, stop_sink_rx) = tokio::sync::watch::channel(false);
    let sink_task = tokio::spawn(sink_loop(
        co.parts.sink.clone(),
        outbox.clone(),
        counters.clone(),
        metrics,
        stop_sink_rx,
    ));
    let control = co.parts.control.take();
    let result = co.main_loop(shutdown, control).await;
    let result = match result {
        Ok(()) => co.drain(drain).await,
        Err(e) => Err(e),
    };
    // Give the sink time to write what was flushed; whatever it has not
    // confirmed is in the last checkpoint.
    let deadline = Instant::now() + Duration::from_secs(co.parts.config.shutdown_timeout_secs);
    while outbox.pending_points() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if result.is_ok() && outbox.pending_points() == 0 {
        // Nothing pending any more: a last checkpoint without the points.
        let _ = co.checkpoint().await;
    }
    let _ = stop_sink_tx.send(true);
    outbox.wake();
    let _ = sink_task.await;
    for shard in co.shards.drain(..) {
        shard.stop();
    }
    if result.is_ok() {
        PipelineStopped {
            open_rows: co.checkpointed_rows,
            pending_points: outbox.pending_points(),
            watermark: co.flushed_watermark,
        }
        .emit();
    }
    result
}

/// The next command, or never when nothing steers the pipeline.
async fn recv(control: &mut Option<mpsc::Receiver<ControlCmd>>) -> Option<ControlCmd> {
    match control {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn start_shards(
    parts: &Parts,
    router: &Router,
    outbox: &Arc<Outbox>,
    rows: Vec<StateRow>,
) -> Result<Vec<ShardHandle>, PipelineError> {
    let n = parts.router.shards;
    let mut per_shard: Vec<Vec<StateRow>> = (0..n).map(|_| Vec::new()).collect();
    for row in rows {
        // Rows are stored by key, not by shard, so a checkpoint survives a
        // change of the shard count: each row goes where its key hashes now.
        let shard = shard_of_row(router, &row).map_err(PipelineError::Config)?;
        per_shard[shard as usize].push(row);
    }
    per_shard
        .into_iter()
        .enumerate()
        .map(|(i, restore)| {
            let spec = ShardSpec {
                index: i as u32,
                assignment: parts.assignment.clone(),
                fallback: parts.fallback.clone(),
                events: parts.events.clone(),
                bucket_seconds: parts.config.bucket_seconds,
                forget_after_buckets: parts.config.forget_after_buckets,
                router: parts.router.clone(),
                metrics: parts.metrics.clone(),
            };
            ShardHandle::start(spec, parts.runtime.clone(), outbox.clone(), restore).map_err(
                |error| PipelineError::Shard {
                    shard: i as u32,
                    error,
                },
            )
        })
        .collect()
}

/// The shard a checkpoint's row belongs to.
fn shard_of_row(router: &Router, row: &StateRow) -> Result<u32, String> {
    router
        .shard_of_key(&row.key)
        .ok_or_else(|| {
            "the checkpoint holds a series key that does not fit the [router] rollups; restore the configuration it was written with"
                .into()
        })
}

/// Reads one shard's rows back from the checkpoint in `store`: the rows a
/// restart would give it. Each read decodes the whole file (every shard's
/// rows and the pending points): a rebuild is rare, memory between
/// checkpoints is not.
pub fn saved_state(store: CheckpointStore, router: Router) -> SavedState {
    SavedState::new(move |shard| {
        let cp = store
            .load()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} is gone", store.path().display()))?;
        let mut rows = Vec::new();
        for row in cp.rows.into_vec() {
            if shard_of_row(&router, &row)? == shard {
                rows.push(row);
            }
        }
        Ok(rows)
    })
}

/// Writes whatever the outbox holds, in order, retrying a failed write
/// until it succeeds or the pipeline stops: flushed points are never
/// dropped (they stay in every checkpoint until confirmed).
async fn sink_loop(
    sink: Arc<Sink>,
    outbox: Arc<Outbox>,
    counters: Arc<PipelineCounters>,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut next = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let jobs = outbox.jobs_from(next);
        if jobs.is_empty() {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                () = outbox.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        for (seq, points) in jobs {
            let started = Instant::now();
            match sink.write(&points).await {
                Ok(report) => {
                    if let Some((_, first_reason)) = report.refused.first() {
                        PointsRefused {
                            points: report.refused.len(),
                            first_reason,
                        }
                        .emit(&metrics, &counters);
                    }
                    outbox.confirm(seq);
                    PointsWritten {
                        points: report.written,
                        duration: started.elapsed(),
                        pending_points: outbox.pending_points(),
                    }
                    .emit(&metrics, &counters);
                    next = seq + 1;
                    backoff = Duration::from_millis(100);
                }
                Err(err) => {
                    SinkWriteFailed {
                        error: &err,
                        pending_points: outbox.pending_points(),
                    }
                    .emit(&metrics, &counters);
                    if *stop.borrow() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    break;
                }
            }
        }
    }
}

impl<S: Source> Coordinator<S> {
    async fn main_loop(
        &mut self,
        shutdown: impl Future<Output = ()>,
        mut control: Option<mpsc::Receiver<ControlCmd>>,
    ) -> Result<(), PipelineError> {
        let cfg = self.parts.config.clone();
        let tick_every = Duration::from_millis(cfg.batch_max_delay_ms.clamp(5, 1000));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let checkpoint_every = Duration::from_millis(cfg.checkpoint_interval_ms.max(10));
        let mut checkpointed_at = Instant::now();
        let mut spacing = checkpoint_every;
        tokio::pin!(shutdown);
        let mut source_done = false;
        loop {
            let backpressure = self.outbox.pending_points() > cfg.max_pending_points;
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                Some(cmd) = recv(&mut control) => self.control(cmd).await?,
                delivery = self.source.next(), if !backpressure && !source_done => {
                    match delivery {
                        Some(d) => self.take(d).await?,
                        None => source_done = true,
                    }
                }
                _ = tick.tick() => {
                    self.on_tick().await?;
                    // With the source's window full nothing arrives until
                    // an ack, so spacing checkpoints out (below) would only
                    // stall consumption longer.
                    let since = checkpointed_at.elapsed();
                    let starved = self.source.window().is_some_and(|w| self.unacked >= w)
                        && since >= checkpoint_every;
                    if since >= spacing || starved {
                        let started = Instant::now();
                        self.checkpoint().await?;
                        checkpointed_at = Instant::now();
                        // A checkpoint stalls the pipeline while it is cut
                        // and written, and its cost grows with the open
                        // state. Spacing them by at least four times their
                        // cost keeps that stall under a fifth of the time;
                        // the prefetch window must then cover the longer
                        // interval (see `[source.amqp] prefetch`).
                        spacing = checkpoint_every.max(started.elapsed() * 4);
                    }
                    if source_done {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Handles an admin command. A swap goes to its shard behind the
    /// batches already routed to it, so it happens at a batch boundary; the
    /// shard answers the requester itself, and meanwhile the other shards
    /// keep consuming.
    async fn control(&mut self, cmd: ControlCmd) -> Result<(), PipelineError> {
        match cmd {
            ControlCmd::Swap {
                shard,
                to,
                fallback,
                reply,
            } => {
                let Some(i) = self.shards.get(shard as usize).map(|_| shard as usize) else {
                    let _ = reply.send(Err(InstanceError::Refused {
                        call: "swap",
                        message: format!("no shard {shard}"),
                    }));
                    return Ok(());
                };
                if !self.batches[i].is_empty() {
                    self.send_batch(i).await?;
                }
                self.shards[i]
                    .send(Command::Swap {
                        to,
                        fallback,
                        reply,
                    })
                    .await
                    .map_err(|_| PipelineError::ShardStopped)?;
            }
            ControlCmd::Shadow { shard, to, reply } => {
                if self.shards.get(shard as usize).is_none() {
                    let _ = reply.send(Err(InstanceError::Refused {
                        call: "shadow",
                        message: format!("no shard {shard}"),
                    }));
                    return Ok(());
                }
                // Behind the batches already routed, like a swap.
                if !self.batches[shard as usize].is_empty() {
                    self.send_batch(shard as usize).await?;
                }
                self.shards[shard as usize]
                    .send(Command::Shadow { to, reply })
                    .await
                    .map_err(|_| PipelineError::ShardStopped)?;
            }
            ControlCmd::ShadowReports { reply } => {
                let mut pending = Vec::with_capacity(self.shards.len());
                for shard in &self.shards {
                    let (tx, rx) = oneshot::channel();
                    shard
                        .send(Command::ShadowReport(tx))
                        .await
                        .map_err(|_| PipelineError::ShardStopped)?;
                    pending.push(rx);
                }
                tokio::spawn(async move {
                    let mut reports = Vec::new();
                    for rx in pending {
                        match rx.await {
                            Ok(Some(r)) => reports.push(r),
                            Ok(None) => {}
                            Err(_) => return,
                        }
                    }
                    let _ = reply.send(reports);
                });
            }
            ControlCmd::FlushOpen { reply } => {
                let width = u64::from(self.parts.config.bucket_seconds);
                if self.open_data {
                    let end = self.max_event_time - self.max_event_time % width + width;
                    self.flush_to(end).await?;
                }
                tracing::info!(
                    watermark = self.flushed_watermark,
                    "Flushed every open bucket, as the operator asked."
                );
                let _ = reply.send(self.flushed_watermark);
            }
            ControlCmd::Stats { reply } => {
                let mut pending = Vec::with_capacity(self.shards.len());
                for shard in &self.shards {
                    let (tx, rx) = oneshot::channel();
                    shard
                        .send(Command::Stats(tx))
                        .await
                        .map_err(|_| PipelineError::ShardStopped)?;
                    pending.push(rx);
                }
                // Collect off the loop: deliveries go on meanwhile.
                tokio::spawn(async move {
                    let mut stats = Vec::with_capacity(pending.len());
                    for rx in pending {
                        match rx.await {
                            Ok(s) => stats.push(s),
                            Err(_) => return,
                        }
                    }
                    let _ = reply.send(stats);
                });
            }
        }
        Ok(())
    }

    /// Handles one delivery.
    async fn take(&mut self, d: Delivery) -> Result<(), PipelineError> {
        MessageReceived.emit(&self.metrics, &self.counters);
        self.last_delivery = Instant::now();
        self.unacked += 1;
        let hash = dedup::identity(&d);
        if self.dedup.seen(d.tag, d.redelivered, hash) {
            // Counted before a reconnect or a restart, and its effect is in
            // the state (or the checkpoint): ack it with the next checkpoint.
            DuplicateRecognised.emit(&self.metrics, &self.counters);
            self.last_tag = self.last_tag.max(Some(d.tag));
            return Ok(());
        }
        let decoder = self.parts.decoder.clone();
        let msg = match decoder.decode(&d.body) {
            Ok(msg) => msg,
            Err(err) => {
                self.reject(d, err.code(), &err).await;
                return Ok(());
            }
        };
        let max_future = self.parts.config.max_future_secs;
        if let Err(err) = event_time::check_future(msg.time, event_time::wall_now(), max_future) {
            drop(msg);
            self.reject(d, event_time::FromFuture::CODE, &err).await;
            return Ok(());
        }
        MessageDecoded {
            samples: msg.metrics.len(),
        }
        .emit(&self.metrics);
        let width = u64::from(self.parts.config.bucket_seconds);
        let bucket_end = msg.time - msg.time % width + width;
        let samples = msg.metrics.len() * self.parts.router.rollups.len();
        let now = Instant::now();
        if bucket_end <= self.flushed_watermark {
            SamplesLate {
                samples,
                time: msg.time,
                watermark: self.flushed_watermark,
            }
            .emit(&self.metrics, &self.counters);
            self.late_log.add(
                samples as u64,
                self.flushed_watermark - msg.time,
                &msg.pop,
                &msg.host,
                now,
            );
            // Still a source that is sending: it holds the watermark back
            // from here on.
            self.sources.observe(&msg.pop, &msg.host, msg.time, now);
        } else {
            self.router.route(&msg, &mut self.batches);
            SamplesRouted { samples }.emit(&self.metrics, &self.counters);
            self.sources.observe(&msg.pop, &msg.host, msg.time, now);
            self.max_event_time = self.max_event_time.max(msg.time);
            self.open_data = true;
            self.batch_started.get_or_insert_with(Instant::now);
        }
        self.dedup.counted(d.tag, hash);
        self.last_tag = self.last_tag.max(Some(d.tag));
        drop(msg);
        let full = self.parts.config.batch_size;
        for i in 0..self.batches.len() {
            if self.batches[i].len() >= full {
                self.send_batch(i).await?;
            }
        }
        Ok(())
    }

    /// Dead-letters a delivery that is the input's fault, with its reason
    /// code; if the dead letter fails, it waits in `undead`.
    async fn reject(
        &mut self,
        d: Delivery,
        code: &'static str,
        err: &(dyn std::error::Error + Send + Sync + 'static),
    ) {
        MessageDeadLettered {
            reason: code,
            error: err,
        }
        .emit(&self.metrics, &self.counters);
        let reason = err.to_string();
        if let Err(e) = self.source.dead_letter(&d, code, &reason).await {
            // It stays unacked: retried at the next checkpoint, which acks
            // only the deliveries before it meanwhile.
            SourceOperationFailed {
                op: "dead_letter",
                error: &e,
            }
            .emit(&self.metrics);
            self.undead.push((d, code, reason));
        }
    }

    /// The latest event time every active source has reached (see
    /// `event_time`), which the watermark may follow; `flushed_watermark`
    /// (no advance) while no source is active: only `idle_flush_secs`
    /// flushes a stream that went quiet. With `source_idle_secs = 0`, the
    /// latest of all.
    fn low_event_time(&self, now: Instant) -> u64 {
        if self.parts.config.source_idle_secs == 0 {
            return self.max_event_time;
        }
        self.sources
            .low(now)
            .map_or(self.flushed_watermark, |(t, _)| t)
    }

    async fn send_batch(&mut self, i: usize) -> Result<(), PipelineError> {
        let cap = self.parts.config.batch_size;
        let batch = std::mem::replace(&mut self.batches[i], KeyBatch::with_capacity(cap));
        self.shards[i]
            .send(Command::Put(batch))
            .await
            .map_err(|_| PipelineError::ShardStopped)
    }

    async fn send_all_batches(&mut self) -> Result<(), PipelineError> {
        for i in 0..self.batches.len() {
            if !self.batches[i].is_empty() {
                self.send_batch(i).await?;
            }
        }
        self.batch_started = None;
        Ok(())
    }

    async fn on_tick(&mut self) -> Result<(), PipelineError> {
        let cfg = self.parts.config.clone();
        if self
            .batch_started
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(cfg.batch_max_delay_ms))
        {
            self.send_all_batches().await?;
        }
        let width = u64::from(cfg.bucket_seconds);
        let now = Instant::now();
        self.late_log.maybe_log(now);
        let mut watermark = self
            .low_event_time(now)
            .saturating_sub(cfg.allowed_lateness_secs);
        watermark -= watermark % width;
        if self.outbox.pending_points() > cfg.max_pending_points {
            // Backpressure: deliveries wait in the broker, so the stream is
            // not idle, and flushing its open buckets now would make the
            // waiting samples late. Buckets closed by deliveries taken
            // before it set in stay in the shards' state (and so in the
            // checkpoint) rather than swell the outbox past its bound.
            self.last_delivery = Instant::now();
            return Ok(());
        }
        if self.outbox.flushes_in_flight() > 0 {
            // The last flush is still behind a shard's backlog: the next one
            // goes once its points are counted (see `Outbox::flush_sent`).
            return Ok(());
        }
        if cfg.idle_flush_secs > 0
            && self.open_data
            && self.last_delivery.elapsed() >= Duration::from_secs(cfg.idle_flush_secs)
        {
            watermark = self.max_event_time - self.max_event_time % width + width;
        }
        self.flush_to(watermark).await
    }

    async fn flush_to(&mut self, watermark: u64) -> Result<(), PipelineError> {
        if watermark <= self.flushed_watermark {
            return Ok(());
        }
        self.send_all_batches().await?;
        for shard in &self.shards {
            // Counted before it is sent: the shard may run it at once.
            self.outbox.flush_sent();
            shard
                .send(Command::Flush(watermark))
                .await
                .map_err(|_| PipelineError::ShardStopped)?;
        }
        self.flushed_watermark = watermark;
        if watermark > self.max_event_time {
            self.open_data = false;
        }
        WatermarkAdvanced { watermark }.emit(&self.metrics, &self.counters);
        Ok(())
    }

    /// Writes a checkpoint at the current message boundary, then acks every
    /// delivery it covers.
    async fn checkpoint(&mut self) -> Result<(), PipelineError> {
        let started = Instant::now();
        self.send_all_batches().await?;
        // Every shard snapshots at once; then the replies are collected.
        let mut replies = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (tx, rx) = oneshot::channel();
            shard
                .send(Command::Snapshot(tx))
                .await
                .map_err(|_| PipelineError::ShardStopped)?;
            replies.push(rx);
        }
        let mut rows = Vec::with_capacity(replies.len());
        for rx in replies {
            rows.push(rx.await.map_err(|_| PipelineError::ShardStopped)?);
        }
        let cp = Checkpoint {
            version: VERSION,
            flushed_watermark: self.flushed_watermark,
            max_event_time: self.max_event_time,
            rows: Rows::from_chunks(rows),
            pending: Pending::from_chunks(self.outbox.pending()),
            recent_messages: self.dedup.unconfirmed(),
        };
        let (rows, pending_points) = (cp.rows.len(), cp.pending.len());
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save(&cp))
            .await
            .map_err(|e| PipelineError::Config(format!("checkpoint writer panicked: {e}")))??;
        self.checkpointed_rows = rows;
        // Each shard's snapshot is on disk now: the shards need not hold it.
        // Not waiting for room: a shard that misses this only keeps its
        // rows in memory until the next checkpoint, and the acks below
        // must not wait behind a busy shard.
        for shard in &self.shards {
            shard.try_send(Command::Checkpointed(self.saved.clone()));
        }
        CheckpointWritten {
            rows,
            pending_points,
            duration: started.elapsed(),
        }
        .emit(&self.metrics, &self.counters);
        let ack_to = self.retry_dead_letters().await;
        if let Some(tag) = ack_to
            && Some(tag) > self.acked_tag
        {
            match self.source.ack_upto(tag).await {
                Ok(confirmed) => {
                    self.acked_tag = Some(tag);
                    self.unacked = 0;
                    if confirmed {
                        // Only now can these messages not come back.
                        self.dedup.acked(tag);
                    }
                    DeliveriesAcked.emit(&self.metrics);
                }
                // Not acked: the messages come back as redeliveries and are
                // recognised by their hashes.
                Err(e) => SourceOperationFailed {
                    op: "ack",
                    error: &e,
                }
                .emit(&self.metrics),
            }
        }
        Ok(())
    }

    /// Retries the dead letters that failed, in order, and returns how far
    /// the next ack may go: [`Self::last_tag`], or just below the first
    /// delivery whose dead letter still fails.
    async fn retry_dead_letters(&mut self) -> Option<DeliveryTag> {
        // A delivery of an older connection comes back by itself.
        let current = self.last_tag.map(|t| t.generation);
        self.undead
            .retain(|(d, ..)| Some(d.tag.generation) >= current);
        while let Some((d, code, reason)) = self.undead.first() {
            match self.source.dead_letter(d, code, reason).await {
                Ok(()) => {
                    self.undead.remove(0);
                }
                Err(e) => {
                    SourceOperationFailed {
                        op: "dead_letter",
                        error: &e,
                    }
                    .emit(&self.metrics);
                    break;
                }
            }
        }
        match self.undead.first() {
            None => self.last_tag,
            Some((d, ..)) if d.tag.tag > 1 => self.last_tag.min(Some(DeliveryTag {
                generation: d.tag.generation,
                tag: d.tag.tag - 1,
            })),
            Some(_) => None,
        }
    }

    async fn drain(&mut self, drain: Drain) -> Result<(), PipelineError> {
        self.send_all_batches().await?;
        let cfg = self.parts.config.clone();
        let width = u64::from(cfg.bucket_seconds);
        let watermark = match drain {
            Drain::Everything if self.open_data => {
                self.max_event_time - self.max_event_time % width + width
            }
            _ => {
                let w = self
                    .low_event_time(Instant::now())
                    .saturating_sub(cfg.allowed_lateness_secs);
                w - w % width
            }
        };
        self.flush_to(watermark).await?;
        self.checkpoint().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(customer: u32) -> StateRow {
        StateRow {
            key: format!("\x00{customer}\0lga\0").into_bytes().into(),
            bucket: 60,
            count: u64::from(customer) + 1,
            sum: 1.0,
            min: 1.0,
            max: 1.0,
        }
    }

    /// A shard rebuilding its module reads back from the checkpoint file
    /// the rows a restart would give it: its own, every one of them.
    #[test]
    fn a_shard_reads_its_own_rows_back_from_the_checkpoint_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let config = Arc::new(RouterConfig::default());
        let saved = saved_state(store.clone(), Router::new(config.clone()));
        let err = saved.load(0).expect_err("no checkpoint yet");
        assert!(err.contains("checkpoint.bin is gone"), "{err}");

        let rows: Vec<StateRow> = (0..40).map(row).collect();
        store
            .save(&Checkpoint {
                version: VERSION,
                rows: rows.clone().into(),
                ..Checkpoint::default()
            })
            .unwrap();
        let router = Router::new(config);
        let mut read_back = Vec::new();
        for shard in 0..2 {
            let read = saved.load(shard).unwrap();
            assert!(!read.is_empty(), "shard {shard} has rows");
            for r in &read {
                assert_eq!(shard_of_row(&router, r), Ok(shard), "{r:?}");
            }
            read_back.extend(read);
        }
        read_back.sort_by_key(|r| r.count);
        assert_eq!(read_back, rows);
    }
}
