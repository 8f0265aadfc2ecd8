//! Telemetry: every Prometheus metric wagg exports, and the typed events
//! that change them.
//!
//! # How it fits
//!
//! - [`Metrics`] owns one [`prometheus::Registry`] (not the process-global
//!   default one: tests run several pipelines in one process) and every
//!   metric family in it. [`Metrics::render`] is the body of `/metrics`.
//! - [`events`] holds one struct per thing that happens (`MessageDeadLettered`,
//!   `ModuleFailed`, `ShardSwapped`, ...). Its `emit` writes the log line and
//!   changes the metrics together, so the two cannot drift; stages call
//!   `emit` and never touch a metric or write that log line themselves.
//! - Where a stage also keeps an in-process counter that tests and the
//!   demo's status line read ([`PipelineCounters`](crate::pipeline::PipelineCounters),
//!   [`ShardCounters`](crate::shard::ShardCounters)), the same `emit` is the
//!   only writer of both.
//!
//! # Rules
//!
//! - Names are `wagg_*`, with the unit in the name (`_seconds`, `_bytes`),
//!   `_total` for counters.
//! - Labels are low-cardinality and from a closed or operator-chosen set:
//!   `module` (an assignment's label, `name@version`), `shard` (its index),
//!   `reason`, `kind`, `op`, `state`. Never a customer, a series key or a
//!   routing key.
//! - Nothing is emitted per sample: stages emit per message, per batch, per
//!   flush or per write.
//!
//! # Families
//!
//! | family | type | labels |
//! |---|---|---|
//! | `wagg_messages_received_total` | counter | |
//! | `wagg_messages_decoded_total` | counter | |
//! | `wagg_messages_dead_lettered_total` | counter | `reason` |
//! | `wagg_messages_duplicate_total` | counter | |
//! | `wagg_samples_received_total` | counter | |
//! | `wagg_samples_routed_total` | counter | |
//! | `wagg_late_samples_total` | counter | |
//! | `wagg_unacked_deliveries` | gauge | |
//! | `wagg_source_reconnects_total` | counter | |
//! | `wagg_source_errors_total` | counter | `op` |
//! | `wagg_checkpoints_total` | counter | |
//! | `wagg_checkpoint_duration_seconds` | histogram | |
//! | `wagg_flushes_total` | counter | |
//! | `wagg_flushed_watermark_seconds` | gauge | |
//! | `wagg_shard_queue_depth` | gauge | `shard` |
//! | `wagg_shard_batch_duration_seconds` | histogram | `shard` |
//! | `wagg_shard_flush_duration_seconds` | histogram | `shard` |
//! | `wagg_points_flushed_total` | counter | `shard` |
//! | `wagg_shards_stopped_total` | counter | `shard` |
//! | `wagg_module_put_duration_seconds` | histogram | `module`, `shard` |
//! | `wagg_module_flush_duration_seconds` | histogram | `module`, `shard` |
//! | `wagg_module_fuel_per_sample` | histogram | `module`, `shard` |
//! | `wagg_module_memory_bytes` | gauge | `module`, `shard` |
//! | `wagg_module_memory_peak_bytes` | gauge | `module`, `shard` |
//! | `wagg_module_live_series` | gauge | `module`, `shard` |
//! | `wagg_module_failures_total` | counter | `module`, `shard`, `kind` |
//! | `wagg_module_fallbacks_total` | counter | `module`, `shard` |
//! | `wagg_swap_pause_seconds` | histogram | `module`, `shard` |
//! | `wagg_swap_failures_total` | counter | `module`, `shard` |
//! | `wagg_module_rollbacks_total` | counter | `module`, `reason` |
//! | `wagg_module_state` | gauge | `module`, `state` |
//! | `wagg_rollout_weight_percent` | gauge | |
//! | `wagg_points_written_total` | counter | |
//! | `wagg_points_refused_total` | counter | |
//! | `wagg_sink_write_duration_seconds` | histogram | |
//! | `wagg_sink_errors_total` | counter | `kind` |
//! | `wagg_sink_retries_total` | counter | |
//! | `wagg_sink_pending_points` | gauge | |

pub mod events;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use events::*;

/// Latency buckets for work done per batch or per flush, in seconds: 10 µs
/// to about 2.6 s, each four times the one before.
const LATENCY_BUCKETS: [f64; 10] = [
    0.000_01, 0.000_04, 0.000_16, 0.000_64, 0.002_56, 0.010_24, 0.040_96, 0.163_84, 0.655_36,
    2.621_44,
];

