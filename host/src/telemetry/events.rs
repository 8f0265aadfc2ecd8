//! Internal events: one struct per thing that happens, whose `emit` writes
//! the log line and changes the metrics together.
//!
//! Grouped by stage, in the order data flows: source and pipeline, shards
//! and their modules, the sink, rollouts. Events that change a counter the
//! pipeline or a shard also keeps in process take that counters struct too;
//! nothing else writes those counters.
//!
//! Log levels: ERROR only where data is lost or an operator must act, WARN
//! for failures wagg recovers from, INFO for changes an operator made or
//! should know of, DEBUG for routine work. Events emitted per message or per
//! batch log at DEBUG or not at all.

use std::fmt;
use std::time::Duration;

use super::{Metrics, shard_label};
use crate::pipeline::PipelineCounters;
use crate::runtime::ModuleStats;
use crate::shard::ShardCounters;
use crate::sink::SinkError;

/// An error as events take it; logged with its sources (`a: b: c`).
pub type ErrorRef = dyn std::error::Error + 'static;

/// Displays an error with its sources: `a: b: c`.
struct Chain<'a>(&'a ErrorRef);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------
// Source and pipeline
// ---------------------------------------------------------------------------

/// A delivery was taken from the source. Per message: no log.
#[derive(Debug, Clone, Copy)]
pub struct MessageReceived;

impl MessageReceived {
    /// `wagg_messages_received_total` and [`PipelineCounters::messages`] +1,
    /// `wagg_unacked_deliveries` +1.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        add(&counters.messages, 1);
        metrics.messages_received.inc();
        metrics.unacked_deliveries.inc();
    }
}

/// A redelivered message was recognised by its hash as counted already
/// (before a reconnect or a restart), and is not counted again.
#[derive(Debug, Clone, Copy)]
pub struct DuplicateRecognised;

impl DuplicateRecognised {
    /// DEBUG; `wagg_messages_duplicate_total` and
    /// [`PipelineCounters::duplicates`] +1.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::debug!("Recognised a redelivered message as already counted; skipping it.");
        add(&counters.duplicates, 1);
        metrics.messages_duplicate.inc();
    }
}

/// A message decoded and validated. Per message: no log.
#[derive(Debug, Clone, Copy)]
pub struct MessageDecoded {
    /// Entries of its `metrics[]`.
    pub samples: usize,
}

impl MessageDecoded {
    /// `wagg_messages_decoded_total` +1, `wagg_samples_received_total`
    /// +`samples`.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.messages_decoded.inc();
        metrics.samples_received.inc_by(self.samples as u64);
    }
}

/// A message did not decode and goes to the dead-letter queue.
#[derive(Debug, Clone, Copy)]
pub struct MessageDeadLettered<'a> {
    /// The reason code (`bad_json`, `bad_field`, `too_large`): a label.
    pub reason: &'a str,
    /// The decoder's error, for the log only.
    pub error: &'a ErrorRef,
}

impl MessageDeadLettered<'_> {
    /// DEBUG (the message is kept in the dead-letter queue, and a stream of
    /// them shows in the metric); `wagg_messages_dead_lettered_total{reason}`
    /// and [`PipelineCounters::dead_lettered`] +1.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::debug!(code = self.reason, error = %Chain(self.error), "Malformed message; dead-lettering it.");
        add(&counters.dead_lettered, 1);
        metrics
            .messages_dead_lettered
            .with_label_values(&[self.reason])
            .inc();
    }
}

/// An acknowledgement or a dead letter failed; the messages it covers stay
/// unacknowledged and come back as redeliveries.
#[derive(Debug, Clone, Copy)]
pub struct SourceOperationFailed<'a> {
    /// `ack` or `dead_letter`: a label.
    pub op: &'static str,
    /// The error, for the log only.
    pub error: &'a ErrorRef,
}

