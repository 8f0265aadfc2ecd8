//! Checks on everything a module returns, before the host uses it.
//!
//! A module is untrusted: its output is checked row by row so that a bug or a
//! hostile module costs that module, never a host panic or a wrong point in
//! the sink.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use super::bindings::Aggregates;
use super::error::InstanceError;

/// What a module's aggregates must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct OutputRules {
    /// Bucket width: every `bucket-start` is a multiple of it.
    pub bucket_seconds: u64,
    /// Most rows accepted.
    pub max_rows: usize,
    /// For `flush`: every returned bucket must end at or before it.
    pub watermark: Option<u64>,
}

/// Checks `aggs` against `rules`; `known` says whether a series id is one the
/// host handed to this module. It is called once per row, in row order,
/// before any other check and up to the first unknown id, so a caller can
/// collect what it looked up for each row (the shard keeps each row's key:
/// one dictionary lookup per row, not two).
///
/// # Errors
///
/// [`InstanceError::BadOutput`] naming the first problem found: an unknown
/// id first, then the first row that breaks another rule.
pub fn check(
    call: &'static str,
    aggs: &Aggregates,
    rules: &OutputRules,
    known: &dyn Fn(u64) -> bool,
) -> Result<(), InstanceError> {
    check_ids(call, aggs, rules, known)?;
    check_shaped_rows(call, aggs, rules)
}

/// The part of [`check`] that needs the host's dictionary: the row limit,
/// the columns' lengths, and that every id is known.
///
/// # Errors
///
/// [`InstanceError::BadOutput`] naming the first problem found.
pub fn check_ids(
    call: &'static str,
    aggs: &Aggregates,
    rules: &OutputRules,
    known: &dyn Fn(u64) -> bool,
) -> Result<(), InstanceError> {
    check_shape(call, aggs, rules)?;
    // Asked in a pass of its own: `known` is a lookup in a table of every
    // live series, a cache miss per row, and a short loop lets several
    // misses be under way at once where the full row check would not.
    if let Some(i) = aggs.series.iter().position(|&series| !known(series)) {
        return Err(InstanceError::BadOutput {
            call,
            reason: format!("row {i}: unknown series id {}", aggs.series[i]),
        });
    }
    Ok(())
}

/// The row limit and the columns' lengths: checked first by both halves,
/// so that [`check_rows`] never indexes past a short column.
fn check_shape(
    call: &'static str,
    aggs: &Aggregates,
    rules: &OutputRules,
) -> Result<(), InstanceError> {
    let bad = |reason: String| Err(InstanceError::BadOutput { call, reason });
    let n = aggs.series.len();
    if n > rules.max_rows {
        return bad(format!(
            "{n} rows, more than the limit of {}",
            rules.max_rows
        ));
    }
    let lens = [
        ("bucket-start", aggs.bucket_start.len()),
        ("count", aggs.count.len()),
        ("sum", aggs.sum.len()),
        ("min", aggs.min.len()),
        ("max", aggs.max.len()),
    ];
    for (name, len) in lens {
        if len != n {
            return bad(format!("column `{name}` has {len} rows, `series` has {n}"));
        }
    }
    for col in &aggs.extra {
        if col.values.len() != n {
            return bad(format!(
                "extra column `{}` has {} rows, `series` has {n}",
                col.name,
                col.values.len()
            ));
        }
    }
    Ok(())
}

/// The rest of [`check`]: the row limit and columns' lengths again, then
/// aligned and (for a flush) complete buckets, counts, finite values, no
/// row twice. It needs nothing but the rows, so it can run on any thread.
///
/// # Errors
///
/// [`InstanceError::BadOutput`] naming the first problem found.
pub fn check_rows(
    call: &'static str,
    aggs: &Aggregates,
    rules: &OutputRules,
) -> Result<(), InstanceError> {
    check_shape(call, aggs, rules)?;
    check_shaped_rows(call, aggs, rules)
}

