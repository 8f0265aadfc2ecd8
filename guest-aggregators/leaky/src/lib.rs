//! The talk's leak, on purpose: the hash-map strategy, except that it keeps
//! a copy of every bucket it flushes, "for later", and never lets go.
//!
//! Its output is correct, so only memory gives it away: `heap-bytes` and
//! linear memory grow with every window until the host's memory limit
//! stops the module. The host's limit tests and the swap-under-pressure
//! demo use it.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use wagg_guest::{Agg, Aggregates, Aggregator, FastState, flush_bound};

/// Hash-map aggregation that never forgets a flushed bucket.
#[derive(Debug, Default)]
pub struct LeakyAgg {
    bucket_seconds: u64,
    buckets: HashMap<(u64, u64), Agg, FastState>,
    /// Open buckets per series, so `live_series` needs no scan.
    series: HashMap<u64, u32, FastState>,
    /// The leak: every flushed row, forever. Not counted as live.
    history: Vec<(u64, u64, Agg)>,
}

impl LeakyAgg {
    /// Rows kept after being flushed: the size of the leak.
    pub fn leaked_rows(&self) -> usize {
        self.history.len()
    }

    fn open(&mut self, series: u64) {
        *self.series.entry(series).or_insert(0) += 1;
    }
}

impl Aggregator for LeakyAgg {
    fn configure(
        &mut self,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<(), String> {
        if let Some((key, _)) = options.first() {
            return Err(format!("leaky: unknown option {key:?}"));
        }
        self.bucket_seconds = u64::from(bucket_seconds);
        Ok(())
    }

    #[inline]
    fn add(&mut self, series: u64, bucket_start: u64, value: f64) {
        match self.buckets.entry((series, bucket_start)) {
            Entry::Occupied(mut e) => e.get_mut().add(value),
            Entry::Vacant(e) => {
                e.insert(Agg::new(value));
                self.open(series);
            }
        }
    }

    fn flush(&mut self, watermark: u64, out: &mut Aggregates) {
        let bound = flush_bound(watermark, self.bucket_seconds);
        for ((s, b), agg) in self.buckets.extract_if(|&(_, b), _| b < bound) {
            out.push(s, b, &agg);
            self.history.push((s, b, agg));
            if let Entry::Occupied(mut e) = self.series.entry(s) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    fn export_state(&self, out: &mut Aggregates) {
        for (&(s, b), agg) in &self.buckets {
            out.push(s, b, agg);
        }
    }

    fn begin_merge(&mut self, rows: usize) {
        // A series has one or two open buckets as a rule, so `rows` bounds
        // the series too without wasting much.
        self.buckets.reserve(rows);
        self.series.reserve(rows);
    }

    fn merge_row(&mut self, series: u64, bucket_start: u64, agg: &Agg) {
        match self.buckets.entry((series, bucket_start)) {
            Entry::Occupied(mut e) => e.get_mut().merge(agg),
            Entry::Vacant(e) => {
                e.insert(*agg);
                self.open(series);
            }
        }
    }

    fn live_series(&self) -> u64 {
        self.series.len() as u64
    }

    fn live_buckets(&self) -> u64 {
        self.buckets.len() as u64
    }
}

wagg_guest::export_aggregator!(LeakyAgg);

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec;

    use wagg_guest::Driver;

    use super::*;

    #[test]
    fn output_is_correct_but_history_grows() {
        let mut d = Driver::<LeakyAgg>::new();
        d.configure(60, &[]).expect("configure");
        for window in 0..3u64 {
            let t = window * 60;
            d.put(&[1, 2, 1], &[t, t + 1, t + 2], &[1.0, 2.0, 3.0]);
            let out = d.flush(t + 60).sorted();
            assert_eq!(out.series, vec![1, 2]);
            assert_eq!(out.bucket_start, vec![t, t]);
            assert_eq!(out.sum, vec![4.0, 2.0]);
            assert_eq!(d.stats().live_buckets, 0);
        }
        assert_eq!(d.inner().leaked_rows(), 6);
    }
}
