//! The SDK for wagg aggregation strategies: a strategy is one file that
//! implements [`Aggregator`] and ends with [`export_aggregator!`].
//!
//! # Layout
//! - this file: the data types of the WIT contract ([`Agg`], [`Aggregates`],
//!   [`Stats`]), the [`Aggregator`] trait, and [`Driver`], which does
//!   everything the contract asks of a module that is not specific to a
//!   strategy (bucket mapping, skipping non-finite values, validating
//!   `merge` input). Tests and benches run strategies natively through
//!   [`Driver`], so they exercise exactly the code the component runs.
//! - `hash`: a fast hasher for the integer keys strategies use.
//! - `wasm` (wasm32 only): the wit-bindgen bindings, the export glue behind
//!   [`export_aggregator!`], and the runtime a `no_std` component needs
//!   (global allocator that counts bytes, trapping panic handler,
//!   `cabi_realloc`).
//!
//! The crate is `no_std` so components import nothing (no WASI). Natively it
//! links `std`, only so that strategy crates (which are also `cdylib`s) have
//! a panic handler and an allocator and tests can run.
#![no_std]

extern crate alloc;
// Natively a strategy's `cdylib` needs a panic handler and an allocator; std
// brings both. On wasm32 the `wasm` module provides them instead.
#[cfg(not(target_arch = "wasm32"))]
extern crate std;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

mod hash;
pub use hash::{FastHasher, FastState};

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

/// One (series, bucket) partial aggregate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agg {
    /// Number of samples aggregated (at least 1 in a valid row).
    pub count: u64,
    /// Sum of the samples.
    pub sum: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Agg {
    /// The aggregate of a single sample.
    #[inline]
    pub fn new(v: f64) -> Self {
        Self {
            count: 1,
            sum: v,
            min: v,
            max: v,
        }
    }

    /// Adds one sample.
    #[inline]
    pub fn add(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        // `f64::min` would also work, but the comparisons keep the hot path
        // free of NaN handling: the driver never passes a NaN.
        if v < self.min {
            self.min = v;
        }
        if v > self.max {
            self.max = v;
        }
    }

    /// Combines another partial aggregate of the same (series, bucket).
    #[inline]
    pub fn merge(&mut self, other: &Agg) {
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        if other.min < self.min {
            self.min = other.min;
        }
        if other.max > self.max {
            self.max = other.max;
        }
    }
}

/// Mirror of the WIT `aggregates` record (same field names): one row per
/// (series, bucket), as columns of equal length.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Aggregates {
    /// Series id of each row.
    pub series: Vec<u64>,
    /// Bucket start of each row, a multiple of the bucket width.
    pub bucket_start: Vec<u64>,
    /// Sample count of each row.
    pub count: Vec<u64>,
    /// Sum of each row.
    pub sum: Vec<f64>,
    /// Minimum of each row.
    pub min: Vec<f64>,
    /// Maximum of each row.
    pub max: Vec<f64>,
    /// Further per-row columns; the built-in strategies produce none.
    pub extra: Vec<ExtraColumn>,
}

/// A named per-row column beyond the fixed ones (WIT `extra-column`).
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraColumn {
    /// Column name, for example `p99`.
    pub name: String,
    /// One value per row.
    pub values: Vec<f64>,
}