/// Buckets for I/O that waits on a disk or a server (checkpoints, sink
/// writes), in seconds: 1 ms to about 65 s.
const IO_BUCKETS: [f64; 9] = [
    0.001, 0.004, 0.016, 0.064, 0.256, 1.024, 4.096, 16.384, 65.536,
];

/// Buckets for fuel per sample (wasmtime fuel units, about one per Wasm
/// instruction): 16 to 32 768, doubling.
const FUEL_BUCKETS: [f64; 12] = [
    16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

/// Every metric wagg exports, in one registry of its own.
///
/// Create one per pipeline with [`Metrics::new`], hand it to the stages
/// (`pipeline::Parts::metrics`), and serve [`Metrics::render`] on
/// `/metrics`. The fields are private: stages change metrics only by
/// emitting the typed [`events`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,

    // Source and pipeline.
    messages_received: IntCounter,
    messages_decoded: IntCounter,
    messages_dead_lettered: IntCounterVec,
    messages_duplicate: IntCounter,
    samples_received: IntCounter,
    samples_routed: IntCounter,
    late_samples: IntCounter,
    unacked_deliveries: IntGauge,
    source_reconnects: IntCounter,
    source_errors: IntCounterVec,
    checkpoints: IntCounter,
    checkpoint_duration: Histogram,
    flushes: IntCounter,
    flushed_watermark: IntGauge,

    // Shards.
    shard_queue_depth: IntGaugeVec,
    shard_batch_duration: HistogramVec,
    shard_flush_duration: HistogramVec,
    points_flushed: IntCounterVec,
    shards_stopped: IntCounterVec,

    // Modules.
    module_put_duration: HistogramVec,
    module_flush_duration: HistogramVec,
    module_fuel_per_sample: HistogramVec,
    module_memory: IntGaugeVec,
    module_memory_peak: IntGaugeVec,
    module_live_series: IntGaugeVec,
    module_failures: IntCounterVec,
    module_fallbacks: IntCounterVec,
    swap_pause: HistogramVec,
    swap_failures: IntCounterVec,
    module_rollbacks: IntCounterVec,
    module_state: IntGaugeVec,
    /// The state line each module has in `module_state`.
    module_states: Mutex<BTreeMap<String, &'static str>>,
    rollout_weight: IntGauge,

    // Sink.
    points_written: IntCounter,
    points_refused: IntCounter,
    sink_write_duration: Histogram,
    sink_errors: IntCounterVec,
    sink_retries: IntCounter,
    sink_pending_points: IntGauge,
}

