//! Shadow mode: a candidate module fed exactly the batches the incumbent
//! gets on a shard, in the same order, its flushes compared with the
//! incumbent's and never written anywhere.
//!
//! Timings are paired: the incumbent and the shadow put the same batch back
//! to back, in alternating order (so neither always runs on a warmer
//! cache), and the A/B report compares them batch by batch.
//!
//! When the shard falls behind (its command queue is deep), the shadow skips
//! batches rather than slow the incumbent down. A shadow that missed a batch
//! no longer holds what the incumbent holds, so its next flush is not
//! compared; after that flush it is seeded again from the incumbent's open
//! buckets. Skipped batches are counted in the report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::runtime::{Aggregates, Batch, Instance, InstanceError, ModuleStats, Runtime};
use crate::telemetry::{Metrics, ShadowBatch, ShadowCompared, ShadowSkipped};

use super::Assignment;

/// Batches whose paired timings a report keeps (the most recent).
pub const TIMED_BATCHES: usize = 8192;
/// Differences a report names in full.
pub const FIRST_DIFFERENCES: usize = 10;

/// One (series, bucket) on which the two modules disagree.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Difference {
    /// The series' tags.
    pub tags: BTreeMap<String, String>,
    /// Bucket start, seconds.
    pub bucket: u64,
    /// The incumbent's (count, sum), if it flushed the row.
    pub incumbent: Option<(u64, f64)>,
    /// The shadow's (count, sum), if it flushed the row.
    pub shadow: Option<(u64, f64)>,
}

/// What a shard knows about its shadow, for the A/B report.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ShadowReport {
    /// Shard index.
    pub shard: u32,
    /// The incumbent's label.
    pub incumbent: String,
    /// The shadow's label.
    pub shadow: String,
    /// The shadow's module id.
    pub shadow_id: String,
    /// Batches both put.
    pub batches: u64,
    /// Samples both put.
    pub samples: u64,
    /// Batches the shadow skipped because the shard fell behind.
    pub skipped_batches: u64,
    /// Samples in those batches.
    pub skipped_samples: u64,
    /// Per batch: the incumbent's and the shadow's put time per sample, ns
    /// (the last [`TIMED_BATCHES`]).
    pub put_ns: Vec<(f32, f32)>,
    /// Flushes compared.
    pub flushes: u64,
    /// Total flush time of the incumbent and of the shadow.
    pub flush_time: (Duration, Duration),
    /// Fuel both used for `put`, in total.
    pub fuel: (u64, u64),
    /// Both modules' stats at the last flush.
    pub stats: (ModuleStatsView, ModuleStatsView),
    /// Rows equal in both flushes.
    pub equal: u64,
    /// Rows both flushed with different values.
    pub differing: u64,
    /// Rows only the incumbent flushed.
    pub missing_in_shadow: u64,
    /// Rows only the shadow flushed.
    pub missing_in_incumbent: u64,
    /// The first differences.
    pub first_differences: Vec<Difference>,
    /// Why the shadow stopped, if it failed.
    pub stopped: Option<String>,
}

/// [`ModuleStats`] in a serialisable form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ModuleStatsView {
    /// Live series.
    pub live_series: u64,
    /// Open rows.
    pub live_buckets: u64,
    /// Heap bytes the module reports.
    pub heap_bytes: u64,
    /// Linear memory now.
    pub memory_bytes: u64,
    /// Linear memory high-water mark.
    pub memory_peak_bytes: u64,
}

impl From<ModuleStats> for ModuleStatsView {
    fn from(s: ModuleStats) -> Self {
        ModuleStatsView {
            live_series: s.live_series,
            live_buckets: s.live_buckets,
            heap_bytes: s.heap_bytes,
            memory_bytes: s.memory_bytes,
            memory_peak_bytes: s.memory_peak_bytes,
        }
    }
}

