//! The ack ledger, as a model test: random sequences of publishes, waits
//! (during which batches, flushes and checkpoints happen), sink outages,
//! connection losses (with the ack before them lost, or processed but not
//! confirmed), failing dead letters and crashes, driving the real
//! coordinator (`pipeline::run` with real shards and Wasm modules).
//!
//! The source is a fake broker: a real one cannot produce these
//! interleavings on demand (an ack lost with its connection, a crash
//! between a checkpoint and its ack). It is the environment of the unit
//! under test, and keeps the ledger of every delivery. The sink is a fake
//! OpenTSDB server that can be switched off, and records every write.
//!
//! Every message has a customer of its own, so each one's effect can be
//! found: in the checkpoint on disk (open buckets, unconfirmed points) or in
//! the sink; except twins, a message published right after another with a
//! byte-identical body (two POP hosts reporting the same counts), which
//! share its customer: their point is the sum of both. Every delivery has a
//! `message_id` of its own, as wagg's publishers set them. Checked:
//!
//! - no delivery is acked before its effect is durable, with its exact
//!   value (never doubled);
//! - no delivery tag is acked twice, none is acked on a connection other
//!   than its own, none is dead-lettered after it was acked, no valid
//!   message is dead-lettered and no malformed one acked unless
//!   dead-lettered;
//! - in the end every delivery was acked, dead-lettered or released (back
//!   to the queue with its connection), every message is settled, and every
//!   point in the sink is exact, never rewritten with another value.
//!
//! A longer run: `PROPTEST_CASES=500 cargo test -p wagg-tests ack_ledger`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tokio::sync::Notify;
use wagg::pipeline::checkpoint::CheckpointStore;
use wagg::pipeline::{self, Drain, Parts, PipelineConfig, PipelineCounters, Source};
use wagg::router::{Rollup, RouterConfig, Tag};
use wagg::runtime::{Runtime, RuntimeLimits};
use wagg::shard::Assignment;
use wagg::sink::{OpenTsdbConfig, Point, Sink, SinkConfig};
use wagg::source::amqp::{Delivery, DeliveryTag, SourceError};
use wagg::source::json::JsonDecoder;

use crate::bad_input::proptest_config;

const T0: u64 = 1_764_000_000;
/// The customer of the last message, far in the future: it pushes the
/// watermark past every other bucket. Its own bucket stays open.
const PUSHER: u64 = 999_999;

/// Whether message `i` is a twin of `i - 1`: the same body.
fn twin(i: u32) -> bool {
    i != u32::MAX && i % 5 == 4 && !malformed(i) && !malformed(i - 1)
}

/// The message whose body `i` carries.
fn group(i: u32) -> u32 {
    if twin(i) { i - 1 } else { i }
}

/// The messages that carry group `g`'s body.
fn members(g: u32) -> Vec<u32> {
    if g != u32::MAX && twin(g + 1) {
        vec![g, g + 1]
    } else {
        vec![g]
    }
}

fn body(i: u32) -> Vec<u8> {
    own_body(group(i))
}

/// Message `i`: customer `1000 + i`, count `i + 1`, ten seconds after the
/// one before; every seventh is malformed.
fn own_body(i: u32) -> Vec<u8> {
    let time = T0 + u64::from(i) * 10;
    if malformed(i) {
        return format!(r#"{{"pop":"p","host":"h","time":{time},"metrics":"m{i}"}}"#).into_bytes();
    }
    let (customer, time) = if i == u32::MAX {
        (PUSHER, T0 + 1_000_000)
    } else {
        (1000 + u64::from(i), time)
    };
    format!(
        r#"{{"pop":"p","host":"h","time":{time},"metrics":[{{"customer":{customer},"zone":"z","record":"r","type":"A","count":{}}}]}}"#,
        f64::from(i) + 1.0
    )
    .into_bytes()
}

fn malformed(i: u32) -> bool {
    i != u32::MAX && i % 7 == 3
}

fn customer_of(i: u32) -> u64 {
    let i = group(i);
    if i == u32::MAX {
        PUSHER
    } else {
        1000 + u64::from(i)
    }
}

/// How a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Acked,
    DeadLettered,
}

