//! Faults around the pipeline, against the real broker and sink: the
//! broker connection killed mid-stream, the `wagg run` process killed with
//! SIGKILL and stopped with SIGTERM, the sink down and back. Each compares
//! the sink's per-(series, bucket) totals with those computed from the
//! publisher's confirmed messages, exactly.

/// The value of one sample of `name` with `labels` in a `/metrics` text.
///
/// # Panics
///
/// Unless exactly one sample matches.
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    match found[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wagg::pipeline::{self, Drain, Parts, PipelineConfig, PipelineCounters, PipelineError, Source};
use wagg::router::RouterConfig;
use wagg::runtime::{Runtime, RuntimeLimits};
use wagg::shard::Assignment;
use wagg::sink::{OpenTsdbConfig, Sink, SinkConfig};
use wagg::source::amqp::{AmqpConfig, AmqpPublisher, AmqpSource};
use wagg::source::generator::{Generator, GeneratorConfig, GeneratorSource};
use wagg::source::json::JsonDecoder;
use wagg_tests::VictoriaMetrics;

use crate::amqp::{KEY, Names, close_connection_named, ready};
use crate::fault_proxy::{Fault, FaultProxy};
use crate::harness::{Totals, WIDTH, compare, expected};

const T0: u64 = 1_764_000_000;
/// Safety net against a hung test; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(90);
/// The `wagg run` processes' admin token.
const ADMIN_TOKEN: &str = "faults-test-token";

/// `n` generated messages from `first` on, event time advancing by `step`
/// seconds per message (several buckets, flushed as the stream goes).
fn messages(first: u64, n: u64, seed: u64, step: f64) -> Vec<Vec<u8>> {
    let mut g = Generator::new(
        GeneratorConfig {
            customers: 100,
            metrics_per_message: 10,
            seed,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    (first..first + n)
        .map(|i| g.message(T0 + (i as f64 * step) as u64))
        .collect()
}

/// The watermark wagg flushes to after `bodies` while every source is
/// active: the lowest latest event time of any `pop`/`host`, minus the
/// lateness, at a bucket start.
fn per_source_watermark(bodies: &[Vec<u8>], lateness: u64) -> u64 {
    let mut latest = HashMap::<(String, String), u64>::new();
    for body in bodies {
        let msg: wagg::source::json::Message = serde_json::from_slice(body).unwrap();
        let t = latest
            .entry((msg.pop.to_string(), msg.host.to_string()))
            .or_default();
        *t = (*t).max(msg.time);
    }
    let low = latest.values().min().copied().unwrap_or(0) - lateness;
    low - low % u64::from(WIDTH)
}

/// Publishes `bodies` with confirms, in chunks with pauses; returns what
/// the broker confirmed (everything, or the test fails).
fn publish_slowly(
    amqp: &AmqpConfig,
    bodies: Vec<Vec<u8>>,
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<Vec<u8>>> {
    let (uri, exchange) = (amqp.uri.clone(), amqp.exchange.clone());
    tokio::spawn(async move {
        let publisher = AmqpPublisher::connect(&uri, &exchange).await.unwrap();
        let mut confirmed = Vec::with_capacity(bodies.len());
        for c in bodies.chunks(chunk) {
            let items: Vec<(String, Vec<u8>)> =
                c.iter().map(|b| (KEY.to_string(), b.clone())).collect();
            publisher.publish_many(items).await.unwrap();
            confirmed.extend_from_slice(c);
            tokio::time::sleep(pause).await;
        }
        publisher.close().await.unwrap();
        confirmed
    })
}

/// Declares the test's topology (exchange, queue, binding) so that a
/// publisher can start before wagg does.
async fn declare(amqp: &AmqpConfig) {
    AmqpSource::connect(amqp.clone())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

/// Every write VictoriaMetrics holds, per (series, bucket), in order: it
/// keeps each write of a point, so a rewrite shows.
async fn writes(vm: &VictoriaMetrics) -> HashMap<(BTreeMap<String, String>, u64), Vec<f64>> {
    let mut all: HashMap<_, Vec<f64>> = HashMap::new();
    for series in vm.export("dns.queries").await {
        for (ts, v) in series.points {
            all.entry((series.tags.clone(), ts)).or_default().push(v);
        }
    }
    all
}

/// The last value of each point, after checking that no point was ever
/// rewritten with another value; returns them and the number of rewrites
/// (same value again).
async fn read_checked(vm: &VictoriaMetrics) -> (Totals, usize) {
    let mut got = Totals::new();
    let mut rewrites = 0;
    for (key, values) in writes(vm).await {
        assert!(
            values.iter().all(|v| *v == values[0]),
            "point {key:?} rewritten with another value: {values:?}"
        );
        rewrites += values.len() - 1;
        got.insert(key, values[0]);
    }
    (got, rewrites)
}

/// Polls the sink until it holds every point of `want` with its value.
async fn wait_for(vm: &VictoriaMetrics, want: &Totals) -> (Totals, usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (got, rewrites) = read_checked(vm).await;
        if want.iter().all(|(k, v)| got.get(k) == Some(v)) || Instant::now() > deadline {
            return (got, rewrites);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

// ---------------------------------------------------------------------------
// An in-process pipeline with a configuration of the test's own
// ---------------------------------------------------------------------------

struct InProcess {
    counters: Arc<PipelineCounters>,
    metrics: Arc<wagg::telemetry::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), PipelineError>>,
}

impl InProcess {
    async fn start(amqp: AmqpConfig, sink: OpenTsdbConfig, config: PipelineConfig) -> InProcess {
        let source = AmqpSource::connect(amqp).await.unwrap();
        let hashmap = wagg::runtime::builtin("hashmap").unwrap();
        Self::with_source(source, (hashmap, &[]), sink, config)
    }

    /// A pipeline reading `source` and running `module` (its bytes and
    /// options) on every shard.
    fn with_source(
        source: impl Source + 'static,
        module: (&[u8], &[(&str, &str)]),
        sink: OpenTsdbConfig,
        config: PipelineConfig,
    ) -> InProcess {
        let runtime = Runtime::new(
            RuntimeLimits::default(),
            Some(&config.data_dir.join("compiled")),
        )
        .unwrap();
        let (bytes, options) = module;
        let options = options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let module = Assignment::new(runtime.load(bytes).unwrap(), options, "under-test");
        let metrics = wagg::telemetry::Metrics::new();
        let parts = Parts {
            config,
            router: Arc::new(RouterConfig::default()),
            runtime,
            fallback: module.clone(),
            assignment: module,
            events: tokio::sync::broadcast::channel(64).0,
            control: None,
            decoder: Arc::new(JsonDecoder::default()),
            sink: Arc::new(Sink::from_config(&SinkConfig::OpenTsdb(sink)).unwrap()),
            metrics: metrics.clone(),
        };
        let counters = Arc::new(PipelineCounters::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(pipeline::run(
            parts,
            source,
            counters.clone(),
            Drain::Complete,
            async {
                let _ = stop_rx.await;
            },
        ));
        InProcess {
            counters,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    async fn wait_messages(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.counters.messages.load(Ordering::Relaxed) < n as u64 {
            assert!(Instant::now() < deadline, "timed out: {:?}", self.counters);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn pipeline_config(data_dir: &Path) -> PipelineConfig {
    PipelineConfig {
        bucket_seconds: WIDTH,
        allowed_lateness_secs: 30,
        idle_flush_secs: 2,
        checkpoint_interval_ms: 200,
        data_dir: data_dir.to_path_buf(),
        ..PipelineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_killed_mid_stream_is_reconnected_and_redeliveries_count_once() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("conn-kill");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    let data = tempfile::tempdir().unwrap();
    // Acks only every 10 s: at each kill, every message taken since the
    // start is counted and unacked, so its redelivery must be recognised.
    let host = InProcess::start(
        amqp.clone(),
        OpenTsdbConfig::new(vm.opentsdb_url()),
        PipelineConfig {
            checkpoint_interval_ms: 10_000,
            ..pipeline_config(data.path())
        },
    )
    .await;
    let first = messages(0, 300, 21, 0.5);
    // The second set starts a bucket later: should the kill and the
    // reconnect keep the pipeline idle for `idle_flush_secs`, the idle
    // flush closes the first set's buckets, and a message of the second set
    // in one of them would be late (dropped and counted, as documented).
    let second = messages(360, 600, 22, 0.5);
    let published = publish_slowly(&amqp, first.clone(), 100, Duration::ZERO)
        .await
        .unwrap();
    host.wait_messages(published.len()).await;
    let name = amqp.connection_name.clone();
    tokio::task::spawn_blocking(move || close_connection_named(&name))
        .await
        .unwrap();
    // The second kill lands while a publisher runs.
    let publishing = publish_slowly(&amqp, second, 20, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let name = amqp.connection_name.clone();
    tokio::task::spawn_blocking(move || close_connection_named(&name))
        .await
        .unwrap();
    let mut confirmed = published;
    confirmed.extend(publishing.await.unwrap());

    let want = expected(&confirmed, WIDTH);
    let (got, _) = wait_for(&vm, &want).await;
    let text = host.metrics.render();
    host.stop().await;
    compare(&got, &want);
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");
    let reconnects = metric(&text, "wagg_source_reconnects_total", &[]);
    let duplicates = metric(&text, "wagg_messages_duplicate_total", &[]);
    assert!(reconnects >= 2.0, "{reconnects} reconnects");
    assert!(duplicates >= first.len() as f64, "{duplicates} duplicates");
    eprintln!(
        "connection kills: 2, reconnects {reconnects}, duplicates recognised {duplicates}, {} messages, {} points exact",
        confirmed.len(),
        want.len()
    );
}

// ---------------------------------------------------------------------------
// The `wagg run` binary
// ---------------------------------------------------------------------------

/// The `wagg` binary of this build: `target/debug/wagg` beside `deps/`,
/// where this test binary is. `cargo test --workspace` builds it (the wagg
/// package's own tests need it); `cargo test -p wagg-tests` alone does
/// not: run `cargo build -p wagg` first.
fn wagg_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("wagg"))
        .unwrap();
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p wagg` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// A `wagg run` process with a configuration file of its own.
struct Wagg {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    admin: std::net::SocketAddr,
}

impl Wagg {
    /// Writes the configuration into `dir` (data directory `dir/data`) and
    /// starts the process.
    fn start(dir: &Path, amqp: &AmqpConfig, sink_url: &str, idle_flush_secs: u64) -> Wagg {
        let admin = wagg_tests::free_port();
        let config = dir.join("wagg.toml");
        let text = format!(
            r#"[pipeline]
bucket_seconds = {WIDTH}
allowed_lateness_secs = 30
idle_flush_secs = {idle_flush_secs}
checkpoint_interval_ms = 200
data_dir = "{data}"
shutdown_timeout_secs = 5

[source.amqp]
uri = "{uri}"
connection_name = "{name}"
exchange = "{exchange}"
routing_key = "{key}"
queue = "{queue}"
dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"
durable = false
reconnect_min_ms = 50
reconnect_max_ms = 500

[sink]
kind = "opentsdb"
url = "{sink_url}"
retry_base_ms = 20
retry_max_ms = 200

[admin]
listen = "{admin}"
token = "{ADMIN_TOKEN}"
"#,
            data = dir.join("data").display(),
            uri = amqp.uri,
            name = amqp.connection_name,
            exchange = amqp.exchange,
            key = amqp.routing_key,
            queue = amqp.queue,
            dlx = amqp.dead_letter_exchange,
            dlq = amqp.dead_letter_queue,
        );
        std::fs::write(&config, text).unwrap();
        let mut wagg = Wagg {
            child: Command::new("true").spawn().unwrap(),
            config,
            log: dir.join("wagg.log"),
            admin,
        };
        wagg.restart();
        wagg
    }

    /// Starts the process (again), its log appended to `wagg.log`.
    fn restart(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Command::new(wagg_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("WAGG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
    }

    /// Panics with the log if the process exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("wagg exited ({status}); its log:\n{}", self.log_text());
        }
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(8000);
        text[text.ceil_char_boundary(start)..].to_string()
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(&mut self) {
        self.assert_running();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        self.assert_running();
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.child.wait().unwrap()
    }

    /// The host's `/metrics`.
    async fn metrics(&self) -> Option<String> {
        let url = format!("http://{}/metrics", self.admin);
        reqwest::get(url).await.ok()?.text().await.ok()
    }

    /// Waits until the host has taken `n` messages (from `/metrics`).
    async fn wait_received(&mut self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.assert_running();
            if let Some(text) = self.metrics().await
                && metric(&text, "wagg_messages_received_total", &[]) >= n as f64
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Wagg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small xorshift generator: kill moments vary between runs, and a
/// failing run prints its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// `name` from the environment as a number, else `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `WAGG_CRASH_SEED` if set (to replay a run), else one from the clock;
/// odd, as the xorshift [`Rng`] needs a non-zero state.
fn crash_seed() -> u64 {
    std::env::var("WAGG_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_double_counts_nothing() {
    wagg_tests::require_rabbitmq();
    // WAGG_CRASH_KILLS=20 for the issue's figure; 5 keeps CI short.
    let kills = env_u64("WAGG_CRASH_KILLS", 5);
    let seed = crash_seed();
    eprintln!("crash test: {kills} kills, WAGG_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("crash");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    declare(&amqp).await;
    let dir = tempfile::tempdir().unwrap();
    let mut wagg = Wagg::start(dir.path(), &amqp, &vm.opentsdb_url(), 3);
    // A publisher with confirms runs through every kill: event time
    // advances 0.2 s a message, so buckets flush while it runs.
    let bodies = messages(0, 300 * kills, 31, 0.2);
    let publishing = publish_slowly(&amqp, bodies, 25, Duration::from_millis(100));
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(300 + rng.next(1500))).await;
        wagg.kill();
        wagg.restart();
    }
    let confirmed = publishing.await.unwrap();
    let want = expected(&confirmed, WIDTH);
    let (got, rewrites) = wait_for(&vm, &want).await;
    let status = wagg.terminate();
    compare(&got, &want);
    assert!(status.success(), "{status}; log:\n{}", wagg.log_text());
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");
    eprintln!(
        "crash test: {kills} SIGKILLs survived, {} messages, {} points exact, {rewrites} points rewritten with the same value, none with another",
        confirmed.len(),
        want.len()
    );
}

/// Two POP hosts can send byte-identical reports. Counted by body hash, the
/// second one, taken after the first was acked and before the next
/// checkpoint, was dropped as the first's "redelivery" after a SIGKILL (6 of
/// 7 tries on a host holding state): total 5 instead of 10. Each pair comes
/// from two publishers (each message with its own `message_id`), a random
/// pause apart, with a SIGKILL a random moment after the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_message_after_an_acked_one_was_dropped_as_its_redelivery_after_a_kill() {
    wagg_tests::require_rabbitmq();
    let cases = env_u64("WAGG_TWIN_CASES", 4);
    let seed = crash_seed();
    eprintln!("twin test: {cases} cases, WAGG_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("twins");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    declare(&amqp).await;
    let dir = tempfile::tempdir().unwrap();
    let mut wagg = Wagg::start(dir.path(), &amqp, &vm.opentsdb_url(), 3);
    // Other traffic first: the host holds state, as in production.
    let mut confirmed = publish_slowly(&amqp, messages(0, 400, 17, 0.1), 100, Duration::ZERO)
        .await
        .unwrap();
    wagg.wait_received(confirmed.len()).await;
    let hosts = [
        AmqpPublisher::connect(&amqp.uri, &amqp.exchange)
            .await
            .unwrap(),
        AmqpPublisher::connect(&amqp.uri, &amqp.exchange)
            .await
            .unwrap(),
    ];
    for case in 0..cases {
        // A bucket of its own, after the last one: nothing in it is late.
        let time = T0 + 1_000 + 120 * case;
        let body = format!(
            r#"{{"pop":"lga","host":"lga-dns","time":{time},"metrics":[{{"customer":{},"zone":"z","record":"r","type":"A","count":5}}]}}"#,
            50_000 + case
        )
        .into_bytes();
        let (first_pause, kill_after) = (rng.next(600), rng.next(300));
        hosts[0].publish(KEY, &body).await.unwrap();
        tokio::time::sleep(Duration::from_millis(first_pause)).await;
        hosts[1].publish(KEY, &body).await.unwrap();
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        eprintln!(
            "twin test: case {case}: second after {first_pause} ms, SIGKILL {kill_after} ms later"
        );
        confirmed.push(body.clone());
        confirmed.push(body);
        wagg.kill();
        wagg.restart();
    }
    for host in hosts {
        host.close().await.unwrap();
    }
    let want = expected(&confirmed, WIDTH);
    let (got, _) = wait_for(&vm, &want).await;
    let status = wagg.terminate();
    compare(&got, &want);
    assert!(status.success(), "{status}; log:\n{}", wagg.log_text());
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_window_flushes_complete_buckets_acks_and_exits_0() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("sigterm");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    declare(&amqp).await;
    let dir = tempfile::tempdir().unwrap();
    // No idle flush: only the lateness closes buckets.
    let mut wagg = Wagg::start(dir.path(), &amqp, &vm.opentsdb_url(), 0);
    // 0..200 s over 100 sources: the buckets before the watermark of the
    // slowest source are complete, the later ones open.
    let bodies = messages(0, 1600, 41, 0.125);
    let watermark = per_source_watermark(&bodies, 30);
    assert!(watermark > T0 - T0 % 60, "some bucket is complete");
    let confirmed = publish_slowly(&amqp, bodies, 100, Duration::ZERO)
        .await
        .unwrap();
    wagg.wait_received(confirmed.len()).await;
    let status = wagg.terminate();
    assert!(status.success(), "{status}; log:\n{}", wagg.log_text());
    assert!(
        wagg.log_text()
            .contains("Stopped. Complete buckets are written"),
        "the stop says what it kept; log:\n{}",
        wagg.log_text()
    );
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");
    let want = expected(&confirmed, WIDTH);
    let complete: Totals = want
        .iter()
        .filter(|((_, bucket), _)| *bucket < watermark)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let (got, _) = read_checked(&vm).await;
    compare(&got, &complete);
    let cp = wagg::pipeline::checkpoint::CheckpointStore::new(&dir.path().join("data"))
        .load()
        .unwrap()
        .expect("a checkpoint");
    assert!(
        !cp.rows.is_empty() && cp.pending.is_empty(),
        "{} rows, {} pending",
        cp.rows.len(),
        cp.pending.len()
    );

    // The next start resumes the open buckets (no idle flush); `wagg
    // flush` writes them, and the stop after it has nothing left to keep.
    let mut wagg = Wagg::start(dir.path(), &amqp, &vm.opentsdb_url(), 0);
    let admin = format!("http://{}", wagg.admin);
    let deadline = Instant::now() + PATIENCE;
    loop {
        wagg.assert_running();
        let flushed = Command::new(wagg_bin())
            .args(["flush", "--admin", &admin, "--token", ADMIN_TOKEN])
            .output()
            .unwrap();
        if flushed.status.success() {
            break;
        }
        // Until the host has started its controller.
        assert!(
            Instant::now() < deadline,
            "wagg flush: {}",
            String::from_utf8_lossy(&flushed.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (got, rewrites) = wait_for(&vm, &want).await;
    let status = wagg.terminate();
    compare(&got, &want);
    assert_eq!(rewrites, 0, "a complete bucket was written again");
    assert!(status.success(), "{status}; log:\n{}", wagg.log_text());
    assert!(
        wagg.log_text().contains("Stopped. Every bucket is written"),
        "log:\n{}",
        wagg.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_holds_deliveries_bounds_pending_points_and_recovers_exactly() {
    wagg_tests::require_rabbitmq();
    let mut vm = VictoriaMetrics::start().await;
    let names = Names::new("sink-outage");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    let data = tempfile::tempdir().unwrap();
    let max_pending = 500;
    let host = sink_fault_host(
        &amqp,
        vm.opentsdb_url(),
        Duration::from_secs(2),
        max_pending,
        data.path(),
    )
    .await;
    // Before: the first buckets are written.
    let first = messages(0, 600, 51, 0.1);
    let mut confirmed = publish_slowly(&amqp, first, 200, Duration::ZERO)
        .await
        .unwrap();
    let written_first = expected(&confirmed, WIDTH).len();
    let (_, _) = wait_for(&vm, &expected(&confirmed, WIDTH)).await;
    assert_eq!(
        host.counters.points_written.load(Ordering::Relaxed),
        written_first as u64
    );
    vm.stop();

    // During: ten more buckets arrive; writes fail; the pending points
    // reach the bound and deliveries wait; the pause outlasts
    // `idle_flush_secs` (2 s). Ten, so that what the coordinator reads
    // before the first flush of the outage lands (its buckets, then the
    // shard's queue) cannot be all of them.
    let second = messages(600, 6000, 52, 0.1);
    confirmed.extend(
        publish_slowly(&amqp, second, 500, Duration::ZERO)
            .await
            .unwrap(),
    );
    let max_seen = max_pending_during(&host, Duration::from_secs(4)).await;
    let taken = host.counters.messages.load(Ordering::Relaxed);
    // Checkpoints are spaced by their cost, which a loaded machine inflates:
    // wait for one cut during the outage.
    let store = wagg::pipeline::checkpoint::CheckpointStore::new(data.path());
    let deadline = Instant::now() + PATIENCE;
    let cp = loop {
        let cp = store.load().unwrap().unwrap();
        if !cp.pending.is_empty() || Instant::now() > deadline {
            break cp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = host.metrics.render();

    // After: everything flushes, exactly once each.
    vm.restart().await;
    let want = expected(&confirmed, WIDTH);
    let (got, _) = wait_for(&vm, &want).await;
    host.stop().await;
    compare(&got, &want);
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");

    let bound = pending_bound(max_pending, &want);
    eprintln!(
        "sink outage: max pending {max_seen} points (bound {bound}, max_pending_points {max_pending}, total {}), {taken} of {} messages taken during the outage, {} points in the checkpoint, {} retries",
        want.len(),
        confirmed.len(),
        cp.pending.len(),
        metric(&text, "wagg_sink_retries_total", &[])
    );
    assert!(
        max_seen > max_pending as f64,
        "the outage never filled the outbox"
    );
    assert!(
        max_seen <= bound,
        "{max_seen} pending points, bound {bound}"
    );
    assert!((taken as usize) < confirmed.len(), "no backpressure");
    assert!(
        !cp.pending.is_empty(),
        "unconfirmed points are not checkpointed"
    );
    assert!(metric(&text, "wagg_sink_retries_total", &[]) > 0.0);
}

/// Shards far behind the coordinator while the sink is down. The module
/// is correct but slow (`misbehave`, mode `slow`), so the shard's queue is
/// full and each flush waits behind it; event time runs a bucket a
/// millisecond, so every tick could close more buckets. Once the outbox
/// holds more than `max_pending_points`, nothing more may reach it: no
/// delivery is taken and no flush is sent, nor is one already on its way
/// behind the backlog (one flush is in flight at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sink_stops_the_outbox_at_its_bound_even_with_the_shard_behind() {
    // Nothing listens there: every write is refused by the kernel, a real
    // failure, on demand.
    let dead = wagg_tests::free_port();
    let data = tempfile::tempdir().unwrap();
    let generator = Generator::new(
        GeneratorConfig {
            customers: 100,
            metrics_per_message: 10,
            time_scale: 60_000.0,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    // Several flushes' worth, so that the queue is full when it is passed.
    let max_pending = 20_000;
    let slow = wagg_artifacts::MISBEHAVE.bytes;
    let host = InProcess::with_source(
        GeneratorSource::new(generator, None),
        (slow, &[("mode", "slow"), ("work", "50000")]),
        OpenTsdbConfig {
            max_retries: 1,
            retry_base_ms: 20,
            retry_max_ms: 100,
            ..OpenTsdbConfig::new(format!("http://{dead}"))
        },
        PipelineConfig {
            max_pending_points: max_pending,
            shutdown_timeout_secs: 1,
            ..pipeline_config(data.path())
        },
    );
    let state = || {
        let text = host.metrics.render();
        (
            metric(&text, "wagg_sink_pending_points", &[]),
            metric(&text, "wagg_flushes_total", &[]),
            host.counters.messages.load(Ordering::Relaxed),
        )
    };
    let started = Instant::now();
    let deadline = started + PATIENCE;
    let at = loop {
        let now = state();
        if now.0 > max_pending as f64 {
            let text = host.metrics.render();
            eprintln!(
                "dead sink: past the bound after {:?}, shard queue {}",
                started.elapsed(),
                metric(&text, "wagg_shard_queue_depth", &[("shard", "0")])
            );
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox never filled: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Long enough for the shard to work off its queue many times over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = state();
    host.stop().await;
    eprintln!(
        "dead sink: (pending, flushes, messages) {at:?} when past the bound, {after:?} 2 s later"
    );
    assert_eq!(
        (after.0, after.1),
        (at.0, at.1),
        "(pending points, flushes) grew past the bound"
    );
    // One delivery may have been under way when the flush landed: the
    // coordinator checks the bound before it waits for the next one.
    assert!(
        after.2 <= at.2 + 1,
        "deliveries went on past the bound: {} then {}",
        at.2,
        after.2
    );
}

/// An in-process host for the sink-fault tests: few, fast retries, so that
/// a failing sink shows within seconds, and a small `max_pending_points`.
async fn sink_fault_host(
    amqp: &AmqpConfig,
    url: String,
    timeout: Duration,
    max_pending: usize,
    data_dir: &Path,
) -> InProcess {
    InProcess::start(
        amqp.clone(),
        OpenTsdbConfig {
            max_retries: 2,
            retry_base_ms: 20,
            retry_max_ms: 200,
            timeout_ms: timeout.as_millis() as u64,
            ..OpenTsdbConfig::new(url)
        },
        PipelineConfig {
            max_pending_points: max_pending,
            // Backpressure can stop deliveries only once a flush has landed,
            // and a flush lands behind the batches queued before it (up to
            // 64 a shard): with 1024-sample batches that is ~2 200 of these
            // messages, most of an outage's traffic, on a loaded machine.
            // Small batches keep the read-ahead well below it, so that the
            // test sees deliveries held back.
            batch_size: 256,
            ..pipeline_config(data_dir)
        },
    )
    .await
}

/// The largest `wagg_sink_pending_points` seen on `/metrics` over `watch`.
async fn max_pending_during(host: &InProcess, watch: Duration) -> f64 {
    let mut max_seen = 0.0f64;
    let started = Instant::now();
    while started.elapsed() < watch {
        let text = host.metrics.render();
        max_seen = max_seen.max(metric(&text, "wagg_sink_pending_points", &[]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max_seen
}

/// The memory bound of an outage, in points: `max_pending_points`, plus
/// the one flush in flight when it was passed. That flush closes the
/// buckets that ended since the previous one: at these tests' message
/// rates, one to three (the coordinator reads a bucket's messages within
/// a tick or two, and more while a flush waits behind the shard's queue).
/// `a_dead_sink_stops_the_outbox_at_its_bound…` checks the exact rule.
fn pending_bound(max_pending: usize, want: &Totals) -> f64 {
    let mut per_bucket = BTreeMap::<u64, usize>::new();
    for (_, bucket) in want.keys() {
        *per_bucket.entry(*bucket).or_default() += 1;
    }
    let largest = per_bucket.values().copied().max().unwrap_or(0);
    (max_pending + 3 * largest) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_answering_errors_then_slowly_loses_nothing_and_rewrites_nothing_differently() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let proxy = FaultProxy::start(&vm.opentsdb_url()).await;
    let names = Names::new("sink-faults");
    let _cleanup = names.cleanup(&[]);
    let amqp = names.config();
    let data = tempfile::tempdir().unwrap();
    let max_pending = 500;
    let timeout = Duration::from_millis(800);
    let host = sink_fault_host(&amqp, proxy.url(), timeout, max_pending, data.path()).await;
    let first = messages(0, 600, 61, 0.1);
    let mut confirmed = publish_slowly(&amqp, first, 200, Duration::ZERO)
        .await
        .unwrap();
    wait_for(&vm, &expected(&confirmed, WIDTH)).await;

    // 503 for every write while two more buckets arrive.
    proxy.set(Fault::Status(503));
    let second = messages(600, 1800, 62, 0.1);
    confirmed.extend(
        publish_slowly(&amqp, second, 500, Duration::ZERO)
            .await
            .unwrap(),
    );
    let max_in_errors = max_pending_during(&host, Duration::from_secs(3)).await;

    // Then slower than the sink's timeout: each write lands, but wagg does
    // not hear so and writes it again, which must be the same value.
    proxy.set(Fault::Slow(timeout * 2));
    let third = messages(1800, 1200, 63, 0.1);
    confirmed.extend(
        publish_slowly(&amqp, third, 500, Duration::ZERO)
            .await
            .unwrap(),
    );
    let max_in_slow = max_pending_during(&host, Duration::from_secs(4)).await;
    let text = host.metrics.render();

    proxy.set(Fault::Pass);
    let want = expected(&confirmed, WIDTH);
    let (got, rewrites) = wait_for(&vm, &want).await;
    host.stop().await;
    compare(&got, &want);
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");

    let [passed, refused, slow] = proxy.answered();
    let bound = pending_bound(max_pending, &want);
    eprintln!(
        "sink faults: {refused} writes answered 503, {slow} answered after {:?}, {passed} passed; max pending {max_in_errors} (503s) and {max_in_slow} (slow), bound {bound}; {} retries; {rewrites} points rewritten with the same value; {} points exact",
        timeout * 2,
        metric(&text, "wagg_sink_retries_total", &[]),
        want.len()
    );
    assert!(refused > 0 && slow > 0, "{:?}", proxy.answered());
    assert!(metric(&text, "wagg_sink_retries_total", &[]) > 0.0);
    assert!(
        max_in_errors > max_pending as f64,
        "the 503s never filled the outbox"
    );
    assert!(
        max_in_errors <= bound,
        "{max_in_errors} pending points, bound {bound}"
    );
    assert!(
        max_in_slow <= bound,
        "{max_in_slow} pending points, bound {bound}"
    );
}