impl SourceOperationFailed<'_> {
    /// WARN; `wagg_source_errors_total{op}` +1.
    pub fn emit(&self, metrics: &Metrics) {
        match self.op {
            "ack" => tracing::warn!(
                error = %Chain(self.error),
                "Acknowledgement failed; the broker will redeliver."
            ),
            "dead_letter" => tracing::warn!(
                error = %Chain(self.error),
                "Could not dead-letter a malformed message; it will be redelivered."
            ),
            op => tracing::warn!(
                op,
                error = %Chain(self.error),
                "Source operation failed; the message will be redelivered."
            ),
        }
        metrics.source_errors.with_label_values(&[self.op]).inc();
    }
}

/// The connection to RabbitMQ was re-established.
#[derive(Debug, Clone, Copy)]
pub struct SourceReconnected {
    /// The new connection generation.
    pub generation: u64,
    /// Attempts it took.
    pub attempt: u32,
}

impl SourceReconnected {
    /// INFO; `wagg_source_reconnects_total` +1.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::info!(
            generation = self.generation,
            attempt = self.attempt,
            "Reconnected to RabbitMQ."
        );
        metrics.source_reconnects.inc();
    }
}

/// Samples of a message were dropped because their bucket was flushed
/// already (see `PipelineConfig::allowed_lateness_secs`).
#[derive(Debug, Clone, Copy)]
pub struct SamplesLate {
    /// Samples dropped (entries times rollups).
    pub samples: usize,
    /// The message's event time, seconds.
    pub time: u64,
    /// The watermark it fell behind, seconds.
    pub watermark: u64,
}

impl SamplesLate {
    /// DEBUG (per message: the metric is what to alert on);
    /// `wagg_late_samples_total` and [`PipelineCounters::late_samples`]
    /// +`samples`.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::debug!(
            samples = self.samples,
            time = self.time,
            watermark = self.watermark,
            "Dropped late samples: their bucket is flushed."
        );
        add(&counters.late_samples, self.samples as u64);
        metrics.late_samples.inc_by(self.samples as u64);
    }
}

/// Late samples since the last such line: the pipeline sums them and
/// emits this at most every few seconds, so a stream of late messages is
/// seen in the log without flooding it.
#[derive(Debug, Clone, Copy)]
pub struct LateSamplesSummary<'a> {
    /// Samples dropped since the last line (entries times rollups).
    pub samples: u64,
    /// Messages they came in.
    pub messages: u64,
    /// How far the latest of them fell behind the flushed watermark, at
    /// worst, in seconds.
    pub worst_secs: u64,
    /// The `pop/host` of that message.
    pub worst_source: &'a str,
}

impl LateSamplesSummary<'_> {
    /// WARN: data was dropped (the source's clock or its queueing delay is
    /// behind `allowed_lateness_secs`).
    pub fn emit(&self) {
        tracing::warn!(
            samples = self.samples,
            messages = self.messages,
            worst_secs = self.worst_secs,
            worst_source = self.worst_source,
            "Dropped late samples: their buckets were already flushed. \
             The worst was {} s behind, from {}; raise pipeline.allowed_lateness_secs \
             if this source is only slow.",
            self.worst_secs,
            self.worst_source
        );
    }
}

/// The pipeline stopped cleanly: what it wrote and what waits in the
/// checkpoint for the next start.
#[derive(Debug, Clone, Copy)]
pub struct PipelineStopped {
    /// Open (series, bucket) rows in the last checkpoint.
    pub open_rows: usize,
    /// Flushed points the sink had not confirmed by the shutdown timeout.
    pub pending_points: usize,
    /// The flushed watermark, Unix seconds.
    pub watermark: u64,
}

impl PipelineStopped {
    /// INFO, "Stopped." and what stays for the next start.
    pub fn emit(&self) {
        if self.open_rows == 0 && self.pending_points == 0 {
            tracing::info!(
                watermark = self.watermark,
                "Stopped. Every bucket is written and every message acknowledged."
            );
        } else {
            tracing::info!(
                open_rows = self.open_rows,
                pending_points = self.pending_points,
                watermark = self.watermark,
                "Stopped. Complete buckets are written and every message taken is acknowledged; \
                 {} rows of open buckets and {} unwritten points are in the checkpoint, and the \
                 next start writes them (`wagg flush` before a stop writes open buckets now).",
                self.open_rows,
                self.pending_points
            );
        }
    }
}

