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
//! | `wagg_shards_halted_total` | counter | `shard` |
//! | `wagg_shard_state_reads_total` | counter | `shard` |
//! | `wagg_module_put_duration_seconds` | histogram | `module`, `shard` |
//! | `wagg_module_flush_duration_seconds` | histogram | `module`, `shard` |
//! | `wagg_module_fuel_per_sample` | histogram | `module`, `shard` |
//! | `wagg_module_memory_bytes` | gauge | `module`, `shard` |
//! | `wagg_module_memory_peak_bytes` | gauge | `module`, `shard` |
//! | `wagg_module_live_series` | gauge | `module`, `shard` |
//! | `wagg_module_failures_total` | counter | `module`, `shard`, `kind` |
//! | `wagg_module_fallbacks_total` | counter | `module`, `shard` |
//! | `wagg_swap_pause_seconds` | histogram | `module`, `shard` |
//! | `wagg_swap_build_seconds` | histogram | `module`, `shard` |
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
    shards_halted: IntCounterVec,
    shard_state_reads: IntCounterVec,

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
    swap_build: HistogramVec,
    swap_failures: IntCounterVec,
    module_rollbacks: IntCounterVec,
    module_state: IntGaugeVec,
    ab_put: HistogramVec,
    ab_rows: IntCounterVec,
    ab_skipped: IntCounterVec,
    ab_memory: IntGaugeVec,
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
    match HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    ) {
        Ok(h) => reg(r, h),
        Err(e) => unreachable!("metric {name} is malformed: {e}"),
    }
}

/// Label names of module families, in the order their values are given.
const MODULE_SHARD: &[&str] = &["module", "shard"];