impl Aggregates {
    /// Empty columns with room for `n` rows each, so a flush that knows its
    /// size reallocates nothing.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            series: Vec::with_capacity(n),
            bucket_start: Vec::with_capacity(n),
            count: Vec::with_capacity(n),
            sum: Vec::with_capacity(n),
            min: Vec::with_capacity(n),
            max: Vec::with_capacity(n),
            extra: Vec::new(),
        }
    }

    /// Makes room for `additional` more rows in every fixed column.
    pub fn reserve(&mut self, additional: usize) {
        self.series.reserve(additional);
        self.bucket_start.reserve(additional);
        self.count.reserve(additional);
        self.sum.reserve(additional);
        self.min.reserve(additional);
        self.max.reserve(additional);
    }

    /// Appends one row. Extra columns are not extended: strategies that use
    /// them push their values themselves.
    #[inline]
    pub fn push(&mut self, series: u64, bucket_start: u64, agg: &Agg) {
        self.series.push(series);
        self.bucket_start.push(bucket_start);
        self.count.push(agg.count);
        self.sum.push(agg.sum);
        self.min.push(agg.min);
        self.max.push(agg.max);
    }

    /// Number of rows, as the `series` column counts them.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The rows as `(series, bucket_start, aggregate)`. On ragged columns it
    /// stops at the shortest one; call [`Aggregates::check`] first where
    /// that matters.
    pub fn rows(&self) -> impl Iterator<Item = (u64, u64, Agg)> + '_ {
        self.series
            .iter()
            .zip(&self.bucket_start)
            .zip(&self.count)
            .zip(&self.sum)
            .zip(&self.min)
            .zip(&self.max)
            .map(|(((((&s, &b), &count), &sum), &min), &max)| {
                (
                    s,
                    b,
                    Agg {
                        count,
                        sum,
                        min,
                        max,
                    },
                )
            })
    }

    /// Checks the shape and the values of every row.
    ///
    /// # Errors
    /// A message naming the first problem: ragged columns (including extra
    /// columns), or the first row with a zero count, `min > max`, or a
    /// non-finite sum, min or max.
    pub fn check(&self) -> Result<(), String> {
        let n = self.series.len();
        let lens = [
            ("bucket-start", self.bucket_start.len()),
            ("count", self.count.len()),
            ("sum", self.sum.len()),
            ("min", self.min.len()),
            ("max", self.max.len()),
        ];
        for (name, len) in lens {
            if len != n {
                return Err(format!(
                    "ragged columns: series has {n} rows, {name} has {len}"
                ));
            }
        }
        for col in &self.extra {
            if col.values.len() != n {
                return Err(format!(
                    "ragged columns: series has {n} rows, extra column {:?} has {}",
                    col.name,
                    col.values.len()
                ));
            }
        }
        for (i, (series, bucket, agg)) in self.rows().enumerate() {
            let problem = if agg.count == 0 {
                "count is 0"
            } else if !agg.sum.is_finite() {
                "sum is not finite"
            } else if !agg.min.is_finite() {
                "min is not finite"
            } else if !agg.max.is_finite() {
                "max is not finite"
            } else if agg.min > agg.max {
                "min is greater than max"
            } else {
                continue;
            };
            return Err(format!(
                "row {i} (series {series}, bucket {bucket}): {problem}"
            ));
        }
        Ok(())
    }

    /// The same rows sorted by (series, bucket start), extra columns
    /// permuted alike, so outputs of different strategies compare with `==`.
    pub fn sorted(self) -> Self {
        let n = self.len();
        let mut order: Vec<usize> = (0..n).collect();
        // `get`: ragged input (a short column) must not panic here, since
        // tests sort broken outputs to print them.
        order.sort_by_key(|&i| (self.series[i], self.bucket_start.get(i).copied()));
        fn permute<T: Copy>(col: &[T], order: &[usize]) -> Vec<T> {
            order.iter().filter_map(|&i| col.get(i).copied()).collect()
        }
        Self {
            series: permute(&self.series, &order),
            bucket_start: permute(&self.bucket_start, &order),
            count: permute(&self.count, &order),
            sum: permute(&self.sum, &order),
            min: permute(&self.min, &order),
            max: permute(&self.max, &order),
            extra: self
                .extra
                .iter()
                .map(|c| ExtraColumn {
                    name: c.name.clone(),
                    values: permute(&c.values, &order),
                })
                .collect(),
        }
    }
}

/// What a module reports about its own state (WIT `stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Distinct series with at least one open bucket.
    pub live_series: u64,
    /// Open (series, bucket) rows.
    pub live_buckets: u64,
    /// Bytes the module's allocator holds (0 natively, where the host
    /// process's allocator is shared and not counted).
    pub heap_bytes: u64,
}

/// The start of the bucket that holds `ts`.
///
/// # Panics
/// If `bucket_seconds` is 0; [`Driver`] never passes 0.
#[inline]
pub fn bucket_start(ts: u64, bucket_seconds: u64) -> u64 {
    ts - ts % bucket_seconds
}

/// The exclusive upper bound of the bucket starts a flush at `watermark`
/// closes: a bucket flushes iff `bucket_start < flush_bound(..)`, which is
/// `bucket_start + bucket_seconds <= watermark` without overflowing near
/// `u64::MAX`.
#[inline]
pub fn flush_bound(watermark: u64, bucket_seconds: u64) -> u64 {
    match watermark.checked_sub(bucket_seconds) {
        Some(last_closed) => last_closed + 1,
        None => 0,
    }
}

