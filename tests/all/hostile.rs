//! Hostile modules (issue 7, item 5): candidates built to exhaust memory,
//! loop forever, trap, overflow their stack, return too many rows, invent
//! series ids or return NaN are each rolled out at 50 % under live traffic
//! and must be contained to their shards, rolled back with the failure kind
//! as the reason, and cost no data: the sink's totals stay exact, `/healthz`
//! keeps answering, and the other shards keep aggregating. A shard rebuilt
//! after a checkpoint reads its snapshot back from the checkpoint file
//! (`wagg_shard_state_reads_total`, checked), so these totals also cover
//! that path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use wagg::admin::http::{self, AdminState};
use wagg::admin::{AdminConfig, ModuleState};
use wagg::runtime::RuntimeLimits;
use wagg::shard::ShardCounters;
use wagg::source::amqp::AmqpPublisher;
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg_tests::VictoriaMetrics;

use crate::admin::variant;
use crate::amqp::{KEY, Names};
use crate::harness::{Running, Setup, WIDTH, compare, expected, read_back};

const T0: u64 = 1_764_000_000;
/// Event time between the starts of two modes' streams: every mode writes
/// buckets of its own, after the previous mode's (idle-flushed) ones.
const ROUND_SECS: u64 = 600;
/// Messages per mode, one second of event time apart: three buckets, so
/// flushes happen while the candidate runs.
const PER_MODE: u64 = 200;
/// `max_output_rows` of the test: far above what the hashmap flushes here
/// (a few hundred rows per shard and bucket), below what `oversize` returns.
const MAX_ROWS: usize = 10_000;
/// Safety net for every wait; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// One hostile candidate: fixture options, the failure kind it must be
/// rolled back for, and a fragment of the error the reason must quote.
struct Hostile {
    mode: &'static str,
    options: &'static [(&'static str, &'static str)],
    kind: &'static str,
    detail: &'static str,
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        mode: "grow",
        options: &[],
        kind: "memory_limit",
        detail: "memory limit",
    },
    Hostile {
        mode: "loop",
        options: &[],
        kind: "cpu_budget",
        detail: "CPU budget",
    },
    Hostile {
        mode: "trap-on",
        options: &[("n", "5")],
        kind: "trap",
        detail: "trap",
    },
    Hostile {
        mode: "stack-overflow",
        options: &[],
        kind: "trap",
        detail: "trap",
    },
    Hostile {
        mode: "oversize",
        // Under 1 MiB of guest memory: within the memory limit, so it is
        // the row limit that refuses it.
        options: &[("rows", "15000")],
        kind: "bad_output",
        detail: "more than the limit of 10000",
    },
    Hostile {
        mode: "unknown-ids",
        options: &[],
        kind: "bad_output",
        detail: "unknown series id",
    },
    Hostile {
        mode: "nan",
        options: &[],
        kind: "bad_output",
        detail: "non-finite",
    },
];

