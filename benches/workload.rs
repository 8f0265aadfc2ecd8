//! The `put` and `flush` workload of the Wasm-tax measurements, shared by
//! the `strategies` bench (time) and `instructions` (instructions
//! counted by callgrind), so that both measure the same batches.
//!
//! Each strategy runs two ways: as a component in the host's runtime
//! ([`Wasm`]) and as the same core compiled natively behind
//! [`Driver`] ([`Native`]). The ratio of the two is the Wasm tax.

use std::hint::black_box;
use std::sync::Arc;

use wagg::runtime::{Batch, Instance, LoadedModule, Runtime};
use wagg_guest::{Aggregator, Driver};

/// Samples per `put`.
pub const BATCH: usize = 1024;
/// Batches cycled through, so that the branch predictor does not learn one.
pub const BATCHES: usize = 64;
/// Bucket width, seconds.
pub const BUCKET_SECONDS: u32 = 60;
/// A bucket boundary (a multiple of 60).
pub const T0: u64 = 1_764_133_200;

/// Series ids look like the host's (64-bit hashes of keys), not 0..n.
fn series_id(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` samples of series drawn from `live`, all in the bucket at `bucket`.
fn random_batch(n: usize, live: u64, offset: u64, bucket: u64) -> Batch {
    let mut b = Batch::with_capacity(n);
    for i in 0..n as u64 {
        let x = series_id(i + offset);
        b.push(series_id(x % live), bucket + (x >> 40) % 60, 1.0);
    }
    b
}

/// [`BATCHES`] batches of [`BATCH`] samples of series drawn from `live`,
/// in the bucket at [`T0`]: what a `put` bench cycles through.
pub fn put_batches(live: u64) -> Vec<Batch> {
    (0..BATCHES as u64)
        .map(|k| random_batch(BATCH, live, k * BATCH as u64, T0))
        .collect()
}

/// One sample of each of `live` series, in the bucket at `bucket`.
pub fn every_series(live: u64, bucket: u64) -> Batch {
    let mut b = Batch::with_capacity(live as usize);
    for i in 0..live {
        b.push(series_id(i), bucket + i % 60, 1.0);
    }
    b
}

/// What both sides of a comparison do: a Wasm instance or a native driver.
pub trait Target {
    /// Puts `batch`.
    fn put(&mut self, batch: &Batch);
    /// Flushes up to `watermark`, returning the number of rows.
    fn flush(&mut self, watermark: u64) -> usize;
}

/// A strategy as a component, through the host's runtime.
#[derive(Debug)]
pub struct Wasm(Instance);

impl Wasm {
    /// A configured instance of `module`.
    ///
    /// # Panics
    /// If the module does not instantiate: a bench has nothing to measure.
    pub fn new(rt: &Runtime, module: &Arc<LoadedModule>) -> Self {
        Wasm(
            rt.instantiate(module, BUCKET_SECONDS, &[])
                .expect("instantiate"),
        )
    }
}

impl Target for Wasm {
    fn put(&mut self, batch: &Batch) {
        self.0.put(batch).expect("put");
    }

    fn flush(&mut self, watermark: u64) -> usize {
        self.0.flush(watermark, &|_| true).expect("flush").len()
    }
}

/// A strategy compiled natively, through the SDK's [`Driver`] as the
/// component's export glue calls it.
#[derive(Debug)]
pub struct Native<A>(Driver<A>);

impl<A: Aggregator> Native<A> {
    /// A configured driver.
    ///
    /// # Panics
    /// If the strategy refuses the configuration.
    pub fn new() -> Self {
        let mut d = Driver::<A>::new();
        d.configure(BUCKET_SECONDS, &[]).expect("configure");
        Native(d)
    }
}

impl<A: Aggregator> Default for Native<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregator> Target for Native<A> {
    fn put(&mut self, batch: &Batch) {
        let (s, t, v) = batch.columns();
        black_box(self.0.put(s, t, v));
    }

    fn flush(&mut self, watermark: u64) -> usize {
        black_box(self.0.flush(watermark)).len()
    }
}
