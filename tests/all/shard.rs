//! One shard driven through its own commands, without a broker or a sink:
//! what a rebuild after a module failure replays, and what a hot swap
//! replays into the new instance, checked point by point.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};
use wagg::pipeline::checkpoint::{Checkpoint, CheckpointStore, VERSION};
use wagg::pipeline::saved_state;
use wagg::router::{KeyBatch, Router, RouterConfig};
use wagg::runtime::{InstanceError, LoadedModule, Runtime, RuntimeLimits};
use wagg::shard::{
    Assignment, Command, Outbox, SavedState, ShardEvent, ShardHandle, ShardSpec, ShardStats,
    StateRow, SwapReport,
};
use wagg::sink::Point;
use wagg::telemetry::Metrics;

const WIDTH: u64 = 60;
const T0: u64 = 1_764_000_000 - 1_764_000_000 % WIDTH;
/// Safety net for every reply; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

/// A key of the default router's `customer` rollup (index 0: customer, pop).
fn key(customer: u32) -> Vec<u8> {
    format!("\x00{customer}\0lga\0").into_bytes()
}

async fn send(shard: &ShardHandle, cmd: Command) {
    shard.send(cmd).await.expect("the shard is running");
}

async fn put(shard: &ShardHandle, customer: u32, timestamp: u64) {
    let mut batch = KeyBatch::default();
    batch.push_raw(&key(customer), timestamp, 1.0);
    send(shard, Command::Put(batch)).await;
}

/// The shard's stats, once every command sent before has run. A shard that
/// halted never replies: that fails here, after [`PATIENCE`].
async fn stats(shard: &ShardHandle) -> ShardStats {
    let (tx, rx) = oneshot::channel();
    send(shard, Command::Stats(tx)).await;
    tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("the shard replies (it has not halted)")
        .expect("the shard replies")
}

/// The shard's next snapshot (`Command::Snapshot`, as a checkpoint takes it).
async fn snapshot(shard: &ShardHandle) -> Arc<Vec<StateRow>> {
    let (tx, rx) = oneshot::channel();
    send(shard, Command::Snapshot(tx)).await;
    tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("the shard replies")
        .expect("the shard replies")
}

/// One open bucket at `T0` of `customer`, holding `count` samples of 1.0.
fn open_row(customer: u32, count: u64) -> StateRow {
    StateRow {
        key: key(customer).into(),
        bucket: T0,
        count,
        sum: 1.0,
        min: 1.0,
        max: 1.0,
    }
}

/// `misbehave` exporting every row twice (the output check refuses it).
fn double_export(misbehave: &Arc<LoadedModule>) -> Assignment {
    Assignment::new(
        misbehave.clone(),
        vec![("mode".into(), "double-export".into())],
        "double-export@1",
    )
}

/// Asserts that the shard halted: it answers nothing any more. A command
/// may be refused, or dropped with the halted shard's queue.
async fn assert_halted(shard: &ShardHandle, what: &str) {
    let (tx, rx) = oneshot::channel();
    let _ = shard.send(Command::Stats(tx)).await;
    let reply = tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("a halted shard drops the request at once");
    assert!(reply.is_err(), "{what}: the shard halted: {reply:?}");
}

/// Asks for a swap to `hashmap` (falling back to it too); the reply comes
/// on the receiver.
async fn swap_to(
    shard: &ShardHandle,
    hashmap: &Arc<LoadedModule>,
) -> oneshot::Receiver<Result<SwapReport, InstanceError>> {
    let (reply, swapped) = oneshot::channel();
    send(
        shard,
        Command::Swap {
            to: Assignment::plain(hashmap.clone()),
            fallback: Assignment::plain(hashmap.clone()),
            reply,
        },
    )
    .await;
    swapped
}

/// The error a swap is answered with. A shard that drops the request
/// instead fails here.
async fn swap_error(
    swapped: oneshot::Receiver<Result<SwapReport, InstanceError>>,
) -> InstanceError {
    tokio::time::timeout(PATIENCE, swapped)
        .await
        .expect("the shard replies")
        .expect("the shard answers the swap rather than drop it")
        .expect_err("the swap fails")
}

/// Swaps to `hashmap` (falling back to it too), expecting the swap to fail.
async fn failed_swap_to(shard: &ShardHandle, hashmap: &Arc<LoadedModule>) -> InstanceError {
    swap_error(swap_to(shard, hashmap).await).await
}

