//! Hot-swap pause, tail included: criterion's `swap` bench reports means,
//! this reports p50, p99 and max over a plain loop of swaps of a real shard,
//! then where the pause goes.
//!
//! ```text
//! cargo run --release -p wagg-benches --bin swap-pause [SWAPS]   # default 200
//! ```
//!
//! Table 1: a shard (`ShardHandle`, the shard's own `Command::Swap`) holding
//! `live` open rows swaps from hashmap to the other module `SWAPS` times,
//! swapping back untimed in between. "pause" is the shard's
//! [`SwapReport::pause`](wagg::shard::SwapReport) (what
//! `wagg_swap_pause_seconds` observes: the export, and the replay of what
//! the old module did during the build); "build" is
//! [`SwapReport::build`](wagg::shard::SwapReport), off the shard thread;
//! "round trip" is from sending the command to its reply, which adds the
//! build, the channel, thread wake-ups and the swap's telemetry. Rows
//! "while putting": each timed swap has 8 puts of 1024 samples queued
//! behind it, which the old module runs during the build and the new one
//! replays ("replayed" is their mean count per swap).
//!
//! Table 2: the same calls the swap makes, timed one by one on bare
//! instances (median of up to 50): `export-state` from hashmap with its
//! ids checked against a dictionary of the same keys, on the shard thread;
//! the check of its rows, instantiate+configure of the new module and its
//! `merge`, on the builder thread; and dropping the old instance
//! (unmapping its linear memory), on a thread of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wagg::runtime::{Batch, LoadedModule, Runtime, RuntimeLimits};
use wagg::shard::Dictionary;
use wagg_artifacts::{BTREE, HASHMAP};
use wagg_benches::live_shard::{BUCKET_SECONDS, LiveShard, T0, series_key};

/// Live series (= open rows) every swap runs at.
const LIVE: [u64; 3] = [1_000, 10_000, 100_000];
/// Untimed swaps (there and back) before the timed ones.
const WARM_UP: usize = 5;
/// Most repetitions of the breakdown.
const BREAKDOWN_REPS: usize = 50;
/// Puts of 1024 samples queued behind a swap "while putting".
const PUTS_BEHIND: u64 = 8;

fn main() {
    let swaps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SWAPS is a number"))
        .unwrap_or(200);
    println!("load average at start: {}", load_average());
    let rt = Runtime::new(RuntimeLimits::default(), None).expect("a runtime");
    let hashmap = rt.load(HASHMAP.bytes).expect("hashmap loads");
    let btree = rt.load(BTREE.bytes).expect("btree loads");
    let pairs = [("btree", &btree), ("hashmap", &hashmap)];

    println!();
    println!(
        "| swap | live series | traffic | swaps | pause p50 | pause p99 | pause max | pause mean | build p50 | replayed | round trip p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, to) in pairs {
        for live in LIVE {
            for putting in [false, true] {
                let shard = LiveShard::start(&rt, &hashmap, &hashmap);
                shard.fill(live, T0);
                let swap = |to| {
                    if putting {
                        shard.swap_while_putting(to, PUTS_BEHIND, live, T0)
                    } else {
                        shard.swap(to)
                    }
                };
                for _ in 0..WARM_UP {
                    swap(to).expect("the swap succeeds");
                    shard.swap(&hashmap).expect("the swap back succeeds");
                }
                let mut pauses = Vec::with_capacity(swaps);
                let mut builds = Vec::with_capacity(swaps);
                let mut trips = Vec::with_capacity(swaps);
                let mut replayed = 0;
                for _ in 0..swaps {
                    let sent = Instant::now();
                    let report = swap(to).expect("the swap succeeds");
                    trips.push(sent.elapsed());
                    assert_eq!(report.rows as u64, live, "every open row is carried over");
                    pauses.push(report.pause);
                    builds.push(report.build);
                    replayed += report.replayed;
                    shard.swap(&hashmap).expect("the swap back succeeds");
                }
                shard.stop();
                let mean = pauses.iter().sum::<Duration>() / swaps as u32;
                println!(
                    "| hashmap→{name} | {live} | {} | {swaps} | {} | {} | {} | {} | {} | {:.1} | {} |",
                    if putting { "while putting" } else { "none" },
                    ms(percentile(&mut pauses, 0.50)),
                    ms(percentile(&mut pauses, 0.99)),
                    ms(percentile(&mut pauses, 1.0)),
                    ms(mean),
                    ms(percentile(&mut builds, 0.50)),
                    replayed as f64 / swaps as f64,
                    ms(percentile(&mut trips, 0.99)),
                );
            }
        }
    }

    println!();
    println!("Breakdown, medians of {} (ms):", swaps.min(BREAKDOWN_REPS));
    println!();
    println!(
        "| swap | live series | export, ids checked (shard) | row check (builder) | instantiate+configure (builder) | merge (builder) | drop old (own thread) | sum |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, to) in pairs {
        for live in LIVE {
            let steps = breakdown(&rt, &hashmap, to, live, swaps.min(BREAKDOWN_REPS));
            println!(
                "| hashmap→{name} | {live} | {} | {} |",
                steps.map(ms).join(" | "),
                ms(steps.iter().sum()),
            );
        }
    }
    println!();
    println!("load average at end: {}", load_average());
}

/// Medians of the swap's five steps, on bare instances: the old one is
/// rebuilt by a merge before each repetition, as the untimed swap back
/// leaves it in the loop above.
fn breakdown(
    rt: &Runtime,
    from: &Arc<LoadedModule>,
    to: &Arc<LoadedModule>,
    live: u64,
    reps: usize,
) -> [Duration; 5] {
    let mut dict = Dictionary::new();
    let mut batch = Batch::with_capacity(live as usize);
    for i in 0..live {
        let id = dict.intern(&series_key(i), T0);
        batch.push(id, T0 + i % u64::from(BUCKET_SECONDS), 1.0);
    }
    let known = |id| dict.contains(id);
    let mut first = rt
        .instantiate(from, BUCKET_SECONDS, &[])
        .expect("instantiates");
    first.put(&batch).expect("puts");
    let state = first.export_state(&known).expect("exports");
    drop(first);
    let mut steps: [Vec<Duration>; 5] = Default::default();
    for _ in 0..reps {
        let mut old = rt
            .instantiate(from, BUCKET_SECONDS, &[])
            .expect("instantiates");
        old.merge(&state).expect("merges");
        let t0 = Instant::now();
        let exported = old.export_ids_checked(&known).expect("exports");
        let t1 = Instant::now();
        let exported = exported.check().expect("the rows pass");
        let t1b = Instant::now();
        let mut new = rt
            .instantiate(to, BUCKET_SECONDS, &[])
            .expect("instantiates");
        let t2 = Instant::now();
        new.merge(&exported).expect("merges");
        let t3 = Instant::now();
        drop(old);
        let t4 = Instant::now();
        let took = [t1 - t0, t1b - t1, t2 - t1b, t3 - t2, t4 - t3];
        for (step, d) in steps.iter_mut().zip(took) {
            step.push(d);
        }
    }
    steps.map(|mut s| percentile(&mut s, 0.5))
}

/// The `p` quantile (nearest rank) of `xs`.
fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort_unstable();
    let rank = ((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
