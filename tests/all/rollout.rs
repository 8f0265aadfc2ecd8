//! Changing strategies under live traffic: hot swaps, a gradual rollout,
//! and the circuit breaker, with exact totals in the sink throughout.

use std::time::Duration;

use wagg::admin::{AdminConfig, ModuleState};
use wagg::runtime::RuntimeLimits;
use wagg::source::amqp::AmqpPublisher;
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg_tests::VictoriaMetrics;

use crate::amqp::{KEY, Names};
use crate::harness::{Running, Setup, WIDTH, compare, expected, read_back};

const T0: u64 = 1_764_000_000;

/// `n` messages whose event time advances by `step` seconds every message.
fn messages(n: u64, seed: u64, step: f64) -> Vec<Vec<u8>> {
    let mut g = Generator::new(
        GeneratorConfig {
            customers: 300,
            metrics_per_message: 40,
            seed,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    (0..n)
        .map(|i| g.message(T0 + (i as f64 * step) as u64))
        .collect()
}

/// Publishes `bodies` in chunks with pauses, so the pipeline takes them
/// while the test changes modules.
fn publish_slowly(
    publisher: AmqpPublisher,
    bodies: Vec<Vec<u8>>,
    chunk: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for c in bodies.chunks(chunk) {
            let items: Vec<(String, Vec<u8>)> =
                c.iter().map(|b| (KEY.to_string(), b.clone())).collect();
            publisher.publish_many(items).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_hashmap_btree_sorted_mid_stream_loses_and_double_counts_nothing() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("swap");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = Running::start(Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data.path(),
        shards: 4,
        incumbent: "hashmap",
        limits: RuntimeLimits::default(),
        admin: AdminConfig::default(),
    })
    .await;
    let bodies = messages(1200, 11, 0.25);
    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    let publishing = publish_slowly(publisher, bodies.clone(), 30);

    let c = &running.controller;
    tokio::time::sleep(Duration::from_millis(150)).await;
    for weight in [25, 50, 100] {
        let v = c.set_rollout("btree", weight).await.unwrap();
        assert_eq!(v.weight, weight);
    }
    c.promote().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.set_rollout("sorted@builtin", 50).await.unwrap();
    c.promote().await.unwrap();
    let rollout = c.rollout().await;
    assert_eq!(rollout.incumbent.label, "sorted@builtin");
    assert!(rollout.shards.iter().all(|s| *s == rollout.incumbent.id));
    publishing.await.unwrap();

    let want = expected(&bodies, WIDTH);
    running.wait_points(want.len()).await;
    running.stop().await;
    compare(&read_back(&vm).await, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaky_at_25_percent_is_rolled_back_by_the_breaker_and_totals_stay_exact() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("leaky");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = Running::start(Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data.path(),
        shards: 4,
        incumbent: "hashmap",
        // Room for a shard's open buckets (the hashmap peaks near 3 MiB
        // here), not for everything leaky keeps.
        limits: RuntimeLimits {
            memory_limit_bytes: 5 << 20,
            ..RuntimeLimits::default()
        },
        // The first failure trips the breaker: how many it takes within
        // what window is unit-tested; here the point is what a rollback does.
        admin: AdminConfig {
            breaker_failures: 1,
            ..AdminConfig::default()
        },
    })
    .await;
    let c = &running.controller;
    let v = c.set_rollout("leaky", 25).await.unwrap();
    assert_eq!(
        v.shards
            .iter()
            .filter(|s| **s == v.candidate.as_ref().unwrap().id)
            .count(),
        1
    );

    // Many buckets: every flush adds to what leaky keeps.
    let bodies = messages(3000, 12, 2.0);
    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    publish_slowly(publisher, bodies.clone(), 100)
        .await
        .unwrap();

    let want = expected(&bodies, WIDTH);
    running.wait_points(want.len()).await;
    let list = c.list().await;
    let leaky = list.iter().find(|m| m.record.name == "leaky").unwrap();
    assert_eq!(leaky.state, ModuleState::RolledBack, "{leaky:?}");
    let reason = leaky.record.rolled_back.as_deref().unwrap();
    assert!(reason.contains("memory_limit"), "{reason}");
    assert!(leaky.shards.is_empty());
    assert!(
        leaky.failures.get("memory_limit").copied().unwrap_or(0) >= 1,
        "{leaky:?}"
    );
    let rollout = c.rollout().await;
    assert!(rollout.candidate.is_none());
    assert!(rollout.shards.iter().all(|s| *s == rollout.incumbent.id));
    // The event is on /metrics too.
    let text = running.metrics.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("wagg_module_rollbacks_total")
                && l.contains(r#"module="leaky@builtin""#)
                && l.contains(r#"reason="memory_limit""#)),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("wagg_module_state")
            && l.contains(r#"module="leaky@builtin""#)
            && l.contains(r#"state="rolled_back""#)),
        "no rolled_back state"
    );
    assert!(
        text.contains("wagg_rollout_weight_percent 0"),
        "weight not reset"
    );
    running.stop().await;
    compare(&read_back(&vm).await, &want);
}
