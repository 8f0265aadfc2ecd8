//! The admin HTTP API, over real HTTP against an in-process server that
//! steers a real pipeline (generated traffic, a file sink; no broker):
//! authentication, body limits, refused uploads, rollout / promote / remove,
//! a restart, health and metrics. After every refused call the module list
//! and the rollout are checked unchanged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use wagg::admin::client::{AdminClient, ClientError};
use wagg::admin::controller::starting_incumbent;
use wagg::admin::http::{self, AdminState, ErrorBody};
use wagg::admin::{AdminConfig, Controller, ModuleState, Registry, RolloutView};
use wagg::pipeline::{
    self, Drain, Parts, PipelineConfig, PipelineControl, PipelineCounters, PipelineError, Source,
};
use wagg::router::RouterConfig;
use wagg::runtime::{Runtime, RuntimeLimits};
use wagg::sink::{FileSinkConfig, Sink, SinkConfig};
use wagg::source::amqp::{Delivery, DeliveryTag, SourceError};
use wagg::source::generator::{Generator, GeneratorConfig, GeneratorSource};
use wagg::source::json::JsonDecoder;
use wagg::telemetry::Metrics;

const TOKEN: &str = "correct horse battery staple";
/// Body limit of the test hosts: above every fixture (about 60 KiB).
const LIMIT: usize = 128 << 10;
/// Safety net against a hung server; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(15);

/// The generator, one small message every few milliseconds: traffic flows
/// through the shards without taking the machine.
struct Paced {
    inner: GeneratorSource,
    tick: tokio::time::Interval,
}

impl Source for Paced {
    async fn next(&mut self) -> Option<Delivery> {
        // Cancel-safe: the only await before the message exists.
        self.tick.tick().await;
        self.inner.next().await
    }
    async fn ack_upto(&self, tag: DeliveryTag) -> Result<bool, SourceError> {
        self.inner.ack_upto(tag).await
    }
    async fn dead_letter(&self, d: &Delivery, code: &str, reason: &str) -> Result<(), SourceError> {
        self.inner.dead_letter(d, code, reason).await
    }
}

/// Compiled modules shared by every test's runtime (keyed by engine and
/// module hash, so sharing is safe). The first test to get here compiles
/// the built-ins into it while the others wait, instead of every test
/// compiling them at once.
fn compile_cache() -> PathBuf {
    static WARM: OnceLock<PathBuf> = OnceLock::new();
    WARM.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-compiled");
        let runtime = Runtime::new(RuntimeLimits::default(), Some(&dir)).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        Registry::open(scratch.path(), runtime).unwrap();
        dir
    })
    .clone()
}

/// A host as `wagg run` assembles it: pipeline, controller, admin API.
struct Host {
    url: String,
    addr: std::net::SocketAddr,
    control: PipelineControl,
    state: AdminState,
    metrics: Arc<Metrics>,
    stop_pipeline: Option<oneshot::Sender<()>>,
    pipeline: JoinHandle<Result<(), PipelineError>>,
    stop_server: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

impl Host {
    async fn start(data_dir: &Path, shards: u32, token: Option<&str>) -> Host {
        let cache = tokio::task::spawn_blocking(compile_cache).await.unwrap();
        let runtime = Runtime::new(RuntimeLimits::default(), Some(&cache)).unwrap();
        let registry = {
            let (dir, rt) = (data_dir.to_path_buf(), runtime.clone());
            tokio::task::spawn_blocking(move || Registry::open(&dir, rt))
                .await
                .unwrap()
                .unwrap()
        };
        let incumbent = starting_incumbent(data_dir, &registry, "hashmap").unwrap();
        let fallback = registry
            .assignment(&registry.resolve("hashmap@builtin").unwrap().id)
            .unwrap();
        let metrics = Metrics::new();

        // The server first, as `wagg run` does: not ready until the
        // controller runs.
        let state = AdminState::new(token, LIMIT, metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_server, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(http::serve(listener, state.clone(), async {
            let _ = stop_rx.await;
        }));
        let url = format!("http://{addr}");
        let raw = reqwest::Client::new();
        let ready = raw.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503, "ready before the controller runs");
        let health = raw.get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);

