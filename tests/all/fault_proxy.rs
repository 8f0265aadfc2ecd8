//! An HTTP proxy in front of the real VictoriaMetrics that answers with
//! errors or slowly on demand.
//!
//! This is the one mock-like piece of the sink tests, and only for what the
//! real server cannot be made to do on demand: VictoriaMetrics does not
//! answer 5xx to a healthy write, nor slowly. Everything the proxy lets
//! through is written to, and read back from, the real server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// How the proxy answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fault {
    /// Forward, answer with the server's answer.
    Pass,
    /// Answer with this status without forwarding.
    Status(u16),
    /// Forward, then hold the answer this long: the write is stored, but a
    /// client with a shorter timeout does not learn it.
    Slow(Duration),
}

#[derive(Debug, Default)]
struct Seen {
    /// Requests answered, by the fault in force: pass, status, slow.
    answered: [u64; 3],
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    client: reqwest::Client,
    fault: Arc<Mutex<Fault>>,
    seen: Arc<Mutex<Seen>>,
}

/// A running proxy; stops when dropped.
pub(crate) struct FaultProxy {
    addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`http://host:port`), passing everything.
    pub(crate) async fn start(upstream: &str) -> FaultProxy {
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            fault: fault.clone(),
            seen: seen.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            addr,
            fault,
            seen,
            task,
        }
    }

    /// The proxy's URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers from now on as `fault` says.
    pub(crate) fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Requests answered so far while passing, with a status, slowly.
    pub(crate) fn answered(&self) -> [u64; 3] {
        self.seen.lock().unwrap().answered
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = *s.fault.lock().unwrap();
    let slot = match fault {
        Fault::Pass => 0,
        Fault::Status(_) => 1,
        Fault::Slow(_) => 2,
    };
    if let Fault::Status(code) = fault {
        s.seen.lock().unwrap().answered[slot] += 1;
        let status = StatusCode::from_u16(code).unwrap();
        return (status, "injected by the test's fault proxy").into_response();
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = s
        .client
        .request(method, format!("{}{path}", s.upstream))
        .body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    let answer = match request.send().await {
        Ok(r) => {
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
            let body = r.bytes().await.unwrap_or_default();
            (status, body).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    // Counted before the hold: a client that gives up drops this future.
    s.seen.lock().unwrap().answered[slot] += 1;
    if let Fault::Slow(hold) = fault {
        tokio::time::sleep(hold).await;
    }
    answer
}