/// [`check_rows`] on rows whose shape [`check_shape`] accepted.
fn check_shaped_rows(
    call: &'static str,
    aggs: &Aggregates,
    rules: &OutputRules,
) -> Result<(), InstanceError> {
    let bad = |reason: String| Err(InstanceError::BadOutput { call, reason });
    let n = aggs.series.len();
    // Cut to `n` so that indexing below needs no bounds checks: this loop
    // runs for every row of every flush and checkpoint.
    let (series, bucket_start) = (&aggs.series[..n], &aggs.bucket_start[..n]);
    let (count, sum, min, max) = (
        &aggs.count[..n],
        &aggs.sum[..n],
        &aggs.min[..n],
        &aggs.max[..n],
    );
    let Some(mut seen) = SeenRows::for_rows(n) else {
        return bad(format!("{n} rows, more than can be checked"));
    };
    // Rows come in few buckets: a bucket already found aligned and
    // complete is not divided again.
    let mut bucket_ok = None;
    for i in 0..n {
        let bucket = bucket_start[i];
        if bucket_ok != Some(bucket) {
            if rules.bucket_seconds == 0 || bucket % rules.bucket_seconds != 0 {
                return bad(format!(
                    "row {i}: bucket start {bucket} is not a multiple of {} s",
                    rules.bucket_seconds
                ));
            }
            if let Some(watermark) = rules.watermark
                && bucket.saturating_add(rules.bucket_seconds) > watermark
            {
                return bad(format!(
                    "row {i}: bucket {bucket} is not complete at watermark {watermark}"
                ));
            }
            bucket_ok = Some(bucket);
        }
        if count[i] == 0 {
            return bad(format!("row {i}: count is 0"));
        }
        let (sum, min, max) = (sum[i], min[i], max[i]);
        if !(sum.is_finite() && min.is_finite() && max.is_finite()) {
            return bad(format!(
                "row {i}: non-finite value (sum {sum}, min {min}, max {max})"
            ));
        }
        if min > max {
            return bad(format!("row {i}: min {min} > max {max}"));
        }
        if !seen.insert(i, series, bucket_start) {
            return bad(format!(
                "row {i}: series {} bucket {bucket} returned twice",
                series[i]
            ));
        }
    }
    Ok(())
}

/// The rows of one output seen so far, to refuse a (series, bucket)
/// returned twice.
///
/// An open-addressing table of row indices: the pair is read back from the
/// columns, so a slot is 4 bytes and an insert a hash, a probe and a
/// compare. A `HashSet<(u64, u64)>` took half of the whole check's
/// instructions (`benches/instructions.sh`, BENCHMARKS.md session 11). The
/// hash is seeded per process, so a module cannot pick rows that collide.
struct SeenRows {
    /// Row index + 1 per slot; 0 is empty.
    slots: Vec<u32>,
    mask: usize,
    hasher: RandomState,
}

impl SeenRows {
    /// A table for `n` rows, at most half full; `None` if row indices do
    /// not fit a slot.
    fn for_rows(n: usize) -> Option<Self> {
        if n >= u32::MAX as usize {
            return None;
        }
        let len = n.checked_mul(2)?.checked_next_power_of_two()?;
        Some(SeenRows {
            slots: vec![0; len],
            mask: len - 1,
            hasher: RandomState::default(),
        })
    }