/// What a strategy author implements. [`Driver`] does the rest: bucket
/// mapping, skipping non-finite values, validating merge input, stats.
pub trait Aggregator: Default {
    /// Applies the operator's options. The driver has already checked that
    /// `bucket_seconds` is at least 1; strategies keep it to decide what a
    /// flush closes. The SDK reserves no option names: every option is
    /// passed here.
    ///
    /// # Errors
    /// A message naming an option the strategy does not understand (or a
    /// value it cannot parse); the host refuses the module with it.
    fn configure(
        &mut self,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<(), String>;

    /// Called once per `put` batch before its samples, with the batch
    /// length. Optional: a strategy may reserve capacity here.
    #[inline]
    fn begin_batch(&mut self, _len: usize) {}

    /// Called once per `merge` before its rows, with their number. Optional:
    /// a hot swap merges the whole state of the module it replaces into an
    /// empty one, and reserving here saves growing (and rehashing) the
    /// tables step by step while the shard waits.
    #[inline]
    fn begin_merge(&mut self, _rows: usize) {}

    /// One finite sample, already mapped to its bucket start.
    fn add(&mut self, series: u64, bucket_start: u64, value: f64);

    /// Moves every bucket with `bucket_start + width <= watermark` into
    /// `out`, each exactly once, and forgets it. [`flush_bound`] computes
    /// the cut-off without overflow.
    fn flush(&mut self, watermark: u64, out: &mut Aggregates);

    /// Copies every open bucket into `out` without removing it.
    fn export_state(&self, out: &mut Aggregates);

    /// Merges one partial aggregate (already validated by the driver): adds
    /// it to the open bucket or opens one.
    fn merge_row(&mut self, series: u64, bucket_start: u64, agg: &Agg);

    /// Distinct series with at least one open bucket.
    fn live_series(&self) -> u64;

    /// Open (series, bucket) rows.
    fn live_buckets(&self) -> u64;
}

/// Runs a strategy exactly as the component export does. The wasm export
/// glue calls these methods, and natively tests and benches call them, so
/// both exercise the same code.
pub struct Driver<A> {
    inner: A,
    bucket_seconds: u64,
}

impl<A: fmt::Debug> fmt::Debug for Driver<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("bucket_seconds", &self.bucket_seconds)
            .field("inner", &self.inner)
            .finish()
    }
}

impl<A: Aggregator> Default for Driver<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregator> Driver<A> {
    /// A driver around `A::default()`, not yet configured. Until
    /// [`Driver::configure`] the bucket width is 1 second, so a contract
    /// violation (a call before `configure`) misaggregates instead of
    /// dividing by zero.
    pub fn new() -> Self {
        Self {
            inner: A::default(),
            bucket_seconds: 1,
        }
    }

