//! The OpenTSDB sink: POSTs batches of points to an OpenTSDB-compatible
//! HTTP API (`{url}/api/put?details`).
//!
//! What the servers answer (OpenTSDB 2.x documentation; VictoriaMetrics
//! 1.79 measured):
//!
//! | | OpenTSDB | VictoriaMetrics |
//! |---|---|---|
//! | all stored | 200 + `{"success":N,"failed":0,"errors":[]}` | 204, no body (`?details` is ignored) |
//! | some points bad | 400 + the same object, one `errors[]` entry per bad point | 204: bad points are dropped with only a server log line |
//! | body not JSON | 400 | 400, plain text |
//! | `Content-Encoding: gzip` | accepted | accepted |
//!
//! So per-point refusals come back in [`WriteReport::refused`] from OpenTSDB
//! only; the sink itself also refuses points no server could store
//! ([`Point::invalid_reason`]). 5xx, 408, 429, connection errors and
//! timeouts are retried with full-jitter exponential backoff
//! ([`backoff_cap`]); other answers are not.

use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{Point, SinkError, Tags, WriteReport, encode_json_iter};

/// Longest piece of an error response body kept in [`SinkError::Status`].
const MAX_ERROR_BODY: usize = 512;

/// `[sink]` with `kind = "opentsdb"`: an OpenTSDB-compatible HTTP API
/// (OpenTSDB 2.x, or VictoriaMetrics' `-opentsdbHTTPListenAddr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenTsdbConfig {
    /// Base URL of the API, e.g. `http://127.0.0.1:4242`; points are POSTed
    /// to `{url}/api/put?details`. Plain `http` only: this build has no TLS.
    pub url: String,
    /// Points per request. Default 5000: about 0.7 MB of JSON, 50 KB
    /// gzipped. VictoriaMetrics takes up to 32 MiB per request
    /// (`-opentsdbhttp.maxInsertRequestSize`); OpenTSDB needs
    /// `tsd.http.request.enable_chunked = true` and a
    /// `tsd.http.request.max_chunk` above the request size for bodies this
    /// large, and otherwise answers 400, which is not retried.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Timeout of one request, from connecting to reading the whole answer,
    /// in milliseconds. A timed-out request is retried. Default 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Whether to gzip request bodies (`Content-Encoding: gzip`, fastest
    /// level); JSON points shrink about thirteenfold. OpenTSDB 2.2 and later
    /// (documented) and VictoriaMetrics (measured, 1.79) accept it.
    /// Default true.
    #[serde(default = "default_gzip")]
    pub gzip: bool,
    /// How often one batch is retried after a retryable failure (5xx, 408,
    /// 429, connection error, timeout) before the write gives up. 0 never
    /// retries. Default 8.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Backoff before retry `n` (from 0) is uniformly random in
    /// `0..=min(retry_max_ms, retry_base_ms * 2^n)` ("full jitter"), in
    /// milliseconds. Default 100.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Cap of the backoff, in milliseconds. Default 10000: with the other
    /// defaults, a failing batch waits at most 22.7 s in backoff (half that
    /// on average) plus its 9 requests' time (at most 9 × `timeout_ms`)
    /// before the write gives up.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Requests of one write in flight at once. A flush of many buckets is
    /// many batches; with more than one in flight, a request's round trip
    /// to a remote server need not leave both sides idle. Default 2 (no
    /// gain measured with the server on the same 2 cores: BENCHMARKS.md).
    #[serde(default = "default_requests_in_flight")]
    pub requests_in_flight: usize,
}