/// The flushed watermark read from the checkpoint at start.
#[derive(Debug, Clone, Copy)]
pub struct WatermarkRestored {
    /// The checkpoint's flushed watermark, Unix seconds (0 without one).
    pub watermark: u64,
    /// `max_future_secs`.
    pub max_future_secs: u64,
    /// The wall clock, Unix seconds.
    pub now: u64,
}

impl WatermarkRestored {
    /// `wagg_flushed_watermark_seconds` set (so it does not read 0 until
    /// the first flush); WARN if the watermark is further ahead of the wall
    /// clock than any message may be, which only a wagg without the
    /// `max_future_secs` bound, or a clock that went back, can leave.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.flushed_watermark.set(gauge_value(self.watermark));
        let ahead = self.watermark.saturating_sub(self.now);
        if ahead > self.max_future_secs.max(1) {
            tracing::warn!(
                watermark = self.watermark,
                ahead_secs = ahead,
                "The checkpoint's watermark is {ahead} s ahead of this host's clock: \
                 samples before it are late until the clock catches up. \
                 Check this host's clock, or remove the checkpoint to start over."
            );
        }
    }
}

/// A message's samples were routed into shard batches. Per message: no log.
#[derive(Debug, Clone, Copy)]
pub struct SamplesRouted {
    /// Samples (entries times rollups).
    pub samples: usize,
}

impl SamplesRouted {
    /// `wagg_samples_routed_total` and [`PipelineCounters::samples`]
    /// +`samples`.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        add(&counters.samples, self.samples as u64);
        metrics.samples_routed.inc_by(self.samples as u64);
    }
}

/// The watermark advanced: every shard flushes the buckets that end before
/// it.
#[derive(Debug, Clone, Copy)]
pub struct WatermarkAdvanced {
    /// The new watermark, Unix seconds.
    pub watermark: u64,
}

impl WatermarkAdvanced {
    /// DEBUG; `wagg_flushes_total` and [`PipelineCounters::flushes`] +1,
    /// `wagg_flushed_watermark_seconds` set.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::debug!(
            watermark = self.watermark,
            "Flushing buckets up to the watermark."
        );
        add(&counters.flushes, 1);
        metrics.flushes.inc();
        metrics.flushed_watermark.set(gauge_value(self.watermark));
    }
}

/// A checkpoint was written.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointWritten {
    /// Open (series, bucket) rows in it.
    pub rows: usize,
    /// Flushed points in it that the sink has not confirmed.
    pub pending_points: usize,
    /// Time it took, snapshots included.
    pub duration: Duration,
}

impl CheckpointWritten {
    /// DEBUG; `wagg_checkpoints_total` and [`PipelineCounters::checkpoints`]
    /// +1, `wagg_checkpoint_duration_seconds` observed,
    /// `wagg_sink_pending_points` set.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::debug!(
            rows = self.rows,
            pending_points = self.pending_points,
            duration_ms = self.duration.as_millis() as u64,
            "Wrote a checkpoint."
        );
        add(&counters.checkpoints, 1);
        metrics.checkpoints.inc();
        metrics
            .checkpoint_duration
            .observe(self.duration.as_secs_f64());
        metrics
            .sink_pending_points
            .set(gauge_value(self.pending_points as u64));
    }
}

/// Every delivery taken so far was acknowledged (after a checkpoint).
#[derive(Debug, Clone, Copy)]
pub struct DeliveriesAcked;

impl DeliveriesAcked {
    /// DEBUG; `wagg_unacked_deliveries` back to 0.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::debug!(
            deliveries = metrics.unacked_deliveries.get(),
            "Acknowledged the deliveries the checkpoint covers."
        );
        metrics.unacked_deliveries.set(0);
    }
}

// ---------------------------------------------------------------------------
// Shards and modules
// ---------------------------------------------------------------------------

