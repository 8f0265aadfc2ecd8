//! The traffic tools against real services: loadgen → record → replay into
//! a host → VictoriaMetrics gives exactly the totals loadgen reported; the
//! generator's determinism and skew; torn recordings; the offline bench.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wagg::pipeline::{self, Drain, Parts, PipelineConfig, PipelineCounters};
use wagg::router::RouterConfig;
use wagg::runtime::{self, Runtime, RuntimeLimits};
use wagg::shard::Assignment;
use wagg::sink::{OpenTsdbConfig, Sink, SinkConfig};
use wagg::source::amqp::{AmqpSource, ExchangeKind};
use wagg::source::generator::{Churn, Generator, GeneratorConfig};
use wagg::source::json::{JsonDecoder, Message};
use wagg::telemetry::Metrics;
use wagg::traffic::TrafficError;
use wagg::traffic::bench::{self, BenchOptions, Workload};
use wagg::traffic::loadgen::{self, EventTime, LoadgenOptions, Rate};
use wagg::traffic::progress::Progress;
use wagg::traffic::ratelimit::TokenBucket;
use wagg::traffic::record::{RecordLimits, RecordSource, Recorder};
use wagg::traffic::recording::{RecordingError, RecordingReader, RecordingWriter, TailReason};
use wagg::traffic::replay::{self, Pace, ReplayOptions};
use wagg::traffic::{Target, recording};
use wagg_tests::VictoriaMetrics;

use crate::amqp::{KEY, Names, ready};

const WIDTH: u32 = 60;
/// Event times in the past: VictoriaMetrics hides nothing and no wall clock
/// decides what is late.
const T0: u64 = 1_764_000_000;

fn target(names: &Names) -> Target {
    let cfg = names.config();
    Target {
        uri: cfg.uri,
        exchange: cfg.exchange,
        routing_key: KEY.to_owned(),
        persistent: false,
    }
}

/// Declares `names`' exchange and queue (as a host would), then lets go.
async fn declare(names: &Names) {
    let mut source = AmqpSource::connect(names.config()).await.unwrap();
    source.close().await.unwrap();
}