/// What the next `ack_upto` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckFault {
    None,
    /// The ack is lost with the connection: not applied, `Ok(false)`.
    LostThenDisconnect,
    /// The broker processed it, but the connection died before confirming:
    /// applied, `Ok(false)`.
    UnconfirmedThenDisconnect,
}

/// The fake broker: one queue, its connections, and the ledger.
struct Broker {
    /// Message ids ready, with their redelivered flag.
    queue: VecDeque<(u32, bool)>,
    /// Connection number (counts across incarnations).
    connection: u64,
    next_tag: u64,
    /// Deliveries of the current connection not acked or dead-lettered.
    unacked: BTreeMap<u64, u32>,
    acked_upto: u64,
    settled: HashMap<u32, Settled>,
    ack_fault: AckFault,
    dead_letter_fails: bool,
    violations: Vec<String>,
    deliveries: u64,
    released: u64,
    stale_acks: u64,
    data_dir: PathBuf,
    sink: Arc<FakeSink>,
}

impl Broker {
    fn publish(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.queue.extend(ids.into_iter().map(|i| (i, false)));
    }

    /// The connection dies: its unacked deliveries go back to the front of
    /// the queue, in order, marked redelivered.
    fn disconnect(&mut self) {
        let back: Vec<u32> = std::mem::take(&mut self.unacked).into_values().collect();
        self.released += back.len() as u64;
        for id in back.into_iter().rev() {
            self.queue.push_front((id, true));
        }
        self.connection += 1;
        self.next_tag = 1;
        self.acked_upto = 0;
    }

    /// Whether message `id`'s effect is durable with its exact value: in
    /// the checkpoint on disk (an open bucket or an unconfirmed point) or
    /// confirmed by the sink.
    fn durable(&self, id: u32) -> Result<(), String> {
        let customer = customer_of(id).to_string();
        let count = f64::from(group(id)) + 1.0;
        // Acked now and before, at least; at most every twin of its body.
        let members = members(group(id));
        let acked = members
            .iter()
            .filter(|m| **m != id && self.settled.get(m) == Some(&Settled::Acked))
            .count()
            + 1;
        let allowed: Vec<f64> = (acked..=members.len()).map(|n| n as f64 * count).collect();
        let cp = CheckpointStore::new(&self.data_dir)
            .load()
            .map_err(|e| e.to_string())?;
        let mut found = Vec::new();
        if let Some(cp) = &cp {
            let in_rows: Vec<f64> = cp
                .rows
                .iter()
                .filter(|r| key_customer(&r.key).as_deref() == Some(&customer))
                .map(|r| r.sum)
                .collect();
            if !in_rows.is_empty() {
                found.push(("checkpoint rows", in_rows.iter().sum::<f64>()));
            }
            for p in cp
                .pending
                .iter()
                .filter(|p| p.tags.get("customer").as_deref() == Some(customer.as_str()))
            {
                found.push(("checkpoint pending", p.value));
            }
        }
        if let Some(v) = self.sink.last(&customer) {
            found.push(("sink", v));
        }
        if found.is_empty() {
            return Err(format!(
                "message {id} acked but its effect is nowhere durable"
            ));
        }
        if id != u32::MAX && found.iter().any(|(_, v)| !allowed.contains(v)) {
            return Err(format!(
                "message {id} acked; want one of {allowed:?}, durable: {found:?}"
            ));
        }
        Ok(())
    }
}

/// The customer in a checkpoint row's key (one rollup: customer only).
fn key_customer(bytes: &[u8]) -> Option<String> {
    let key = wagg::router::SeriesKey::parse(bytes)?;
    key.values.first().map(|s| (*s).to_string())
}

/// One incarnation's view of the broker: its connections count from 1.
struct FakeSource {
    broker: Arc<Mutex<Broker>>,
    notify: Arc<Notify>,
    /// The broker connection this incarnation's generation 1 is.
    base: u64,
}

impl FakeSource {
    fn generation(&self, b: &Broker) -> u64 {
        b.connection - self.base + 1
    }
}