/// Shard 0 of the default router running `assignment` (`fallback` takes
/// over if it fails twice), with its outbox and its events.
fn start_shard(
    runtime: Runtime,
    assignment: Assignment,
    fallback: Assignment,
    forget_after_buckets: u64,
) -> (ShardHandle, Arc<Outbox>, broadcast::Receiver<ShardEvent>) {
    start_shard_with(
        runtime,
        assignment,
        fallback,
        forget_after_buckets,
        Vec::new(),
    )
}

/// [`start_shard`], its module first merging `restore`.
fn start_shard_with(
    runtime: Runtime,
    assignment: Assignment,
    fallback: Assignment,
    forget_after_buckets: u64,
    restore: Vec<StateRow>,
) -> (ShardHandle, Arc<Outbox>, broadcast::Receiver<ShardEvent>) {
    let (events, events_rx) = broadcast::channel(64);
    let outbox = Outbox::new();
    let spec = ShardSpec {
        index: 0,
        assignment,
        fallback,
        bucket_seconds: WIDTH as u32,
        forget_after_buckets,
        router: Arc::new(RouterConfig::default()),
        events,
        metrics: Metrics::new(),
    };
    let shard = ShardHandle::start(spec, runtime, outbox.clone(), restore).unwrap();
    (shard, outbox, events_rx)
}

/// (customer tag, bucket, value) of every point in the outbox, sorted.
fn points(outbox: &Outbox) -> Vec<(String, u64, f64)> {
    let jobs = outbox.jobs_from(0);
    let mut points: Vec<_> = jobs
        .iter()
        .flat_map(|(_, job)| job.iter())
        .map(|p: &Point| {
            let customer = p.tags.get("customer").unwrap_or_default().to_string();
            (customer, p.timestamp, p.value)
        })
        .collect();
    points.sort_by(|a, b| a.partial_cmp(b).expect("finite values"));
    points
}

/// Misbehave trapping on its third `put` call, falling back to hashmap:
/// a shard whose first two puts are in its snapshot and whose third traps.
fn trap_on_third_put(runtime: &Runtime) -> (Assignment, Assignment) {
    let misbehave = runtime.load(wagg_artifacts::MISBEHAVE.bytes).unwrap();
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    (
        Assignment::new(
            misbehave,
            vec![("mode".into(), "trap-on".into()), ("n".into(), "3".into())],
            "trap-on@1",
        ),
        Assignment::plain(hashmap),
    )
}

/// The replay log holds samples by series id, so a series that a flush
/// made idle must stay in the dictionary until the log is cleared: a
/// rebuild replays the puts from before that flush, and the replayed flush
/// returns the series' rows again, which the output check accepts only for
/// known ids. Here the series is idle after the first flush
/// (`forget_after_buckets = 0`) and the module traps twice on one put: the
/// rebuilt module and then the fallback replay everything since the start.
#[tokio::test]
async fn a_rebuild_replays_puts_of_series_a_flush_made_idle() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    // Traps on its third `put` call, and so does the instance rebuilt to
    // replay two puts before the same command runs again.
    let (module, fallback) = trap_on_third_put(&runtime);
    let (shard, outbox, mut events_rx) = start_shard(runtime, module, fallback, 0);

    put(&shard, 1, T0 + 5).await;
    outbox.flush_sent();
    send(&shard, Command::Flush(T0 + 2 * WIDTH)).await;
    put(&shard, 2, T0 + 2 * WIDTH).await;
    // The module's third put: it traps, its rebuild traps on the same
    // command, and the fallback takes over.
    put(&shard, 3, T0 + 2 * WIDTH + 1).await;
    outbox.flush_sent();
    send(&shard, Command::Flush(T0 + 4 * WIDTH)).await;
    let before_snapshot = stats(&shard).await;

    let mut failures = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        if let ShardEvent::ModuleFailed { fell_back, .. } = event {
            failures.push(fell_back);
        }
    }
    assert_eq!(failures, [false, true], "a rebuild, then the fallback");
    assert_eq!(
        points(&outbox),
        [
            ("1".to_string(), T0, 1.0),
            ("2".to_string(), T0 + 2 * WIDTH, 1.0),
            ("3".to_string(), T0 + 2 * WIDTH, 1.0),
        ],
        "every sample flushed once, none lost or counted twice by the replays"
    );
    // Idle series are forgotten when a snapshot clears the log, not before.
    assert_eq!(before_snapshot.dictionary_series, 3);
    let rows = snapshot(&shard).await;
    assert!(rows.is_empty(), "every bucket was flushed: {rows:?}");
    assert_eq!(stats(&shard).await.dictionary_series, 0);
    shard.stop();
}

