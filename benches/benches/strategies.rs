//! Every built-in strategy's `put` (batch 1024) and `flush` at 1, 100,
//! 10 000 and 100 000 live series, as a component in the host's runtime
//! (`wasm`) and as the same core compiled natively behind
//! [`Driver`](wagg_guest::Driver) (`native`). The ratio of the two is the
//! Wasm tax.
//!
//! `cargo bench -p wagg-benches --bench strategies`
//!
//! - `put/<strategy>/<wasm|native>/live/<n>`: one `put` of 1024
//!   samples into a module that already holds that many live series, all in
//!   one open bucket; throughput is samples.
//! - `flush/<strategy>/<wasm|native>/live/<n>`: one `flush` returning
//!   one row per live series; throughput is rows. Only the flush is timed:
//!   the module is refilled before each one, outside the clock. The Wasm
//!   figure includes the host's check of the returned rows.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wagg::runtime::{Runtime, RuntimeLimits};
use wagg_artifacts::{BTREE, Guest, HASHMAP, LEAKY, SORTED};
use wagg_benches::workload::{
    BATCH, BATCHES, BUCKET_SECONDS, Native, T0, Target, Wasm, every_series, put_batches,
};
use wagg_guest::Aggregator;

/// Live series counts every bench runs at.
const LIVE: [u64; 4] = [1, 100, 10_000, 100_000];
/// The leaky strategy keeps every flushed row; start it afresh after this
/// many, well before the default 256 MiB memory limit.
const LEAKY_RESET_ROWS: u64 = 1_000_000;

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

fn bench_put(c: &mut Criterion, name: &str, new: &mut dyn FnMut() -> Box<dyn Target>) {
    let mut group = c.benchmark_group(format!("put/{name}"));
    group.throughput(Throughput::Elements(BATCH as u64));
    for live in LIVE {
        let batches = put_batches(live);
        let mut target = new();
        target.put(&every_series(live, T0));
        let mut k = 0;
        group.bench_function(BenchmarkId::new("live", live), |b| {
            b.iter(|| {
                k = (k + 1) % BATCHES;
                target.put(&batches[k]);
            })
        });
    }
    group.finish();
}

fn bench_flush(c: &mut Criterion, name: &str, new: &mut dyn FnMut() -> Box<dyn Target>) {
    let mut group = c.benchmark_group(format!("flush/{name}"));
    for live in LIVE {
        group.throughput(Throughput::Elements(live));
        let mut target = new();
        let mut bucket = T0;
        let mut flushed = 0u64;
        group.bench_function(BenchmarkId::new("live", live), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if flushed >= LEAKY_RESET_ROWS {
                        target = new();
                        flushed = 0;
                    }
                    target.put(&every_series(live, bucket));
                    bucket += u64::from(BUCKET_SECONDS);
                    let start = Instant::now();
                    let rows = target.flush(bucket);
                    timed += start.elapsed();
                    assert_eq!(rows as u64, live);
                    flushed += live;
                }
                timed
            })
        });
    }
    group.finish();
}

fn strategy<A: Aggregator + 'static>(c: &mut Criterion, guest: &Guest) {
    let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let module = rt.load(guest.bytes).unwrap();
    let name = guest.name;
    let mut wasm = || Box::new(Wasm::new(&rt, &module)) as Box<dyn Target>;
    let mut native = || Box::new(Native::<A>::new()) as Box<dyn Target>;
    bench_put(c, &format!("{name}/wasm"), &mut wasm);
    bench_put(c, &format!("{name}/native"), &mut native);
    bench_flush(c, &format!("{name}/wasm"), &mut wasm);
    bench_flush(c, &format!("{name}/native"), &mut native);
}

fn hashmap(c: &mut Criterion) {
    strategy::<wagg_hashmap::HashMapAgg>(c, &HASHMAP);
}

fn btree(c: &mut Criterion) {
    strategy::<wagg_btree::BTreeAgg>(c, &BTREE);
}

fn sorted(c: &mut Criterion) {
    strategy::<wagg_sorted::SortedAgg>(c, &SORTED);
}

fn leaky(c: &mut Criterion) {
    strategy::<wagg_leaky::LeakyAgg>(c, &LEAKY);
}

criterion_group! {
    name = benches;
    config = config();
    targets = hashmap, btree, sorted, leaky
}
criterion_main!(benches);
