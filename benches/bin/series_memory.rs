//! Host memory per live series, beyond the module's own: a counting global
//! allocator around a real shard filled with N distinct series.
//!
//! ```text
//! cargo run --release -p wagg-benches --bin series-memory [N ...]   # default 10000 100000
//! ```
//!
//! For each N, a shard running hashmap gets one sample of each of N series
//! (keys in the router's format, [`series_key`]), then a checkpoint's
//! snapshot. Heap bytes are read at four points: the empty shard, after
//! the samples (the replay log still holds them), after the snapshot (the
//! log cleared, the rows kept as the rebuild base), and after the shard is
//! told that the checkpoint holding them is on disk (the rows dropped: the
//! steady state between two checkpoints, less the samples since). Then every
//! row is flushed, and
//! the points (one per series) are weighed while the outbox holds them, as
//! it does until the sink confirms them. The same dictionary and rows
//! are then built alone to say where the bytes go.
//!
//! Bytes are counted twice: as requested (`Layout::size`) and as glibc holds
//! them (`malloc_usable_size` plus its 8-byte chunk header). The module's
//! linear memory is mapped by wasmtime, not allocated through the global
//! allocator, so it is not in these counts; the last table checks that on
//! a bare instance.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use wagg::runtime::{Batch, Runtime, RuntimeLimits};
use wagg::shard::{Dictionary, StateRow};
use wagg_artifacts::HASHMAP;
use wagg_benches::live_shard::{BUCKET_SECONDS, LiveShard, T0, series_key};

/// glibc's per-chunk header, not included in `malloc_usable_size`.
const CHUNK_HEADER: isize = 8;

static REQUESTED: AtomicIsize = AtomicIsize::new(0);
static HELD: AtomicIsize = AtomicIsize::new(0);
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// [`System`], counting what is live.
struct Counting;

