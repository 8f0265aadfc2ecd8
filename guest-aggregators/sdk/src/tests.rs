use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::hash::BuildHasher;

use super::*;

/// The simplest correct strategy, to test the driver in isolation.
#[derive(Debug, Default)]
struct Naive {
    width: u64,
    rows: Vec<(u64, u64, Agg)>,
    batches: usize,
    /// The row count of every `begin_merge`.
    merges: Vec<usize>,
}

impl Naive {
    fn find(&mut self, s: u64, b: u64) -> Option<&mut Agg> {
        self.rows
            .iter_mut()
            .find(|(rs, rb, _)| *rs == s && *rb == b)
            .map(|(_, _, a)| a)
    }
}

impl Aggregator for Naive {
    fn configure(&mut self, w: u32, options: &[(String, String)]) -> Result<(), String> {
        if let Some((k, _)) = options.first() {
            return Err(format!("unknown option {k:?}"));
        }
        self.width = u64::from(w);
        Ok(())
    }
    fn begin_batch(&mut self, _len: usize) {
        self.batches += 1;
    }
    fn begin_merge(&mut self, rows: usize) {
        self.merges.push(rows);
    }
    fn add(&mut self, s: u64, b: u64, v: f64) {
        match self.find(s, b) {
            Some(a) => a.add(v),
            None => self.rows.push((s, b, Agg::new(v))),
        }
    }
    fn flush(&mut self, watermark: u64, out: &mut Aggregates) {
        let bound = flush_bound(watermark, self.width);
        self.rows.retain(|(s, b, a)| {
            if *b < bound {
                out.push(*s, *b, a);
                false
            } else {
                true
            }
        });
    }
    fn export_state(&self, out: &mut Aggregates) {
        for (s, b, a) in &self.rows {
            out.push(*s, *b, a);
        }
    }
    fn merge_row(&mut self, s: u64, b: u64, agg: &Agg) {
        match self.find(s, b) {
            Some(a) => a.merge(agg),
            None => self.rows.push((s, b, *agg)),
        }
    }
    fn live_series(&self) -> u64 {
        let mut s: Vec<u64> = self.rows.iter().map(|r| r.0).collect();
        s.sort_unstable();
        s.dedup();
        s.len() as u64
    }
    fn live_buckets(&self) -> u64 {
        self.rows.len() as u64
    }
}

fn configured(width: u32) -> Driver<Naive> {
    let mut d = Driver::new();
    d.configure(width, &[]).expect("configure");
    d
}

#[test]
fn agg_tracks_count_sum_min_max() {
    let mut a = Agg::new(2.0);
    a.add(-1.0);
    a.add(5.0);
    assert_eq!(
        a,
        Agg {
            count: 3,
            sum: 6.0,
            min: -1.0,
            max: 5.0
        }
    );
    let mut b = Agg::new(10.0);
    b.merge(&a);
    assert_eq!((b.count, b.sum, b.min, b.max), (4, 16.0, -1.0, 10.0));
}

#[test]
fn bucket_start_and_flush_bound() {
    assert_eq!(bucket_start(125, 60), 120);
    assert_eq!(bucket_start(120, 60), 120);
    assert_eq!(flush_bound(180, 60), 121);
    assert_eq!(flush_bound(59, 60), 0);
    assert_eq!(flush_bound(u64::MAX, 60), u64::MAX - 59);
}

#[test]
fn configure_rejects_zero_width_and_keeps_state_on_error() {
    let mut d = configured(10);
    d.put(&[1], &[15], &[1.0]);
    assert!(d.configure(0, &[]).is_err());
    let opts = vec![("nope".to_string(), "1".to_string())];
    let err = d.configure(10, &opts).unwrap_err();
    assert!(err.contains("nope"), "{err}");
    assert_eq!(d.stats().live_buckets, 1);
    assert_eq!(d.bucket_seconds(), 10);
}

#[test]
fn put_skips_non_finite_and_maps_buckets() {
    let mut d = configured(10);
    let skipped = d.put(
        &[1, 1, 2, 1, 1],
        &[3, 9, 12, 14, 15],
        &[1.0, f64::NAN, 4.0, f64::INFINITY, 2.0],
    );
    assert_eq!(skipped, 2);
    assert_eq!(d.inner().batches, 1);
    let out = d.flush(u64::MAX).sorted();
    let rows: Vec<_> = out.rows().collect();
    assert_eq!(
        rows,
        vec![
            (1, 0, Agg::new(1.0)),
            (1, 10, Agg::new(2.0)),
            (2, 10, Agg::new(4.0))
        ]
    );
}

/// The driver reuses the previous sample's bucket while timestamps stay
/// in it: every timestamp at and around a boundary, in both directions and
/// at the top of the range, must still land in its own bucket.
#[test]
fn put_maps_timestamps_at_bucket_edges_in_any_order() {
    let mut d = configured(10);
    let top = u64::MAX - u64::MAX % 10;
    let ts = [0, 9, 10, 9, 19, 20, 0, 5, 25, 15, u64::MAX, top - 1, top, 0];
    d.put(&[1; 14], &ts, &[1.0; 14]);
    let rows: Vec<_> = d
        .flush(u64::MAX)
        .sorted()
        .rows()
        .map(|(s, b, a)| (s, b, a.count))
        .collect();
    assert_eq!(
        rows,
        vec![(1, 0, 6), (1, 10, 3), (1, 20, 2), (1, top - 10, 1),],
        "the top bucket never flushes: it ends past u64::MAX"
    );
    let open: Vec<_> = d
        .export_state()
        .rows()
        .map(|(_, b, a)| (b, a.count))
        .collect();
    assert_eq!(open, vec![(top, 2)]);
}