/// Puts customers 1 and 2, takes a snapshot, writes a checkpoint file in
/// `dir` holding `on_disk(snapshot's rows)`, and tells the shard that the
/// checkpoint holding its snapshot is on disk: the shard reads it back with
/// the pipeline's reader, after `before_read`. Returns how many times the
/// shard read.
async fn checkpoint_two_series(
    shard: &ShardHandle,
    dir: &Path,
    on_disk: impl FnOnce(Vec<StateRow>) -> Vec<StateRow>,
    before_read: impl Fn() + Send + Sync + 'static,
) -> Arc<AtomicUsize> {
    put(shard, 1, T0 + 5).await;
    put(shard, 2, T0 + 6).await;
    let rows = snapshot(shard).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let store = CheckpointStore::new(dir);
    store
        .save(&Checkpoint {
            version: VERSION,
            rows: on_disk(rows.to_vec()).into(),
            ..Checkpoint::default()
        })
        .unwrap();
    // Only the shard's copy is left: the test drops its own.
    drop(rows);
    // One shard in the reader's router: this test puts every customer into
    // shard 0, wherever the default router would send it.
    let file = saved_state(
        store,
        Router::new(Arc::new(RouterConfig {
            shards: 1,
            ..RouterConfig::default()
        })),
    );
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    let saved = SavedState::new(move |index| {
        before_read();
        counted.fetch_add(1, Ordering::Relaxed);
        file.load(index)
    });
    send(shard, Command::Checkpointed(saved)).await;
    reads
}

/// Once the checkpoint holding its snapshot is on disk, a shard holds no
/// copy of the snapshot's rows: a rebuild reads them back from the file.
/// The module traps on the put after the checkpoint, and the rebuilt module
/// must still flush the two series from before it.
#[tokio::test]
async fn a_rebuild_after_a_checkpoint_reads_the_snapshot_back() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let (module, fallback) = trap_on_third_put(&runtime);
    let (shard, outbox, mut events_rx) = start_shard(runtime, module, fallback, 2);

    let dir = tempfile::tempdir().unwrap();
    let reads = checkpoint_two_series(&shard, dir.path(), |rows| rows, || ()).await;
    assert_eq!(reads.load(Ordering::Relaxed), 0, "no rebuild yet");
    // The third put traps; the rebuilt instance counts its puts afresh.
    put(&shard, 3, T0 + 7).await;
    outbox.flush_sent();
    send(&shard, Command::Flush(T0 + 2 * WIDTH)).await;
    stats(&shard).await;

    let mut failures = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        if let ShardEvent::ModuleFailed { fell_back, .. } = event {
            failures.push(fell_back);
        }
    }
    assert_eq!(failures, [false], "one rebuild, with the same module");
    assert_eq!(
        reads.load(Ordering::Relaxed),
        1,
        "the rebuild read the rows"
    );
    assert_eq!(
        points(&outbox),
        [
            ("1".to_string(), T0, 1.0),
            ("2".to_string(), T0, 1.0),
            ("3".to_string(), T0, 1.0),
        ],
        "the rows from before the checkpoint survive the rebuild"
    );
    shard.stop();
}

/// A checkpoint file that no longer matches the snapshot (replaced or
/// altered: here it lacks a row, or a row's sum differs) would change the
/// totals if merged: the shard stops instead, and the pipeline
/// acknowledges nothing more.
#[tokio::test]
async fn a_rebuild_refuses_rows_read_back_that_are_not_the_snapshot() {
    type Alter = fn(&mut Vec<StateRow>);
    let alterations: [(&str, Alter); 2] = [
        ("a row missing", |rows| drop(rows.pop())),
        ("a sum changed", |rows| rows[0].sum += 1.0),
    ];
    for (what, alter) in alterations {
        let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
        let (module, fallback) = trap_on_third_put(&runtime);
        let (shard, outbox, _events) = start_shard(runtime, module, fallback, 2);

        let dir = tempfile::tempdir().unwrap();
        let reads = checkpoint_two_series(
            &shard,
            dir.path(),
            |mut rows| {
                alter(&mut rows);
                rows
            },
            || (),
        )
        .await;
        put(&shard, 3, T0 + 7).await;
        // The shard may stop before these are queued, or drop them with its
        // queue: either way they do not run.
        outbox.flush_sent();
        let _ = shard.send(Command::Flush(T0 + 2 * WIDTH)).await;
        assert_halted(&shard, what).await;
        assert_eq!(reads.load(Ordering::Relaxed), 1, "{what}: read once");
        assert!(points(&outbox).is_empty(), "{what}: nothing flushed");
        shard.stop();
    }
}