fn default_batch_size() -> usize {
    5000
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_gzip() -> bool {
    true
}
fn default_max_retries() -> u32 {
    8
}
fn default_retry_base_ms() -> u64 {
    100
}
fn default_retry_max_ms() -> u64 {
    10_000
}
fn default_requests_in_flight() -> usize {
    2
}

impl OpenTsdbConfig {
    /// A configuration for `url` with every other field at its default.
    pub fn new(url: impl Into<String>) -> OpenTsdbConfig {
        OpenTsdbConfig {
            url: url.into(),
            batch_size: default_batch_size(),
            timeout_ms: default_timeout_ms(),
            gzip: default_gzip(),
            max_retries: default_max_retries(),
            retry_base_ms: default_retry_base_ms(),
            retry_max_ms: default_retry_max_ms(),
            requests_in_flight: default_requests_in_flight(),
        }
    }

    /// Checks what `wagg config check` and the sink's start both refuse.
    ///
    /// # Errors
    ///
    /// [`SinkError::Config`] for a URL that is not `http://host[:port][/path]`
    /// or a zero `batch_size`, `timeout_ms` or `requests_in_flight`.
    pub fn validate(&self) -> Result<(), SinkError> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| SinkError::Config(format!("opentsdb url {:?}: {e}", self.url)))?;
        if url.scheme() != "http" {
            return Err(SinkError::Config(format!(
                "opentsdb url {:?}: only http:// is supported (this build has no TLS)",
                self.url
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SinkError::Config(format!(
                "opentsdb url {:?}: give the base URL, without query or fragment",
                self.url
            )));
        }
        if self.batch_size == 0 {
            return Err(SinkError::Config(
                "opentsdb batch_size must be at least 1".into(),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(SinkError::Config(
                "opentsdb timeout_ms must be at least 1".into(),
            ));
        }
        if self.requests_in_flight == 0 {
            return Err(SinkError::Config(
                "opentsdb requests_in_flight must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// The cap of the backoff before retry `attempt` (0 for the first retry):
/// `min(max, base * 2^attempt)`, saturating. The actual delay is uniformly
/// random below it ([`full_jitter`]).
pub fn backoff_cap(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// A delay uniformly random in `0..=cap`, at microsecond resolution.
pub fn full_jitter(cap: Duration, rng: &mut impl Rng) -> Duration {
    let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.random_range(0..=cap_us))
}

/// Writes points to an OpenTSDB-compatible HTTP API. Cheap to share: one
/// connection pool, no state between writes.
#[derive(Debug)]
pub struct OpenTsdbSink {
    cfg: OpenTsdbConfig,
    /// `{url}/api/put?details`.
    endpoint: String,
    client: reqwest::Client,
    /// Where retries are counted; see [`OpenTsdbSink::set_metrics`].
    metrics: std::sync::OnceLock<std::sync::Arc<crate::telemetry::Metrics>>,
}

/// What one batch's successful request said.
enum Answer {
    /// Every point stored (VictoriaMetrics' 204, or a 2xx without details).
    All,
    /// OpenTSDB's `?details` summary.
    Details(Details),
}

/// OpenTSDB's answer to `/api/put?details`.
#[derive(Debug, Deserialize)]
struct Details {
    success: usize,
    failed: usize,
    #[serde(default)]
    errors: Vec<DetailError>,
}

/// One refused point in OpenTSDB's `?details` answer.
#[derive(Debug, Deserialize)]
struct DetailError {
    datapoint: serde_json::Value,
    error: String,
}

/// The point as OpenTSDB echoes it: its `value` may be a string.
#[derive(Debug, Deserialize)]
struct EchoedPoint {
    metric: String,
    timestamp: u64,
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default)]
    tags: Tags,
}

impl OpenTsdbSink {
    /// Checks `cfg` and builds the HTTP client; connects on the first write.
    ///
    /// # Errors
    ///
    /// [`SinkError::Config`] for a URL that is not `http://host[:port][/path]`
    /// or a zero `batch_size` or `timeout_ms`; [`SinkError::Client`] if the
    /// client cannot be built.
    pub fn new(cfg: OpenTsdbConfig) -> Result<OpenTsdbSink, SinkError> {
        cfg.validate()?;
        let endpoint = format!("{}/api/put?details", cfg.url.trim_end_matches('/'));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .build()
            .map_err(SinkError::Client)?;
        Ok(OpenTsdbSink {
            cfg,
            endpoint,
            client,
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// Reports retries to `metrics` (the pipeline calls it with its own
    /// before the first write). Only the first call counts; a sink that
    /// wrote before any call keeps a registry of its own. Returns whether
    /// `metrics` was taken.
    pub fn set_metrics(&self, metrics: std::sync::Arc<crate::telemetry::Metrics>) -> bool {
        self.metrics.set(metrics).is_ok()
    }

    fn metrics(&self) -> &crate::telemetry::Metrics {
        self.metrics.get_or_init(crate::telemetry::Metrics::new)
    }

    /// The configuration this sink was built from.
    pub fn config(&self) -> &OpenTsdbConfig {
        &self.cfg
    }

    /// Writes `points` in batches of `batch_size`, one request at a time;
    /// see [`super::Sink::write`].
    ///
    /// # Errors
    ///
    /// [`SinkError::GaveUp`] once a batch has failed `max_retries` retries;
    /// [`SinkError::Status`] at once for an answer that is not retried.
    pub async fn write(&self, points: &[Point]) -> Result<WriteReport, SinkError> {
        let mut report = WriteReport::default();
        let mut valid: Vec<&Point> = Vec::with_capacity(points.len());
        for p in points {
            match p.invalid_reason() {
                Some(reason) => report.refused.push((p.clone(), reason.to_owned())),
                None => valid.push(p),
            }
        }
        // Batches complete in any order: each point is written once per
        // write whatever the order, and a rewrite after a failed write
        // stores the same values again. The futures are collected first
        // (each does nothing until polled): a closure inside the stream's
        // type would make the spawned sink task's future fail the compiler's
        // higher-ranked lifetime check.
        let sends: Vec<_> = valid
            .chunks(self.cfg.batch_size)
            .map(|batch| self.encode_and_send(batch))
            .collect();
        let mut batches =
            futures_util::stream::iter(sends).buffer_unordered(self.cfg.requests_in_flight);
        while let Some(done) = batches.next().await {
            let (written, refused, retries) = match done {
                Ok(batch) => (batch.written, batch.refused, batch.retries),
                Err(SinkError::GaveUp {
                    retries,
                    written,
                    last,
                }) => {
                    return Err(SinkError::GaveUp {
                        retries: report.retries + retries,
                        written: report.written + written,
                        last,
                    });
                }
                Err(e) => return Err(e),
            };
            report.written += written;
            report.refused.extend(refused);
            report.retries += retries;
        }
        if !report.refused.is_empty() {
            warn!(
                refused = report.refused.len(),
                first_reason = %report.refused[0].1,
                "Points were refused; they are dropped."
            );
        }
        Ok(report)
    }

    /// Encodes one batch and sends it, retrying; the report covers this
    /// batch alone.
    async fn encode_and_send(&self, batch: &[&Point]) -> Result<WriteReport, SinkError> {
        let mut json = Vec::new();
        encode_json_iter(batch.iter().copied(), &mut json);
        let body = if self.cfg.gzip {
            Bytes::from(gzip(&json))
        } else {
            Bytes::from(json)
        };
        let mut report = WriteReport::default();
        self.send_batch(batch, &body, &mut report).await?;
        Ok(report)
    }

    /// Sends one batch, retrying, and accounts for it in `report`.
    async fn send_batch(
        &self,
        batch: &[&Point],
        body: &Bytes,
        report: &mut WriteReport,
    ) -> Result<(), SinkError> {
        let mut attempt = 0;
        loop {
            match self.post(body).await {
                Ok(Answer::All) => {
                    report.written += batch.len();
                    debug!(points = batch.len(), attempt, "Wrote batch to OpenTSDB.");
                    return Ok(());
                }
                Ok(Answer::Details(details)) => {
                    account_details(batch, details, report);
                    return Ok(());
                }
                Err(e) if is_retryable(&e) && attempt < self.cfg.max_retries => {
                    let cap = backoff_cap(
                        attempt,
                        Duration::from_millis(self.cfg.retry_base_ms),
                        Duration::from_millis(self.cfg.retry_max_ms),
                    );
                    let delay = full_jitter(cap, &mut rand::rng());
                    attempt += 1;
                    report.retries += 1;
                    crate::telemetry::SinkRetried {
                        attempt,
                        delay,
                        error: &e,
                    }
                    .emit(self.metrics());
                    tokio::time::sleep(delay).await;
                }
                Err(e) if is_retryable(&e) => {
                    return Err(SinkError::GaveUp {
                        retries: attempt,
                        written: report.written,
                        last: Box::new(e),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request. Per-point answers are `Ok`, even with OpenTSDB's 400.
    async fn post(&self, body: &Bytes) -> Result<Answer, SinkError> {
        let transport = |source| SinkError::Transport {
            url: self.endpoint.clone(),
            source,
        };
        let mut req = self
            .client
            .post(&self.endpoint)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone());
        if self.cfg.gzip {
            req = req.header(CONTENT_ENCODING, "gzip");
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let answer = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            // OpenTSDB: 200 with details; VictoriaMetrics: 204, empty.
            return Ok(match serde_json::from_slice::<Details>(&answer) {
                Ok(details) => Answer::Details(details),
                Err(_) => Answer::All,
            });
        }
        if status == StatusCode::BAD_REQUEST
            && let Ok(details) = serde_json::from_slice::<Details>(&answer)
        {
            // OpenTSDB: some points failed, the rest are stored.
            return Ok(Answer::Details(details));
        }
        let end = answer.len().min(MAX_ERROR_BODY);
        Err(SinkError::Status {
            url: self.endpoint.clone(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&answer[..end])
                .trim_end()
                .to_owned(),
        })
    }
}

/// Whether a failed request is worth repeating.
fn is_retryable(e: &SinkError) -> bool {
    match e {
        SinkError::Transport { source, .. } => !source.is_builder(),
        SinkError::Status { status, .. } => {
            *status >= 500
                || *status == StatusCode::REQUEST_TIMEOUT
                || *status == StatusCode::TOO_MANY_REQUESTS
        }
        _ => false,
    }
}

/// Adds an OpenTSDB `?details` answer for `batch` to `report`.
fn account_details(batch: &[&Point], details: Details, report: &mut WriteReport) {
    report.written += details.success;
    let failed = details.errors.len();
    for DetailError { datapoint, error } in details.errors {
        match serde_json::from_value::<EchoedPoint>(datapoint) {
            Ok(echo) => report.refused.push((original(batch, echo), error)),
            Err(e) => {
                warn!(error = %e, reason = %error, "OpenTSDB refused a point it echoed unreadably.")
            }
        }
    }
    if details.success + failed != batch.len() || details.failed != failed {
        warn!(
            batch = batch.len(),
            success = details.success,
            failed = details.failed,
            errors = failed,
            "OpenTSDB's answer does not account for every point of the batch."
        );
    }
    debug!(
        points = batch.len(),
        success = details.success,
        failed,
        "Wrote batch to OpenTSDB."
    );
}

/// The batch's point OpenTSDB echoed, or the echo itself if none matches.
fn original(batch: &[&Point], echo: EchoedPoint) -> Point {
    if let Some(p) = batch
        .iter()
        .find(|p| *p.metric == echo.metric && p.timestamp == echo.timestamp && p.tags == echo.tags)
    {
        return (*p).clone();
    }
    let value = match &echo.value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    Point {
        metric: echo.metric.into(),
        timestamp: echo.timestamp,
        value: value.unwrap_or(f64::NAN),
        tags: echo.tags,
    }
}

/// Gzips `json` at the fastest level.
fn gzip(json: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    // Compressing into a Vec cannot fail: the Vec is the only writer.
    match enc.write_all(json).and_then(|()| enc.finish()) {
        Ok(out) => out,
        Err(e) => unreachable!("gzip into a Vec failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::sync::{Arc, Mutex};

    use rand::SeedableRng as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    use super::super::tests::point;
    use super::*;

    #[test]
    fn backoff_cap_doubles_from_base_up_to_max() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(10_000));
        let caps: Vec<u64> = (0..10)
            .map(|n| backoff_cap(n, base, max).as_millis() as u64)
            .collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn backoff_cap_saturates_instead_of_overflowing() {
        let max = Duration::from_secs(30);
        for n in [31, 32, 63, 64, u32::MAX] {
            assert_eq!(
                backoff_cap(n, Duration::from_millis(100), max),
                max,
                "attempt {n}"
            );
        }
        assert_eq!(
            backoff_cap(u32::MAX, Duration::MAX, Duration::MAX),
            Duration::MAX
        );
        assert_eq!(backoff_cap(5, Duration::ZERO, max), Duration::ZERO);
    }

    #[test]
    fn full_jitter_stays_within_the_cap_and_spreads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cap = Duration::from_millis(400);
        let delays: Vec<Duration> = (0..1000).map(|_| full_jitter(cap, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= cap));
        assert!(delays.iter().any(|d| *d < cap / 4));
        assert!(delays.iter().any(|d| *d > cap * 3 / 4));
        assert_eq!(full_jitter(Duration::ZERO, &mut rng), Duration::ZERO);
    }

    #[test]
    fn default_backoff_gives_up_within_a_bounded_time() {
        let cfg = OpenTsdbConfig::new("http://x");
        let total: Duration = (0..cfg.max_retries)
            .map(|n| {
                backoff_cap(
                    n,
                    Duration::from_millis(cfg.retry_base_ms),
                    Duration::from_millis(cfg.retry_max_ms),
                )
            })
            .sum();
        assert_eq!(
            total,
            Duration::from_millis(100 + 200 + 400 + 800 + 1600 + 3200 + 6400 + 10_000)
        );
    }

    /// One request as the fake server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        target: String,
        headers: Vec<(String, String)>,
        /// The body, gunzipped if it was gzipped.
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn points(&self) -> Vec<Point> {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    /// The next request on a connection, or `None` once it is closed.
    async fn read_request(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Seen> {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        let target = line.split(' ').nth(1).unwrap_or("").to_owned();
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        let mut seen = Seen {
            target,
            headers,
            body,
        };
        if seen.header("content-encoding") == Some("gzip") {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&seen.body[..])
                .read_to_end(&mut plain)
                .unwrap();
            seen.body = plain;
        }
        Some(seen)
    }

    /// A fake OpenTSDB: answers requests with `answers` in order, then 204.
    async fn fake_server(answers: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let (log, answers) = (log.clone(), answers.clone());
                tokio::spawn(async move {
                    let (r, mut w) = conn.into_split();
                    let mut r = BufReader::new(r);
                    while let Some(seen) = read_request(&mut r).await {
                        log.lock().unwrap().push(seen);
                        let (status, answer) = answers.lock().unwrap().next().unwrap_or((204, ""));
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        w.write_all(resp.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (url, seen)
    }

    fn fast_cfg(url: &str) -> OpenTsdbConfig {
        OpenTsdbConfig {
            retry_base_ms: 1,
            retry_max_ms: 5,
            max_retries: 3,
            ..OpenTsdbConfig::new(url)
        }
    }

    fn points(n: usize) -> Vec<Point> {
        (0..n)
            .map(|i| point("m", 1_735_689_600 + i as u64, i as f64, &[("host", "a")]))
            .collect()
    }

    #[tokio::test]
    async fn batches_gzipped_json_to_api_put_details() {
        let (url, seen) = fake_server(vec![]).await;
        let sink = OpenTsdbSink::new(OpenTsdbConfig {
            batch_size: 2,
            ..fast_cfg(&format!("{url}/"))
        })
        .unwrap();
        let pts = points(5);
        let report = sink.write(&pts).await.unwrap();
        assert_eq!(
            report,
            WriteReport {
                written: 5,
                refused: vec![],
                retries: 0
            }
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        for s in &seen {
            assert_eq!(s.target, "/api/put?details");
            assert_eq!(s.header("content-encoding"), Some("gzip"));
            assert_eq!(s.header("content-type"), Some("application/json"));
        }
        assert_eq!(in_time_order(&seen), pts);
    }

    /// What `seen` carried, by timestamp: batches in flight together may
    /// arrive in either order.
    fn in_time_order(seen: &[Seen]) -> Vec<Point> {
        let mut sent: Vec<Point> = seen.iter().flat_map(Seen::points).collect();
        sent.sort_by_key(|p| p.timestamp);
        sent
    }

    #[tokio::test]
    async fn without_gzip_sends_plain_json() {
        let (url, seen) = fake_server(vec![]).await;
        let sink = OpenTsdbSink::new(OpenTsdbConfig {
            gzip: false,
            batch_size: 3,
            ..fast_cfg(&url)
        })
        .unwrap();
        let pts = points(7);
        assert_eq!(sink.write(&pts).await.unwrap().written, 7);
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().all(|s| s.header("content-encoding").is_none()));
        assert_eq!(in_time_order(&seen), pts);
    }

    /// A server that holds every request until `together` are open at
    /// once (or a second passed), then answers 204; returns the most it
    /// saw open.
    async fn gate_server(together: usize) -> (String, Arc<Mutex<(usize, usize)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let open = Arc::new(Mutex::new((0usize, 0usize)));
        let gate = Arc::new(tokio::sync::Notify::new());
        let state = open.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let (open, gate) = (state.clone(), gate.clone());
                tokio::spawn(async move {
                    let (r, mut w) = conn.into_split();
                    let mut r = BufReader::new(r);
                    while read_request(&mut r).await.is_some() {
                        let reached = {
                            let mut o = open.lock().unwrap();
                            o.0 += 1;
                            o.1 = o.1.max(o.0);
                            o.0 >= together
                        };
                        if reached {
                            gate.notify_waiters();
                        } else {
                            // A safety net, not a measurement: a sink that
                            // sends one request at a time is answered too.
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), gate.notified()).await;
                        }
                        open.lock().unwrap().0 -= 1;
                        w.write_all(b"HTTP/1.1 204 X\r\nContent-Length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (url, open)
    }

    #[tokio::test]
    async fn a_write_keeps_requests_in_flight_up_to_its_limit() {
        for limit in [1, 2, 3] {
            let (url, open) = gate_server(limit).await;
            let sink = OpenTsdbSink::new(OpenTsdbConfig {
                batch_size: 2,
                requests_in_flight: limit,
                ..fast_cfg(&url)
            })
            .unwrap();
            // Six batches.
            let report = sink.write(&points(12)).await.unwrap();
            assert_eq!(report.written, 12);
            assert_eq!(open.lock().unwrap().1, limit, "most requests open at once");
        }
    }

    #[tokio::test]
    async fn retries_5xx_then_succeeds() {
        let (url, seen) = fake_server(vec![(503, "busy"), (500, "")]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        let report = sink.write(&points(3)).await.unwrap();
        assert_eq!(
            report,
            WriteReport {
                written: 3,
                refused: vec![],
                retries: 2
            }
        );
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries() {
        let (url, seen) =
            fake_server(vec![(502, "a"), (502, "b"), (502, "c"), (502, "last")]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        let err = sink.write(&points(1)).await.unwrap_err();
        let SinkError::GaveUp {
            retries,
            written,
            last,
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!((retries, written), (3, 0));
        assert!(
            matches!(*last, SinkError::Status { status: 502, ref body, .. } if body == "last"),
            "{last:?}"
        );
        assert_eq!(seen.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn plain_4xx_is_not_retried() {
        let (url, seen) = fake_server(vec![(400, "cannot parse HTTP OpenTSDB json\n")]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        let err = sink.write(&points(2)).await.unwrap_err();
        assert!(
            matches!(err, SinkError::Status { status: 400, ref body, .. } if body == "cannot parse HTTP OpenTSDB json"),
            "{err:?}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn opentsdb_details_refusals_are_reported_not_retried() {
        let details = r#"{"success":2,"failed":1,"errors":[{"datapoint":{"metric":"m","timestamp":1735689601,"value":"1","tags":{"host":"a"}},"error":"Unable to parse value to a number"}]}"#;
        let (url, seen) = fake_server(vec![(400, details)]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        let pts = points(3);
        let report = sink.write(&pts).await.unwrap();
        assert_eq!(report.written, 2);
        assert_eq!(report.retries, 0);
        assert_eq!(
            report.refused,
            vec![(
                pts[1].clone(),
                "Unable to parse value to a number".to_owned()
            )]
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn opentsdb_200_details_counts_successes() {
        let (url, _) = fake_server(vec![(200, r#"{"success":3,"failed":0,"errors":[]}"#)]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        let report = sink.write(&points(3)).await.unwrap();
        assert_eq!(
            report,
            WriteReport {
                written: 3,
                refused: vec![],
                retries: 0
            }
        );
    }

    #[tokio::test]
    async fn unstorable_points_are_refused_before_sending() {
        let (url, seen) = fake_server(vec![]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        let mut pts = points(2);
        pts.insert(1, point("", 5, 1.0, &[]));
        pts.push(point("m", 6, f64::NAN, &[]));
        let report = sink.write(&pts).await.unwrap();
        assert_eq!(report.written, 2);
        // NaN != NaN: compare what identifies the points.
        let refused: Vec<(&str, u64)> = report
            .refused
            .iter()
            .map(|(p, _)| (&*p.metric, p.timestamp))
            .collect();
        assert_eq!(refused, [("", 5), ("m", 6)]);
        assert!(report.refused[1].0.value.is_nan());
        assert!(
            report.refused[1].1.contains("finite"),
            "{}",
            report.refused[1].1
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].points(), [pts[0].clone(), pts[2].clone()]);
    }

    #[tokio::test]
    async fn nothing_to_write_sends_nothing() {
        let (url, seen) = fake_server(vec![]).await;
        let sink = OpenTsdbSink::new(fast_cfg(&url)).unwrap();
        assert_eq!(sink.write(&[]).await.unwrap(), WriteReport::default());
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn config_rejects_https_and_queries() {
        for url in ["https://x:4242", "http://x:4242/?a=1", "x:4242", ""] {
            let err = OpenTsdbSink::new(OpenTsdbConfig::new(url)).unwrap_err();
            assert!(matches!(err, SinkError::Config(_)), "{url}: {err:?}");
        }
        let sink = OpenTsdbSink::new(OpenTsdbConfig::new("http://x:4242/prefix/")).unwrap();
        assert_eq!(sink.endpoint, "http://x:4242/prefix/api/put?details");
    }
}