impl Counting {
    fn add(ptr: *mut u8, size: usize, sign: isize) {
        // SAFETY: `ptr` is a live block from glibc's malloc family (System
        // uses it on Linux for every alignment).
        let held = unsafe { libc::malloc_usable_size(ptr.cast()) } as isize;
        REQUESTED.fetch_add(sign * size as isize, Relaxed);
        HELD.fetch_add(sign * (held + CHUNK_HEADER), Relaxed);
        LIVE.fetch_add(sign, Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only
// observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::add(p, layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::add(p, layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::add(ptr, layout.size(), -1);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::add(ptr, layout.size(), -1);
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            // The old block is still live.
            Self::add(ptr, layout.size(), 1);
        } else {
            Self::add(p, new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live heap: (requested bytes, bytes glibc holds, blocks).
#[derive(Debug, Clone, Copy)]
struct Heap(isize, isize, isize);

impl Heap {
    fn now() -> Self {
        Heap(
            REQUESTED.load(Relaxed),
            HELD.load(Relaxed),
            LIVE.load(Relaxed),
        )
    }

    fn since(self, before: Heap) -> Heap {
        Heap(self.0 - before.0, self.1 - before.1, self.2 - before.2)
    }

    /// "requested / held / blocks" per series.
    fn per(self, n: u64) -> String {
        let n = n as f64;
        format!(
            "{:.1} | {:.1} | {:.2}",
            self.0 as f64 / n,
            self.1 as f64 / n,
            self.2 as f64 / n
        )
    }
}

fn main() {
    let counts: Vec<u64> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("N is a number"))
        .collect();
    let counts = if counts.is_empty() {
        vec![10_000, 100_000]
    } else {
        counts
    };
    println!("load average at start: {}", load_average());
    let rt = Runtime::new(RuntimeLimits::default(), None).expect("a runtime");
    let hashmap = rt.load(HASHMAP.bytes).expect("hashmap loads");

    println!();
    println!("Bytes per live series (requested | held by glibc | heap blocks):");
    println!();
    println!("| live series | mean key | what | requested B | held B | blocks |");
    println!("|---|---|---|---|---|---|");
    let mut module_memory = Vec::new();
    for &n in &counts {
        let key_bytes: usize = (0..n).map(|i| series_key(i).len()).sum();
        let mean_key = key_bytes as f64 / n as f64;
        let row = |what: &str, heap: Heap| {
            println!("| {n} | {mean_key:.1} | {what} | {} |", heap.per(n));
        };

        // The real shard.
        let shard = LiveShard::start(&rt, &hashmap, &hashmap);
        let empty_stats = shard.stats();
        let empty = Heap::now();
        shard.fill(n, T0);
        let filled = Heap::now();
        let rows = shard.snapshot();
        let with_reply = Heap::now();
        drop(rows);
        shard.stats();
        let snapshotted = Heap::now();
        shard.checkpointed();
        let stats = shard.stats();
        let checkpointed = Heap::now();
        row(
            "shard, samples since the last checkpoint in its log",
            filled.since(empty),
        );
        row(
            "shard, after a snapshot, until its checkpoint is on disk",
            snapshotted.since(empty),
        );
        row(
            "**shard, after the checkpoint is on disk (steady state)**",
            checkpointed.since(empty),
        );
        row(
            "snapshot sent to the checkpoint (shared with the shard's base)",
            with_reply.since(snapshotted),
        );
        // Every row flushed: one point per series, held in the outbox (and
        // every checkpoint) until the sink confirms it.
        let points = shard.flush(T0 + u64::from(BUCKET_SECONDS));
        let flushed = Heap::now();
        assert_eq!(points.iter().map(|p| p.len()).sum::<usize>() as u64, n);
        drop(points);
        let after_flush = Heap::now();
        row(
            "flushed points waiting for the sink, per point",
            flushed.since(after_flush),
        );
        row(
            "shard after the flush, beside its points",
            after_flush.since(empty),
        );
        shard.stop();

        // The same structures alone.
        let before = Heap::now();
        let mut dict = Dictionary::new();
        for i in 0..n {
            dict.intern(&series_key(i), T0);
        }
        row(
            "… of which the series dictionary",
            Heap::now().since(before),
        );
        let before = Heap::now();
        let base: Vec<StateRow> = (0..n)
            .map(|i| StateRow {
                key: series_key(i).into(),
                bucket: T0,
                count: 1,
                sum: 1.0,
                min: 1.0,
                max: 1.0,
            })
            .collect();
        row(
            "… the last snapshot's rows (held until its checkpoint is on disk)",
            Heap::now().since(before),
        );
        println!(
            "| {n} | {mean_key:.1} | (dictionary's own estimate, `dictionary_bytes`) | {:.1} | | |",
            stats.dictionary_bytes as f64 / n as f64
        );
        drop((dict, base));
        module_memory.push((
            n,
            stats.module_stats.memory_bytes - empty_stats.module_stats.memory_bytes,
        ));
    }

    println!();
    println!("The module's linear memory, for comparison (not in the figures above):");
    println!();
    println!(
        "| live series | hashmap linear memory grown in the shard, B/series | heap counted on a bare instance, B/series |"
    );
    println!("|---|---|---|");
    for (n, grown) in module_memory {
        let mut dict = Dictionary::new();
        let mut batch = Batch::with_capacity(n as usize);
        for i in 0..n {
            batch.push(
                dict.intern(&series_key(i), T0),
                T0 + i % u64::from(BUCKET_SECONDS),
                1.0,
            );
        }
        let mut instance = rt
            .instantiate(&hashmap, BUCKET_SECONDS, &[])
            .expect("instantiates");
        let before = Heap::now();
        instance.put(&batch).expect("puts");
        let counted = Heap::now().since(before);
        drop(instance);
        println!(
            "| {n} | {:.1} | {:.1} |",
            grown as f64 / n as f64,
            counted.1 as f64 / n as f64
        );
    }
    println!();
    println!("load average at end: {}", load_average());
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