/// A shadow instance beside a shard's incumbent.
pub(super) struct Shadow {
    pub(super) assignment: Assignment,
    instance: Option<Instance>,
    /// Missed a batch since its last seeding: its next flush is not compared.
    desynced: bool,
    pub(super) report: ShadowReport,
    timings: VecDeque<(f32, f32)>,
    /// Rows of the last compared flush: equal, differing, missing in the
    /// shadow, missing in the incumbent.
    last_rows: Option<[u64; 4]>,
    metrics: std::sync::Arc<Metrics>,
    /// A failure not yet reported to the controller: kind and error.
    unreported: Option<(&'static str, String)>,
}

impl Shadow {
    /// A shadow of `assignment` holding `state` (the incumbent's open
    /// buckets).
    pub(super) fn start(
        runtime: &Runtime,
        assignment: Assignment,
        bucket_seconds: u32,
        state: &Aggregates,
        report: ShadowReport,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, InstanceError> {
        let instance = seeded(runtime, &assignment, bucket_seconds, state)?;
        Ok(Shadow {
            assignment,
            instance: Some(instance),
            desynced: false,
            report,
            timings: VecDeque::with_capacity(TIMED_BATCHES),
            last_rows: None,
            metrics,
            unreported: None,
        })
    }

    /// Whether the shadow still runs.
    pub(super) fn running(&self) -> bool {
        self.instance.is_some()
    }

    /// Puts `batch`; returns the time it took. Stops the shadow on failure.
    pub(super) fn put(&mut self, batch: &Batch) -> Option<Duration> {
        let instance = self.instance.as_mut()?;
        let started = std::time::Instant::now();
        match instance.put(batch) {
            Ok(_) => {
                self.report.fuel.1 += instance.last_fuel();
                Some(started.elapsed())
            }
            Err(e) => {
                self.stop(&e);
                None
            }
        }
    }

    /// Records one batch's paired timings.
    pub(super) fn record_batch(
        &mut self,
        samples: usize,
        incumbent: Duration,
        shadow: Duration,
        incumbent_fuel: u64,
    ) {
        let per = |d: Duration| (d.as_nanos() as f64 / samples.max(1) as f64) as f32;
        if self.timings.len() == TIMED_BATCHES {
            self.timings.pop_front();
        }
        self.timings.push_back((per(incumbent), per(shadow)));
        ShadowBatch {
            incumbent: &self.report.incumbent,
            shadow: &self.report.shadow,
            incumbent_ns: f64::from(per(incumbent)),
            shadow_ns: f64::from(per(shadow)),
        }
        .emit(&self.metrics);
        self.report.batches += 1;
        self.report.samples += samples as u64;
        self.report.fuel.0 += incumbent_fuel;
    }

    /// Counts a batch of `samples` the shadow did not get.
    pub(super) fn skip(&mut self, samples: usize) {
        self.report.skipped_batches += 1;
        self.report.skipped_samples += samples as u64;
        ShadowSkipped {
            shadow: &self.report.shadow,
            shard: self.report.shard,
        }
        .emit(&self.metrics);
        self.desynced = true;
    }

    /// Flushes the shadow at `watermark` and compares its rows with the
    /// incumbent's `flushed`; `tags` names a series for the report. Returns
    /// the rows that differed or were missing on either side (0 when the
    /// flush was not compared).
    pub(super) fn flush_and_compare(
        &mut self,
        watermark: u64,
        flushed: &Aggregates,
        incumbent_time: Duration,
        known: &dyn Fn(u64) -> bool,
        tags: &dyn Fn(u64) -> BTreeMap<String, String>,
    ) -> u64 {
        let Some(instance) = self.instance.as_mut() else {
            return 0;
        };
        let started = std::time::Instant::now();
        let theirs = match instance.flush(watermark, known) {
            Ok(a) => a,
            Err(e) => {
                self.stop(&e);
                return 0;
            }
        };
        let shadow_time = started.elapsed();
        if self.desynced {
            return 0;
        }
        self.report.flushes += 1;
        self.report.flush_time.0 += incumbent_time;
        self.report.flush_time.1 += shadow_time;
        let rows = |a: &Aggregates| -> HashMap<(u64, u64), (u64, f64, f64, f64)> {
            (0..a.len())
                .map(|i| {
                    (
                        (a.series[i], a.bucket_start[i]),
                        (a.count[i], a.sum[i], a.min[i], a.max[i]),
                    )
                })
                .collect()
        };
        let ours = rows(flushed);
        let theirs = rows(&theirs);
        let before = [
            self.report.equal,
            self.report.differing,
            self.report.missing_in_shadow,
            self.report.missing_in_incumbent,
        ];
        let mut bad = 0;
        let note = |report: &mut ShadowReport,
                    (series, bucket): (u64, u64),
                    a: Option<(u64, f64)>,
                    b: Option<(u64, f64)>| {
            if report.first_differences.len() < FIRST_DIFFERENCES {
                report.first_differences.push(Difference {
                    tags: tags(series),
                    bucket,
                    incumbent: a,
                    shadow: b,
                });
            }
        };
        for (key, a) in &ours {
            match theirs.get(key) {
                Some(b) if bitwise_eq(a, b) => self.report.equal += 1,
                Some(b) => {
                    self.report.differing += 1;
                    bad += 1;
                    note(&mut self.report, *key, Some((a.0, a.1)), Some((b.0, b.1)));
                }
                None => {
                    self.report.missing_in_shadow += 1;
                    bad += 1;
                    note(&mut self.report, *key, Some((a.0, a.1)), None);
                }
            }
        }
        for (key, b) in &theirs {
            if !ours.contains_key(key) {
                self.report.missing_in_incumbent += 1;
                bad += 1;
                note(&mut self.report, *key, None, Some((b.0, b.1)));
            }
        }
        let after = [
            self.report.equal,
            self.report.differing,
            self.report.missing_in_shadow,
            self.report.missing_in_incumbent,
        ];
        self.last_rows = Some([0, 1, 2, 3].map(|i| after[i] - before[i]));
        bad
    }

    /// After a flush: seeds a desynced shadow again from the incumbent's
    /// open buckets, and notes both modules' stats.
    pub(super) fn after_flush(
        &mut self,
        runtime: &Runtime,
        bucket_seconds: u32,
        incumbent_state: impl FnOnce() -> Result<Aggregates, InstanceError>,
        incumbent_stats: ModuleStats,
    ) {
        if self.instance.is_none() {
            return;
        }
        if self.desynced {
            let reseeded = incumbent_state()
                .and_then(|state| seeded(runtime, &self.assignment, bucket_seconds, &state));
            match reseeded {
                Ok(instance) => {
                    self.instance = Some(instance);
                    self.desynced = false;
                }
                Err(e) => {
                    self.stop(&e);
                    return;
                }
            }
        }
        let shadow_stats = self.instance.as_mut().map(|i| i.stats());
        match shadow_stats {
            Some(Ok(s)) => {
                self.report.stats = (incumbent_stats.into(), s.into());
                if let Some(rows) = self.last_rows.take() {
                    ShadowCompared {
                        shard: self.report.shard,
                        incumbent: &self.report.incumbent,
                        shadow: &self.report.shadow,
                        rows,
                        memory: (incumbent_stats.memory_bytes, s.memory_bytes),
                    }
                    .emit(&self.metrics);
                }
            }
            Some(Err(e)) => self.stop(&e),
            None => {}
        }
    }

    fn stop(&mut self, e: &InstanceError) {
        tracing::warn!(
            shard = self.report.shard,
            module = %self.assignment.label,
            error = %e,
            "Shadow module failed; it stops, the incumbent is untouched."
        );
        self.report.stopped = Some(e.to_string());
        self.unreported = Some((e.kind(), e.to_string()));
        self.instance = None;
    }

    /// The failure that stopped the shadow, once: the shard reports it so
    /// that the module list counts a shadow's failures like any other.
    pub(super) fn take_failure(&mut self) -> Option<(&'static str, String)> {
        self.unreported.take()
    }

    /// The report with its timings.
    pub(super) fn report(&self) -> ShadowReport {
        let mut r = self.report.clone();
        r.put_ns = self.timings.iter().copied().collect();
        r
    }
}

/// Same aggregate to the bit: both modules add the same values in the same
/// order, so anything else is a difference.
fn bitwise_eq(a: &(u64, f64, f64, f64), b: &(u64, f64, f64, f64)) -> bool {
    a.0 == b.0
        && a.1.to_bits() == b.1.to_bits()
        && a.2.to_bits() == b.2.to_bits()
        && a.3.to_bits() == b.3.to_bits()
}

fn seeded(
    runtime: &Runtime,
    assignment: &Assignment,
    bucket_seconds: u32,
    state: &Aggregates,
) -> Result<Instance, InstanceError> {
    let mut instance =
        runtime.instantiate(&assignment.module, bucket_seconds, &assignment.options)?;
    instance.merge(state)?;
    Ok(instance)
}