        let (control, control_rx) = PipelineControl::new(shards);
        let events = broadcast::channel(1024).0;
        let events_rx = events.subscribe();
        let parts = Parts {
            config: PipelineConfig {
                checkpoint_interval_ms: 200,
                idle_flush_secs: 1,
                data_dir: data_dir.to_path_buf(),
                ..PipelineConfig::default()
            },
            router: Arc::new(RouterConfig {
                shards,
                ..RouterConfig::default()
            }),
            runtime,
            assignment: incumbent.clone(),
            fallback,
            events,
            control: Some(control_rx),
            decoder: Arc::new(JsonDecoder::default()),
            sink: Arc::new(
                Sink::from_config(&SinkConfig::File(FileSinkConfig {
                    path: data_dir.join("points.jsonl"),
                }))
                .unwrap(),
            ),
            metrics: metrics.clone(),
        };
        let generator = Generator::new(
            GeneratorConfig {
                customers: 50,
                metrics_per_message: 10,
                ..GeneratorConfig::default()
            },
            60,
        )
        .unwrap();
        let source = Paced {
            inner: GeneratorSource::new(generator, None),
            tick: tokio::time::interval(Duration::from_millis(5)),
        };
        let (stop_pipeline, stop_rx) = oneshot::channel::<()>();
        let pipeline = tokio::spawn(pipeline::run(
            parts,
            source,
            Arc::new(PipelineCounters::default()),
            Drain::Complete,
            async {
                let _ = stop_rx.await;
            },
        ));
        let controller: Arc<Controller> = Controller::start(
            registry,
            incumbent.module.id(),
            control.clone(),
            events_rx,
            AdminConfig::default(),
            data_dir,
            metrics.clone(),
        )
        .await
        .unwrap();
        state.set_controller(controller);
        let ready = raw.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        Host {
            url,
            addr,
            control,
            state,
            metrics,
            stop_pipeline: Some(stop_pipeline),
            pipeline,
            stop_server: Some(stop_server),
            server,
        }
    }

    fn client(&self, token: Option<&str>) -> AdminClient {
        AdminClient::new(&self.url, token.map(str::to_owned)).unwrap()
    }

    /// The module each shard runs, as the shards report it.
    async fn shard_modules(&self) -> Vec<String> {
        let mut stats = self.control.stats().await.unwrap();
        stats.sort_by_key(|s| s.shard);
        stats.into_iter().map(|s| s.module).collect()
    }

    async fn stop(mut self) {
        let _ = self.stop_pipeline.take().unwrap().send(());
        tokio::time::timeout(PATIENCE * 2, &mut self.pipeline)
            .await
            .expect("the pipeline stops")
            .unwrap()
            .unwrap();
        let _ = self.stop_server.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, &mut self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// What a refused call must not change: every module's identity, state,
/// shards and rollback reason, and the rollout.
type Snapshot = (
    Vec<(String, String, ModuleState, Vec<u32>, Option<String>)>,
    RolloutView,
);

async fn snapshot(client: &AdminClient) -> Snapshot {
    let modules = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.record.id.clone(),
                m.record.label(),
                m.state,
                m.shards,
                m.record.rolled_back,
            )
        })
        .collect();
    (modules, client.rollout().await.unwrap())
}