/// The messages of mode number `round`.
fn messages(round: u64) -> Vec<Vec<u8>> {
    let mut g = Generator::new(
        GeneratorConfig {
            customers: 100,
            metrics_per_message: 20,
            seed: 70 + round,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    let start = T0 + round * ROUND_SECS;
    (0..PER_MODE).map(|i| g.message(start + i)).collect()
}

/// Polls `done` every 50 ms until it holds, failing after [`PATIENCE`].
async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn samples(shards: &[Arc<ShardCounters>], which: &[usize]) -> u64 {
    which
        .iter()
        .map(|&i| shards[i].samples.load(Ordering::Relaxed))
        .sum()
}

/// Asks `/healthz` until told to stop; counts answers, records anything
/// other than a 200 within the (generous) client timeout.
fn probe_health(
    url: String,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut problems = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => problems.push(format!("status {}", r.status())),
                Err(e) => problems.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        problems
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_candidates_are_contained_rolled_back_and_lose_nothing() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("hostile");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = Running::start(Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data.path(),
        shards: 4,
        incumbent: "hashmap",
        limits: RuntimeLimits {
            // `grow` keeps 1 MiB per batch; the hashmap needs under 0.5 MiB
            // per shard at this data size.
            memory_limit_bytes: 4 << 20,
            // `loop` burns this (plus the per-sample share) per call, 20×
            // less than the default; the hashmap's calls need a small
            // fraction of it (checked below: the incumbent never fails).
            fuel_per_call: 50_000_000,
            max_output_rows: MAX_ROWS,
            ..RuntimeLimits::default()
        },
        // Every mode's first failure trips the breaker. Some modes fail only
        // once (`trap-on` traps on one call; the rebuilt instance then
        // runs), others fail on every call: with one failure enough, the
        // test does not depend on how often each mode fails. How many
        // failures within what window trip the breaker is unit-tested in
        // the controller.
        admin: AdminConfig {
            breaker_failures: 1,
            ..AdminConfig::default()
        },
    })
    .await;
    let c = running.controller.clone();

    // The admin API, as `wagg run` serves it, probed throughout.
    let state = AdminState::new(None, 1 << 20, running.metrics.clone());
    state.set_controller(c.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_url = format!("http://{}/healthz", listener.local_addr().unwrap());
    let (stop_server, stop_server_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, state, async {
        let _ = stop_server_rx.await;
    }));
    let stop_probe = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let probe = probe_health(health_url, stop_probe.clone(), answered.clone());

    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    let shard_counters = running
        .counters
        .shards
        .get()
        .expect("the shards run once the controller started")
        .clone();
    let mut all = Vec::new();
    for (round, h) in HOSTILE.iter().enumerate() {
        let name = format!("hostile-{}", h.mode);
        let mut options = vec![("mode".to_string(), h.mode.to_string())];
        options.extend(
            h.options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        // Each upload its own bytes: a module's id is its hash.
        let bytes = variant(wagg_artifacts::MISBEHAVE.bytes, h.mode);
        c.upload(bytes, name.clone(), "1".into(), options)
            .await
            .unwrap();
        // The previous mode's data is written before the next rollout, so
        // each mode's figures are its own. The swap still happens with the
        // shards' replay logs holding what the incumbent did since the last
        // checkpoint: a hostile module that fails again while replaying
        // them hands the shard to the fallback (this once halted the shard:
        // regression test).
        running.wait_points(expected(&all, WIDTH).len()).await;
        let label = format!("{name}@1");
        let view = c.set_rollout(&label, 50).await.unwrap();
        let candidate = view.candidate.unwrap().id;
        let (hostile, others): (Vec<usize>, Vec<usize>) =
            (0..view.shards.len()).partition(|&i| view.shards[i] == candidate);
        assert_eq!(hostile.len(), 2, "{}: {:?}", h.mode, view.shards);
        let before = samples(&shard_counters, &others);

        let bodies = messages(round as u64);
        // Small chunks with pauses: many batches per shard, so `grow` and
        // `trap-on` reach their limit and their fifth call.
        for chunk in bodies.chunks(5) {
            let items: Vec<(String, Vec<u8>)> =
                chunk.iter().map(|b| (KEY.to_string(), b.clone())).collect();
            publisher.publish_many(items).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        all.extend(bodies);

        // Rolled back, for the failure the mode provokes.
        let mut rolled_back = None;
        wait_for(&format!("{} to be rolled back", h.mode), async || {
            let list = c.list().await;
            let m = list.into_iter().find(|m| m.record.name == name).unwrap();
            let done = m.state == ModuleState::RolledBack;
            rolled_back = Some(m);
            done
        })
        .await;
        let m = rolled_back.unwrap();
        let reason = m.record.rolled_back.as_deref().unwrap();
        assert!(
            reason.contains(&format!(": {}: ", h.kind)) && reason.contains(h.detail),
            "{}: reason {reason:?} does not name {} ({})",
            h.mode,
            h.kind,
            h.detail
        );
        assert!(m.failures.get(h.kind).copied().unwrap_or(0) >= 1, "{m:?}");
        assert!(m.shards.is_empty(), "{m:?}");
        let rollout = c.rollout().await;
        assert!(rollout.candidate.is_none(), "{}: {rollout:?}", h.mode);
        assert!(rollout.shards.iter().all(|s| *s == rollout.incumbent.id));

        // Contained: only the candidate's shards failed; the others kept
        // taking samples.
        for &i in &others {
            assert_eq!(
                shard_counters[i].failures.load(Ordering::Relaxed),
                0,
                "{}: shard {i} ran the incumbent and failed",
                h.mode
            );
        }
        assert!(
            hostile
                .iter()
                .any(|&i| shard_counters[i].failures.load(Ordering::Relaxed) > 0),
            "{}: no failure on shards {hostile:?}",
            h.mode
        );
        wait_for(
            &format!("{}: the other shards to take samples", h.mode),
            async || samples(&shard_counters, &others) > before,
        )
        .await;
    }

    let want = expected(&all, WIDTH);
    running.wait_points(want.len()).await;

    // The incumbent never failed under the test's limits.
    let list = c.list().await;
    let incumbent = list
        .iter()
        .find(|m| m.record.label() == "hashmap@builtin")
        .unwrap();
    assert!(incumbent.failures.is_empty(), "{incumbent:?}");
    let text = running.metrics.render();
    // No shard ever gave up: each fell back or was swapped back.
    let halted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("wagg_shards_halted_total") && !l.ends_with(" 0"))
        .collect();
    assert!(halted.is_empty(), "{halted:?}");
    // Rebuilds after a checkpoint read the snapshot back from the file.
    let reads: f64 = text
        .lines()
        .filter(|l| l.starts_with("wagg_shard_state_reads_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(reads > 0.0, "no rebuild read its snapshot back");
    for h in HOSTILE {
        let module = format!(r#"module="hostile-{}@1""#, h.mode);
        let reason = format!(r#"reason="{}""#, h.kind);
        assert!(
            text.lines()
                .any(|l| l.starts_with("wagg_module_rollbacks_total")
                    && l.contains(&module)
                    && l.contains(&reason)),
            "no rollback of {module} on /metrics"
        );
    }

    stop_probe.store(true, Ordering::Relaxed);
    let problems = probe.await.unwrap();
    assert!(problems.is_empty(), "/healthz did not answer: {problems:?}");
    assert!(answered.load(Ordering::Relaxed) > 0);
    let _ = stop_server.send(());
    server.await.unwrap().unwrap();

    running.stop().await;
    compare(&read_back(&vm).await, &want);
}