/// A shard that halts with a swap pending answers it, the swap deferred
/// behind it and the one still in its queue with the error that halted
/// it, rather than drop them: the admin API says why the swap failed.
///
/// The order is made certain, not timed: the shard waits inside a rebuild
/// (its read of the snapshot, until the test opens the gate) while the
/// swaps and the put that halts it are queued. They then run in that
/// order, before the swap's builder can queue its wake-up.
#[tokio::test]
async fn a_shard_that_halts_answers_the_swaps_asked_for() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let (trap, _) = trap_on_third_put(&runtime);
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    // Its own fallback: a put that traps after every rebuild halts the
    // shard.
    let (shard, _outbox, _events) = start_shard(runtime, trap.clone(), trap, 2);
    let dir = tempfile::tempdir().unwrap();
    let (open, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    checkpoint_two_series(
        &shard,
        dir.path(),
        |rows| rows,
        // Returns once `open` is dropped.
        move || drop(gate.lock().map(|gate| gate.recv())),
    )
    .await;

    // The module's third put traps, and its rebuild waits at the gate.
    put(&shard, 3, T0 + 7).await;
    let pending = swap_to(&shard, &hashmap).await;
    let deferred = swap_to(&shard, &hashmap).await;
    // The rebuilt module's second put since the snapshot, then its third,
    // which traps again after every rebuild.
    put(&shard, 4, T0 + 8).await;
    put(&shard, 5, T0 + 9).await;
    let queued = swap_to(&shard, &hashmap).await;
    drop(open);

    for (what, swapped) in [
        ("pending", pending),
        ("deferred", deferred),
        ("still queued", queued),
    ] {
        let err = swap_error(swapped).await;
        assert_eq!(err.kind(), "trap", "{what}: {err}");
    }
    assert_halted(&shard, "after the put that traps").await;
    shard.stop();
}

/// A hot swap whose old module exports bad rows rebuilds that module
/// before trying again; if the rebuild cannot read the snapshot back, the
/// shard halts at once, as after any command it cannot recover from,
/// rather than run on without a module and blame it for the next command.
#[tokio::test]
async fn a_swap_whose_rebuild_cannot_read_the_snapshot_halts_the_shard() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let misbehave = runtime.load(wagg_artifacts::MISBEHAVE.bytes).unwrap();
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    // The restored rows are the last snapshot; the checkpoint file the
    // shard is then pointed at holds none of them.
    let (shard, _outbox, mut events_rx) = start_shard_with(
        runtime,
        double_export(&misbehave),
        Assignment::plain(hashmap.clone()),
        2,
        vec![open_row(1, 1), open_row(2, 1)],
    );
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path());
    store
        .save(&Checkpoint {
            version: VERSION,
            ..Checkpoint::default()
        })
        .unwrap();
    let file = saved_state(store, Router::new(Arc::new(RouterConfig::default())));
    send(&shard, Command::Checkpointed(file)).await;

    let err = failed_swap_to(&shard, &hashmap).await;
    assert!(
        err.to_string()
            .contains("cannot read the shard's last snapshot back"),
        "{err}"
    );
    assert_halted(&shard, "after the swap").await;
    let failures: Vec<_> = std::iter::from_fn(|| events_rx.try_recv().ok())
        .filter_map(|e| match e {
            ShardEvent::ModuleFailed { kind, .. } => Some(kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        failures,
        ["bad_output"],
        "only the bad export is blamed on the module"
    );
    shard.stop();
}

/// A module's counts are only checked to be non-zero, so the sample total
/// a shard keeps to check what it reads back must not overflow on them (a
/// plain sum panicked the shard thread at the checkpoint, in a debug build).
#[tokio::test]
async fn counts_near_u64_max_do_not_stop_a_shard_at_a_checkpoint() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    let (shard, _outbox, _events) = start_shard_with(
        runtime,
        Assignment::plain(hashmap.clone()),
        Assignment::plain(hashmap),
        2,
        vec![open_row(1, u64::MAX - 1), open_row(2, u64::MAX - 1)],
    );
    assert_eq!(snapshot(&shard).await.len(), 2);
    let saved = SavedState::new(|_| Err("no rebuild in this test".into()));
    send(&shard, Command::Checkpointed(saved)).await;
    assert_eq!(
        stats(&shard).await.dictionary_series,
        2,
        "the shard runs on"
    );
    shard.stop();
}