/// A shard took a command off its queue. Per command: no log.
#[derive(Debug, Clone, Copy)]
pub struct ShardQueueDepth {
    /// Shard index.
    pub shard: u32,
    /// Commands still queued behind it.
    pub depth: usize,
}

impl ShardQueueDepth {
    /// `wagg_shard_queue_depth{shard}` set.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .shard_queue_depth
            .with_label_values(&[shard_label(self.shard)])
            .set(gauge_value(self.depth as u64));
    }
}

/// A shard put one batch into its module. Per batch: no log.
#[derive(Debug, Clone, Copy)]
pub struct BatchPut<'a> {
    /// Shard index.
    pub shard: u32,
    /// The module's label (`name@version`).
    pub module: &'a str,
    /// Samples in the batch.
    pub samples: usize,
    /// The whole batch: series ids plus the module call.
    pub batch_duration: Duration,
    /// The module's put call alone.
    pub put_duration: Duration,
    /// Fuel the put used.
    pub fuel: u64,
    /// Linear memory now and its high-water mark, bytes.
    pub memory: (u64, u64),
}

impl BatchPut<'_> {
    /// [`ShardCounters`] `samples`, `batches`, `put_nanos` and
    /// `memory_bytes`; `wagg_shard_batch_duration_seconds{shard}`,
    /// `wagg_module_put_duration_seconds` and `wagg_module_fuel_per_sample`
    /// observed, `wagg_module_memory_bytes` and
    /// `wagg_module_memory_peak_bytes` set.
    pub fn emit(&self, metrics: &Metrics, counters: &ShardCounters) {
        add(&counters.samples, self.samples as u64);
        add(&counters.batches, 1);
        add(&counters.put_nanos, self.put_duration.as_nanos() as u64);
        counters
            .memory_bytes
            .store(self.memory.0, std::sync::atomic::Ordering::Relaxed);
        let shard = shard_label(self.shard);
        let labels = [self.module, shard.as_str()];
        metrics
            .shard_batch_duration
            .with_label_values(&[shard.as_str()])
            .observe(self.batch_duration.as_secs_f64());
        metrics
            .module_put_duration
            .with_label_values(&labels)
            .observe(self.put_duration.as_secs_f64());
        if self.samples > 0 {
            metrics
                .module_fuel_per_sample
                .with_label_values(&labels)
                .observe(self.fuel as f64 / self.samples as f64);
        }
        set_memory(metrics, &labels, self.memory);
    }
}

fn set_memory(metrics: &Metrics, labels: &[&str; 2], (now, peak): (u64, u64)) {
    metrics
        .module_memory
        .with_label_values(labels)
        .set(gauge_value(now));
    metrics
        .module_memory_peak
        .with_label_values(labels)
        .set(gauge_value(peak));
}

/// A shard's module flushed (also when a flush is replayed to rebuild a
/// module's state: the work is real). No log: [`PointsFlushed`] logs once
/// per flush.
#[derive(Debug, Clone, Copy)]
pub struct ModuleFlushed<'a> {
    /// Shard index.
    pub shard: u32,
    /// The module's label.
    pub module: &'a str,
    /// The module's flush call alone.
    pub flush_duration: Duration,
    /// The whole flush: module call, stats, points.
    pub duration: Duration,
    /// The module's stats after the flush.
    pub stats: ModuleStats,
}

impl ModuleFlushed<'_> {
    /// [`ShardCounters`] `live_series` and `memory_bytes`;
    /// `wagg_shard_flush_duration_seconds{shard}` and
    /// `wagg_module_flush_duration_seconds` observed,
    /// `wagg_module_live_series` and the memory gauges set.
    pub fn emit(&self, metrics: &Metrics, counters: &ShardCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        counters.live_series.store(self.stats.live_series, Relaxed);
        counters
            .memory_bytes
            .store(self.stats.memory_bytes, Relaxed);
        let shard = shard_label(self.shard);
        let labels = [self.module, shard.as_str()];
        metrics
            .shard_flush_duration
            .with_label_values(&[shard.as_str()])
            .observe(self.duration.as_secs_f64());
        metrics
            .module_flush_duration
            .with_label_values(&labels)
            .observe(self.flush_duration.as_secs_f64());
        metrics
            .module_live_series
            .with_label_values(&labels)
            .set(gauge_value(self.stats.live_series));
        set_memory(
            metrics,
            &labels,
            (self.stats.memory_bytes, self.stats.memory_peak_bytes),
        );
    }
}

