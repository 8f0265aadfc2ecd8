//! Support for wagg's end-to-end tests (the `all` test binary).
//!
//! `tests/setup.sh` installs and starts what these need on a fresh machine;
//! the helpers here panic with "run tests/setup.sh" when something is
//! missing, rather than letting a test fail obscurely.
//!
//! - [`VictoriaMetrics`]: a private VictoriaMetrics per test, on free
//!   loopback ports, as the OpenTSDB-compatible sink; read back with
//!   [`VictoriaMetrics::export`];
//! - [`require_victoria_metrics`], [`require_rabbitmq`]: the service checks.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Where Debian's `victoria-metrics` package puts the server.
pub const VICTORIA_METRICS_BIN: &str = "/usr/bin/victoria-metrics";

/// RabbitMQ's AMQP address as `tests/setup.sh` leaves it.
pub const RABBITMQ_ADDR: &str = "127.0.0.1:5672";

/// How long a VictoriaMetrics gets to become healthy (it takes ~0.2 s).
const VM_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Panics with a clear message unless VictoriaMetrics is installed.
///
/// # Panics
///
/// If [`VICTORIA_METRICS_BIN`] is missing.
pub fn require_victoria_metrics() {
    assert!(
        Path::new(VICTORIA_METRICS_BIN).is_file(),
        "{VICTORIA_METRICS_BIN} is missing: run `bash tests/setup.sh` (as root) first"
    );
}

/// Panics with a clear message unless RabbitMQ accepts connections on
/// [`RABBITMQ_ADDR`].
///
/// # Panics
///
/// If nothing accepts a TCP connection there within a second.
pub fn require_rabbitmq() {
    let addr: SocketAddr = RABBITMQ_ADDR
        .parse()
        .expect("RABBITMQ_ADDR is a socket address");
    if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        panic!(
            "RabbitMQ is not reachable at {addr} ({e}): run `bash tests/setup.sh` (as root) first"
        );
    }
}

/// A time series read back from VictoriaMetrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The tags (labels), without `__name__`.
    pub tags: BTreeMap<String, String>,
    /// `(unix seconds, value)`, sorted by time.
    pub points: Vec<(u64, f64)>,
}

/// A VictoriaMetrics server of its own for one test: free loopback ports, a
/// temporary data directory, a 100-year retention (so points from years ago
/// are kept), no query latency offset (so fresh points are visible at once).
/// Killed on drop.
#[derive(Debug)]
pub struct VictoriaMetrics {
    child: Child,
    http: SocketAddr,
    opentsdb: SocketAddr,
    client: reqwest::Client,
    /// The data directory and the log; removed after the child is killed.
    dir: tempfile::TempDir,
}

/// One line of `/api/v1/export`.
#[derive(Deserialize)]
struct ExportLine {
    metric: BTreeMap<String, String>,
    values: Vec<f64>,
    timestamps: Vec<i64>,
}

