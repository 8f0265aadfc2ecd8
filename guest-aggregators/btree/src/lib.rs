//! An ordered strategy: a `BTreeMap` keyed by (bucket start, series).
//!
//! Ordering by bucket first puts every bucket a flush closes at the front
//! of the map, so a flush is one `split_off` instead of a scan of all open
//! buckets; the price is a tree descent (O(log n)) per sample instead of a
//! hash lookup.
#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::collections::btree_map::Entry;
use alloc::format;
use alloc::string::String;
use core::mem;

use hashbrown::{HashMap, hash_map};
use wagg_guest::{Agg, Aggregates, Aggregator, FastState, flush_bound};

/// B-tree aggregation; see the crate docs.
#[derive(Debug, Default)]
pub struct BTreeAgg {
    bucket_seconds: u64,
    buckets: BTreeMap<(u64, u64), Agg>,
    /// Open buckets per series, so `live_series` needs no scan. Hashed, not
    /// ordered: nothing reads it in order, and removing from a `BTreeMap`
    /// shifts the node's entries, 8 `memory.copy` calls out to the host per
    /// flushed row in Wasm (BENCHMARKS.md, session 11).
    series: HashMap<u64, u32, FastState>,
}

impl BTreeAgg {
    fn open(&mut self, series: u64) {
        *self.series.entry(series).or_insert(0) += 1;
    }
}

impl Aggregator for BTreeAgg {
    fn configure(
        &mut self,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<(), String> {
        if let Some((key, _)) = options.first() {
            return Err(format!("btree: unknown option {key:?}"));
        }
        self.bucket_seconds = u64::from(bucket_seconds);
        Ok(())
    }

    #[inline]
    fn add(&mut self, series: u64, bucket_start: u64, value: f64) {
        match self.buckets.entry((bucket_start, series)) {
            Entry::Occupied(mut e) => e.get_mut().add(value),
            Entry::Vacant(e) => {
                e.insert(Agg::new(value));
                self.open(series);
            }
        }
    }

    fn flush(&mut self, watermark: u64, out: &mut Aggregates) {
        let bound = flush_bound(watermark, self.bucket_seconds);
        // `split_off` keeps the part before the key in place: swap so the
        // map keeps the open buckets and `closed` holds the flushed ones.
        let open = self.buckets.split_off(&(bound, 0));
        let closed = mem::replace(&mut self.buckets, open);
        if closed.is_empty() {
            return;
        }
        out.reserve(closed.len());
        for ((b, s), agg) in closed {
            out.push(s, b, &agg);
            if let hash_map::Entry::Occupied(mut e) = self.series.entry(s) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    fn export_state(&self, out: &mut Aggregates) {
        for (&(b, s), agg) in &self.buckets {
            out.push(s, b, agg);
        }
    }

    fn merge_row(&mut self, series: u64, bucket_start: u64, agg: &Agg) {
        match self.buckets.entry((bucket_start, series)) {
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

wagg_guest::export_aggregator!(BTreeAgg);

#[cfg(test)]
mod tests {
    extern crate std;

    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    use wagg_guest::Driver;

    use super::*;

    fn driver() -> Driver<BTreeAgg> {
        let mut d = Driver::new();
        d.configure(60, &[]).expect("configure");
        d
    }

    #[test]
    fn flush_splits_at_the_watermark() {
        let mut d = driver();
        d.put(&[2, 1, 1, 3], &[30, 59, 60, 179], &[5.0, 3.0, 7.0, 1.0]);
        let out = d.flush(120);
        // Ordered by bucket, then series: no sort needed.
        assert_eq!(out.series, vec![1, 2, 1]);
        assert_eq!(out.bucket_start, vec![0, 0, 60]);
        let s = d.stats();
        assert_eq!((s.live_series, s.live_buckets), (1, 1));
        assert!(d.flush(179).is_empty());
        assert_eq!(
            d.flush(180).rows().collect::<Vec<_>>(),
            vec![(3, 120, Agg::new(1.0))]
        );
    }

    #[test]
    fn export_then_merge_reproduces_flush() {
        let mut a = driver();
        a.put(
            &[1, 2, 3, 1, 1],
            &[10, 20, 70, 80, 11],
            &[1.0, 2.0, 3.0, 4.0, -1.0],
        );
        let mut b = driver();
        b.merge(&a.export_state()).expect("merge");
        assert_eq!(a.flush(1000), b.flush(1000));
    }

    #[test]
    fn rejects_unknown_option() {
        let mut d = Driver::<BTreeAgg>::new();
        let err = d
            .configure(60, &[("order".to_string(), "asc".to_string())])
            .unwrap_err();
        assert!(err.contains("order"), "{err}");
    }
}
