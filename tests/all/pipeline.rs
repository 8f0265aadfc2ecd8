//! The whole pipeline against real services: messages published to
//! RabbitMQ, aggregated by wagg, read back from VictoriaMetrics through its
//! query API, compared exactly with totals computed here from what was
//! published — independently of wagg's router.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wagg::pipeline::{self, Drain, Parts, PipelineConfig, PipelineCounters};
use wagg::router::RouterConfig;
use wagg::runtime::{self, Runtime, RuntimeLimits};
use wagg::shard::Assignment;
use wagg::sink::{OpenTsdbConfig, Sink, SinkConfig};
use wagg::source::amqp::{AmqpPublisher, AmqpSource};
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg::source::json::{Decoder as _, JsonDecoder};
use wagg::telemetry::Metrics;
use wagg_tests::VictoriaMetrics;

use crate::amqp::{KEY, Names, ready};
use crate::harness::{compare, expected, read_back};

const WIDTH: u32 = 60;
/// Event times in the past: VictoriaMetrics hides nothing, and no wall
/// clock decides what is late.
const T0: u64 = 1_764_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_totals_arrive_exactly_and_malformed_messages_are_dead_lettered() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("pipeline");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    let source = AmqpSource::connect(amqp.clone()).await.unwrap();

    // A known, skewed set of messages over several buckets, shuffled in
    // time within a bucket's lateness.
    let mut generator = Generator::new(
        GeneratorConfig {
            customers: 200,
            metrics_per_message: 50,
            seed: 7,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    let bodies: Vec<Vec<u8>> = (0..600u64)
        .map(|i| generator.message(T0 + i / 2 + (i * 7) % 20))
        .collect();
    let malformed: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        br#"{"pop":"lga","host":"h","time":1764000000,"metrics":[{"customer":"x"}]}"#.to_vec(),
        br#"{"pop":"lga","host":"h","time":1764000000}"#.to_vec(),
        br#"{"pop":"lga","host":"h","time":1764000000,"metrics":[{"customer":1,"zone":"z","record":"r","type":"A","count":-1}]}"#.to_vec(),
        vec![b'['; 5000],
    ];
    let publisher = AmqpPublisher::connect(&amqp.uri, &amqp.exchange)
        .await
        .unwrap();
    let mut all: Vec<(String, Vec<u8>)> = bodies
        .iter()
        .map(|b| (KEY.to_string(), b.clone()))
        .collect();
    for (i, bad) in malformed.iter().enumerate() {
        all.insert(i * 100 + 3, (KEY.to_string(), bad.clone()));
    }
    publisher.publish_many(all).await.unwrap();

    let data = tempfile::tempdir().unwrap();
    let config = PipelineConfig {
        bucket_seconds: WIDTH,
        allowed_lateness_secs: 30,
        idle_flush_secs: 1,
        checkpoint_interval_ms: 200,
        data_dir: data.path().to_path_buf(),
        ..PipelineConfig::default()
    };
    let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let module = rt.load(runtime::builtin("btree").unwrap()).unwrap();
    let fallback = rt.load(runtime::builtin("hashmap").unwrap()).unwrap();
    let sink = Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig::new(
        vm.opentsdb_url(),
    )))
    .unwrap();
    let metrics = Metrics::new();
    let parts = Parts {
        config,
        router: Arc::new(RouterConfig {
            shards: 3,
            ..RouterConfig::default()
        }),
        runtime: rt,
        assignment: Assignment::plain(module),
        fallback: Assignment::plain(fallback),
        events: tokio::sync::broadcast::channel(64).0,
        control: None,
        decoder: Arc::new(JsonDecoder::default()),
        sink: Arc::new(sink),
        metrics: metrics.clone(),
    };
    let counters = Arc::new(PipelineCounters::default());
    let want = expected(&bodies, WIDTH);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(pipeline::run(
        parts,
        source,
        counters.clone(),
        Drain::Complete,
        async {
            let _ = stop_rx.await;
        },
    ));
    // Wait until every point is written (the idle flush closes the last
    // buckets), then stop.
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters.points_written.load(Ordering::Relaxed) < want.len() as u64 {
        assert!(Instant::now() < deadline, "timed out: {counters:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One more checkpoint interval, so the acks of the last messages go out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).unwrap();
    run.await.unwrap().unwrap();

    let got = read_back(&vm).await;
    compare(&got, &want);
    assert_eq!(
        counters.messages.load(Ordering::Relaxed),
        (bodies.len() + malformed.len()) as u64
    );
    assert_eq!(
        counters.dead_lettered.load(Ordering::Relaxed),
        malformed.len() as u64
    );
    assert_eq!(counters.late_samples.load(Ordering::Relaxed), 0);
    assert_eq!(ready(&names.dlq()).await, malformed.len() as u32);
    // Everything was acknowledged.
    assert_eq!(ready(&names.queue()).await, 0);

    // `/metrics` tells the same story.
    let scrape =
        prometheus_parse::Scrape::parse(metrics.render().lines().map(|l| Ok(l.to_owned())))
            .unwrap();
    let metric = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let found: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        match found[0].value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(
        metric("wagg_messages_received_total", &[]),
        (bodies.len() + malformed.len()) as f64
    );
    let mut reasons = BTreeMap::<&str, f64>::new();
    for bad in &malformed {
        let code = JsonDecoder::default().decode(bad).unwrap_err().code();
        *reasons.entry(code).or_default() += 1.0;
    }
    assert!(reasons.len() > 1, "{reasons:?}");
    for (reason, n) in reasons {
        assert_eq!(
            metric("wagg_messages_dead_lettered_total", &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    assert_eq!(metric("wagg_points_written_total", &[]), got.len() as f64);
    assert_eq!(metric("wagg_late_samples_total", &[]), 0.0);
    assert_eq!(metric("wagg_unacked_deliveries", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_open_buckets_from_the_checkpoint_exactly() {
    use crate::harness::{Running, Setup};
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("restart");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let setup = || Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data.path(),
        shards: 2,
        incumbent: "hashmap",
        limits: wagg::runtime::RuntimeLimits::default(),
        admin: wagg::admin::AdminConfig::default(),
    };
    let mut generator = Generator::new(
        GeneratorConfig {
            customers: 100,
            metrics_per_message: 30,
            seed: 9,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    // One stream over three buckets, cut in the middle of the second.
    let bodies: Vec<Vec<u8>> = (0..400u64)
        .map(|i| generator.message(T0 + i * 180 / 400))
        .collect();
    let (first, second) = bodies.split_at(230);
    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    let publish = |part: &[Vec<u8>]| {
        part.iter()
            .map(|b| (KEY.to_string(), b.clone()))
            .collect::<Vec<_>>()
    };

    // The pipeline declares the exchange and queue.
    let running = Running::start(setup()).await;
    publisher.publish_many(publish(first)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.counters.messages.load(Ordering::Relaxed) < first.len() as u64 {
        assert!(Instant::now() < deadline, "first half not consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A clean stop flushes only complete buckets; the open ones stay in
    // the checkpoint and every message is acknowledged.
    running.stop().await;
    assert_eq!(ready(&names.queue()).await, 0);
    let checkpoint = wagg::pipeline::checkpoint::CheckpointStore::new(data.path())
        .load()
        .unwrap()
        .unwrap();
    assert!(
        !checkpoint.rows.is_empty(),
        "the open buckets were not checkpointed"
    );

    publisher.publish_many(publish(second)).await.unwrap();
    let running = Running::start(setup()).await;
    let want = expected(&bodies, WIDTH);
    // Points of complete buckets written before the restart are not counted
    // by the new process: wait for the sink to hold all of them instead.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = read_back(&vm).await;
        if got.len() >= want.len() {
            running.stop().await;
            compare(&got, &want);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} points after the restart",
            got.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    compare(&read_back(&vm).await, &want);
}
