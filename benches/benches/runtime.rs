//! The module runtime's costs: compile, instantiate, and `put` per sample at
//! several batch sizes, in Wasm and natively (the ratio is the Wasm tax).
//!
//! `cargo bench -p wagg-benches --bench runtime`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wagg::runtime::{Batch, Runtime, RuntimeLimits};
use wagg_artifacts::HASHMAP;
use wagg_guest::Driver;

const SERIES: u64 = 10_000;
const T0: u64 = 1_764_133_200;

fn batch(n: usize, offset: u64) -> Batch {
    let mut b = Batch::with_capacity(n);
    for i in 0..n as u64 {
        let x = (i + offset).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        b.push(x % SERIES, T0 + (x >> 40) % 60, 1.0);
    }
    b
}

fn runtime_costs(c: &mut Criterion) {
    let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
    c.bench_function("compile+check/hashmap", |b| {
        b.iter(|| rt.load(black_box(HASHMAP.bytes)).unwrap())
    });
    let module = rt.load(HASHMAP.bytes).unwrap();
    c.bench_function("instantiate+configure/hashmap", |b| {
        b.iter(|| rt.instantiate(&module, 60, &[]).unwrap())
    });

    let mut group = c.benchmark_group("put/hashmap");
    for size in [1usize, 64, 1024] {
        let batches: Vec<Batch> = (0..64).map(|k| batch(size, k * size as u64)).collect();
        group.throughput(Throughput::Elements(size as u64));
        let mut instance = rt.instantiate(&module, 60, &[]).unwrap();
        let mut k = 0;
        group.bench_with_input(BenchmarkId::new("wasm", size), &size, |b, _| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                instance.put(&batches[k]).unwrap()
            })
        });
        let mut native = Driver::<wagg_hashmap::HashMapAgg>::new();
        native.configure(60, &[]).unwrap();
        group.bench_with_input(BenchmarkId::new("native", size), &size, |b, _| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                let (s, t, v) = batches[k].columns();
                native.put(s, t, v)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, runtime_costs);
criterion_main!(benches);