#[test]
fn put_ragged_columns_uses_common_prefix() {
    let mut d = configured(10);
    assert_eq!(d.put(&[1, 2, 3], &[1, 2], &[1.0, 2.0, 3.0]), 0);
    assert_eq!(d.stats().live_buckets, 2);
}

#[test]
fn flush_closes_only_ended_buckets() {
    let mut d = configured(10);
    d.put(&[1, 1], &[5, 15], &[1.0, 2.0]);
    assert!(d.flush(9).is_empty());
    let out = d.flush(10);
    assert_eq!(out.rows().collect::<Vec<_>>(), vec![(1, 0, Agg::new(1.0))]);
    assert_eq!(d.stats().live_buckets, 1);
}

#[test]
fn merge_validates_everything_first() {
    let mut d = configured(10);
    let mut good = Aggregates::default();
    good.push(1, 10, &Agg::new(1.0));
    good.push(2, 20, &Agg::new(2.0));
    let mut bad = good.clone();
    bad.push(3, 25, &Agg::new(3.0));
    let err = d.merge(&bad).unwrap_err();
    assert!(err.contains("row 2"), "{err}");
    assert_eq!(d.stats().live_buckets, 0, "a failed merge changes nothing");
    assert!(
        d.inner().merges.is_empty(),
        "nothing reserved for a refused merge"
    );
    d.merge(&good).expect("merge");
    d.merge(&good).expect("merge again combines");
    assert_eq!(
        d.inner().merges,
        vec![2, 2],
        "each merge announces its rows"
    );
    let out = d.export_state().sorted();
    assert_eq!(out.count, vec![2, 2]);
    assert_eq!(out.sum, vec![2.0, 4.0]);
}

#[test]
fn check_names_the_first_bad_row() {
    let mut a = Aggregates::default();
    a.push(1, 0, &Agg::new(1.0));
    assert_eq!(a.check(), Ok(()));
    let mut zero = a.clone();
    zero.count[0] = 0;
    assert!(zero.check().unwrap_err().contains("count is 0"));
    let mut inverted = a.clone();
    inverted.min[0] = 2.0;
    assert!(inverted.check().unwrap_err().contains("min is greater"));
    let mut nan = a.clone();
    nan.sum[0] = f64::NAN;
    assert!(nan.check().unwrap_err().contains("sum is not finite"));
    let mut ragged = a.clone();
    ragged.max.push(1.0);
    assert!(ragged.check().unwrap_err().contains("ragged"));
    let mut extra = a.clone();
    extra.extra.push(ExtraColumn {
        name: "p99".to_string(),
        values: vec![],
    });
    assert!(extra.check().unwrap_err().contains("p99"));
}

#[test]
fn sorted_permutes_every_column() {
    let mut a = Aggregates::default();
    a.push(2, 0, &Agg::new(2.0));
    a.push(1, 10, &Agg::new(3.0));
    a.push(1, 0, &Agg::new(1.0));
    a.extra.push(ExtraColumn {
        name: "x".to_string(),
        values: vec![20.0, 30.0, 10.0],
    });
    let s = a.sorted();
    assert_eq!(s.series, vec![1, 1, 2]);
    assert_eq!(s.bucket_start, vec![0, 10, 0]);
    assert_eq!(s.sum, vec![1.0, 3.0, 2.0]);
    assert_eq!(s.extra[0].values, vec![10.0, 30.0, 20.0]);

    let mut ragged = Aggregates::default();
    ragged.push(2, 0, &Agg::new(2.0));
    ragged.series.push(1);
    let r = ragged.sorted();
    assert_eq!(r.series, vec![1, 2]);
    assert_eq!(r.bucket_start, vec![0]);
}

#[test]
fn fast_hasher_spreads_every_bit_hashbrown_reads() {
    // hashbrown indexes buckets with the hash's low bits and keeps the top
    // 7 bits of its low `usize` as a control byte: bits 25..32 on wasm32,
    // 57..64 natively. Keys that differ only in their high bits (series
    // ids), or only in the bucket start, must spread over all three, or
    // the table degenerates into a scan.
    let distinct = |bits: fn(u64) -> u64, keys: &[(u64, u64)]| {
        let mut seen: Vec<u64> = keys.iter().map(|&k| bits(FastState.hash_one(k))).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    let high: Vec<(u64, u64)> = (0..64u64).map(|i| (i << 40, 0)).collect();
    let bucket: Vec<(u64, u64)> = (0..64u64).map(|i| (7, i * 60)).collect();
    let index = |h: u64| h & 0xff;
    let tag32 = |h: u64| (h >> 25) & 0x7f;
    let tag64 = |h: u64| h >> 57;
    for (name, keys) in [("high series bits", &high), ("bucket starts", &bucket)] {
        for (part, bits) in [
            ("index", index as fn(u64) -> u64),
            ("wasm32 tag", tag32),
            ("64-bit tag", tag64),
        ] {
            let n = distinct(bits, keys);
            assert!(
                n > 32,
                "{name}: only {n} distinct values of the {part} bits for 64 keys"
            );
        }
    }
}