    /// Configures the width and the strategy's options. A fresh strategy
    /// is configured and replaces the current one only on success.
    ///
    /// # Errors
    /// When `bucket_seconds` is 0, or the strategy refuses an option.
    pub fn configure(
        &mut self,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<(), String> {
        if bucket_seconds == 0 {
            return Err(String::from("bucket-seconds must be at least 1"));
        }
        let mut inner = A::default();
        inner.configure(bucket_seconds, options)?;
        self.inner = inner;
        self.bucket_seconds = u64::from(bucket_seconds);
        Ok(())
    }

    /// Aggregates a batch of samples and returns how many were skipped for
    /// being NaN or infinite. The host guarantees equal column lengths; on
    /// ragged columns only the common prefix is processed.
    pub fn put(&mut self, series: &[u64], timestamps: &[u64], values: &[f64]) -> u32 {
        let n = series.len().min(timestamps.len()).min(values.len());
        self.inner.begin_batch(n);
        let width = self.bucket_seconds;
        let mut skipped: u32 = 0;
        // The bucket of the previous sample, [lo, hi): a batch's samples
        // mostly share a bucket, and this skips the 64-bit division.
        let (mut lo, mut hi) = (0, 0);
        for ((&s, &t), &v) in series[..n].iter().zip(&timestamps[..n]).zip(&values[..n]) {
            if v.is_finite() {
                if !(lo <= t && t < hi) {
                    lo = bucket_start(t, width);
                    hi = lo.saturating_add(width);
                }
                self.inner.add(s, lo, v);
            } else {
                skipped = skipped.saturating_add(1);
            }
        }
        skipped
    }

    /// Removes and returns every bucket that ends at or before `watermark`.
    /// The output is not checked here: the host checks it, and fixtures
    /// rely on being able to return broken output.
    pub fn flush(&mut self, watermark: u64) -> Aggregates {
        let mut out = self.room_for_open_buckets();
        self.inner.flush(watermark, &mut out);
        out
    }

    /// Every open bucket's partial aggregate, without removing it.
    pub fn export_state(&self) -> Aggregates {
        let mut out = self.room_for_open_buckets();
        self.inner.export_state(&mut out);
        out
    }

    /// Empty output with room for every open bucket: all of them for an
    /// export, an upper bound for a flush. Grown by doubling instead, six
    /// columns were copied ~10 times each (in Wasm, a call out to the
    /// host's `memory.copy` per step), ~11 % of hashmap's flush
    /// (BENCHMARKS.md, session 11). An export needs as much at every
    /// checkpoint, so a flush's reservation grows no module's peak memory.
    fn room_for_open_buckets(&self) -> Aggregates {
        Aggregates::with_capacity(usize::try_from(self.inner.live_buckets()).unwrap_or(0))
    }

    /// Merges partial aggregates into the open buckets. Every row is
    /// validated before the first one is merged, so an error changes
    /// nothing. Extra columns are validated for length and then ignored:
    /// the strategies keep none.
    ///
    /// # Errors
    /// Ragged columns, an invalid row (see [`Aggregates::check`]), or a
    /// bucket start that is not a multiple of the bucket width.
    pub fn merge(&mut self, state: &Aggregates) -> Result<(), String> {
        state.check()?;
        let width = self.bucket_seconds;
        if let Some((i, (&s, &b))) = state
            .series
            .iter()
            .zip(&state.bucket_start)
            .enumerate()
            .find(|(_, (_, b))| **b % width != 0)
        {
            return Err(format!(
                "row {i} (series {s}, bucket {b}): bucket start is not a multiple of the bucket width {width}"
            ));
        }
        self.inner.begin_merge(state.series.len());
        for (s, b, agg) in state.rows() {
            self.inner.merge_row(s, b, &agg);
        }
        Ok(())
    }

    /// Live series, open buckets and, on wasm32, the bytes the module's
    /// allocator holds.
    pub fn stats(&self) -> Stats {
        Stats {
            live_series: self.inner.live_series(),
            live_buckets: self.inner.live_buckets(),
            heap_bytes: heap_bytes(),
        }
    }

    /// The configured bucket width in seconds.
    pub fn bucket_seconds(&self) -> u64 {
        self.bucket_seconds
    }

    /// The strategy, for inspection in tests.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The strategy, mutably, for tests that set up odd states.
    pub fn inner_mut(&mut self) -> &mut A {
        &mut self.inner
    }
}

/// Bytes currently allocated through the module's counting allocator; 0
/// natively, where the process allocator is shared with the host.
pub fn heap_bytes() -> u64 {
    #[cfg(all(target_arch = "wasm32", feature = "runtime", not(test)))]
    {
        wasm::rt::allocated_bytes()
    }
    #[cfg(not(all(target_arch = "wasm32", feature = "runtime", not(test))))]
    {
        0
    }
}

/// Exports `$ty` (an [`Aggregator`]) as the component's
/// `wagg:aggregator/aggregator@0.1.0` interface, keeping one
/// `Driver<$ty>` in a static. It expands to nothing except on wasm32, so a
/// strategy crate compiles natively unchanged.
#[macro_export]
macro_rules! export_aggregator {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __WaggModule;
            static __WAGG_DRIVER: $crate::wasm::DriverCell<$ty> = $crate::wasm::DriverCell::new();
            impl $crate::wasm::Slot for __WaggModule {
                type A = $ty;
                fn cell() -> &'static $crate::wasm::DriverCell<$ty> {
                    &__WAGG_DRIVER
                }
            }
    $crate::wasm::bindings::export!(__WaggModule with_types_in $crate::wasm::bindings);
        };
    };
}

#[cfg(test)]
mod tests;