    /// Adds row `i`; false if an earlier row has its series and bucket.
    fn insert(&mut self, i: usize, series: &[u64], bucket: &[u64]) -> bool {
        let (s, b) = (series[i], bucket[i]);
        let mut at = self.hasher.hash_one((s, b)) as usize & self.mask;
        loop {
            match self.slots[at] {
                0 => {
                    // `for_rows` refused indices that do not fit.
                    self.slots[at] = i as u32 + 1;
                    return true;
                }
                j => {
                    let j = j as usize - 1;
                    if series[j] == s && bucket[j] == b {
                        return false;
                    }
                }
            }
            at = (at + 1) & self.mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_row(series: u64, bucket: u64) -> Aggregates {
        Aggregates {
            series: vec![series],
            bucket_start: vec![bucket],
            count: vec![2],
            sum: vec![3.0],
            min: vec![1.0],
            max: vec![2.0],
            extra: vec![],
        }
    }

    /// `aggs` with one more valid row.
    fn push_row(aggs: &mut Aggregates, series: u64, bucket: u64) {
        aggs.series.push(series);
        aggs.bucket_start.push(bucket);
        aggs.count.push(1);
        aggs.sum.push(1.0);
        aggs.min.push(1.0);
        aggs.max.push(1.0);
    }

    const RULES: OutputRules = OutputRules {
        bucket_seconds: 60,
        max_rows: 10,
        watermark: Some(120),
    };

    #[test]
    fn accepts_a_valid_row() {
        assert_eq!(check("flush", &one_row(7, 60), &RULES, &|_| true), Ok(()));
    }

    #[test]
    fn known_is_asked_once_per_row_in_row_order() {
        // The shard relies on it to collect each row's key as it is checked.
        let mut aggs = one_row(7, 0);
        for (series, bucket) in [(3, 60), (7, 60), (5, 0)] {
            push_row(&mut aggs, series, bucket);
        }
        let asked = std::cell::RefCell::new(Vec::new());
        let known = |id| {
            asked.borrow_mut().push(id);
            true
        };
        assert_eq!(check("flush", &aggs, &RULES, &known), Ok(()));
        assert_eq!(asked.into_inner(), aggs.series);
    }

    #[test]
    fn an_unknown_id_is_named_by_its_row_and_ends_the_lookups() {
        let mut aggs = one_row(7, 0);
        for series in [3, 9, 5] {
            push_row(&mut aggs, series, 60);
        }
        let asked = std::cell::RefCell::new(Vec::new());
        let known = |id| {
            asked.borrow_mut().push(id);
            id != 9
        };
        let err = check("flush", &aggs, &RULES, &known).expect_err("9 is unknown");
        assert!(
            err.to_string().contains("row 2: unknown series id 9"),
            "{err}"
        );
        assert_eq!(asked.into_inner(), [7, 3, 9]);
    }

    /// `check_rows` runs on its own (a swap's builder thread), so it must
    /// refuse short columns itself rather than index past them.
    #[test]
    fn the_row_check_alone_refuses_short_columns() {
        let mut aggs = one_row(7, 60);
        push_row(&mut aggs, 8, 60);
        aggs.max.pop();
        let err = check_rows("export-state", &aggs, &RULES).expect_err("`max` is short");
        assert!(err.to_string().contains("column `max` has 1 rows"), "{err}");
    }

    #[test]
    fn refuses_each_kind_of_bad_output() {
        type Case<'a> = (Aggregates, &'a dyn Fn(u64) -> bool, &'a str);
        let cases: Vec<Case> = vec![
            (one_row(7, 60), &|id| id != 7, "unknown series"),
            (one_row(7, 61), &|_| true, "not a multiple"),
            (one_row(7, 120), &|_| true, "not complete"),
            (
                {
                    let mut a = one_row(7, 60);
                    a.count[0] = 0;
                    a
                },
                &|_| true,
                "count is 0",
            ),
            (
                {
                    let mut a = one_row(7, 60);
                    a.sum[0] = f64::NAN;
                    a
                },
                &|_| true,
                "non-finite",
            ),
            (
                {
                    let mut a = one_row(7, 60);
                    a.min[0] = 5.0;
                    a
                },
                &|_| true,
                "min 5 > max",
            ),
            (
                {
                    let mut a = one_row(7, 60);
                    a.max.push(1.0);
                    a
                },
                &|_| true,
                "column `max` has 2",
            ),
            (
                {
                    let mut a = one_row(7, 60);
                    push_row(&mut a, 7, 60);
                    a
                },
                &|_| true,
                "returned twice",
            ),
        ];
        for (aggs, known, expected) in cases {
            let err = check("flush", &aggs, &RULES, known).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} lacks {expected}");
        }
    }

    /// A bucket checked once is not checked again for later rows of the
    /// same bucket, and a later row of another bucket still is.
    #[test]
    fn every_rows_bucket_is_checked_after_the_first() {
        for (second, expected) in [
            (61, "row 2: bucket start 61 is not a multiple"),
            (120, "row 2: bucket 120 is not complete"),
        ] {
            let mut aggs = one_row(7, 60);
            push_row(&mut aggs, 8, 60);
            push_row(&mut aggs, 9, second);
            let err = check("flush", &aggs, &RULES, &|_| true).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    proptest::proptest! {
        /// The first row whose (series, bucket) an earlier row has is the
        /// one refused, as a plain set would find it; rows that share only
        /// a series or only a bucket pass.
        #[test]
        fn the_first_repeated_row_is_refused(
            rows in proptest::collection::vec((0u64..6, 0u64..3), 0..40),
        ) {
            let mut aggs = Aggregates::empty();
            for &(series, bucket) in &rows {
                push_row(&mut aggs, series << 40, bucket * 60);
            }
            let rules = OutputRules { max_rows: 100, watermark: None, ..RULES };
            let mut set = std::collections::HashSet::new();
            let first_repeat = rows.iter().position(|row| !set.insert(*row));
            match (first_repeat, check("flush", &aggs, &rules, &|_| true)) {
                (None, Ok(())) => {}
                (Some(i), Err(err)) => proptest::prop_assert!(
                    err.to_string().contains(&format!("row {i}: series")),
                    "{err}, expected row {i}"
                ),
                (want, got) => proptest::prop_assert!(false, "{want:?} but {got:?}"),
            }
        }
    }

    #[test]
    fn refuses_too_many_rows() {
        let rules = OutputRules {
            max_rows: 0,
            ..RULES
        };
        let err = check("flush", &one_row(7, 60), &rules, &|_| true).unwrap_err();
        assert!(err.to_string().contains("more than the limit"));
    }
}
