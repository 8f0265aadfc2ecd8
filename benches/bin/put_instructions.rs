//! Instructions per sample of a strategy's `put`, in Wasm and natively, for
//! `benches/instructions.sh`, which runs it under callgrind.
//!
//! ```text
//! put-instructions <hashmap|btree|sorted|leaky> <wasm|native> <live series> [puts]
//! ```
//!
//! The workload is the `strategies` bench's (`put/<strategy>/<side>/live/<n>`):
//! a module filled with one sample of each live series, then `puts` batches
//! of 1024 samples drawn from them. Only [`measured`] is meant to be counted
//! (`--toggle-collect`): setting up, compiling the module and filling it are
//! not. Instruction counts do not move with the load of a shared machine the
//! way times do (±30 % here between runs), so a change to the guest, the SDK
//! or the engine can be compared on them run against run; they say nothing
//! of cache misses, which is what the time benches are for.

use anyhow::{Context, bail};
use wagg::runtime::{Batch, Runtime, RuntimeLimits};
use wagg_artifacts::{BTREE, HASHMAP, LEAKY, SORTED};
use wagg_benches::workload::{BATCHES, Native, T0, Target, Wasm, every_series, put_batches};

/// The puts counted: `batches` in turn, `puts` times. Not inlined, so that
/// callgrind can count exactly this call.
#[inline(never)]
fn measured(target: &mut dyn Target, batches: &[Batch], puts: usize) {
    for k in 0..puts {
        target.put(&batches[k % batches.len()]);
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [strategy, side, live, rest @ ..] = args.as_slice() else {
        bail!("usage: put-instructions <hashmap|btree|sorted|leaky> <wasm|native> <live> [puts]");
    };
    let live: u64 = live.parse().context("live series: not a number")?;
    if live == 0 {
        bail!("live series: at least 1");
    }
    let puts: usize = match rest.first() {
        Some(p) => p.parse().context("puts: not a number")?,
        None => 200,
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
            let guest = [&HASHMAP, &BTREE, &SORTED, &LEAKY]
                .into_iter()
                .find(|g| g.name == name)
                .with_context(|| format!("unknown strategy {name}"))?;
            Box::new(Wasm::new(&rt, &rt.load(guest.bytes)?))
        }
        ("native", "hashmap") => Box::new(Native::<wagg_hashmap::HashMapAgg>::new()),
        ("native", "btree") => Box::new(Native::<wagg_btree::BTreeAgg>::new()),
        ("native", "sorted") => Box::new(Native::<wagg_sorted::SortedAgg>::new()),
        ("native", "leaky") => Box::new(Native::<wagg_leaky::LeakyAgg>::new()),
        ("native", name) => bail!("unknown strategy {name}"),
        (side, _) => bail!("unknown side {side} (wasm, native)"),
    };
    target.put(&every_series(live, T0));
    let batches = put_batches(live);
    // One round first, as criterion's warm-up: tables have grown to their
    // working size before anything is counted.
    warm_up(target.as_mut(), &batches);
    measured(target.as_mut(), &batches, puts);
    Ok(())
}

/// The same puts as [`measured`], outside it: not counted.
#[inline(never)]
fn warm_up(target: &mut dyn Target, batches: &[Batch]) {
    for batch in batches.iter().take(BATCHES) {
        target.put(batch);
    }
}