/// A shard handed a flush's points to the sink's queue (once per flush,
/// never for a replay).
#[derive(Debug, Clone, Copy)]
pub struct PointsFlushed {
    /// Shard index.
    pub shard: u32,
    /// Points.
    pub points: usize,
    /// The watermark flushed to, Unix seconds.
    pub watermark: u64,
}

impl PointsFlushed {
    /// DEBUG; `wagg_points_flushed_total{shard}` and
    /// [`ShardCounters::points`] +`points`.
    pub fn emit(&self, metrics: &Metrics, counters: &ShardCounters) {
        tracing::debug!(
            shard = self.shard,
            points = self.points,
            watermark = self.watermark,
            "Flushed buckets."
        );
        add(&counters.points, self.points as u64);
        metrics
            .points_flushed
            .with_label_values(&[shard_label(self.shard)])
            .inc_by(self.points as u64);
    }
}

/// What a shard does about a failed module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery<'a> {
    /// Rebuilds the same module's state from the last snapshot and the log.
    Rebuild,
    /// The fallback module (this label) takes over the shard.
    FallBack(&'a str),
    /// Nothing can take over: the shard stops (see [`ShardHalted`]).
    GiveUp,
}

/// A module call failed (trap, memory limit, CPU budget, bad output).
#[derive(Debug, Clone, Copy)]
pub struct ModuleFailed<'a> {
    /// Shard index.
    pub shard: u32,
    /// The failed module's label.
    pub module: &'a str,
    /// `InstanceError::kind`: a label.
    pub kind: &'static str,
    /// The error, for the log only.
    pub error: &'a ErrorRef,
    /// What the shard does about it.
    pub recovery: Recovery<'a>,
}

impl ModuleFailed<'_> {
    /// WARN; `wagg_module_failures_total
    /// {module,shard,kind}` and [`ShardCounters::failures`] +1; on a
    /// fallback `wagg_module_fallbacks_total{module,shard}` +1 and the
    /// failed module's gauges on this shard removed.
    pub fn emit(&self, metrics: &Metrics, counters: &ShardCounters) {
        let (shard, module, kind, error) = (self.shard, self.module, self.kind, self.error);
        match self.recovery {
            Recovery::Rebuild => tracing::warn!(
                shard,
                module,
                kind,
                error = %Chain(error),
                "Module failed; rebuilding its state from the last snapshot."
            ),
            Recovery::FallBack(fallback) => tracing::warn!(
                shard,
                module,
                kind,
                fallback,
                error = %Chain(error),
                "Module failed again on the same data; the fallback module takes over this shard."
            ),
            // The shard stops next, and `ShardHalted` says so at ERROR.
            Recovery::GiveUp => tracing::warn!(
                shard,
                module,
                kind,
                error = %Chain(error),
                "Module failed again and nothing can take over."
            ),
        }
        add(&counters.failures, 1);
        let shard = shard_label(self.shard);
        metrics
            .module_failures
            .with_label_values(&[self.module, shard.as_str(), self.kind])
            .inc();
        if let Recovery::FallBack(fallback) = self.recovery {
            metrics
                .module_fallbacks
                .with_label_values(&[self.module, shard.as_str()])
                .inc();
            if fallback != self.module {
                forget_module_gauges(metrics, self.module, &shard);
            }
        }
    }
}

/// Removes the gauges of a module that no longer runs on a shard, so they
/// do not report its last values for ever.
fn forget_module_gauges(metrics: &Metrics, module: &str, shard: &str) {
    let labels = [module, shard];
    let _ = metrics.module_memory.remove_label_values(&labels);
    let _ = metrics.module_memory_peak.remove_label_values(&labels);
    let _ = metrics.module_live_series.remove_label_values(&labels);
}

