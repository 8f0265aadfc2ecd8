//! Running a whole pipeline in-process against the real broker and
//! VictoriaMetrics, and computing what it should write — independently of
//! wagg's router.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use wagg::admin::{AdminConfig, Controller, Registry};
use wagg::pipeline::{
    self, Drain, Parts, PipelineConfig, PipelineControl, PipelineCounters, PipelineError,
};
use wagg::router::RouterConfig;
use wagg::runtime::{Runtime, RuntimeLimits};
use wagg::sink::{OpenTsdbConfig, Sink, SinkConfig};
use wagg::source::amqp::{AmqpConfig, AmqpSource};
use wagg::source::json::{JsonDecoder, Message};
use wagg_tests::VictoriaMetrics;

use crate::amqp::{KEY, Names};
use wagg::source::amqp::AmqpPublisher;

/// Bucket width of the harness's pipelines.
pub(crate) const WIDTH: u32 = 60;

/// (sorted tags, bucket start) → total.
pub(crate) type Totals = HashMap<(BTreeMap<String, String>, u64), f64>;

/// Totals the default rollups should have, computed from message bodies.
pub(crate) fn expected(bodies: &[Vec<u8>], width: u32) -> Totals {
    let mut totals = Totals::new();
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                // OpenTSDB also accepts letters of the Basic Multilingual
                // Plane (the tests' names use only plain ones).
                if c.is_ascii_alphanumeric()
                    || "-_./".contains(c)
                    || (!c.is_ascii() && c.is_alphabetic() && u32::from(c) <= 0xFFFF)
                {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    for body in bodies {
        let msg: Message = serde_json::from_slice(body).unwrap();
        let bucket = msg.time - msg.time % u64::from(width);
        for m in &msg.metrics {
            let c = m.customer.to_string();
            let pop = clean(&msg.pop);
            let rollups: [Vec<(&str, String)>; 3] = [
                vec![
                    ("customer", c.clone()),
                    ("pop", pop.clone()),
                    ("rollup", "customer".into()),
                ],
                vec![
                    ("customer", c.clone()),
                    ("zone", clean(&m.zone)),
                    ("pop", pop.clone()),
                    ("rollup", "zone".into()),
                ],
                vec![
                    ("customer", c),
                    ("zone", clean(&m.zone)),
                    ("record", clean(&m.record)),
                    ("type", clean(&m.rtype)),
                    ("pop", pop),
                    ("rollup", "record".into()),
                ],
            ];
            for tags in rollups {
                let tags = tags.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                *totals.entry((tags, bucket)).or_default() += m.count;
            }
        }
    }
    totals
}

/// Every `dns.queries` point VictoriaMetrics holds.
pub(crate) async fn read_back(vm: &VictoriaMetrics) -> Totals {
    vm.force_flush().await;
    let mut got = Totals::new();
    for series in vm.export("dns.queries").await {
        for (ts, v) in series.points {
            let prev = got.insert((series.tags.clone(), ts), v);
            assert!(prev.is_none(), "point written twice under one key");
        }
    }
    got
}

/// Asserts `got` equals `want` exactly, naming the first differences.
pub(crate) fn compare(got: &Totals, want: &Totals) {
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .take(5)
        .collect();
    assert!(
        missing == 0 && extra == 0 && differ.is_empty(),
        "{} points expected, {} read: {missing} missing, {extra} extra, first differing: {differ:?}",
        want.len(),
        got.len()
    );
}

/// What a harness pipeline is built from.
pub(crate) struct Setup<'a> {
    pub amqp: AmqpConfig,
    pub sink_url: String,
    pub data_dir: &'a Path,
    pub shards: u32,
    pub incumbent: &'a str,
    pub limits: RuntimeLimits,
    pub admin: AdminConfig,
}

/// A pipeline running in a task, with its controller.
pub(crate) struct Running {
    pub counters: Arc<PipelineCounters>,
    pub controller: Arc<Controller>,
    pub metrics: Arc<wagg::telemetry::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), PipelineError>>>,
}

impl Running {
    /// Starts a pipeline on `setup`. Its idle flush (every open bucket once
    /// no message came for 3 s) ends a test's stream; 3 s rather than less
    /// because a loaded test machine can pause a publisher for a second.
    pub(crate) async fn start(setup: Setup<'_>) -> Running {
        let runtime = Runtime::new(setup.limits, Some(&setup.data_dir.join("compiled"))).unwrap();
        let registry = Registry::open(setup.data_dir, runtime.clone()).unwrap();
        let incumbent =
            wagg::admin::controller::starting_incumbent(setup.data_dir, &registry, setup.incumbent)
                .unwrap();
        let fallback = registry
            .assignment(&registry.resolve("hashmap@builtin").unwrap().id)
            .unwrap();
        let (control, control_rx) = PipelineControl::new(setup.shards);
        let metrics = wagg::telemetry::Metrics::new();
        let events = broadcast::channel(1024).0;
        let events_rx = events.subscribe();
        let parts = Parts {
            config: PipelineConfig {
                bucket_seconds: WIDTH,
                allowed_lateness_secs: 30,
                idle_flush_secs: 3,
                checkpoint_interval_ms: 200,
                data_dir: setup.data_dir.to_path_buf(),
                ..PipelineConfig::default()
            },
            router: Arc::new(RouterConfig {
                shards: setup.shards,
                ..RouterConfig::default()
            }),
            runtime,
            assignment: incumbent.clone(),
            fallback,
            events,
            control: Some(control_rx),
            decoder: Arc::new(JsonDecoder::default()),
            sink: Arc::new(
                Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig::new(setup.sink_url)))
                    .unwrap(),
            ),
            metrics: metrics.clone(),
        };
        let source = AmqpSource::connect(setup.amqp).await.unwrap();
        let counters = Arc::new(PipelineCounters::default());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(pipeline::run(
            parts,
            source,
            counters.clone(),
            Drain::Complete,
            async {
                let _ = stop_rx.await;
            },
        ));
        let controller = Controller::start(
            registry,
            incumbent.module.id(),
            control,
            events_rx,
            setup.admin,
            setup.data_dir,
            metrics.clone(),
        )
        .await
        .unwrap();
        Running {
            counters,
            controller,
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until the sink confirmed `points` points (or fails after 60 s).
    pub(crate) async fn wait_points(&self, points: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.counters.points_written.load(Ordering::Relaxed) < points as u64 {
            assert!(Instant::now() < deadline, "timed out: {:?}", self.counters);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the pipeline (after one more checkpoint interval, so the last
    /// acks go out) and waits for it.
    pub(crate) async fn stop(mut self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A harness pipeline on `names`' broker objects and `vm`, two shards of
/// the built-in hashmap, default limits and admin.
pub(crate) async fn start_default(
    names: &Names,
    vm: &VictoriaMetrics,
    data: &std::path::Path,
) -> Running {
    Running::start(Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data,
        shards: 2,
        incumbent: "hashmap",
        limits: RuntimeLimits::default(),
        admin: wagg::admin::AdminConfig::default(),
    })
    .await
}

/// Publishes `bodies` with confirms, under the test routing key.
pub(crate) async fn publish(names: &Names, bodies: &[Vec<u8>]) {
    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    let all: Vec<(String, Vec<u8>)> = bodies
        .iter()
        .map(|b| (KEY.to_string(), b.clone()))
        .collect();
    publisher.publish_many(all).await.unwrap();
    publisher.close().await.unwrap();
}