/// `bytes` with a custom section appended: the same strategy under another
/// id (every fixture strategy is also a built-in, and the registry refuses
/// the same bytes twice).
pub(crate) fn variant(bytes: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"wagg-test";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    leb(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

/// A raw call: `head` (request line and headers, without the blank line),
/// then `body` chunks, written as far as the server reads them; the
/// response's status and body.
async fn raw(addr: std::net::SocketAddr, head: &str, body: &[Vec<u8>]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    for part in body {
        // The server may answer and close before it has read everything.
        if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no complete answer: {}",
        String::from_utf8_lossy(&response)
    );
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn api_status(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_without_the_right_token_are_refused_with_401_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 2, Some(TOKEN)).await;
    let admin = host.client(Some(TOKEN));
    // Something to refuse changes to: a candidate on one shard.
    admin
        .upload(variant(wagg_artifacts::BTREE.bytes, "a"), "btree", "2", &[])
        .await
        .unwrap();
    admin.set_rollout("btree@2", 50).await.unwrap();
    let before = snapshot(&admin).await;

    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", host.url);
    let calls = || {
        [
            http.post(url("/modules?name=sorted&version=2"))
                .header("content-type", "application/wasm")
                .body(variant(wagg_artifacts::SORTED.bytes, "b")),
            http.delete(url("/modules/btree@2")),
            http.put(url("/rollout"))
                .json(&serde_json::json!({"candidate": "btree@2", "weight": 100})),
            http.post(url("/rollout/promote")),
            http.post(url("/rollout/rollback")),
        ]
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some(&*format!("Basic {TOKEN}")),
        Some("Bearer "),
    ] {
        for call in calls() {
            let call = match auth {
                Some(a) => call.header("authorization", a),
                None => call,
            };
            let response = call.send().await.unwrap();
            assert_eq!(response.status(), 401, "{auth:?}");
            let challenge = response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let body: ErrorBody = response.json().await.unwrap();
            assert_eq!(body.status, 401);
        }
    }
    // A refused call with a body leaves it unread, and the server drops the
    // connection: it says so, so a pooling client does not send its next
    // call there and lose it (what broke: the call after a refused upload
    // failed with "connection closed before message completed").
    let refused = calls().into_iter().next().unwrap().send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["connection"], "close");
    // The CLI's client says what to do.
    let (status, _) = api_status(host.client(Some("wrong")).promote().await);
    assert_eq!(status, 401);
    let e = host.client(None).promote().await.unwrap_err();
    assert!(e.to_string().contains("--token"), "{e}");
    // Reads need no token.
    assert_eq!(snapshot(&host.client(None)).await, before);
    assert_eq!(snapshot(&admin).await, before);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_every_change_is_refused_with_403() {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 1, None).await;
    let client = host.client(Some("anything"));
    let before = snapshot(&client).await;
    let (status, message) = api_status(
        client
            .upload(variant(wagg_artifacts::BTREE.bytes, "c"), "btree", "2", &[])
            .await,
    );
    assert_eq!(status, 403);
    assert!(message.contains("WAGG_ADMIN_TOKEN"), "{message}");
    assert_eq!(
        api_status(client.set_rollout("btree@builtin", 100).await).0,
        403
    );
    assert_eq!(api_status(client.remove("leaky@builtin").await).0, 403);
    assert_eq!(api_status(client.rollback(None).await).0, 403);
    assert_eq!(snapshot(&client).await, before);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_with_413_before_they_are_read() {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 1, Some(TOKEN)).await;
    let admin = host.client(Some(TOKEN));
    let before = snapshot(&admin).await;
    let auth = format!("Authorization: Bearer {TOKEN}");

    // A declared gigabyte: answered before a byte of it is sent.
    let (status, body) = raw(
        host.addr,
        &format!(
            "POST /modules?name=big&version=1 HTTP/1.1\r\n{auth}\r\nContent-Type: application/wasm\r\nContent-Length: {}",
            1u64 << 30
        ),
        &[],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"status\":413"), "{body}");

    // Chunked, without a length: cut off at the limit, answered while the
    // body has not ended (no last chunk is ever sent).
    let chunk = vec![b'x'; 16 << 10];
    let chunks: Vec<Vec<u8>> = (0..LIMIT / chunk.len() + 2)
        .map(|_| {
            let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
            c.extend_from_slice(&chunk);
            c.extend_from_slice(b"\r\n");
            c
        })
        .collect();
    let (status, body) = raw(
        host.addr,
        &format!(
            "POST /modules?name=big&version=2 HTTP/1.1\r\n{auth}\r\nContent-Type: application/wasm\r\nTransfer-Encoding: chunked"
        ),
        &chunks,
    )
    .await;
    assert_eq!(status, 413, "{body}");

    // The JSON calls have a small limit of their own.
    let (status, _) = raw(
        host.addr,
        &format!(
            "PUT /rollout HTTP/1.1\r\n{auth}\r\nContent-Type: application/json\r\nContent-Length: {}",
            http::MAX_JSON_BODY_BYTES + 1
        ),
        &[],
    )
    .await;
    assert_eq!(status, 413);

    // Through the client: one byte over.
    let (status, message) = api_status(admin.upload(vec![0; LIMIT + 1], "big", "3", &[]).await);
    assert_eq!(status, 413);
    assert!(message.contains(&LIMIT.to_string()), "{message}");

    assert_eq!(snapshot(&admin).await, before);
    host.stop().await;
}