/// A hot swap builds its new instance off the shard thread while the old
/// module keeps putting and flushing, then replays into the new instance
/// what the old one did meanwhile. Each round here queues a put, a flush,
/// a snapshot and a put into a later bucket right behind the swap, so the
/// old module runs them during the build, and the new one flushes the
/// later bucket. The flush makes the swapped rows' series idle
/// (`forget_after_buckets = 0`): were they forgotten at that snapshot, the
/// new instance's replayed flush would return rows of unknown series and
/// the swap would fail. Every sample must be flushed exactly once.
#[tokio::test]
async fn what_the_old_module_does_during_a_swaps_build_reaches_the_new_one_once() {
    /// Open rows each swap carries: enough that the build takes a while.
    const SERIES: u32 = 5_000;
    const ROUNDS: u32 = 6;
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    let targets = [wagg_artifacts::BTREE, wagg_artifacts::SORTED]
        .map(|m| runtime.load(m.bytes).unwrap())
        .into_iter()
        .chain([hashmap.clone()])
        .collect::<Vec<_>>();
    let (shard, outbox, _events) = start_shard(
        runtime,
        Assignment::plain(hashmap.clone()),
        Assignment::plain(hashmap.clone()),
        0,
    );

    let mut want = BTreeMap::new();
    let mut replayed = 0;
    for round in 0..ROUNDS {
        let bucket = T0 + u64::from(round) * 3 * WIDTH;
        let first = round * SERIES;
        let customers: Vec<u32> = (first..first + SERIES).collect();
        for chunk in customers.chunks(1024) {
            let mut batch = KeyBatch::default();
            for &c in chunk {
                batch.push_raw(&key(c), bucket, 1.0);
                *want.entry((c.to_string(), bucket)).or_insert(0.0) += 1.0;
            }
            send(&shard, Command::Put(batch)).await;
        }
        let (reply, swapped) = oneshot::channel();
        send(
            &shard,
            Command::Swap {
                to: Assignment::plain(targets[round as usize % targets.len()].clone()),
                fallback: Assignment::plain(hashmap.clone()),
                reply,
            },
        )
        .await;
        let mut batch = KeyBatch::default();
        for c in first..first + 100 {
            batch.push_raw(&key(c), bucket + 1, 2.0);
            *want.entry((c.to_string(), bucket)).or_insert(0.0) += 2.0;
        }
        send(&shard, Command::Put(batch)).await;
        outbox.flush_sent();
        send(&shard, Command::Flush(bucket + 2 * WIDTH)).await;
        let (snapshot, _rows) = oneshot::channel();
        send(&shard, Command::Snapshot(snapshot)).await;
        // Still open when the swap completes: only the new module can
        // flush this one.
        let mut batch = KeyBatch::default();
        for c in first..first + 100 {
            batch.push_raw(&key(c), bucket + 2 * WIDTH, 4.0);
            *want
                .entry((c.to_string(), bucket + 2 * WIDTH))
                .or_insert(0.0) += 4.0;
        }
        send(&shard, Command::Put(batch)).await;
        let report = tokio::time::timeout(PATIENCE, swapped)
            .await
            .expect("the shard replies")
            .expect("the shard replies")
            .expect("the swap succeeds");
        // The last round's late put is open too.
        let carried = if round == 0 { 0 } else { 100 };
        assert_eq!(report.rows, SERIES as usize + carried, "round {round}");
        replayed += report.replayed;
    }
    outbox.flush_sent();
    send(
        &shard,
        Command::Flush(T0 + u64::from(ROUNDS + 1) * 3 * WIDTH),
    )
    .await;
    stats(&shard).await;

    let mut want: Vec<_> = want.into_iter().map(|((c, b), v)| (c, b, v)).collect();
    want.sort_by(|a, b| a.partial_cmp(b).expect("finite values"));
    let got = points(&outbox);
    assert_eq!(got.len(), want.len(), "one point per series and bucket");
    assert!(
        got == want,
        "every sample flushed once, by one module or the other"
    );
    assert!(
        replayed > 0,
        "no swap ran a command during its build, so this test checked nothing"
    );
    shard.stop();
}