/// Registers `c` and hands it back. Names and labels are constants, so a
/// failure is a bug (two families with one name): the unit tests build a
/// [`Metrics`], so they catch it.
fn reg<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        unreachable!("metric families are registered once, under distinct names: {e}");
    }
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    match IntCounter::new(name, help) {
        Ok(c) => reg(r, c),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    match IntCounterVec::new(Opts::new(name, help), labels) {
        Ok(c) => reg(r, c),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    match IntGauge::new(name, help) {
        Ok(g) => reg(r, g),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    match IntGaugeVec::new(Opts::new(name, help), labels) {
        Ok(g) => reg(r, g),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    match Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())) {
        Ok(h) => reg(r, h),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    match HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels) {
        Ok(h) => reg(r, h),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

/// Label names of module families, in the order their values are given.
const MODULE_SHARD: &[&str] = &["module", "shard"];

impl Metrics {
    /// A registry with every family registered, all at zero.
    ///
    /// # Panics
    ///
    /// Never in practice: only if two families shared a name, which the
    /// unit tests would show.
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let m = Metrics {
            messages_received: counter(
                &r,
                "wagg_messages_received_total",
                "Messages taken from the source (RabbitMQ deliveries, redeliveries included).",
            ),
            messages_decoded: counter(
                &r,
                "wagg_messages_decoded_total",
                "Messages that decoded and validated.",
            ),
            messages_dead_lettered: counter_vec(
                &r,
                "wagg_messages_dead_lettered_total",
                "Messages sent to the dead-letter queue, by reason code (bad_json, bad_field, too_large).",
                &["reason"],
            ),
            messages_duplicate: counter(
                &r,
                "wagg_messages_duplicate_total",
                "Redelivered messages recognised by their hash as already counted, and not counted again.",
            ),
            samples_received: counter(
                &r,
                "wagg_samples_received_total",
                "Samples (entries of a message's metrics[]) in decoded messages.",
            ),
            samples_routed: counter(
                &r,
                "wagg_samples_routed_total",
                "Samples routed to shards: one per sample and rollup.",
            ),
            late_samples: counter(
                &r,
                "wagg_late_samples_total",
                "Samples (per rollup) dropped because their bucket was already flushed.",
            ),
            unacked_deliveries: gauge(
                &r,
                "wagg_unacked_deliveries",
                "Deliveries taken since the last acknowledgement (acks follow checkpoints).",
            ),
            source_reconnects: counter(
                &r,
                "wagg_source_reconnects_total",
                "Reconnections to RabbitMQ after a lost connection or channel.",
            ),
            source_errors: counter_vec(
                &r,
                "wagg_source_errors_total",
                "Failed source operations, by op (ack, dead_letter); the messages are redelivered.",
                &["op"],
            ),
            checkpoints: counter(&r, "wagg_checkpoints_total", "Checkpoints written."),
            checkpoint_duration: histogram(
                &r,
                "wagg_checkpoint_duration_seconds",
                "Time to write a checkpoint (shard snapshots and the atomic file write), seconds.",
                &IO_BUCKETS,
            ),
            flushes: counter(
                &r,
                "wagg_flushes_total",
                "Watermark advances: each has every shard flush the buckets that ended before it.",
            ),
            flushed_watermark: gauge(
                &r,
                "wagg_flushed_watermark_seconds",
                "Event time (Unix seconds) up to which buckets are flushed; later samples for earlier buckets are late.",
            ),
            shard_queue_depth: gauge_vec(
                &r,
                "wagg_shard_queue_depth",
                "Commands (batches, flushes, snapshots) waiting in a shard's queue when it takes the next one.",
                &["shard"],
            ),
            shard_batch_duration: histogram_vec(
                &r,
                "wagg_shard_batch_duration_seconds",
                "Time a shard spends on one batch: series ids plus the module's put, seconds.",
                &LATENCY_BUCKETS,
                &["shard"],
            ),
            shard_flush_duration: histogram_vec(
                &r,
                "wagg_shard_flush_duration_seconds",
                "Time a shard spends on one flush: the module's flush, its stats and the points, seconds.",
                &LATENCY_BUCKETS,
                &["shard"],
            ),
            points_flushed: counter_vec(
                &r,
                "wagg_points_flushed_total",
                "Points a shard flushed to the sink's queue.",
                &["shard"],
            ),
            shards_stopped: counter_vec(
                &r,
                "wagg_shards_stopped_total",
                "Shards that stopped because neither their module nor the fallback could rebuild their state; the pipeline stalls.",
                &["shard"],
            ),
            module_put_duration: histogram_vec(
                &r,
                "wagg_module_put_duration_seconds",
                "Time one put call (a batch) takes inside the module, seconds.",
                &LATENCY_BUCKETS,
                MODULE_SHARD,
            ),
            module_flush_duration: histogram_vec(
                &r,
                "wagg_module_flush_duration_seconds",
                "Time one flush call takes inside the module, seconds.",
                &LATENCY_BUCKETS,
                MODULE_SHARD,
            ),
            module_fuel_per_sample: histogram_vec(
                &r,
                "wagg_module_fuel_per_sample",
                "Fuel (wasmtime's CPU budget unit, about one per Wasm instruction) a put used per sample, one observation per batch.",
                &FUEL_BUCKETS,
                MODULE_SHARD,
            ),
            module_memory: gauge_vec(
                &r,
                "wagg_module_memory_bytes",
                "Size of the module instance's linear memory now, bytes.",
                MODULE_SHARD,
            ),
            module_memory_peak: gauge_vec(
                &r,
                "wagg_module_memory_peak_bytes",
                "Largest size the module instance's linear memory has had (high-water mark), bytes.",
                MODULE_SHARD,
            ),
            module_live_series: gauge_vec(
                &r,
                "wagg_module_live_series",
                "Series with an open bucket, as the module reported at its last flush.",
                MODULE_SHARD,
            ),
            module_failures: counter_vec(
                &r,
                "wagg_module_failures_total",
                "Module calls that failed, by kind (trap, memory_limit, cpu_budget, bad_output, refused, poisoned).",
                &["module", "shard", "kind"],
            ),
            module_fallbacks: counter_vec(
                &r,
                "wagg_module_fallbacks_total",
                "Times the fallback module took a shard over from this module after it failed twice on the same data.",
                MODULE_SHARD,
            ),
            swap_pause: histogram_vec(
                &r,
                "wagg_swap_pause_seconds",
                "Time a shard stood still for a hot swap to this module (export, instantiate, merge), seconds.",
                &LATENCY_BUCKETS,
                MODULE_SHARD,
            ),
            swap_failures: counter_vec(
                &r,
                "wagg_swap_failures_total",
                "Hot swaps to this module that failed; the shard kept its old module.",
                MODULE_SHARD,
            ),
            module_rollbacks: counter_vec(
                &r,
                "wagg_module_rollbacks_total",
                "Rollbacks of a candidate module, by reason (a failure kind, or manual).",
                &["module", "reason"],
            ),
            module_state: gauge_vec(
                &r,
                "wagg_module_state",
                "1 for each module and its rollout state (incumbent, candidate, rolled_back).",
                &["module", "state"],
            ),
            module_states: Mutex::new(BTreeMap::new()),
            rollout_weight: gauge(
                &r,
                "wagg_rollout_weight_percent",
                "Share of shards the rollout puts on the candidate module, percent (0 without a candidate).",
            ),
            points_written: counter(
                &r,
                "wagg_points_written_total",
                "Points the sink confirmed written.",
            ),
            points_refused: counter(
                &r,
                "wagg_points_refused_total",
                "Points the sink or the server refused one by one; they are lost.",
            ),
            sink_write_duration: histogram(
                &r,
                "wagg_sink_write_duration_seconds",
                "Time one successful sink write (a flush's points, retries included) took, seconds.",
                &IO_BUCKETS,
            ),
            sink_errors: counter_vec(
                &r,
                "wagg_sink_errors_total",
                "Sink writes that failed after their retries, by kind; the points stay queued and are written again.",
                &["kind"],
            ),
            sink_retries: counter(
                &r,
                "wagg_sink_retries_total",
                "Requests to the sink repeated after a retryable failure (5xx, 408, 429, connection error, timeout).",
            ),
            sink_pending_points: gauge(
                &r,
                "wagg_sink_pending_points",
                "Flushed points not yet confirmed by the sink; past [pipeline] max_pending_points no deliveries are taken.",
            ),
            registry: r,
        };
        Arc::new(m)
    }

    /// The registry, for a caller that adds families of its own (they then
    /// appear in [`render`](Self::render) too).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every family in the Prometheus text exposition format (version
    /// 0.0.4, content type [`prometheus::TEXT_FORMAT`]): the body of
    /// `/metrics`.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only for a malformed family, which the
        // registry refuses at registration.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "Could not encode the metrics.");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Sets the rollout: `weight` percent of shards (capped at 100) on
    /// `candidate`, the rest on `incumbent`. `wagg_rollout_weight_percent`
    /// shows the weight (0 without a candidate), `wagg_module_state` a 1 for
    /// the incumbent (`state="incumbent"`) and the candidate
    /// (`state="candidate"`); a module rolled back earlier keeps its
    /// `state="rolled_back"` line until a rollout names it again.
    pub fn set_rollout(&self, weight: u8, candidate: Option<&str>, incumbent: &str) {
        let weight = if candidate.is_some() {
            weight.min(100)
        } else {
            0
        };
        self.rollout_weight.set(i64::from(weight));
        let mut states = self.lock_states();
        states.retain(|module, state| {
            let keep = *state == ROLLED_BACK
                && module.as_str() != incumbent
                && Some(module.as_str()) != candidate;
            if !keep {
                let _ = self.module_state.remove_label_values(&[module.as_str(), *state]);
            }
            keep
        });
        for (module, state) in [(Some(incumbent), "incumbent"), (candidate, "candidate")] {
            if let Some(module) = module {
                self.module_state.with_label_values(&[module, state]).set(1);
                states.insert(module.to_owned(), state);
            }
        }
    }

    /// Marks `module` rolled back in `wagg_module_state` (replacing its
    /// other state line).
    fn set_rolled_back(&self, module: &str) {
        let mut states = self.lock_states();
        if let Some(old) = states.insert(module.to_owned(), ROLLED_BACK) {
            let _ = self.module_state.remove_label_values(&[module, old]);
        }
        self.module_state
            .with_label_values(&[module, ROLLED_BACK])
            .set(1);
    }

    fn lock_states(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, &'static str>> {
        // The map only mirrors label sets; a panic while it was held
        // cannot leave it worse than stale.
        self.module_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `wagg_module_state`'s state of a module rolled back.
const ROLLED_BACK: &str = "rolled_back";

/// A shard index as a label value.
fn shard_label(shard: u32) -> String {
    shard.to_string()
}