/// A shard stopped: neither its module nor the fallback can rebuild its
/// state. The pipeline stalls and acknowledges nothing more.
#[derive(Debug, Clone, Copy)]
pub struct ShardHalted<'a> {
    /// Shard index.
    pub shard: u32,
    /// The last error.
    pub error: &'a ErrorRef,
}

impl ShardHalted<'_> {
    /// ERROR (an operator must act); `wagg_shards_halted_total{shard}` +1.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::error!(
            shard = self.shard,
            error = %Chain(self.error),
            "Shard cannot rebuild its module and stops; unacknowledged data will be redelivered after a restart."
        );
        metrics
            .shards_halted
            .with_label_values(&[shard_label(self.shard)])
            .inc();
    }
}

/// A shard read its last snapshot back from the checkpoint file, to
/// rebuild its module.
#[derive(Debug, Clone, Copy)]
pub struct StateReadBack {
    /// Shard index.
    pub shard: u32,
    /// Rows read.
    pub rows: usize,
    /// How long reading took.
    pub duration: Duration,
}

impl StateReadBack {
    /// INFO; `wagg_shard_state_reads_total{shard}` +1.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::info!(
            shard = self.shard,
            rows = self.rows,
            duration_ms = self.duration.as_secs_f64() * 1e3,
            "Read the shard's last snapshot back from the checkpoint to rebuild its module."
        );
        metrics
            .shard_state_reads
            .with_label_values(&[shard_label(self.shard)])
            .inc();
    }
}

/// A hot swap finished: the shard runs `to` with the open buckets `from`
/// held.
#[derive(Debug, Clone, Copy)]
pub struct ShardSwapped<'a> {
    /// Shard index.
    pub shard: u32,
    /// Label of the module that ran before.
    pub from: &'a str,
    /// Label of the module that runs now.
    pub to: &'a str,
    /// Open (series, bucket) rows carried over.
    pub rows: usize,
    /// Time the shard stood still: the export, and the replay of what the
    /// old module did while the new instance was built.
    pub pause: Duration,
    /// Time the new instance took to build, off the shard thread.
    pub build: Duration,
    /// Commands replayed into the new instance.
    pub replayed: usize,
}

impl ShardSwapped<'_> {
    /// INFO; `wagg_swap_pause_seconds{module=to,shard}` and
    /// `wagg_swap_build_seconds{module=to,shard}` observed; `from`'s
    /// gauges on this shard removed.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::info!(
            shard = self.shard,
            from = self.from,
            to = self.to,
            rows = self.rows,
            pause_us = self.pause.as_micros() as u64,
            build_us = self.build.as_micros() as u64,
            replayed = self.replayed,
            "Shard swapped modules."
        );
        let shard = shard_label(self.shard);
        metrics
            .swap_pause
            .with_label_values(&[self.to, shard.as_str()])
            .observe(self.pause.as_secs_f64());
        metrics
            .swap_build
            .with_label_values(&[self.to, shard.as_str()])
            .observe(self.build.as_secs_f64());
        if self.from != self.to {
            forget_module_gauges(metrics, self.from, &shard);
        }
    }
}

/// A hot swap failed; the shard keeps its old module.
#[derive(Debug, Clone, Copy)]
pub struct SwapFailed<'a> {
    /// Shard index.
    pub shard: u32,
    /// Label of the module that was to take over.
    pub module: &'a str,
    /// Why.
    pub error: &'a ErrorRef,
}

impl SwapFailed<'_> {
    /// WARN; `wagg_swap_failures_total{module,shard}` +1.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::warn!(
            shard = self.shard,
            module = self.module,
            error = %Chain(self.error),
            "Hot swap failed; the shard keeps its module."
        );
        metrics
            .swap_failures
            .with_label_values(&[self.module, &shard_label(self.shard)])
            .inc();
    }
}

