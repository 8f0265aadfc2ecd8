//! Instructions per sample of a strategy's `put`, or per row of its
//! `flush`, in Wasm and natively, for `benches/instructions.sh`, which runs
//! it under callgrind.
//!
//! ```text
//! instructions <put|flush> <hashmap|btree|sorted|leaky> <wasm|native> <live series> [reps]
//! ```
//!
//! The workloads are the `strategies` bench's:
//! - `put` (`put/<strategy>/<side>/live/<n>`): a module filled with one
//!   sample of each live series, then `reps` (default 200) batches of 1024
//!   samples drawn from them;
//! - `flush` (`flush/<strategy>/<side>/live/<n>`): `reps` times, one sample
//!   of each live series in a new bucket, then the flush that returns those
//!   rows. By default as many as keep the rows flushed at 1 000 000 or
//!   fewer (the leaky strategy keeps them all), at most 20.
//!
//! Only the `measured_*` functions are meant to be counted
//! (`--toggle-collect`): setting up, compiling the module, filling it and
//! refilling it between flushes are not. Instruction counts do not move with
//! the load of a shared machine the way times do (±30 % here between runs),
//! so a change to the guest, the SDK or the engine can be compared on them
//! run against run; they say nothing of cache misses, which is what the time
//! benches are for.

use anyhow::{Context, bail, ensure};
use wagg::runtime::{Batch, Runtime, RuntimeLimits, builtin};
use wagg_benches::workload::{BUCKET_SECONDS, Native, T0, Target, Wasm, every_series, put_batches};

/// The puts counted: `batches` in turn, `puts` times. Not inlined, so that
/// callgrind can count exactly this call.
#[inline(never)]
fn measured_put(target: &mut dyn Target, batches: &[Batch], puts: usize) {
    for k in 0..puts {
        target.put(&batches[k % batches.len()]);
    }
}

/// One flush counted; returns its rows.
#[inline(never)]
fn measured_flush(target: &mut dyn Target, watermark: u64) -> usize {
    target.flush(watermark)
}

/// Puts outside the counted functions, so that tables have grown to their
/// working size before anything is counted, as in criterion's warm-up.
#[inline(never)]
fn warm_up(target: &mut dyn Target, batches: &[Batch]) {
    for batch in batches {
        target.put(batch);
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [op, strategy, side, live, rest @ ..] = args.as_slice() else {
        bail!(
            "usage: instructions <put|flush> <hashmap|btree|sorted|leaky> <wasm|native> <live> [reps]"
        );
    };
    let live: u64 = live.parse().context("live series: not a number")?;
    if live == 0 {
        bail!("live series: at least 1");
    }
    let reps: Option<usize> = match rest.first() {
        Some(r) => Some(r.parse().context("reps: not a number")?),
        None => None,
    };
    // Cranelift runs some 50 times slower under valgrind: the default
    // compile timeout (30 s) would refuse the module on a busy machine.
    let limits = RuntimeLimits {
        compile_timeout_secs: 1800,
        ..RuntimeLimits::default()
    };
    let rt = Runtime::new(limits, None)?;
    let mut target: Box<dyn Target> = match (side.as_str(), strategy.as_str()) {
        ("wasm", name) => {
            let bytes = builtin(name).with_context(|| format!("unknown strategy {name}"))?;
            Box::new(Wasm::new(&rt, &rt.load(bytes)?))
        }
        ("native", "hashmap") => Box::new(Native::<wagg_hashmap::HashMapAgg>::new()),
        ("native", "btree") => Box::new(Native::<wagg_btree::BTreeAgg>::new()),
        ("native", "sorted") => Box::new(Native::<wagg_sorted::SortedAgg>::new()),
        ("native", "leaky") => Box::new(Native::<wagg_leaky::LeakyAgg>::new()),
        ("native", name) => bail!("unknown strategy {name}"),
        (side, _) => bail!("unknown side {side} (wasm, native)"),
    };
    match op.as_str() {
        "put" => {
            target.put(&every_series(live, T0));
            let batches = put_batches(live);
            warm_up(target.as_mut(), &batches);
            measured_put(target.as_mut(), &batches, reps.unwrap_or(200));
        }
        "flush" => {
            let reps = reps.unwrap_or_else(|| (1_000_000 / live).clamp(1, 20) as usize);
            let step = u64::from(BUCKET_SECONDS);
            // The first cycle is not counted, as criterion's warm-up.
            let mut bucket = T0;
            for k in 0..=reps {
                target.put(&every_series(live, bucket));
                bucket += step;
                let rows = if k == 0 {
                    target.flush(bucket)
                } else {
                    measured_flush(target.as_mut(), bucket)
                };
                ensure!(
                    rows as u64 == live,
                    "flush returned {rows} rows, not {live}"
                );
            }
        }
        op => bail!("unknown operation {op} (put, flush)"),
    }
    Ok(())
}
