//! The talk's second approach: a map of series → its open buckets, beside
//! an array of every open (bucket start, series) kept in time order.
//!
//! Samples go through the map (one hash lookup, then a scan of the
//! series' one or two open buckets). The array answers "what does this
//! watermark close?" without scanning the map: sorted by bucket start, the
//! closed buckets are a prefix. It is appended to when a bucket opens;
//! since time moves forward that nearly always keeps it sorted, and when a
//! late-arriving sample opens an older bucket the array is re-sorted once,
//! lazily, at the next flush (pattern-defeating quicksort is close to
//! linear on nearly sorted input).
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;
use wagg_guest::{Agg, Aggregates, Aggregator, FastState, flush_bound};

/// Map-plus-sorted-array aggregation; see the crate docs.
#[derive(Debug, Default)]
pub struct SortedAgg {
    bucket_seconds: u64,
    /// Each live series' open buckets as (bucket start, aggregate), in no
    /// particular order: there are rarely more than two.
    series: HashMap<u64, Vec<(u64, Agg)>, FastState>,
    /// (bucket start, series) of every open bucket: sorted unless
    /// `unsorted`.
    order: Vec<(u64, u64)>,
    unsorted: bool,
}

impl SortedAgg {
    /// Records a newly opened bucket in `order`, noting whether that broke
    /// the sort (a bucket older than the last one opened).
    fn opened(&mut self, bucket_start: u64, series: u64) {
        if self
            .order
            .last()
            .is_some_and(|&last| last > (bucket_start, series))
        {
            self.unsorted = true;
        }
        self.order.push((bucket_start, series));
    }

    /// Adds to the open bucket or opens one, via `update` or `init`.
    #[inline]
    fn upsert(
        &mut self,
        series: u64,
        bucket_start: u64,
        update: impl FnOnce(&mut Agg),
        init: impl FnOnce() -> Agg,
    ) {
        let buckets = self.series.entry(series).or_default();
        // The newest bucket is the likeliest: search from the back.
        if let Some((_, agg)) = buckets.iter_mut().rev().find(|(b, _)| *b == bucket_start) {
            update(agg);
            return;
        }
        buckets.push((bucket_start, init()));
        self.opened(bucket_start, series);
    }
}

impl Aggregator for SortedAgg {
    fn configure(
        &mut self,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<(), String> {
        if let Some((key, _)) = options.first() {
            return Err(format!("sorted: unknown option {key:?}"));
        }
        self.bucket_seconds = u64::from(bucket_seconds);
        Ok(())
    }

    #[inline]
    fn add(&mut self, series: u64, bucket_start: u64, value: f64) {
        self.upsert(series, bucket_start, |a| a.add(value), || Agg::new(value));
    }

    fn flush(&mut self, watermark: u64, out: &mut Aggregates) {
        if self.unsorted {
            self.order.sort_unstable();
            self.unsorted = false;
        }
        let bound = flush_bound(watermark, self.bucket_seconds);
        let cut = self.order.partition_point(|&(b, _)| b < bound);
        out.reserve(cut);
        for (b, s) in self.order.drain(..cut) {
            let Some(buckets) = self.series.get_mut(&s) else {
                continue;
            };
            if let Some(i) = buckets.iter().position(|(bb, _)| *bb == b) {
                let (_, agg) = buckets.swap_remove(i);
                out.push(s, b, &agg);
            }
            if buckets.is_empty() {
                self.series.remove(&s);
            }
        }
    }

    fn export_state(&self, out: &mut Aggregates) {
        for (&s, buckets) in &self.series {
            for (b, agg) in buckets {
                out.push(s, *b, agg);
            }
        }
    }

    fn begin_merge(&mut self, rows: usize) {
        self.series.reserve(rows);
        self.order.reserve(rows);
    }

    fn merge_row(&mut self, series: u64, bucket_start: u64, agg: &Agg) {
        self.upsert(series, bucket_start, |a| a.merge(agg), || *agg);
    }

    fn live_series(&self) -> u64 {
        self.series.len() as u64
    }

    fn live_buckets(&self) -> u64 {
        self.order.len() as u64
    }
}

wagg_guest::export_aggregator!(SortedAgg);

#[cfg(test)]
mod tests {
    extern crate std;

    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    use wagg_guest::Driver;

    use super::*;

    fn driver() -> Driver<SortedAgg> {
        let mut d = Driver::new();
        d.configure(60, &[]).expect("configure");
        d
    }

    #[test]
    fn late_bucket_is_flushed_in_order() {
        let mut d = driver();
        // Bucket 120 opens before bucket 0: the array goes unsorted.
        d.put(&[1, 2, 1], &[130, 10, 70], &[1.0, 2.0, 3.0]);
        assert!(d.inner().unsorted);
        let out = d.flush(120);
        assert_eq!(out.series, vec![2, 1]);
        assert_eq!(out.bucket_start, vec![0, 60]);
        let s = d.stats();
        assert_eq!((s.live_series, s.live_buckets), (1, 1));
        assert_eq!(
            d.flush(180).rows().collect::<Vec<_>>(),
            vec![(1, 120, Agg::new(1.0))]
        );
        assert_eq!(d.stats().live_series, 0);
    }

    #[test]
    fn repeated_samples_accumulate() {
        let mut d = driver();
        d.put(&[7; 4], &[0, 1, 2, 3], &[4.0, -2.0, 8.0, 1.0]);
        let out = d.flush(60);
        assert_eq!(
            out.rows().collect::<Vec<_>>(),
            vec![(
                7,
                0,
                Agg {
                    count: 4,
                    sum: 11.0,
                    min: -2.0,
                    max: 8.0
                }
            )]
        );
    }

    #[test]
    fn export_then_merge_reproduces_flush() {
        let mut a = driver();
        a.put(&[1, 2, 3, 1], &[10, 20, 70, 80], &[1.0, 2.0, 3.0, 4.0]);
        let mut b = driver();
        b.merge(&a.export_state()).expect("merge");
        b.merge(&a.export_state()).expect("merge twice doubles");
        let mut doubled = a.export_state().sorted();
        doubled.count.iter_mut().for_each(|c| *c *= 2);
        doubled.sum.iter_mut().for_each(|s| *s *= 2.0);
        assert_eq!(b.flush(1000).sorted(), doubled);
    }

    #[test]
    fn rejects_unknown_option() {
        let mut d = Driver::<SortedAgg>::new();
        let err = d
            .configure(60, &[("x".to_string(), "1".to_string())])
            .unwrap_err();
        assert!(err.contains("\"x\""), "{err}");
    }
}