impl Source for FakeSource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                // No await between taking a message and returning it:
                // cancel-safe, as the pipeline needs.
                let mut b = self.broker.lock().unwrap();
                if let Some((id, redelivered)) = b.queue.pop_front() {
                    let tag = b.next_tag;
                    b.next_tag += 1;
                    b.unacked.insert(tag, id);
                    b.deliveries += 1;
                    let generation = self.generation(&b);
                    let mut d =
                        Delivery::bare(body(id), redelivered, DeliveryTag { generation, tag });
                    d.properties = d.properties.with_message_id(format!("m{id}").into());
                    return Some(d);
                }
            }
            notified.await;
        }
    }

    async fn ack_upto(&self, tag: DeliveryTag) -> Result<bool, SourceError> {
        let mut b = self.broker.lock().unwrap();
        if tag.generation != self.generation(&b) {
            // An older connection's tag: the real source ignores it, as a
            // tag means nothing on another channel.
            b.stale_acks += 1;
            return Ok(false);
        }
        if tag.tag <= b.acked_upto {
            b.violations.push(format!("{tag:?} acked twice"));
            return Ok(false);
        }
        if tag.tag >= b.next_tag {
            b.violations
                .push(format!("{tag:?} acked but never delivered"));
            return Ok(false);
        }
        let fault = std::mem::replace(&mut b.ack_fault, AckFault::None);
        if fault == AckFault::LostThenDisconnect {
            b.disconnect();
            self.notify.notify_one();
            return Ok(false);
        }
        let covered: Vec<(u64, u32)> = b.unacked.range(..=tag.tag).map(|(t, i)| (*t, *i)).collect();
        for (t, id) in covered {
            if malformed(id) {
                b.violations.push(format!(
                    "malformed message {id} (tag {t}) acked without a dead letter"
                ));
            } else if let Err(e) = b.durable(id) {
                b.violations.push(e);
            }
            b.unacked.remove(&t);
            if b.settled.insert(id, Settled::Acked).is_some() {
                b.violations.push(format!("message {id} settled twice"));
            }
        }
        b.acked_upto = tag.tag;
        if fault == AckFault::UnconfirmedThenDisconnect {
            b.disconnect();
            self.notify.notify_one();
            return Ok(false);
        }
        Ok(true)
    }

    async fn dead_letter(
        &self,
        d: &Delivery,
        _code: &str,
        _reason: &str,
    ) -> Result<(), SourceError> {
        let mut b = self.broker.lock().unwrap();
        if d.tag.generation != self.generation(&b) {
            return Ok(()); // comes back as a redelivery
        }
        if d.tag.tag <= b.acked_upto {
            b.violations
                .push(format!("{:?} dead-lettered after its ack", d.tag));
            return Ok(());
        }
        if b.dead_letter_fails {
            return Err(SourceError::Nacked);
        }
        let Some(id) = b.unacked.remove(&d.tag.tag) else {
            b.violations
                .push(format!("{:?} dead-lettered twice", d.tag));
            return Ok(());
        };
        if !malformed(id) {
            b.violations
                .push(format!("valid message {id} dead-lettered"));
        }
        if b.settled.insert(id, Settled::DeadLettered).is_some() {
            b.violations.push(format!("message {id} settled twice"));
        }
        Ok(())
    }
}

/// A fake OpenTSDB `/api/put`: answers 204 and records every point, or 503
/// while down.
#[derive(Default)]
struct FakeSink {
    down: AtomicBool,
    /// customer → every value written, in order.
    writes: Mutex<HashMap<String, Vec<f64>>>,
}

impl FakeSink {
    fn last(&self, customer: &str) -> Option<f64> {
        self.writes.lock().unwrap().get(customer)?.last().copied()
    }
}

/// Serves a [`FakeSink`] on a runtime of its own; returns its URL.
fn serve(sink: Arc<FakeSink>) -> (String, tokio::runtime::Runtime) {
    use axum::body::Bytes;
    use axum::http::StatusCode;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/api/put",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                if sink.down.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let points: Vec<Point> = serde_json::from_slice(&body).unwrap();
                let mut writes = sink.writes.lock().unwrap();
                for p in points {
                    writes
                        .entry(p.tags.get("customer").unwrap_or_default().to_string())
                        .or_default()
                        .push(p.value);
                }
                StatusCode::NO_CONTENT
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rt)
}