impl VictoriaMetrics {
    /// Starts a server and waits until it is healthy.
    ///
    /// # Panics
    ///
    /// If VictoriaMetrics is not installed, or does not become healthy
    /// within 15 s (the panic shows its log).
    pub async fn start() -> VictoriaMetrics {
        require_victoria_metrics();
        // Another process may grab a port between our probe and the
        // server's bind: start again on fresh ports then.
        let mut last_log = String::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(vm) => return vm,
                Err(log) => last_log = log,
            }
        }
        panic!("VictoriaMetrics did not start; its log:\n{last_log}");
    }

    /// One start; `Err` holds the server's log.
    async fn try_start() -> Result<VictoriaMetrics, String> {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let (http, opentsdb) = (free_port(), free_port());
        let child = Self::spawn(dir.path(), http, opentsdb);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("cannot build an HTTP client");
        let mut vm = VictoriaMetrics {
            child,
            http,
            opentsdb,
            client,
            dir,
        };
        vm.wait_healthy().await?;
        Ok(vm)
    }

    /// Stops the server gracefully (SIGTERM: it writes what it accepted to
    /// disk first) and waits for it to exit. For sink-outage tests; see
    /// [`Self::restart`].
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent.
    pub fn stop(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
        let _ = self.child.wait();
    }

    /// Starts the server again on the same ports and data directory, after
    /// [`Self::stop`], and waits until it is healthy.
    ///
    /// # Panics
    ///
    /// If it does not become healthy (the panic shows its log).
    pub async fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.http, self.opentsdb);
        if let Err(log) = self.wait_healthy().await {
            panic!("VictoriaMetrics did not restart; its log:\n{log}");
        }
    }

    fn spawn(dir: &Path, http: SocketAddr, opentsdb: SocketAddr) -> Child {
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("vm.log"))
            .expect("cannot create the VictoriaMetrics log");
        Command::new(VICTORIA_METRICS_BIN)
            .arg(format!("-storageDataPath={}", dir.join("data").display()))
            .arg(format!("-httpListenAddr={http}"))
            .arg(format!("-opentsdbHTTPListenAddr={opentsdb}"))
            .arg("-retentionPeriod=100y")
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-loggerLevel=ERROR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {VICTORIA_METRICS_BIN}: {e}"))
    }

    /// Waits until the server answers `/health`; `Err` holds its log.
    async fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + VM_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exited: {status})\n{}", self.log()));
            }
            if self.healthy().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "(not healthy after {VM_START_TIMEOUT:?})\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn healthy(&self) -> bool {
        let url = format!("{}/health", self.http_url());
        matches!(self.client.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// What the server logged (errors only).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vm.log")).unwrap_or_default()
    }

    /// The base URL of its OpenTSDB HTTP API (for `OpenTsdbConfig::url`).
    pub fn opentsdb_url(&self) -> String {
        format!("http://{}", self.opentsdb)
    }

    /// The base URL of its main HTTP API (queries, export, health).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Makes every point accepted so far searchable
    /// (`/internal/force_flush`). [`Self::export`] calls it.
    ///
    /// # Panics
    ///
    /// If the request fails.
    pub async fn force_flush(&self) {
        let url = format!("{}/internal/force_flush", self.http_url());
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .expect("force_flush request failed");
        assert!(
            resp.status().is_success(),
            "force_flush answered {}",
            resp.status()
        );
    }

    /// Every series of `metric`, with its points, sorted by tags and time.
    /// Flushes first.
    ///
    /// # Panics
    ///
    /// If the request fails or the answer is not what VictoriaMetrics sends.
    pub async fn export(&self, metric: &str) -> Vec<Series> {
        self.force_flush().await;
        let selector = format!(
            "{{__name__=\"{}\"}}",
            metric.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let resp = self
            .client
            .get(format!("{}/api/v1/export", self.http_url()))
            // `end` defaults to now: a point a source dated ahead (inside
            // wagg's `max_future_secs`) would not be read back.
            .query(&[("match[]", selector.as_str()), ("end", "9999999999")])
            .send()
            .await
            .expect("export request failed");
        let status = resp.status();
        let body = resp.text().await.expect("export answer unreadable");
        assert!(status.is_success(), "export answered {status}: {body}");
        // One line per series and block: a series may span several lines.
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(u64, f64)>> = BTreeMap::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let ExportLine {
                mut metric,
                values,
                timestamps,
            } = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("bad export line ({e}): {line}"));
            metric.remove("__name__");
            let points = series.entry(metric).or_default();
            for (ts_ms, v) in timestamps.into_iter().zip(values) {
                let ts =
                    u64::try_from(ts_ms.div_euclid(1000)).expect("export timestamp before 1970");
                points.push((ts, v));
            }
        }
        series
            .into_iter()
            .map(|(tags, mut points)| {
                points.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
                Series { tags, points }
            })
            .collect()
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
///
/// # Panics
///
/// If no loopback port can be bound.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind a loopback port")
}