/// ns per sample: from a few ns (bulk puts) to tens of µs (single samples,
/// slow modules).
const AB_NS_BUCKETS: [f64; 12] = [
    2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 5_000.0, 20_000.0, 100_000.0,
];

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
            shards_halted: counter_vec(
                &r,
                "wagg_shards_halted_total",
                "Shards that stopped because neither their module nor the fallback could rebuild their state; the pipeline stalls.",
                &["shard"],
            ),
            shard_state_reads: counter_vec(
                &r,
                "wagg_shard_state_reads_total",
                "Rebuilds that read the shard's last snapshot back from the checkpoint file.",
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
                "Time a shard stood still for a hot swap to this module (the export, and replaying what the old module did while the new one was built), seconds.",
                &LATENCY_BUCKETS,
                MODULE_SHARD,
            ),
            swap_build: histogram_vec(
                &r,
                "wagg_swap_build_seconds",
                "Time a hot swap to this module took to build its new instance (instantiate, merge the old one's export), off the shard thread while the old module kept running, seconds.",
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
            ab_put: histogram_vec(
                &r,
                "wagg_ab_put_nanoseconds_per_sample",
                "Put time per sample of each batch on shadowed shards, ns: role `incumbent` (A) and `shadow` (B), on the same batches.",
                &AB_NS_BUCKETS,
                &["module", "role"],
            ),
            ab_rows: counter_vec(
                &r,
                "wagg_ab_rows_total",
                "Flushed (series, bucket) rows of a shadow compared with the incumbent's, by result (equal, differing, missing_in_shadow, missing_in_incumbent).",
                &["module", "result"],
            ),
            ab_skipped: counter_vec(
                &r,
                "wagg_ab_skipped_batches_total",
                "Batches a shadow skipped because its shard fell behind.",
                &["module"],
            ),
            ab_memory: gauge_vec(
                &r,
                "wagg_ab_memory_bytes",
                "Linear memory of the incumbent and the shadow on a shadowed shard at its last flush, bytes.",
                &["module", "role", "shard"],
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
                let _ = self
                    .module_state
                    .remove_label_values(&[module.as_str(), *state]);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use prometheus_parse::{Sample, Scrape, Value};

    use super::*;
    use crate::pipeline::PipelineCounters;
    use crate::runtime::{InstanceError, ModuleStats};
    use crate::shard::ShardCounters;
    use crate::sink::SinkError;

    /// Every family: name, type, label names (histograms without `le`).
    const FAMILIES: &[(&str, &str, &[&str])] = &[
        ("wagg_messages_received_total", "counter", &[]),
        ("wagg_messages_decoded_total", "counter", &[]),
        ("wagg_messages_dead_lettered_total", "counter", &["reason"]),
        ("wagg_messages_duplicate_total", "counter", &[]),
        ("wagg_samples_received_total", "counter", &[]),
        ("wagg_samples_routed_total", "counter", &[]),
        ("wagg_late_samples_total", "counter", &[]),
        ("wagg_unacked_deliveries", "gauge", &[]),
        ("wagg_source_reconnects_total", "counter", &[]),
        ("wagg_source_errors_total", "counter", &["op"]),
        ("wagg_checkpoints_total", "counter", &[]),
        ("wagg_checkpoint_duration_seconds", "histogram", &[]),
        ("wagg_flushes_total", "counter", &[]),
        ("wagg_flushed_watermark_seconds", "gauge", &[]),
        ("wagg_shard_queue_depth", "gauge", &["shard"]),
        ("wagg_shard_batch_duration_seconds", "histogram", &["shard"]),
        ("wagg_shard_flush_duration_seconds", "histogram", &["shard"]),
        ("wagg_points_flushed_total", "counter", &["shard"]),
        ("wagg_shards_halted_total", "counter", &["shard"]),
        ("wagg_shard_state_reads_total", "counter", &["shard"]),
        (
            "wagg_module_put_duration_seconds",
            "histogram",
            &["module", "shard"],
        ),
        (
            "wagg_module_flush_duration_seconds",
            "histogram",
            &["module", "shard"],
        ),
        (
            "wagg_module_fuel_per_sample",
            "histogram",
            &["module", "shard"],
        ),
        ("wagg_module_memory_bytes", "gauge", &["module", "shard"]),
        (
            "wagg_module_memory_peak_bytes",
            "gauge",
            &["module", "shard"],
        ),
        ("wagg_module_live_series", "gauge", &["module", "shard"]),
        (
            "wagg_module_failures_total",
            "counter",
            &["module", "shard", "kind"],
        ),
        (
            "wagg_module_fallbacks_total",
            "counter",
            &["module", "shard"],
        ),
        ("wagg_swap_pause_seconds", "histogram", &["module", "shard"]),
        ("wagg_swap_build_seconds", "histogram", &["module", "shard"]),
        ("wagg_swap_failures_total", "counter", &["module", "shard"]),
        (
            "wagg_module_rollbacks_total",
            "counter",
            &["module", "reason"],
        ),
        ("wagg_module_state", "gauge", &["module", "state"]),
        ("wagg_rollout_weight_percent", "gauge", &[]),
        ("wagg_points_written_total", "counter", &[]),
        ("wagg_points_refused_total", "counter", &[]),
        ("wagg_sink_write_duration_seconds", "histogram", &[]),
        ("wagg_sink_errors_total", "counter", &["kind"]),
        ("wagg_sink_retries_total", "counter", &[]),
        ("wagg_sink_pending_points", "gauge", &[]),
    ];

    /// The text as Prometheus would read it; every sample line must also
    /// have the exposition format's shape (the parser skips lines it does
    /// not understand).
    fn scrape(metrics: &Metrics) -> Scrape {
        let text = metrics.render();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "value of {line}"
            );
            let name = series.split('{').next().unwrap();
            assert!(
                name.starts_with("wagg_")
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "name of {line}"
            );
        }
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    /// The samples of `name` whose labels include `labels`.
    fn find<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
        s.samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .collect()
    }

    /// The value of the one sample of `name` with exactly `labels` (for a
    /// histogram: its observation count).
    fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = find(s, name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        match &found[0].value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            Value::Summary(_) => unreachable!("wagg exports no summaries"),
        }
    }

    fn error() -> InstanceError {
        InstanceError::MemoryLimit {
            call: "put",
            limit: 1 << 20,
            requested: 2 << 20,
        }
    }

    /// One of every event, as a running pipeline would emit them.
    fn emit_everything(m: &Metrics, pc: &PipelineCounters, sc: &ShardCounters) {
        let decode_error = std::io::Error::other("expected value at line 1");
        MessageReceived.emit(m, pc);
        MessageDecoded { samples: 50 }.emit(m);
        MessageDeadLettered {
            reason: "bad_json",
            error: &decode_error,
        }
        .emit(m, pc);
        DuplicateRecognised.emit(m, pc);
        SamplesRouted { samples: 150 }.emit(m, pc);
        SamplesLate {
            samples: 3,
            time: 10,
            watermark: 60,
        }
        .emit(m, pc);
        SourceOperationFailed {
            op: "ack",
            error: &decode_error,
        }
        .emit(m);
        SourceReconnected {
            generation: 2,
            attempt: 1,
        }
        .emit(m);
        WatermarkAdvanced { watermark: 120 }.emit(m, pc);
        CheckpointWritten {
            rows: 10,
            pending_points: 5,
            duration: Duration::from_millis(3),
        }
        .emit(m, pc);
        DeliveriesAcked.emit(m);
        ShardQueueDepth { shard: 1, depth: 4 }.emit(m);
        BatchPut {
            shard: 1,
            module: "btree@0.1.0",
            samples: 1024,
            batch_duration: Duration::from_micros(300),
            put_duration: Duration::from_micros(200),
            fuel: 300_000,
            memory: (1 << 20, 2 << 20),
        }
        .emit(m, sc);
        ModuleFlushed {
            shard: 1,
            module: "btree@0.1.0",
            flush_duration: Duration::from_micros(500),
            duration: Duration::from_micros(700),
            stats: ModuleStats {
                live_series: 42,
                memory_bytes: 1 << 20,
                memory_peak_bytes: 2 << 20,
                ..ModuleStats::default()
            },
        }
        .emit(m, sc);
        PointsFlushed {
            shard: 1,
            points: 7,
            watermark: 120,
        }
        .emit(m, sc);
        ModuleFailed {
            shard: 2,
            module: "leaky@0.1.0",
            kind: error().kind(),
            error: &error(),
            recovery: Recovery::FallBack("hashmap@builtin"),
        }
        .emit(m, sc);
        ShardHalted {
            shard: 2,
            error: &error(),
        }
        .emit(m);
        StateReadBack {
            shard: 1,
            rows: 10,
            duration: Duration::from_millis(3),
        }
        .emit(m);
        ShardSwapped {
            shard: 0,
            from: "hashmap@builtin",
            to: "sorted@0.1.0",
            rows: 100,
            pause: Duration::from_micros(900),
            build: Duration::from_micros(900),
            replayed: 0,
        }
        .emit(m);
        SwapFailed {
            shard: 0,
            module: "otherworld@1",
            error: &error(),
        }
        .emit(m);
        ModuleRolledBack {
            module: "leaky@0.1.0",
            reason: "memory_limit",
            shards: 1,
        }
        .emit(m);
        m.set_rollout(25, Some("sorted@0.1.0"), "btree@0.1.0");
        PointsWritten {
            points: 7,
            duration: Duration::from_millis(12),
            pending_points: 0,
        }
        .emit(m, pc);
        PointsRefused {
            points: 1,
            first_reason: "empty metric name",
        }
        .emit(m, pc);
        SinkWriteFailed {
            error: &SinkError::Config("x".into()),
            pending_points: 9,
        }
        .emit(m, pc);
        SinkRetried {
            attempt: 1,
            delay: Duration::from_millis(80),
            error: &decode_error,
        }
        .emit(m);
    }

    #[test]
    fn every_family_renders_with_its_type_help_and_labels() {
        let (m, pc, sc) = (
            Metrics::new(),
            PipelineCounters::default(),
            ShardCounters::default(),
        );
        emit_everything(&m, &pc, &sc);
        let text = m.render();
        let s = scrape(&m);
        for (name, kind, labels) in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}"
            );
            assert!(
                s.docs.get(*name).is_some_and(|d| !d.is_empty()),
                "{name} has no help"
            );
            let samples = find(&s, name, &[]);
            assert!(!samples.is_empty(), "{name} has no sample");
            for sample in samples {
                let mut got: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
                got.sort_unstable();
                let mut want = labels.to_vec();
                want.sort_unstable();
                assert_eq!(got, want, "labels of {name}");
            }
        }
        // And nothing else: the table above is the whole list.
        let rendered: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let listed: BTreeSet<&str> = FAMILIES.iter().map(|f| f.0).collect();
        assert_eq!(rendered, listed);
    }

    #[test]
    fn events_set_the_values_they_document() {
        let (m, pc, sc) = (
            Metrics::new(),
            PipelineCounters::default(),
            ShardCounters::default(),
        );
        emit_everything(&m, &pc, &sc);
        let s = scrape(&m);
        let (btree1, leaky2) = (
            [("module", "btree@0.1.0"), ("shard", "1")],
            [("module", "leaky@0.1.0"), ("shard", "2")],
        );
        assert_eq!(value(&s, "wagg_messages_received_total", &[]), 1.0);
        assert_eq!(value(&s, "wagg_samples_received_total", &[]), 50.0);
        assert_eq!(value(&s, "wagg_samples_routed_total", &[]), 150.0);
        assert_eq!(value(&s, "wagg_late_samples_total", &[]), 3.0);
        assert_eq!(value(&s, "wagg_unacked_deliveries", &[]), 0.0);
        assert_eq!(value(&s, "wagg_flushed_watermark_seconds", &[]), 120.0);
        assert_eq!(value(&s, "wagg_source_errors_total", &[("op", "ack")]), 1.0);
        assert_eq!(value(&s, "wagg_shard_queue_depth", &[("shard", "1")]), 4.0);
        assert_eq!(value(&s, "wagg_module_put_duration_seconds", &btree1), 1.0);
        assert_eq!(value(&s, "wagg_module_live_series", &btree1), 42.0);
        assert_eq!(
            value(&s, "wagg_module_memory_peak_bytes", &btree1),
            (2 << 20) as f64
        );
        assert_eq!(
            value(&s, "wagg_points_flushed_total", &[("shard", "1")]),
            7.0
        );
        assert_eq!(
            value(
                &s,
                "wagg_module_failures_total",
                &[leaky2[0], leaky2[1], ("kind", "memory_limit")]
            ),
            1.0
        );
        assert_eq!(value(&s, "wagg_module_fallbacks_total", &leaky2), 1.0);
        assert_eq!(
            value(
                &s,
                "wagg_swap_pause_seconds",
                &[("module", "sorted@0.1.0"), ("shard", "0")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "wagg_swap_build_seconds",
                &[("module", "sorted@0.1.0"), ("shard", "0")]
            ),
            1.0
        );
        assert_eq!(
            value(&s, "wagg_sink_errors_total", &[("kind", "config")]),
            1.0
        );
        assert_eq!(value(&s, "wagg_sink_pending_points", &[]), 9.0);
        // 300 000 fuel for 1024 samples is 293 per sample: in (256, 512].
        let fuel = find(&s, "wagg_module_fuel_per_sample", &btree1);
        let Value::Histogram(buckets) = &fuel[0].value else {
            panic!("{fuel:?}")
        };
        let count = |le: f64| buckets.iter().find(|b| b.less_than == le).unwrap().count;
        assert_eq!((count(256.0), count(512.0)), (0.0, 1.0));

        // The in-process counters moved with the metrics.
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(pc.messages.load(Relaxed), 1);
        assert_eq!(pc.dead_lettered.load(Relaxed), 1);
        assert_eq!(pc.duplicates.load(Relaxed), 1);
        assert_eq!(pc.samples.load(Relaxed), 150);
        assert_eq!(pc.late_samples.load(Relaxed), 3);
        assert_eq!(pc.flushes.load(Relaxed), 1);
        assert_eq!(pc.checkpoints.load(Relaxed), 1);
        assert_eq!(pc.points_written.load(Relaxed), 7);
        assert_eq!(pc.points_refused.load(Relaxed), 1);
        assert_eq!(pc.sink_failures.load(Relaxed), 1);
        assert_eq!(sc.samples.load(Relaxed), 1024);
        assert_eq!(sc.batches.load(Relaxed), 1);
        assert_eq!(sc.put_nanos.load(Relaxed), 200_000);
        assert_eq!(sc.points.load(Relaxed), 7);
        assert_eq!(sc.failures.load(Relaxed), 1);
        assert_eq!(sc.live_series.load(Relaxed), 42);
    }

    #[test]
    fn dead_letters_are_counted_by_reason_and_in_total() {
        let (m, pc) = (Metrics::new(), PipelineCounters::default());
        let e = std::io::Error::other("bad");
        for reason in ["bad_json", "bad_json", "too_large"] {
            MessageDeadLettered { reason, error: &e }.emit(&m, &pc);
        }
        let s = scrape(&m);
        let by = |r| value(&s, "wagg_messages_dead_lettered_total", &[("reason", r)]);
        assert_eq!((by("bad_json"), by("too_large")), (2.0, 1.0));
        assert!(
            find(
                &s,
                "wagg_messages_dead_lettered_total",
                &[("reason", "bad_field")]
            )
            .is_empty()
        );
        assert_eq!(
            pc.dead_lettered.load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn unacked_deliveries_count_up_to_the_next_ack() {
        let (m, pc) = (Metrics::new(), PipelineCounters::default());
        for _ in 0..5 {
            MessageReceived.emit(&m, &pc);
        }
        assert_eq!(value(&scrape(&m), "wagg_unacked_deliveries", &[]), 5.0);
        DeliveriesAcked.emit(&m);
        MessageReceived.emit(&m, &pc);
        assert_eq!(value(&scrape(&m), "wagg_unacked_deliveries", &[]), 1.0);
        assert_eq!(value(&scrape(&m), "wagg_messages_received_total", &[]), 6.0);
    }

    #[test]
    fn a_module_that_leaves_a_shard_leaves_no_stale_gauges() {
        let (m, sc) = (Metrics::new(), ShardCounters::default());
        let put = |module| BatchPut {
            shard: 3,
            module,
            samples: 10,
            batch_duration: Duration::ZERO,
            put_duration: Duration::ZERO,
            fuel: 1000,
            memory: (65536, 65536),
        };
        put("hashmap@builtin").emit(&m, &sc);
        ShardSwapped {
            shard: 3,
            from: "hashmap@builtin",
            to: "btree@0.1.0",
            rows: 1,
            pause: Duration::from_micros(50),
            build: Duration::from_micros(50),
            replayed: 0,
        }
        .emit(&m);
        put("btree@0.1.0").emit(&m, &sc);
        let s = scrape(&m);
        assert!(
            find(
                &s,
                "wagg_module_memory_bytes",
                &[("module", "hashmap@builtin")]
            )
            .is_empty()
        );
        assert_eq!(
            value(
                &s,
                "wagg_module_memory_bytes",
                &[("module", "btree@0.1.0"), ("shard", "3")]
            ),
            65536.0
        );
        // Histograms and counters keep the old module's history.
        assert_eq!(
            value(
                &s,
                "wagg_module_put_duration_seconds",
                &[("module", "hashmap@builtin"), ("shard", "3")]
            ),
            1.0
        );

        ModuleFailed {
            shard: 3,
            module: "btree@0.1.0",
            kind: "trap",
            error: &error(),
            recovery: Recovery::FallBack("hashmap@builtin"),
        }
        .emit(&m, &sc);
        assert!(
            find(
                &scrape(&m),
                "wagg_module_memory_bytes",
                &[("module", "btree@0.1.0")]
            )
            .is_empty()
        );
    }

    #[test]
    fn rollout_weight_and_states_follow_the_setters() {
        let m = Metrics::new();
        let state = |s: &Scrape| -> BTreeSet<(String, String)> {
            find(s, "wagg_module_state", &[])
                .into_iter()
                .map(|x| {
                    assert_eq!(x.value, Value::Gauge(1.0));
                    (
                        x.labels.get("module").unwrap().to_owned(),
                        x.labels.get("state").unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let pairs = |p: &[(&str, &str)]| -> BTreeSet<(String, String)> {
            p.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        m.set_rollout(25, Some("leaky@0.1.0"), "btree@0.1.0");
        let s = scrape(&m);
        assert_eq!(value(&s, "wagg_rollout_weight_percent", &[]), 25.0);
        assert_eq!(
            state(&s),
            pairs(&[("btree@0.1.0", "incumbent"), ("leaky@0.1.0", "candidate")])
        );

        ModuleRolledBack {
            module: "leaky@0.1.0",
            reason: "memory_limit",
            shards: 1,
        }
        .emit(&m);
        m.set_rollout(0, None, "btree@0.1.0");
        let s = scrape(&m);
        assert_eq!(value(&s, "wagg_rollout_weight_percent", &[]), 0.0);
        assert_eq!(
            state(&s),
            pairs(&[("btree@0.1.0", "incumbent"), ("leaky@0.1.0", "rolled_back")])
        );
        assert_eq!(
            value(
                &s,
                "wagg_module_rollbacks_total",
                &[("module", "leaky@0.1.0"), ("reason", "memory_limit")]
            ),
            1.0
        );

        // Promoting: the old incumbent's line goes, weights cap at 100.
        m.set_rollout(200, Some("sorted@0.1.0"), "btree@0.1.0");
        m.set_rollout(0, None, "sorted@0.1.0");
        let s = scrape(&m);
        assert_eq!(
            state(&s),
            pairs(&[
                ("sorted@0.1.0", "incumbent"),
                ("leaky@0.1.0", "rolled_back")
            ])
        );
        m.set_rollout(200, Some("leaky@0.1.0"), "sorted@0.1.0");
        let s = scrape(&m);
        assert_eq!(value(&s, "wagg_rollout_weight_percent", &[]), 100.0);
        assert_eq!(
            state(&s),
            pairs(&[("sorted@0.1.0", "incumbent"), ("leaky@0.1.0", "candidate")])
        );
    }

    #[test]
    fn each_metrics_has_its_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let pc = PipelineCounters::default();
        MessageReceived.emit(&a, &pc);
        assert_eq!(value(&scrape(&a), "wagg_messages_received_total", &[]), 1.0);
        assert_eq!(value(&scrape(&b), "wagg_messages_received_total", &[]), 0.0);
    }

    #[test]
    fn labels_are_only_the_low_cardinality_ones() {
        let (m, pc, sc) = (
            Metrics::new(),
            PipelineCounters::default(),
            ShardCounters::default(),
        );
        emit_everything(&m, &pc, &sc);
        let allowed = ["module", "shard", "reason", "kind", "op", "state"];
        for sample in scrape(&m).samples {
            for name in sample.labels.keys() {
                assert!(
                    allowed.contains(&name.as_str()),
                    "{} has label {name}",
                    sample.metric
                );
            }
        }
    }
}
