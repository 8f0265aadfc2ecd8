//! Hot-swap pause: what a shard's data path stands still for while it moves
//! its open buckets to another module (`Command::Swap`: the old instance
//! exports; a new one instantiates and merges on a builder thread, replays
//! what the old one did meanwhile, then replaces it).
//!
//! `cargo bench -p wagg-benches --bench swap`
//!
//! - `swap/hashmap-btree/live/<n>`, `swap/hashmap-hashmap/live/<n>`: a real
//!   shard holding `n` open rows (one per series, one bucket) swaps from
//!   hashmap to the other module; throughput is rows carried over. The time
//!   is the shard's own [`SwapReport::pause`](wagg::shard::SwapReport)
//!   (what `wagg_swap_pause_seconds` observes). Between two timed swaps the
//!   shard swaps back to hashmap, untimed, so every timed swap starts from
//!   hashmap with the same state.
//!
//! - `snapshot/hashmap/live/<n>`: what a checkpoint asks of each shard
//!   (`Command::Snapshot`): export every open row, check it, and turn it
//!   into a state row with its key; measured from sending the command to
//!   holding the rows.
//!
//! - `flush/hashmap/live/<n>`: a shard holding `n` open rows, all in one
//!   bucket, flushes them (`Command::Flush`): the module's flush, the
//!   output check, and one point per row handed to the outbox; measured
//!   from sending the command to the points being in the outbox. The rows
//!   are put back, untimed, between two flushes.
//!
//! Criterion reports means; the tail (p99) comes from the plain loop in
//! `benches/bin/swap_pause.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Bencher, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wagg::runtime::{LoadedModule, Runtime, RuntimeLimits};
use wagg_artifacts::{BTREE, HASHMAP};
use wagg_benches::live_shard::{BUCKET_SECONDS, LiveShard, T0};

/// Live series (= open rows) every swap runs at.
const LIVE: [u64; 3] = [1_000, 10_000, 100_000];

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

/// One benchmark group: per live count in [`LIVE`], a fresh shard running
/// `module` (its own fallback too), readied by `prepare`, timed by `bench`.
fn per_live_count(
    c: &mut Criterion,
    rt: &Runtime,
    name: String,
    module: &Arc<LoadedModule>,
    prepare: impl Fn(&LiveShard, u64),
    mut bench: impl FnMut(&mut Bencher<'_>, &LiveShard, u64),
) {
    let mut group = c.benchmark_group(name);
    for live in LIVE {
        group.throughput(Throughput::Elements(live));
        let shard = LiveShard::start(rt, module, module);
        prepare(&shard, live);
        group.bench_function(BenchmarkId::new("live", live), |b| bench(b, &shard, live));
        shard.stop();
    }
    group.finish();
}

fn filled(shard: &LiveShard, live: u64) {
    shard.fill(live, T0);
}

fn bench_swap(
    c: &mut Criterion,
    rt: &Runtime,
    (from_name, from): (&str, &Arc<LoadedModule>),
    (to_name, to): (&str, &Arc<LoadedModule>),
) {
    let name = format!("swap/{from_name}-{to_name}");
    per_live_count(c, rt, name, from, filled, |b, shard, live| {
        b.iter_custom(|iters| {
            let mut paused = Duration::ZERO;
            for _ in 0..iters {
                let report = shard.swap(to).expect("the swap succeeds");
                assert_eq!(report.rows as u64, live);
                paused += report.pause;
                shard.swap(from).expect("the swap back succeeds");
            }
            paused
        })
    });
}

fn bench_snapshot(c: &mut Criterion, rt: &Runtime, (name, module): (&str, &Arc<LoadedModule>)) {
    let name = format!("snapshot/{name}");
    per_live_count(c, rt, name, module, filled, |b, shard, live| {
        b.iter(|| {
            let rows = shard.snapshot();
            assert_eq!(rows.len() as u64, live);
            rows
        })
    });
}

fn bench_flush(c: &mut Criterion, rt: &Runtime, (name, module): (&str, &Arc<LoadedModule>)) {
    // Each flush closes the next bucket, so watermarks only advance.
    let mut bucket = T0;
    let name = format!("flush/{name}");
    per_live_count(
        c,
        rt,
        name,
        module,
        |_, _| {},
        |b, shard, live| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    shard.fill(live, bucket);
                    bucket += u64::from(BUCKET_SECONDS);
                    let started = Instant::now();
                    let points = shard.flush(bucket);
                    took += started.elapsed();
                    let flushed: usize = points.iter().map(|p| p.len()).sum();
                    assert_eq!(flushed as u64, live);
                    // Clears the replay log, as the pipeline's checkpoints do.
                    shard.snapshot();
                }
                took
            })
        },
    );
}

fn swap(c: &mut Criterion) {
    let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let hashmap = rt.load(HASHMAP.bytes).unwrap();
    let btree = rt.load(BTREE.bytes).unwrap();
    bench_swap(c, &rt, ("hashmap", &hashmap), ("btree", &btree));
    bench_swap(c, &rt, ("hashmap", &hashmap), ("hashmap", &hashmap));
    bench_snapshot(c, &rt, ("hashmap", &hashmap));
    bench_flush(c, &rt, ("hashmap", &hashmap));
}

criterion_group! {
    name = benches;
    config = config();
    targets = swap
}
criterion_main!(benches);
