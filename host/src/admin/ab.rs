//! The A/B report: a shadow module against the incumbent on the same live
//! batches, and whether they differ beyond noise.
//!
//! Put times are paired: both modules put the same batch back to back (in
//! alternating order), so a batch's ratio `shadow / incumbent` cancels what
//! the machine was doing at that moment. The report gives the geometric mean
//! of those ratios with a 95 % confidence interval (a t-interval on their
//! logarithms). It calls a difference real only when the whole interval lies
//! beyond ±[`MARGIN`]: a shared machine makes two runs of the same code differ
//! by a few percent, and that is not a difference worth acting on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::shard::{Difference, ShadowReport};

/// Ratios within ±3 % of 1 are not called a difference.
pub const MARGIN: f64 = 0.03;

/// The whole report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AbReport {
    /// Shards with a shadow.
    pub shards: Vec<u32>,
    /// Module A: the incumbent on those shards.
    pub incumbent: ModuleFigures,
    /// Module B: the shadow.
    pub shadow: ModuleFigures,
    /// B's put time per sample relative to A's.
    pub put_ratio: Ratio,
    /// B's total flush time relative to A's (no interval: flushes are few).
    pub flush_ratio: f64,
    /// What shadowing costs: put time per sample with the shadow (A + B)
    /// relative to A alone, on the shadowed shards.
    pub shadow_cost: f64,
    /// Samples per second one shard can put, from the measured put times:
    /// A alone, and A with the shadow.
    pub shard_capacity: (f64, f64),
    /// Batches the shadow skipped because a shard fell behind.
    pub skipped_batches: u64,
    /// Samples in those batches.
    pub skipped_samples: u64,
    /// Whether their flushes agree.
    pub agreement: Agreement,
    /// Shards whose shadow stopped, and why.
    pub stopped: BTreeMap<u32, String>,
}

/// One module's figures over the shadowed shards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleFigures {
    /// `name@version`.
    pub label: String,
    /// Samples put.
    pub samples: u64,
    /// Median put time per sample over batches, ns.
    pub put_ns_median: f64,
    /// 99th percentile put time per sample over batches, ns.
    pub put_ns_p99: f64,
    /// Mean flush time, ms.
    pub flush_ms: f64,
    /// Linear memory now, bytes (sum over shards).
    pub memory_bytes: u64,
    /// Largest linear memory of one instance, bytes.
    pub memory_peak_bytes: u64,
    /// Linear memory per live series, bytes.
    pub bytes_per_series: f64,
    /// Fuel per sample put.
    pub fuel_per_sample: f64,
}

/// A paired ratio B/A with its interval and verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// Geometric mean of the per-batch ratios.
    pub ratio: f64,
    /// 95 % interval, low end.
    pub low: f64,
    /// 95 % interval, high end.
    pub high: f64,
    /// Batches compared.
    pub batches: usize,
    /// `slower`, `faster`, or `no difference` (beyond noise).
    pub verdict: String,
}

/// How the two modules' flushes compare.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Flushes compared.
    pub flushes: u64,
    /// (series, bucket) rows equal in both.
    pub equal: u64,
    /// Rows both flushed, with different values.
    pub differing: u64,
    /// Rows only the incumbent flushed.
    pub missing_in_shadow: u64,
    /// Rows only the shadow flushed.
    pub missing_in_incumbent: u64,
    /// The first differences found.
    pub first_differences: Vec<Difference>,
}

impl Agreement {
    /// Rows that were not equal.
    pub fn disagreeing(&self) -> u64 {
        self.differing + self.missing_in_shadow + self.missing_in_incumbent
    }
}