/// A swap checks the old module's export in two places: its ids on the
/// shard thread, its rows on the builder thread. Rows that fail there are
/// the old module's fault: it is rebuilt as after any failure and the swap
/// tried once more from the rebuilt one; a module whose export stays bad
/// fails the swap and keeps running, and loses nothing.
#[tokio::test]
async fn a_swap_from_a_module_whose_export_repeats_rows_fails_and_loses_nothing() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let misbehave = runtime.load(wagg_artifacts::MISBEHAVE.bytes).unwrap();
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    let (shard, outbox, mut events_rx) = start_shard(
        runtime,
        double_export(&misbehave),
        Assignment::plain(hashmap.clone()),
        2,
    );
    put(&shard, 1, T0 + 5).await;
    put(&shard, 2, T0 + 6).await;

    let err = failed_swap_to(&shard, &hashmap).await;
    assert!(err.to_string().contains("returned twice"), "{err}");
    let rebuilds: Vec<_> = std::iter::from_fn(|| events_rx.try_recv().ok())
        .filter_map(|e| match e {
            ShardEvent::ModuleFailed {
                module, fell_back, ..
            } => Some((module, fell_back)),
            _ => None,
        })
        .collect();
    assert_eq!(
        rebuilds,
        vec![(misbehave.id().to_string(), false); 2],
        "the old module is rebuilt after each bad export, not replaced"
    );
    assert_eq!(stats(&shard).await.module, misbehave.id());

    outbox.flush_sent();
    send(&shard, Command::Flush(T0 + WIDTH)).await;
    stats(&shard).await;
    assert_eq!(
        points(&outbox),
        [("1".to_string(), T0, 1.0), ("2".to_string(), T0, 1.0)],
        "the rebuilt module flushes every sample once"
    );
    shard.stop();
}

/// Swaps asked for while one is being built wait their turn and run in
/// order: four swaps sent back to back, with puts between them, all
/// succeed, the last one's module runs, and every sample is flushed once.
#[tokio::test]
async fn swaps_sent_back_to_back_run_in_order_and_lose_nothing() {
    let runtime = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let hashmap = runtime.load(wagg_artifacts::HASHMAP.bytes).unwrap();
    let btree = runtime.load(wagg_artifacts::BTREE.bytes).unwrap();
    let sorted = runtime.load(wagg_artifacts::SORTED.bytes).unwrap();
    let (shard, outbox, mut events_rx) = start_shard(
        runtime,
        Assignment::plain(hashmap.clone()),
        Assignment::plain(hashmap.clone()),
        2,
    );
    let mut batch = KeyBatch::default();
    for c in 0..5_000 {
        batch.push_raw(&key(c), T0, 1.0);
    }
    send(&shard, Command::Put(batch)).await;

    let mut replies = Vec::new();
    for (i, to) in [&btree, &sorted, &hashmap, &btree].into_iter().enumerate() {
        let (reply, rx) = oneshot::channel();
        send(
            &shard,
            Command::Swap {
                to: Assignment::plain(to.clone()),
                fallback: Assignment::plain(hashmap.clone()),
                reply,
            },
        )
        .await;
        replies.push(rx);
        put(&shard, i as u32, T0 + 1).await;
    }
    for (i, rx) in replies.into_iter().enumerate() {
        tokio::time::timeout(PATIENCE, rx)
            .await
            .expect("the shard replies")
            .expect("the shard replies")
            .unwrap_or_else(|e| panic!("swap {i} fails: {e}"));
    }
    let swapped: Vec<_> = std::iter::from_fn(|| events_rx.try_recv().ok())
        .filter_map(|e| match e {
            ShardEvent::Swapped { module, .. } => Some(module),
            _ => None,
        })
        .collect();
    assert_eq!(
        swapped,
        [btree.id(), sorted.id(), hashmap.id(), btree.id()],
        "in the order asked"
    );
    assert_eq!(stats(&shard).await.module, btree.id());

    outbox.flush_sent();
    send(&shard, Command::Flush(T0 + WIDTH)).await;
    stats(&shard).await;
    let got = points(&outbox);
    assert_eq!(got.len(), 5_000);
    for (customer, bucket, value) in got {
        let c: u32 = customer.parse().unwrap();
        let want = if c < 4 { 2.0 } else { 1.0 };
        assert_eq!((bucket, value), (T0, want), "customer {c}");
    }
    shard.stop();
}