/// One upload of a refusal table.
struct Upload {
    name: &'static str,
    version: &'static str,
    bytes: Vec<u8>,
    options: Vec<(String, String)>,
}

impl Upload {
    fn new(name: &'static str, bytes: Vec<u8>) -> Self {
        Upload {
            name,
            version: "1",
            bytes,
            options: Vec::new(),
        }
    }
    fn version(self, version: &'static str) -> Self {
        Upload { version, ..self }
    }
    fn options(self, options: Vec<(String, String)>) -> Self {
        Upload { options, ..self }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_uploads_are_refused_with_the_reason_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 1, Some(TOKEN)).await;
    let admin = host.client(Some(TOKEN));
    let before = snapshot(&admin).await;

    let precompiled = wasmtime::Engine::default()
        .precompile_component(wagg_artifacts::OTHERWORLD.bytes)
        .unwrap();
    let btree = variant(wagg_artifacts::BTREE.bytes, "d");
    let o = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
    let garbage = b"this is not wasm at all".to_vec();
    let core = b"\0asm\x01\0\0\0".to_vec();
    let otherworld = wagg_artifacts::OTHERWORLD.bytes.to_vec();
    let imports = wagg_artifacts::IMPORTS.bytes.to_vec();
    let misbehave = wagg_artifacts::MISBEHAVE.bytes.to_vec();
    let builtin = wagg_artifacts::BTREE.bytes.to_vec();
    let refusals = [
        (
            Upload::new("garbage", garbage),
            422,
            "not a WebAssembly binary",
        ),
        (
            Upload::new("empty", Vec::new()),
            422,
            "not a WebAssembly binary",
        ),
        (Upload::new("core", core), 422, "not a component"),
        (
            Upload::new("otherworld", otherworld),
            422,
            "does not export",
        ),
        (Upload::new("imports", imports), 422, "imports"),
        (
            Upload::new("precompiled", precompiled),
            422,
            "precompiled artifacts are refused",
        ),
        (
            Upload::new("misbehave", misbehave).options(o("mode", "nonsense")),
            422,
            "unknown mode",
        ),
        (
            Upload::new("btree", btree.clone()).options(o("colour", "red")),
            422,
            "unknown option",
        ),
        (Upload::new("btree", builtin), 409, "btree@builtin"),
        (
            Upload::new("hashmap", btree.clone()).version("builtin"),
            400,
            "reserved",
        ),
        (Upload::new("bad name!", btree.clone()), 400, "name must be"),
    ];
    for (upload, want, reason) in refusals {
        let name = upload.name;
        let (status, message) = api_status(
            admin
                .upload(upload.bytes, name, upload.version, &upload.options)
                .await,
        );
        assert_eq!(status, want, "{name}: {message}");
        assert!(
            message.contains(reason),
            "{name}: {message:?} lacks {reason:?}"
        );
    }

