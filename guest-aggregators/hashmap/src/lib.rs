//! The baseline strategy: one hash map from (series, bucket start) to its
//! aggregate.
//!
//! A sample costs one hash lookup; opening a bucket costs a second one to
//! count the series. Flushing scans every open bucket, which is cheap while
//! a window holds few buckets per series (the common case: the current
//! bucket and perhaps the previous one).
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;

use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use wagg_guest::{Agg, Aggregates, Aggregator, FastState, flush_bound};

/// Hash-map aggregation; see the crate docs.
#[derive(Debug, Default)]
pub struct HashMapAgg {
    bucket_seconds: u64,
    buckets: HashMap<(u64, u64), Agg, FastState>,
    /// Open buckets per series, so `live_series` needs no scan.
    series: HashMap<u64, u32, FastState>,
}

impl HashMapAgg {
    fn open(&mut self, series: u64) {
        *self.series.entry(series).or_insert(0) += 1;
    }
}

impl Aggregator for HashMapAgg {
    fn configure(
        &mut self,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<(), String> {
        if let Some((key, _)) = options.first() {
            return Err(format!("hashmap: unknown option {key:?}"));
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

wagg_guest::export_aggregator!(HashMapAgg);

#[cfg(test)]
mod tests {
    extern crate std;

    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    use wagg_guest::Driver;

    use super::*;

    fn driver() -> Driver<HashMapAgg> {
        let mut d = Driver::new();
        d.configure(60, &[]).expect("configure");
        d
    }

    #[test]
    fn aggregates_per_series_and_bucket() {
        let mut d = driver();
        d.put(&[1, 1, 2, 1], &[0, 59, 30, 60], &[1.0, 3.0, 5.0, 7.0]);
        let s = d.stats();
        assert_eq!((s.live_series, s.live_buckets), (2, 3));
        let out = d.flush(60).sorted();
        assert_eq!(out.series, vec![1, 2]);
        assert_eq!(out.count, vec![2, 1]);
        assert_eq!(out.sum, vec![4.0, 5.0]);
        assert_eq!((out.min[0], out.max[0]), (1.0, 3.0));
        let s = d.stats();
        assert_eq!((s.live_series, s.live_buckets), (1, 1));
        let rest = d.flush(120);
        assert_eq!(
            rest.rows().collect::<Vec<_>>(),
            vec![(1, 60, Agg::new(7.0))]
        );
        assert_eq!(d.stats().live_series, 0);
    }

    #[test]
    fn export_then_merge_reproduces_flush() {
        let mut a = driver();
        a.put(&[1, 2, 3, 1], &[10, 20, 70, 80], &[1.0, 2.0, 3.0, 4.0]);
        let mut b = driver();
        b.merge(&a.export_state()).expect("merge");
        assert_eq!(a.export_state().sorted(), b.export_state().sorted());
        assert_eq!(a.flush(1000).sorted(), b.flush(1000).sorted());
    }

    #[test]
    fn rejects_unknown_option() {
        let mut d = Driver::<HashMapAgg>::new();
        let err = d
            .configure(60, &[("shards".to_string(), "4".to_string())])
            .unwrap_err();
        assert!(err.contains("shards"), "{err}");
    }
}
