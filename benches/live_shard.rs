//! A real shard ([`ShardHandle`]) driven through its public commands, so
//! that what a bench measures is the shard's own code path (put, snapshot,
//! hot swap), not a copy of it.

use std::sync::Arc;

use tokio::sync::{broadcast, oneshot};
use wagg::router::{KeyBatch, RouterConfig};
use wagg::runtime::{InstanceError, LoadedModule, Runtime};
use wagg::shard::{
    Assignment, Command, Outbox, SavedState, ShardHandle, ShardSpec, ShardStats, StateRow,
    SwapReport,
};
use wagg::sink::Point;
use wagg::telemetry::Metrics;

/// Bucket width every live shard runs with, seconds.
pub const BUCKET_SECONDS: u32 = 60;
/// A bucket boundary (a multiple of 60).
pub const T0: u64 = 1_764_133_200;
/// Samples per `Put`: the order of what the router hands a shard.
const PUT_BATCH: u64 = 1024;
/// POPs the keys cycle through (the generator's default count).
const POPS: u64 = 25;

/// The key of series `i`, as the router writes it for the finest default
/// rollup (`record`: customer, zone, record, type, pop), which has at least
/// as many series as the coarser ones. Distinct for every `i`; the record is
/// a name in the zone, as in DNS (and the generator), so the key refers to
/// the zone for it (`wagg::router::encode_key`): a mean of 45.0 bytes over
/// the first 10 000, 46.7 over the first 100 000 (65.1 and 67.5 with every
/// value in full, as before session 12).
pub fn series_key(i: u64) -> Vec<u8> {
    let customer = (1000 + i % 1000).to_string();
    let zone = format!("zone-{}.example.com", i / 8 % 10_000);
    let record = format!("www-{i}.{zone}");
    let pop = format!("pop{:02}", i % POPS);
    wagg::router::encode_key(2, [&*customer, &zone, &record, "A", &pop])
}

/// A running shard plus what it takes to talk to it from a plain thread.
#[derive(Debug)]
pub struct LiveShard {
    handle: Option<ShardHandle>,
    /// Only to await `ShardHandle::send` (a bounded channel) from here.
    tokio: tokio::runtime::Runtime,
    fallback: Assignment,
    outbox: Arc<Outbox>,
}

impl LiveShard {
    /// Starts shard 0 running `module` (`fallback` takes over if it fails
    /// twice), holding nothing.
    ///
    /// # Panics
    ///
    /// If the shard cannot start (the module fails to instantiate).
    pub fn start(
        runtime: &Runtime,
        module: &Arc<LoadedModule>,
        fallback: &Arc<LoadedModule>,
    ) -> Self {
        // No receiver: the shard ignores a failed send, and nothing queues
        // events in memory that a measurement would count.
        let (events, _) = broadcast::channel(64);
        let fallback = Assignment::plain(fallback.clone());
        let spec = ShardSpec {
            index: 0,
            assignment: Assignment::plain(module.clone()),
            fallback: fallback.clone(),
            bucket_seconds: BUCKET_SECONDS,
            forget_after_buckets: 2,
            router: Arc::new(RouterConfig::default()),
            events,
            metrics: Metrics::new(),
        };
        let outbox = Outbox::new();
        let handle = ShardHandle::start(spec, runtime.clone(), outbox.clone(), Vec::new())
            .expect("the shard starts");
        let tokio = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime");
        LiveShard {
            handle: Some(handle),
            tokio,
            fallback,
            outbox,
        }
    }

    fn send(&self, cmd: Command) {
        let handle = self.handle.as_ref().expect("running");
        self.tokio
            .block_on(handle.send(cmd))
            .expect("the shard is running");
    }

    /// Puts one sample of each of series `0..n` into the bucket at `bucket`,
    /// in batches of 1024 as the router would send them, and waits until the
    /// shard has put them all.
    pub fn fill(&self, n: u64, bucket: u64) {
        let mut i = 0;
        while i < n {
            let mut batch = KeyBatch::with_capacity(PUT_BATCH as usize);
            for j in i..(i + PUT_BATCH).min(n) {
                batch.push_raw(&series_key(j), bucket + j % u64::from(BUCKET_SECONDS), 1.0);
            }
            i += PUT_BATCH;
            self.send(Command::Put(batch));
        }
        self.stats();
    }

    /// The shard's stats; also a barrier: every command sent before has run.
    pub fn stats(&self) -> ShardStats {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Stats(tx));
        rx.blocking_recv().expect("the shard replies")
    }

    /// A checkpoint's snapshot: the shard keeps the rows as its new base
    /// (shared with the reply) and clears its replay log.
    pub fn snapshot(&self) -> Arc<Vec<StateRow>> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Snapshot(tx));
        rx.blocking_recv().expect("the shard replies")
    }

    /// Tells the shard that the checkpoint holding its last snapshot is on
    /// disk, so it drops its own copy of the rows. Nothing here writes one:
    /// a rebuild after this would stop the shard, and none is provoked.
    pub fn checkpointed(&self) {
        self.send(Command::Checkpointed(SavedState::new(|_| {
            Err("this bench writes no checkpoint".into())
        })));
    }

    /// Flushes every bucket that ends at or before `watermark`
    /// (`Command::Flush`, announced to the outbox as the pipeline does),
    /// waits until the shard has run it, and takes the points out of the
    /// outbox as a confirmed sink write would.
    pub fn flush(&self, watermark: u64) -> Vec<Arc<Vec<Point>>> {
        self.outbox.flush_sent();
        self.send(Command::Flush(watermark));
        self.stats();
        let jobs = self.outbox.jobs_from(0);
        for (seq, _) in &jobs {
            self.outbox.confirm(*seq);
        }
        jobs.into_iter().map(|(_, points)| points).collect()
    }

    /// Hot-swaps to `to` (the shard's `Command::Swap`), keeping the fallback.
    ///
    /// # Errors
    ///
    /// The shard's refusal; the old module then keeps running.
    pub fn swap(&self, to: &Arc<LoadedModule>) -> Result<SwapReport, InstanceError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Swap {
            to: Assignment::plain(to.clone()),
            fallback: self.fallback.clone(),
            reply: tx,
        });
        rx.blocking_recv().expect("the shard replies")
    }

    /// Hot-swaps to `to` with traffic behind the swap: `batches` puts of
    /// 1024 samples into series `0..series` at `bucket` are queued right after
    /// the swap command, so the old module runs them while the new instance
    /// is built, and the new one replays them.
    ///
    /// # Errors
    ///
    /// The shard's refusal; the old module then keeps running.
    pub fn swap_while_putting(
        &self,
        to: &Arc<LoadedModule>,
        batches: u64,
        series: u64,
        bucket: u64,
    ) -> Result<SwapReport, InstanceError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Swap {
            to: Assignment::plain(to.clone()),
            fallback: self.fallback.clone(),
            reply: tx,
        });
        for b in 0..batches {
            let mut batch = KeyBatch::with_capacity(PUT_BATCH as usize);
            for j in b * PUT_BATCH..(b + 1) * PUT_BATCH {
                let i = j % series;
                batch.push_raw(&series_key(i), bucket + i % u64::from(BUCKET_SECONDS), 1.0);
            }
            self.send(Command::Put(batch));
        }
        rx.blocking_recv().expect("the shard replies")
    }

    /// Stops the shard and waits for its thread.
    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}