/// Every point the host should write, as (rollup, tags without `rollup`,
/// bucket): only their number is needed, to know when the host is done.
fn expected_points(bodies: &[Vec<u8>]) -> usize {
    let mut points = HashSet::new();
    for body in bodies {
        let msg: Message = serde_json::from_slice(body).unwrap();
        let bucket = msg.time - msg.time % u64::from(WIDTH);
        for m in &msg.metrics {
            let pop = msg.pop.to_string();
            points.insert((0, vec![m.customer.to_string(), pop.clone()], bucket));
            points.insert((
                1,
                vec![m.customer.to_string(), m.zone.to_string(), pop.clone()],
                bucket,
            ));
            points.insert((
                2,
                vec![
                    m.customer.to_string(),
                    m.zone.to_string(),
                    m.record.to_string(),
                    m.rtype.to_string(),
                    pop,
                ],
                bucket,
            ));
        }
    }
    points.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_of_loadgen_traffic_replayed_into_a_host_gives_exactly_the_totals_loadgen_reported()
 {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let prod = Names::new("traffic-prod");
    let _prod_cleanup = prod.cleanup(&[]);
    let host = Names::new("traffic-host");
    let _host_cleanup = host.cleanup(&[]);
    declare(&prod).await;
    declare(&host).await;

    // Record what loadgen publishes to "production".
    let recorder = Recorder::start(&RecordSource {
        uri: prod.config().uri,
        exchange: prod.exchange(),
        exchange_kind: ExchangeKind::Direct,
        binding_key: KEY.to_owned(),
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traffic.wrec");
    const N: u64 = 400;
    let record_path = path.clone();
    let recording = tokio::spawn(async move {
        let (mut writer, _) = RecordingWriter::open(&record_path).unwrap();
        let limits = RecordLimits {
            count: Some(N),
            duration: Some(Duration::from_secs(20)),
            max_bytes: None,
        };
        let report = recorder
            .run(
                &mut writer,
                limits,
                &Progress::hidden(),
                std::future::pending(),
            )
            .await
            .unwrap();
        writer.finish().unwrap();
        report
    });
    let opts = LoadgenOptions {
        target: target(&prod),
        generator: GeneratorConfig {
            customers: 100,
            metrics_per_message: 20,
            seed: 11,
            ..GeneratorConfig::default()
        },
        churn: Some(Churn {
            fraction: 0.3,
            period_secs: 60,
        }),
        bucket_seconds: WIDTH,
        rollups: 3,
        rate: Some(Rate::Messages(2_000.0)),
        count: Some(N),
        duration: None,
        // A few buckets' worth of event time in a fraction of a second.
        event_time: EventTime::Scaled {
            start: T0,
            scale: 600.0,
        },
    };
    let published = loadgen::loadgen(&opts, &Progress::hidden(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(published.messages, N);
    assert_eq!(published.samples, N * 20 * 3);
    let recorded = recording.await.unwrap();
    assert_eq!(recorded.messages, N);

    let mut reader = RecordingReader::open(&path).unwrap();
    let mut bodies = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        bodies.push(r.body);
    }
    assert_eq!(reader.tail(), None);
    assert_eq!(bodies.len() as u64, N);
    let want_points = expected_points(&bodies);

    // A host consuming the other exchange, as in tests/all/pipeline.rs.
    let source = AmqpSource::connect(host.config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let module = rt.load(runtime::builtin("hashmap").unwrap()).unwrap();
    let sink = Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig::new(
        vm.opentsdb_url(),
    )))
    .unwrap();
    let parts = Parts {
        config: PipelineConfig {
            bucket_seconds: WIDTH,
            allowed_lateness_secs: 30,
            idle_flush_secs: 1,
            checkpoint_interval_ms: 200,
            data_dir: data.path().to_path_buf(),
            ..PipelineConfig::default()
        },
        router: Arc::new(RouterConfig {
            shards: 2,
            ..RouterConfig::default()
        }),
        runtime: rt,
        assignment: Assignment::plain(module.clone()),
        fallback: Assignment::plain(module),
        events: tokio::sync::broadcast::channel(64).0,
        control: None,
        decoder: Arc::new(JsonDecoder::default()),
        sink: Arc::new(sink),
        metrics: Metrics::new(),
    };
    let counters = Arc::new(PipelineCounters::default());
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

    let replayed = replay::replay(
        &path,
        &ReplayOptions {
            target: target(&host),
            pace: Pace::Original { speed: 4.0 },
            repeat: false,
            count: None,
            duration: None,
        },
        &Progress::hidden(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(replayed.messages, N);
    assert_eq!(replayed.tail, None);

    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.points_written.load(Ordering::Relaxed) < want_points as u64 {
        assert!(Instant::now() < deadline, "timed out: {counters:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One more checkpoint interval, so the last acks go out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop_tx.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert_eq!(counters.late_samples.load(Ordering::Relaxed), 0);
    assert_eq!(ready(&host.queue()).await, 0);

    // Read back: the `customer` rollup point by point, every rollup's sum.
    let mut customer: HashMap<(u64, String, u64), f64> = HashMap::new();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for series in vm.export("dns.queries").await {
        let rollup = series.tags["rollup"].clone();
        for (ts, v) in &series.points {
            *sums.entry(rollup.clone()).or_default() += v;
            if rollup == "customer" {
                let key = (
                    series.tags["customer"].parse().unwrap(),
                    series.tags["pop"].clone(),
                    *ts,
                );
                assert!(customer.insert(key, *v).is_none(), "a point written twice");
            }
        }
    }
    let reported: HashMap<(u64, String, u64), f64> = published
        .per_customer
        .iter()
        .map(|t| ((t.customer, t.pop.clone(), t.bucket), t.count))
        .collect();
    assert_eq!(customer.len(), reported.len());
    let differ: Vec<_> = reported
        .iter()
        .filter(|(k, v)| customer.get(*k) != Some(*v))
        .take(5)
        .collect();
    assert!(differ.is_empty(), "customer points differ: {differ:?}");
    assert_eq!(sums.len(), 3, "{sums:?}");
    for (rollup, sum) in &sums {
        // Counts are whole numbers, so every order of addition is exact.
        assert_eq!(*sum, published.count_sum, "rollup {rollup}");
    }
}

#[test]
fn same_seed_same_bytes_different_seed_different_and_zipf_skew_is_visible() {
    let messages = |seed: u64, n: u64| {
        let mut g = Generator::new(
            GeneratorConfig {
                seed,
                ..GeneratorConfig::default()
            },
            WIDTH,
        )
        .unwrap()
        .with_churn(Churn {
            fraction: 0.1,
            period_secs: 60,
        });
        (0..n).map(|i| g.message(T0 + i)).collect::<Vec<_>>()
    };
    assert_eq!(messages(5, 200), messages(5, 200));
    let (a, b) = (messages(5, 200), messages(6, 200));
    assert!(a.iter().zip(&b).all(|(x, y)| x != y));

    // Top 1 % of customers (ids 1..=10 of 1000: the Zipf ranks) against the
    // share the Zipf pmf gives them.
    let cfg = GeneratorConfig::default();
    let mut g = Generator::new(cfg.clone(), WIDTH).unwrap();
    let (mut top, mut all) = (0u64, 0u64);
    let top_n = u64::from(cfg.customers) / 100;
    for i in 0..2_000 {
        let body = g.message(T0 + i);
        let msg: Message = serde_json::from_slice(&body).unwrap();
        for m in &msg.metrics {
            all += 1;
            top += u64::from(m.customer <= top_n);
        }
    }
    let weight = |k: u64| (k as f64).powf(-cfg.zipf_exponent);
    let expected = (1..=top_n).map(weight).sum::<f64>()
        / (1..=u64::from(cfg.customers)).map(weight).sum::<f64>();
    let share = top as f64 / all as f64;
    // 200 000 draws: the standard error is ~0.001.
    assert!(
        (share - expected).abs() < 0.01,
        "top 1 % carry {share:.4}, the pmf says {expected:.4}"
    );
    assert!(expected > 0.4, "a skew worth the name: {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_recording_replays_up_to_its_last_whole_record_and_says_so() {
    wagg_tests::require_rabbitmq();
    let names = Names::new("traffic-torn");
    let _cleanup = names.cleanup(&[]);
    declare(&names).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torn.wrec");
    let (mut w, _) = RecordingWriter::open(&path).unwrap();
    let mut g = Generator::new(GeneratorConfig::default(), WIDTH).unwrap();
    for i in 0..10 {
        w.write(i * 100, &g.message(T0 + i)).unwrap();
    }
    w.finish().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    let report = replay::replay(
        &path,
        &ReplayOptions {
            target: target(&names),
            pace: Pace::Rate(5_000.0),
            repeat: false,
            count: None,
            duration: None,
        },
        &Progress::hidden(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(report.messages, 9);
    let tail = report.tail.expect("the torn tail is reported");
    assert_eq!(tail.reason, TailReason::Incomplete);
    let last_record = len - tail.at;
    assert_eq!(tail.dropped_bytes, last_record - 7);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ready(&names.queue()).await < 9 {
        assert!(
            Instant::now() < deadline,
            "the replayed messages never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready(&names.queue()).await, 9);

    // A file that is not a recording is refused by name before connecting.
    let bogus = dir.path().join("bogus.json");
    std::fs::write(&bogus, b"{}").unwrap();
    let err = replay::replay(
        &bogus,
        &ReplayOptions {
            target: target(&names),
            pace: Pace::Unthrottled,
            repeat: false,
            count: None,
            duration: None,
        },
        &Progress::hidden(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            TrafficError::Recording(RecordingError::NotARecording { .. })
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_and_record_name_a_missing_exchange() {
    wagg_tests::require_rabbitmq();
    let names = Names::new("traffic-missing");
    let opts = LoadgenOptions {
        target: target(&names),
        generator: GeneratorConfig::default(),
        churn: None,
        bucket_seconds: WIDTH,
        rollups: 3,
        rate: None,
        count: Some(1),
        duration: None,
        event_time: EventTime::Wall,
    };
    let err = loadgen::loadgen(&opts, &Progress::hidden(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, TrafficError::MissingExchange { .. }), "{err}");
    assert!(err.to_string().contains(&names.exchange()), "{err}");
    let err = Recorder::start(&RecordSource {
        uri: names.config().uri,
        exchange: names.exchange(),
        exchange_kind: ExchangeKind::Direct,
        binding_key: KEY.to_owned(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, TrafficError::MissingExchange { .. }), "{err}");
}

#[test]
fn bench_on_a_recording_reports_equal_aggregates_for_hashmap_and_btree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.wrec");
    let (mut w, _) = RecordingWriter::open(&path).unwrap();
    let mut g = Generator::new(
        GeneratorConfig {
            customers: 300,
            metrics_per_message: 50,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    for i in 0..40 {
        w.write(i * 1000, &g.message(T0 + i)).unwrap();
    }
    w.write(40_000, b"not a message").unwrap();
    w.finish().unwrap();

    let result = bench::bench(
        &BenchOptions {
            modules: vec!["hashmap".into(), "btree".into()],
            workload: Workload::Recording(path),
            sizes: vec![1, 10, 100, 1000],
            rounds: 2,
            batch_size: 512,
            ..BenchOptions::default()
        },
        &Progress::hidden(),
    )
    .unwrap();
    assert_eq!(result.workload.messages, 40);
    assert_eq!(result.workload.undecodable, 1);
    assert_eq!(result.workload.samples, 40 * 50 * 3);
    assert!(result.workload.distinct_series >= 1000);
    let [hashmap, btree] = &result.modules[..] else {
        panic!("two tables expected");
    };
    for (h, b) in hashmap.sizes.iter().zip(&btree.sizes) {
        assert_eq!(h.error, None);
        assert_eq!(b.error, None);
        assert_eq!(b.mismatched_rows, 0, "btree differs at {} series", b.series);
        assert_eq!(h.rows, b.rows);
        assert_eq!(h.live_series, h.series);
        for v in [
            h.put.ns_per_op,
            h.flush.ns_per_op,
            b.put.ns_per_op,
            b.flush.ns_per_op,
            h.memory_bytes_per_series,
            b.memory_bytes_per_series,
            b.peak_memory_bytes as f64,
        ] {
            assert!(v.is_finite() && v > 0.0, "{v} at {} series", h.series);
        }
    }
    // Saved and read back, it compares with itself as unchanged.
    let saved = dir.path().join("result.json");
    std::fs::write(&saved, serde_json::to_vec(&result).unwrap()).unwrap();
    let base = bench::load_result(&saved).unwrap();
    assert!(
        bench::compare(&result, &base, 0.1)
            .iter()
            .all(|c| c.verdict == bench::Verdict::Unchanged)
    );
}

#[test]
fn the_token_bucket_holds_its_rate_on_a_simulated_clock() {
    // 5 000 messages/s, bursts of 250, publishing in bulks of 10, each
    // publish taking 20 µs: one simulated minute.
    let start = Instant::now();
    let mut now = start;
    let mut bucket = TokenBucket::new(5_000.0, 250.0, now);
    let mut sent = 0.0;
    while now - start < Duration::from_secs(60) {
        now += bucket.take(10.0, now);
        sent += 10.0;
        now += Duration::from_micros(20);
    }
    let rate = sent / (now - start).as_secs_f64();
    assert!((rate / 5_000.0 - 1.0).abs() < 0.05, "{rate}/s");
    // The format constant the CLI documents.
    assert_eq!(&recording::MAGIC, b"WAGGREC\0");
}