/// Builds the report from the shards' shadow reports.
pub fn report(reports: &[ShadowReport]) -> AbReport {
    let mut r = AbReport::default();
    let (mut a_ns, mut b_ns, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut a_flush, mut b_flush, mut flushes) = (0f64, 0f64, 0u64);
    let (mut a_fuel, mut b_fuel) = (0u64, 0u64);
    let (mut a_series, mut b_series) = (0u64, 0u64);
    for s in reports {
        r.shards.push(s.shard);
        r.incumbent.label.clone_from(&s.incumbent);
        r.shadow.label.clone_from(&s.shadow);
        r.incumbent.samples += s.samples;
        r.shadow.samples += s.samples;
        r.skipped_batches += s.skipped_batches;
        r.skipped_samples += s.skipped_samples;
        for &(a, b) in &s.put_ns {
            a_ns.push(f64::from(a));
            b_ns.push(f64::from(b));
            if a > 0.0 && b > 0.0 {
                pairs.push((f64::from(b) / f64::from(a)).ln());
            }
        }
        a_flush += s.flush_time.0.as_secs_f64();
        b_flush += s.flush_time.1.as_secs_f64();
        flushes += s.flushes;
        a_fuel += s.fuel.0;
        b_fuel += s.fuel.1;
        let (a, b) = s.stats;
        r.incumbent.memory_bytes += a.memory_bytes;
        r.shadow.memory_bytes += b.memory_bytes;
        r.incumbent.memory_peak_bytes = r.incumbent.memory_peak_bytes.max(a.memory_peak_bytes);
        r.shadow.memory_peak_bytes = r.shadow.memory_peak_bytes.max(b.memory_peak_bytes);
        a_series += a.live_series;
        b_series += b.live_series;
        let g = &mut r.agreement;
        g.flushes += s.flushes;
        g.equal += s.equal;
        g.differing += s.differing;
        g.missing_in_shadow += s.missing_in_shadow;
        g.missing_in_incumbent += s.missing_in_incumbent;
        for d in &s.first_differences {
            if g.first_differences.len() < crate::shard::shadow::FIRST_DIFFERENCES {
                g.first_differences.push(d.clone());
            }
        }
        if let Some(why) = &s.stopped {
            r.stopped.insert(s.shard, why.clone());
        }
    }
    r.incumbent.put_ns_median = quantile(&mut a_ns, 0.5);
    r.incumbent.put_ns_p99 = quantile(&mut a_ns, 0.99);
    r.shadow.put_ns_median = quantile(&mut b_ns, 0.5);
    r.shadow.put_ns_p99 = quantile(&mut b_ns, 0.99);
    let per_flush = |t: f64| {
        if flushes == 0 {
            0.0
        } else {
            t * 1e3 / flushes as f64
        }
    };
    r.incumbent.flush_ms = per_flush(a_flush);
    r.shadow.flush_ms = per_flush(b_flush);
    r.flush_ratio = if a_flush > 0.0 {
        b_flush / a_flush
    } else {
        0.0
    };
    let per_sample = |fuel: u64, samples: u64| {
        if samples == 0 {
            0.0
        } else {
            fuel as f64 / samples as f64
        }
    };
    r.incumbent.fuel_per_sample = per_sample(a_fuel, r.incumbent.samples);
    r.shadow.fuel_per_sample = per_sample(b_fuel, r.shadow.samples);
    let per_series = |bytes: u64, series: u64| {
        if series == 0 {
            0.0
        } else {
            bytes as f64 / series as f64
        }
    };
    r.incumbent.bytes_per_series = per_series(r.incumbent.memory_bytes, a_series);
    r.shadow.bytes_per_series = per_series(r.shadow.memory_bytes, b_series);
    r.put_ratio = paired_ratio(&pairs);
    let (sum_a, sum_b): (f64, f64) = (a_ns.iter().sum(), b_ns.iter().sum());
    r.shadow_cost = if sum_a > 0.0 {
        (sum_a + sum_b) / sum_a
    } else {
        0.0
    };
    r
}

/// The geometric mean of ratios given as logarithms, with a 95 % t-interval
/// and the verdict against [`MARGIN`].
pub fn paired_ratio(logs: &[f64]) -> Ratio {
    let n = logs.len();
    if n < 2 {
        return Ratio {
            ratio: logs.first().map_or(0.0, |l| l.exp()),
            batches: n,
            verdict: "too few batches".into(),
            ..Ratio::default()
        };
    }
    let mean = logs.iter().sum::<f64>() / n as f64;
    let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t95(n - 1) * (var / n as f64).sqrt();
    let (low, high) = ((mean - half).exp(), (mean + half).exp());
    let verdict = if low > 1.0 + MARGIN {
        "slower"
    } else if high < 1.0 / (1.0 + MARGIN) {
        "faster"
    } else {
        "no difference"
    };
    Ratio {
        ratio: mean.exp(),
        low,
        high,
        batches: n,
        verdict: verdict.into(),
    }
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        31..=60 => 2.0,
        61..=120 => 1.98,
        _ => 1.96,
    }
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(pairs: &[(f64, f64)]) -> Vec<f64> {
        pairs.iter().map(|(a, b)| (b / a).ln()).collect()
    }

    #[test]
    fn equal_timings_are_no_difference_and_a_clear_slowdown_is_slower() {
        // Noisy but equal: the batch-to-batch noise is shared by the pair.
        let noise = |i: usize| 1.0 + 0.3 * ((i * 7919) % 13) as f64 / 13.0;
        let same: Vec<(f64, f64)> = (0..500)
            .map(|i| {
                (
                    20.0 * noise(i),
                    20.0 * noise(i) * (1.0 + 0.01 * ((i % 3) as f64 - 1.0)),
                )
            })
            .collect();
        let r = paired_ratio(&logs(&same));
        assert_eq!(r.verdict, "no difference", "{r:?}");
        let slow: Vec<(f64, f64)> = (0..500)
            .map(|i| {
                (
                    20.0 * noise(i),
                    30.0 * noise(i) * (1.0 + 0.05 * ((i % 5) as f64 - 2.0)),
                )
            })
            .collect();
        let r = paired_ratio(&logs(&slow));
        assert_eq!(r.verdict, "slower", "{r:?}");
        assert!((r.ratio - 1.5).abs() < 0.05, "{r:?}");
        assert!(r.low < r.ratio && r.ratio < r.high);
        let fast: Vec<(f64, f64)> = slow.iter().map(|&(a, b)| (b, a)).collect();
        assert_eq!(paired_ratio(&logs(&fast)).verdict, "faster");
    }

    #[test]
    fn a_few_noisy_batches_are_not_called_a_difference() {
        let r = paired_ratio(&logs(&[(10.0, 13.0), (10.0, 8.0), (10.0, 12.0)]));
        assert_eq!(r.verdict, "no difference", "{r:?}");
    }
}