/// A candidate module was rolled back (on the shards it ran on).
#[derive(Debug, Clone, Copy)]
pub struct ModuleRolledBack<'a> {
    /// The candidate's label.
    pub module: &'a str,
    /// A low-cardinality reason: a failure kind (`memory_limit`, `trap`,
    /// ...) for an automatic rollback, `manual` for an operator's.
    pub reason: &'a str,
    /// Shards moved back to the incumbent.
    pub shards: usize,
}

impl ModuleRolledBack<'_> {
    /// WARN; `wagg_module_rollbacks_total{module,reason}` +1 and the
    /// module's `wagg_module_state` set to `rolled_back`.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::warn!(
            module = self.module,
            reason = self.reason,
            shards = self.shards,
            "Rolled a module back."
        );
        metrics
            .module_rollbacks
            .with_label_values(&[self.module, self.reason])
            .inc();
        metrics.set_rolled_back(self.module);
    }
}

// ---------------------------------------------------------------------------
// Sink
// ---------------------------------------------------------------------------

/// The sink confirmed a write.
#[derive(Debug, Clone, Copy)]
pub struct PointsWritten {
    /// Points confirmed.
    pub points: usize,
    /// Time the write took, retries included.
    pub duration: Duration,
    /// Points still waiting for the sink.
    pub pending_points: usize,
}

impl PointsWritten {
    /// DEBUG; `wagg_points_written_total` and
    /// [`PipelineCounters::points_written`] +`points`,
    /// `wagg_sink_write_duration_seconds` observed,
    /// `wagg_sink_pending_points` set.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::debug!(
            points = self.points,
            duration_ms = self.duration.as_millis() as u64,
            pending = self.pending_points,
            "Wrote points to the sink."
        );
        add(&counters.points_written, self.points as u64);
        metrics.points_written.inc_by(self.points as u64);
        metrics
            .sink_write_duration
            .observe(self.duration.as_secs_f64());
        metrics
            .sink_pending_points
            .set(gauge_value(self.pending_points as u64));
    }
}

/// The sink or its server refused points one by one: they are lost.
#[derive(Debug, Clone, Copy)]
pub struct PointsRefused<'a> {
    /// Points refused.
    pub points: usize,
    /// The first one's reason.
    pub first_reason: &'a str,
}

impl PointsRefused<'_> {
    /// ERROR (data lost); `wagg_points_refused_total` and
    /// [`PipelineCounters::points_refused`] +`points`.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::error!(
            refused = self.points,
            first = self.first_reason,
            "The sink refused points; they are lost."
        );
        add(&counters.points_refused, self.points as u64);
        metrics.points_refused.inc_by(self.points as u64);
    }
}

/// A sink write failed after the sink's own retries; the points stay
/// queued and the write is tried again.
#[derive(Debug, Clone, Copy)]
pub struct SinkWriteFailed<'a> {
    /// The error.
    pub error: &'a SinkError,
    /// Points waiting for the sink.
    pub pending_points: usize,
}

impl SinkWriteFailed<'_> {
    /// WARN (nothing is lost yet; a growing `wagg_sink_pending_points` is
    /// what to alert on); `wagg_sink_errors_total{kind}` and
    /// [`PipelineCounters::sink_failures`] +1.
    pub fn emit(&self, metrics: &Metrics, counters: &PipelineCounters) {
        tracing::warn!(
            error = %Chain(self.error),
            pending = self.pending_points,
            "Sink write failed; retrying."
        );
        add(&counters.sink_failures, 1);
        metrics
            .sink_errors
            .with_label_values(&[sink_error_kind(self.error)])
            .inc();
        metrics
            .sink_pending_points
            .set(gauge_value(self.pending_points as u64));
    }
}

/// The `kind` label of a sink error.
pub fn sink_error_kind(error: &SinkError) -> &'static str {
    match error {
        SinkError::Config(_) => "config",
        SinkError::Client(_) => "client",
        SinkError::Transport { .. } => "transport",
        SinkError::Status { .. } => "status",
        SinkError::GaveUp { .. } => "gave_up",
        SinkError::Io { .. } => "io",
        SinkError::Task(_) => "task",
    }
}