/// The Wasm runtime and module, compiled once for every case.
fn wasm() -> &'static (Runtime, Assignment) {
    static WASM: OnceLock<(Runtime, Assignment)> = OnceLock::new();
    WASM.get_or_init(|| {
        let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
        let module = rt.load(wagg::runtime::builtin("hashmap").unwrap()).unwrap();
        (rt, Assignment::plain(module))
    })
}

/// A running pipeline on a runtime of its own, so that a crash can drop
/// everything it runs at once.
struct Incarnation {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), pipeline::PipelineError>>,
}

impl Incarnation {
    fn start(
        broker: &Arc<Mutex<Broker>>,
        notify: &Arc<Notify>,
        sink_url: &str,
        dir: &Path,
    ) -> Self {
        let (runtime, assignment) = wasm().clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sink = Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig {
            gzip: false,
            max_retries: 0,
            timeout_ms: 2000,
            ..OpenTsdbConfig::new(sink_url)
        }))
        .unwrap();
        let parts = Parts {
            config: PipelineConfig {
                bucket_seconds: 60,
                allowed_lateness_secs: 30,
                idle_flush_secs: 0,
                batch_size: 8,
                batch_max_delay_ms: 5,
                checkpoint_interval_ms: 20,
                data_dir: dir.to_path_buf(),
                shutdown_timeout_secs: 1,
                ..PipelineConfig::default()
            },
            router: Arc::new(RouterConfig {
                shards: 2,
                rollups: vec![Rollup {
                    name: "customer".into(),
                    tags: vec![Tag::Customer],
                }],
                ..RouterConfig::default()
            }),
            runtime,
            assignment: assignment.clone(),
            fallback: assignment,
            events: tokio::sync::broadcast::channel(64).0,
            control: None,
            decoder: Arc::new(JsonDecoder::default()),
            sink: Arc::new(sink),
            metrics: wagg::telemetry::Metrics::new(),
        };
        let source = FakeSource {
            broker: broker.clone(),
            notify: notify.clone(),
            base: broker.lock().unwrap().connection,
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(pipeline::run(
            parts,
            source,
            Arc::new(PipelineCounters::default()),
            Drain::Complete,
            async {
                let _ = stop_rx.await;
            },
        ));
        Incarnation {
            rt,
            stop: Some(stop),
            task,
        }
    }

    /// SIGKILL, as far as one process can: every task dropped where it
    /// stands (a checkpoint being written finishes its rename, as the
    /// kernel would finish a `rename(2)` under way).
    fn crash(self) {
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = self.rt.block_on(self.task);
        result.unwrap().unwrap();
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }

    fn failed(&self) -> bool {
        self.task.is_finished()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Publish(u32),
    Wait(u64),
    SinkDown,
    SinkUp,
    Disconnect,
    AckLost,
    AckUnconfirmed,
    DeadLettersFail(bool),
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..8).prop_map(Op::Publish),
        6 => (0u64..60).prop_map(Op::Wait),
        1 => Just(Op::SinkDown),
        2 => Just(Op::SinkUp),
        1 => Just(Op::Disconnect),
        1 => Just(Op::AckLost),
        1 => Just(Op::AckUnconfirmed),
        1 => any::<bool>().prop_map(Op::DeadLettersFail),
        1 => Just(Op::Crash),
    ]
}