    // The JSON shape of an error, and calls that are malformed.
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/modules?name=x&version=1", host.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: ErrorBody = response.json().await.unwrap();
    assert_eq!(body.status, 422);
    for (method, path, content_type, body, want) in [
        ("POST", "/modules?name=x", "application/wasm", "", 400),
        (
            "POST",
            "/modules?name=x&version=1&nmae=y",
            "application/wasm",
            "",
            400,
        ),
        (
            "POST",
            "/modules?name=x&version=1",
            "multipart/form-data",
            "",
            415,
        ),
        (
            "PUT",
            "/rollout",
            "application/json",
            "{\"candidate\":\"btree@builtin\"}",
            400,
        ),
        (
            "PUT",
            "/rollout",
            "application/json",
            "{\"candidate\":\"btree@builtin\",\"weight\":101}",
            400,
        ),
        (
            "PUT",
            "/rollout",
            "application/json",
            "{\"candidate\":\"nope@1\",\"weight\":10}",
            404,
        ),
        (
            "PUT",
            "/rollout",
            "application/json",
            "{\"candidate\":\"hashmap@builtin\",\"weight\":10}",
            400,
        ),
        ("POST", "/rollout/promote", "application/json", "", 409),
        (
            "POST",
            "/rollout/rollback",
            "application/json",
            "{\"reason\": 5}",
            400,
        ),
        ("POST", "/rollout/rollback", "application/json", "", 409),
        ("DELETE", "/modules/nope@1", "application/json", "", 404),
        (
            "DELETE",
            "/modules/hashmap@builtin",
            "application/json",
            "",
            409,
        ),
        (
            "DELETE",
            "/modules/leaky@builtin",
            "application/json",
            "",
            409,
        ),
        ("GET", "/nowhere", "application/json", "", 404),
        ("PATCH", "/rollout", "application/json", "", 405),
    ] {
        let response = http
            .request(method.parse().unwrap(), format!("{}{path}", host.url))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), want, "{method} {path} {body}");
        let error: ErrorBody = response.json().await.unwrap();
        assert_eq!(error.status, want);
    }
    assert_eq!(snapshot(&admin).await, before);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rollout_rollback_promote_and_remove_through_the_api() {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 2, Some(TOKEN)).await;
    let admin = host.client(Some(TOKEN));

    let btree = admin
        .upload(variant(wagg_artifacts::BTREE.bytes, "e"), "btree", "2", &[])
        .await
        .unwrap();
    assert_eq!(btree.label(), "btree@2");
    let sorted = admin
        .upload(
            variant(wagg_artifacts::SORTED.bytes, "e"),
            "sorted",
            "2",
            &[],
        )
        .await
        .unwrap();
    let hashmap = admin.rollout().await.unwrap().incumbent;
    assert_eq!(hashmap.label, "hashmap@builtin");

    // 50 % of two shards: btree on one, by its id prefix.
    let view = admin.set_rollout(&btree.id[..10], 50).await.unwrap();
    assert_eq!(view.candidate.as_ref().unwrap().id, btree.id);
    assert_eq!(view.weight, 50);
    assert_eq!(view.shards, vec![btree.id.clone(), hashmap.id.clone()]);
    assert_eq!(host.shard_modules().await, view.shards);
    let list = admin.list().await.unwrap();
    let find = |id: &str| list.iter().find(|m| m.record.id == id).unwrap().clone();
    assert_eq!(find(&btree.id).state, ModuleState::Candidate);
    assert_eq!(find(&btree.id).shards, vec![0]);
    assert_eq!(find(&hashmap.id).state, ModuleState::Incumbent);
    assert_eq!(find(&hashmap.id).shards, vec![1]);
    assert_eq!(find(&sorted.id).state, ModuleState::Idle);
    // In use: not removable.
    assert_eq!(api_status(admin.remove("btree@2").await).0, 409);

    // Promote: btree everywhere.
    let view = admin.promote().await.unwrap();
    assert_eq!(view.incumbent.id, btree.id);
    assert!(view.candidate.is_none());
    assert_eq!(host.shard_modules().await, vec![btree.id.clone(); 2]);

    // sorted tried and rolled back with a reason, then tried again and
    // promoted.
    admin.set_rollout("sorted@2", 100).await.unwrap();
    assert_eq!(host.shard_modules().await, vec![sorted.id.clone(); 2]);
    let view = admin.rollback(Some("wrong colour")).await.unwrap();
    assert_eq!(view.shards, vec![btree.id.clone(); 2]);
    let list = admin.list().await.unwrap();
    let rolled = list.iter().find(|m| m.record.id == sorted.id).unwrap();
    assert_eq!(rolled.state, ModuleState::RolledBack);
    assert_eq!(rolled.record.rolled_back.as_deref(), Some("wrong colour"));
    admin.set_rollout("sorted@2", 50).await.unwrap();
    let view = admin.promote().await.unwrap();
    assert_eq!(view.incumbent.id, sorted.id);
    assert_eq!(host.shard_modules().await, vec![sorted.id.clone(); 2]);

    // The old incumbent is idle now and goes; the incumbent stays.
    let removed = admin.remove("btree@2").await.unwrap();
    assert_eq!(removed.id, btree.id);
    assert!(
        !data
            .path()
            .join(format!("modules/{}.wasm", btree.id))
            .exists()
    );
    let (status, message) = api_status(admin.remove("sorted@2").await);
    assert_eq!(status, 409, "{message}");
    let list = admin.list().await.unwrap();
    assert!(list.iter().all(|m| m.record.id != btree.id));
    assert_eq!(
        list.iter()
            .find(|m| m.record.id == sorted.id)
            .unwrap()
            .state,
        ModuleState::Incumbent
    );
    assert_eq!(api_status(admin.remove("btree@2").await).0, 404);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_uploaded_modules_and_the_rollout() {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 2, Some(TOKEN)).await;
    let admin = host.client(Some(TOKEN));
    let btree = admin
        .upload(variant(wagg_artifacts::BTREE.bytes, "f"), "btree", "3", &[])
        .await
        .unwrap();
    admin.set_rollout("btree@3", 50).await.unwrap();
    let before = snapshot(&admin).await;
    host.stop().await;

    let host = Host::start(data.path(), 2, Some(TOKEN)).await;
    let admin = host.client(Some(TOKEN));
    assert_eq!(snapshot(&admin).await, before);
    let (_, rollout) = &before;
    assert_eq!(rollout.shards[0], btree.id);
    assert_eq!(host.shard_modules().await, rollout.shards);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() {
    // Readiness before a controller exists: 503; liveness: 200.
    let state = AdminState::new(Some(TOKEN), LIMIT, Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, state.clone(), async {
        let _ = stop_rx.await;
    }));
    let get = |p: &str| reqwest::get(format!("http://{addr}{p}"));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<ErrorBody>().await.unwrap().status, 503);
    assert_eq!(get("/modules").await.unwrap().status(), 503);
    let _ = stop.send(());
    server.await.unwrap().unwrap();

    // A running host: ready; draining: not ready.
    let data = tempfile::tempdir().unwrap();
    let host = Host::start(data.path(), 1, Some(TOKEN)).await;
    let response = reqwest::get(format!("{}/metrics", host.url)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        http::METRICS_CONTENT_TYPE
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("# TYPE wagg_messages_received_total counter"),
        "{text}"
    );
    // The pipeline's own registry is what is served.
    assert!(
        host.metrics
            .render()
            .contains("# TYPE wagg_messages_received_total counter")
    );

    // Draining: not ready, changes refused, reads still served.
    host.state.set_draining();
    assert_eq!(
        reqwest::get(format!("{}/readyz", host.url))
            .await
            .unwrap()
            .status(),
        503
    );
    let admin = host.client(Some(TOKEN));
    assert_eq!(
        api_status(admin.set_rollout("btree@builtin", 100).await).0,
        503
    );
    assert!(admin.list().await.is_ok());
    host.stop().await;

    // Nothing listens any more: the client says what to check.
    let e = AdminClient::new(&format!("http://{addr}"), None)
        .unwrap()
        .list()
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("is `wagg run` running?"), "{e}");
}