/// One request to the sink failed in a way worth repeating, and is
/// repeated after a backoff.
#[derive(Debug, Clone, Copy)]
pub struct SinkRetried<'a> {
    /// Retry number, from 1.
    pub attempt: u32,
    /// The backoff before it.
    pub delay: Duration,
    /// The failure.
    pub error: &'a ErrorRef,
}

impl SinkRetried<'_> {
    /// WARN; `wagg_sink_retries_total` +1.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::warn!(
            attempt = self.attempt,
            delay_ms = u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
            error = %Chain(self.error),
            "OpenTSDB write failed; retrying."
        );
        metrics.sink_retries.inc();
    }
}

/// A batch both the incumbent and its shadow put (paired timing).
#[derive(Debug, Clone, Copy)]
pub struct ShadowBatch<'a> {
    /// The incumbent's label.
    pub incumbent: &'a str,
    /// The shadow's label.
    pub shadow: &'a str,
    /// Incumbent's put time per sample, ns.
    pub incumbent_ns: f64,
    /// Shadow's put time per sample, ns.
    pub shadow_ns: f64,
}

impl ShadowBatch<'_> {
    /// No log (per batch); `wagg_ab_put_nanoseconds_per_sample` observed
    /// for both roles.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .ab_put
            .with_label_values(&[self.incumbent, "incumbent"])
            .observe(self.incumbent_ns);
        metrics
            .ab_put
            .with_label_values(&[self.shadow, "shadow"])
            .observe(self.shadow_ns);
    }
}

/// A shadow skipped a batch because its shard fell behind.
#[derive(Debug, Clone, Copy)]
pub struct ShadowSkipped<'a> {
    /// The shadow's label.
    pub shadow: &'a str,
    /// Shard index.
    pub shard: u32,
}

impl ShadowSkipped<'_> {
    /// DEBUG; `wagg_ab_skipped_batches_total` +1.
    pub fn emit(&self, metrics: &Metrics) {
        tracing::debug!(
            shard = self.shard,
            module = self.shadow,
            "Shard behind; the shadow skips a batch."
        );
        metrics.ab_skipped.with_label_values(&[self.shadow]).inc();
    }
}

/// A shadow's flush compared with the incumbent's.
#[derive(Debug, Clone, Copy)]
pub struct ShadowCompared<'a> {
    /// Shard index.
    pub shard: u32,
    /// The incumbent's label.
    pub incumbent: &'a str,
    /// The shadow's label.
    pub shadow: &'a str,
    /// Rows equal, differing, missing in the shadow, missing in the
    /// incumbent.
    pub rows: [u64; 4],
    /// Linear memory of the incumbent and the shadow, bytes.
    pub memory: (u64, u64),
}

impl ShadowCompared<'_> {
    /// WARN when rows disagree, else nothing; `wagg_ab_rows_total` by
    /// result, `wagg_ab_memory_bytes` set for both roles.
    pub fn emit(&self, metrics: &Metrics) {
        let [equal, differing, missing_shadow, missing_incumbent] = self.rows;
        if differing + missing_shadow + missing_incumbent > 0 {
            tracing::warn!(
                shard = self.shard,
                module = self.shadow,
                differing,
                missing_in_shadow = missing_shadow,
                missing_in_incumbent = missing_incumbent,
                "Shadow flush disagrees with the incumbent's."
            );
        }
        for (result, n) in [
            ("equal", equal),
            ("differing", differing),
            ("missing_in_shadow", missing_shadow),
            ("missing_in_incumbent", missing_incumbent),
        ] {
            metrics
                .ab_rows
                .with_label_values(&[self.shadow, result])
                .inc_by(n);
        }
        let shard = shard_label(self.shard);
        metrics
            .ab_memory
            .with_label_values(&[self.incumbent, "incumbent", shard.as_str()])
            .set(i64::try_from(self.memory.0).unwrap_or(i64::MAX));
        metrics
            .ab_memory
            .with_label_values(&[self.shadow, "shadow", shard.as_str()])
            .set(i64::try_from(self.memory.1).unwrap_or(i64::MAX));
    }
}