/// Runs one sequence and returns the ledger's verdict.
fn run_case(ops: &[Op]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FakeSink::default());
    let (url, _server) = serve(sink.clone());
    let notify = Arc::new(Notify::new());
    let broker = Arc::new(Mutex::new(Broker {
        queue: VecDeque::new(),
        connection: 1,
        next_tag: 1,
        unacked: BTreeMap::new(),
        acked_upto: 0,
        settled: HashMap::new(),
        ack_fault: AckFault::None,
        dead_letter_fails: false,
        violations: Vec::new(),
        deliveries: 0,
        released: 0,
        stale_acks: 0,
        data_dir: dir.path().to_path_buf(),
        sink: sink.clone(),
    }));
    let mut next_id = 0u32;
    let mut crashes = 0;
    let mut host = Incarnation::start(&broker, &notify, &url, dir.path());
    for op in ops {
        match op {
            Op::Publish(n) => {
                broker.lock().unwrap().publish(next_id..next_id + n);
                next_id += n;
                notify.notify_one();
            }
            Op::Wait(ms) => std::thread::sleep(Duration::from_millis(*ms)),
            Op::SinkDown => sink.down.store(true, Ordering::SeqCst),
            Op::SinkUp => sink.down.store(false, Ordering::SeqCst),
            Op::Disconnect => {
                broker.lock().unwrap().disconnect();
                notify.notify_one();
            }
            Op::AckLost => broker.lock().unwrap().ack_fault = AckFault::LostThenDisconnect,
            Op::AckUnconfirmed => {
                broker.lock().unwrap().ack_fault = AckFault::UnconfirmedThenDisconnect;
            }
            Op::DeadLettersFail(fail) => broker.lock().unwrap().dead_letter_fails = *fail,
            Op::Crash => {
                host.crash();
                crashes += 1;
                broker.lock().unwrap().disconnect();
                host = Incarnation::start(&broker, &notify, &url, dir.path());
            }
        }
        if host.failed() {
            return Err(format!(
                "the pipeline stopped: {:?}",
                host.rt.block_on(host.task)
            ));
        }
    }
    // Heal everything, publish the rest and the watermark pusher, and wait
    // until every message is settled and every point is in the sink.
    {
        let mut b = broker.lock().unwrap();
        b.ack_fault = AckFault::None;
        b.dead_letter_fails = false;
        b.publish((next_id..40).chain([u32::MAX]));
    }
    sink.down.store(false, Ordering::SeqCst);
    notify.notify_one();
    let ids: Vec<u32> = (0..next_id.max(40)).chain([u32::MAX]).collect();
    let valid: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&i| !malformed(i) && i != u32::MAX)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let settled = broker.lock().unwrap().settled.len();
        let written = valid
            .iter()
            .filter(|&&i| sink.last(&customer_of(i).to_string()).is_some())
            .count();
        if settled == ids.len() && written == valid.len() {
            break;
        }
        if Instant::now() > deadline {
            let b = broker.lock().unwrap();
            return Err(format!(
                "not settled after 60 s: {settled} of {} settled, {written} of {} points, queue {:?}, unacked {:?}, violations {:?}",
                ids.len(),
                valid.len(),
                b.queue,
                b.unacked,
                b.violations
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    host.stop();
    let b = broker.lock().unwrap();
    let mut problems = b.violations.clone();
    for &i in &ids {
        let want = if malformed(i) {
            Settled::DeadLettered
        } else {
            Settled::Acked
        };
        if b.settled.get(&i) != Some(&want) {
            problems.push(format!(
                "message {i} ended {:?}, not {want:?}",
                b.settled.get(&i)
            ));
        }
    }
    if !b.unacked.is_empty() || !b.queue.is_empty() {
        problems.push(format!("left unsettled: {:?} {:?}", b.unacked, b.queue));
    }
    let writes = sink.writes.lock().unwrap();
    for &i in &valid {
        let values = &writes[&customer_of(i).to_string()];
        let want = (f64::from(group(i)) + 1.0) * members(group(i)).len() as f64;
        if values.iter().any(|v| *v != want) {
            problems.push(format!(
                "message {i}: points written {values:?}, want {want}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "{} deliveries, {} released, {} stale acks ignored, {crashes} crashes",
            b.deliveries, b.released, b.stale_acks
        ))
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn no_delivery_is_acked_before_it_is_durable_and_every_one_is_settled_once() {
    let mut runner = TestRunner::new(proptest_config(10));
    runner
        .run(&prop::collection::vec(op(), 1..30), |ops| {
            match run_case(&ops) {
                Ok(summary) => eprintln!("ack ledger: {summary}"),
                Err(problems) => prop_assert!(false, "{}", problems),
            }
            Ok(())
        })
        .unwrap();
}
