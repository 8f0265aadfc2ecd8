//! Sinks: where flushed aggregates go.
//!
//! - [`Point`]: one data point, in OpenTSDB's `/api/put` JSON shape;
//! - [`Sink`]: writes points, built from the `[sink]` table of `wagg.toml`
//!   ([`SinkConfig`]), and reports what it achieved ([`WriteReport`]);
//! - [`opentsdb`]: POSTs batches to an OpenTSDB-compatible HTTP API
//!   (OpenTSDB, VictoriaMetrics), retrying with jittered backoff;
//! - [`file`](mod@file): appends JSON lines to a local file (the default of `wagg demo`);
//! - [`encode_json`] / [`encode_json_lines`]: the allocation-lean encoders
//!   both use.
//!
//! Points that no OpenTSDB server could store (an empty metric name, a
//! value that is not finite and so has no JSON form) are refused by the sink
//! itself, before any I/O, and reported in [`WriteReport::refused`] like the
//! points a server refuses.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod file;
pub mod opentsdb;
pub mod tags;

pub use file::{FileSink, FileSinkConfig};
pub use opentsdb::{OpenTsdbConfig, OpenTsdbSink};
pub use tags::{KeyLayout, Tags};
pub(crate) use tags::{TOUCH_RUN, touch_key};

/// One OpenTSDB data point; serializes exactly as OpenTSDB's `/api/put` JSON
/// object: `{"metric":"dns.qps","timestamp":1735689600,"value":1.5,"tags":{"host":"a"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The metric name, e.g. `dns.queries`. Must not be empty. Shared by
    /// every point a shard flushes.
    pub metric: Arc<str>,
    /// Unix time in seconds.
    pub timestamp: u64,
    /// The value. Must be finite: JSON has no NaN or infinity.
    pub value: f64,
    /// The tags (OpenTSDB's name for labels); sorted, so the encoding is
    /// deterministic.
    pub tags: Tags,
}

impl Point {
    /// Why no OpenTSDB-compatible server could store this point, or `None`
    /// if it is fine. Sinks refuse such points without sending them.
    pub fn invalid_reason(&self) -> Option<&'static str> {
        if self.metric.is_empty() {
            Some("empty metric name")
        } else if !self.value.is_finite() {
            Some("value is not finite (JSON has no NaN or infinity)")
        } else {
            None
        }
    }
}

/// What a write achieved.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteReport {
    /// Points the sink confirmed written (for VictoriaMetrics: accepted; it
    /// answers 204 for a whole batch and drops points it cannot store, such
    /// as timestamps more than two days ahead, with only a log line).
    pub written: usize,
    /// Points refused one by one, with the reason: by the sink itself (see
    /// [`Point::invalid_reason`]) or by the server (OpenTSDB's `?details`
    /// answer). They are not retried.
    pub refused: Vec<(Point, String)>,
    /// Requests repeated after a retryable failure, summed over all batches.
    pub retries: u32,
}

/// Why a write or a sink's construction failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The configuration cannot work (a bad URL, a zero batch size, ...).
    #[error("invalid sink configuration: {0}")]
    Config(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    /// The request failed without an HTTP answer: connection refused or
    /// reset, timeout, ... Retried.
    #[error("request to {url} failed")]
    Transport {
        /// The URL requested.
        url: String,
        /// What went wrong.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status (a 4xx that is not a
    /// per-point answer is not retried; 5xx, 408 and 429 are).
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// Every retry of one batch failed; `written` points from earlier batches
    /// of the same write were confirmed before it.
    #[error("gave up after {retries} retries ({written} points were written before)")]
    GaveUp {
        /// Retries made for the failing batch (the configured maximum).
        retries: u32,
        /// Points of this write confirmed before the failing batch.
        written: usize,
        /// The last failure.
        #[source]
        last: Box<SinkError>,
    },
    /// File I/O failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done, e.g. "cannot open".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The blocking file-writing task panicked or was cancelled.
    #[error("the file-writing task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// `[sink]` in `wagg.toml`: where flushed aggregates go, chosen by `kind`.
///
/// ```toml
/// [sink]
/// kind = "opentsdb"
/// url = "http://127.0.0.1:4242"
/// ```
///
/// ```toml
/// [sink]
/// kind = "file"
/// path = "/var/lib/wagg/points.jsonl"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// `kind = "opentsdb"`: an OpenTSDB-compatible HTTP API; see
    /// [`OpenTsdbConfig`].
    #[serde(rename = "opentsdb", alias = "open_tsdb")]
    OpenTsdb(OpenTsdbConfig),
    /// `kind = "file"`: JSON lines appended to a file; see [`FileSinkConfig`].
    File(FileSinkConfig),
}

impl SinkConfig {
    /// Checks what the sink would refuse at start, without opening
    /// anything (`wagg config check`).
    ///
    /// # Errors
    ///
    /// [`SinkError::Config`] naming the problem.
    pub fn validate(&self) -> Result<(), SinkError> {
        match self {
            SinkConfig::OpenTsdb(c) => c.validate(),
            SinkConfig::File(c) if c.path.as_os_str().is_empty() => {
                Err(SinkError::Config("file sink path is empty".into()))
            }
            SinkConfig::File(_) => Ok(()),
        }
    }
}

/// A configured sink.
#[derive(Debug)]
pub enum Sink {
    /// An OpenTSDB-compatible HTTP API.
    OpenTsdb(OpenTsdbSink),
    /// JSON lines in a local file.
    File(FileSink),
}

impl Sink {
    /// Builds the sink `cfg` describes. The file sink opens (creates) its
    /// file here; the OpenTSDB sink does not connect until the first write.
    ///
    /// # Errors
    ///
    /// [`SinkError::Config`] for a configuration that cannot work,
    /// [`SinkError::Client`] if the HTTP client cannot be built,
    /// [`SinkError::Io`] if the file cannot be opened for appending.
    pub fn from_config(cfg: &SinkConfig) -> Result<Sink, SinkError> {
        Ok(match cfg {
            SinkConfig::OpenTsdb(c) => Sink::OpenTsdb(OpenTsdbSink::new(c.clone())?),
            SinkConfig::File(c) => Sink::File(FileSink::open(c.clone())?),
        })
    }

    /// Writes all points (batched internally); returns only when every
    /// point is confirmed written or refused per point, or the retries are
    /// exhausted.
    ///
    /// # Errors
    ///
    /// [`SinkError::GaveUp`] when a batch still fails after the configured
    /// retries, [`SinkError::Status`] for an answer that must not be
    /// retried, [`SinkError::Io`] for a failed file write. Earlier batches
    /// of the same call may have been written.
    pub async fn write(&self, points: &[Point]) -> Result<WriteReport, SinkError> {
        match self {
            Sink::OpenTsdb(s) => s.write(points).await,
            Sink::File(s) => s.write(points).await,
        }
    }

    /// Reports what the sink does inside a write (retries) to `metrics`;
    /// the pipeline calls it at its start. See [`OpenTsdbSink::set_metrics`].
    pub fn set_metrics(&self, metrics: std::sync::Arc<crate::telemetry::Metrics>) {
        match self {
            Sink::OpenTsdb(s) => {
                s.set_metrics(metrics);
            }
            // Writes to a file are not retried.
            Sink::File(_) => {}
        }
    }
}

/// Appends `points` to `out` as one JSON array in OpenTSDB's `/api/put`
/// format, without allocating beyond `out`'s growth. `out` is not cleared.
///
/// A non-finite value is written as `null` (JSON has no NaN), which servers
/// refuse: the sinks filter those points out first ([`Point::invalid_reason`]).
pub fn encode_json(points: &[Point], out: &mut Vec<u8>) {
    encode_json_iter(points.iter(), out);
}

/// Appends `points` to `out` as JSON lines: one `/api/put` object and a
/// `\n` per point. `out` is not cleared. Non-finite values as in
/// [`encode_json`].
pub fn encode_json_lines(points: &[Point], out: &mut Vec<u8>) {
    for run in points.chunks(TOUCH_RUN) {
        run.iter().for_each(|p| p.tags.touch());
        for p in run {
            encode_point(p, out);
            out.push(b'\n');
        }
    }
}

/// [`encode_json`] over borrowed points, so a batch needs no copies.
pub(crate) fn encode_json_iter<'a>(points: impl IntoIterator<Item = &'a Point>, out: &mut Vec<u8>) {
    out.push(b'[');
    let mut points = points.into_iter();
    let mut run = Vec::with_capacity(TOUCH_RUN);
    let mut first = true;
    loop {
        // A run's keys into cache together, then its points encoded: see
        // `touch_key`.
        run.clear();
        run.extend(points.by_ref().take(TOUCH_RUN));
        if run.is_empty() {
            break;
        }
        run.iter().for_each(|p| p.tags.touch());
        for p in &run {
            if !first {
                out.push(b',');
            }
            first = false;
            encode_point(p, out);
        }
    }
    out.push(b']');
}

/// The point as serde_json writes its `Serialize` form, byte for byte (a
/// test holds them equal), written directly: through serde, reading tags
/// from the key cost ~50 % more per point than the owned maps they replaced.
fn encode_point(p: &Point, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"metric\":");
    push_json_str(&p.metric, out);
    out.extend_from_slice(b",\"timestamp\":");
    push_json(&p.timestamp, out);
    out.extend_from_slice(b",\"value\":");
    push_json(&p.value, out);
    out.extend_from_slice(b",\"tags\":");
    p.tags.write_json(out);
    out.push(b'}');
}

/// `s` as a JSON string. serde_json escapes `"`, `\` and bytes below 0x20,
/// nothing else; a string without them (every router-made tag value) is
/// copied as it is.
fn push_json_str(s: &str, out: &mut Vec<u8>) {
    if json_plain(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        push_json(s, out);
    }
}

/// Whether serde_json writes `bytes` (UTF-8) as they are between quotes.
fn json_plain(bytes: &[u8]) -> bool {
    // Not short-circuiting, so the loop can be vectorised.
    bytes.iter().fold(true, |plain, &b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    })
}

fn push_json<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing a number or a string into a Vec cannot fail.
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        unreachable!("serializing into a Vec failed: {e}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn point(metric: &str, timestamp: u64, value: f64, tags: &[(&str, &str)]) -> Point {
        Point {
            metric: metric.into(),
            timestamp,
            value,
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn encodes_opentsdb_put_objects_exactly() {
        let mut out = Vec::new();
        encode_json(
            &[
                point(
                    "dns.qps",
                    1_735_689_600,
                    1.5,
                    &[("zone", "b"), ("host", "a")],
                ),
                point("dns.q\"x", 1, -2.0, &[]),
            ],
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"[{"metric":"dns.qps","timestamp":1735689600,"value":1.5,"tags":{"host":"a","zone":"b"}},{"metric":"dns.q\"x","timestamp":1,"value":-2.0,"tags":{}}]"#
        );
    }

    #[test]
    fn the_encoding_is_serde_jsons_byte_for_byte() {
        let tricky = [
            "plain",
            "",
            "quote\"",
            "back\\slash",
            "nl\n tab\t nul\0 esc\u{1b}",
            "del\u{7f} ü €",
            "/slash",
        ];
        for (i, s) in tricky.iter().enumerate() {
            for value in [0.1, -0.0, 1e300, 5e-324, 12345.678, f64::NAN, f64::INFINITY] {
                let p = point(s, i as u64 * 1_000_000_007, value, &[(s, s), ("k", "v")]);
                let mut ours = Vec::new();
                encode_point(&p, &mut ours);
                let theirs = serde_json::to_vec(&p).unwrap();
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(theirs).unwrap()
                );
            }
        }
    }

    #[test]
    fn empty_batch_is_an_empty_array_and_out_is_appended_to() {
        let mut out = b"x".to_vec();
        encode_json(&[], &mut out);
        assert_eq!(out, b"x[]");
    }

    #[test]
    fn json_and_json_lines_round_trip() {
        let points = vec![
            point("a", 10, 0.1, &[("t", "ü\n\\")]),
            point("b", 20, 1e300, &[("k", "v"), ("k2", "")]),
        ];
        let mut out = Vec::new();
        encode_json(&points, &mut out);
        let back: Vec<Point> = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, points);

        out.clear();
        encode_json_lines(&points, &mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.ends_with('\n'));
        let back: Vec<Point> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, points);
    }

    #[test]
    fn invalid_points_are_named() {
        assert_eq!(point("a", 1, 1.0, &[]).invalid_reason(), None);
        assert!(
            point("", 1, 1.0, &[])
                .invalid_reason()
                .unwrap()
                .contains("metric")
        );
        assert!(
            point("a", 1, f64::NAN, &[])
                .invalid_reason()
                .unwrap()
                .contains("finite")
        );
        assert!(point("a", 1, f64::INFINITY, &[]).invalid_reason().is_some());
    }

    #[derive(Debug, Deserialize)]
    struct WaggToml {
        sink: SinkConfig,
    }

    #[test]
    fn sink_config_parses_both_kinds_with_defaults() {
        let cfg: WaggToml =
            toml::from_str("[sink]\nkind = \"opentsdb\"\nurl = \"http://127.0.0.1:4242\"\n")
                .unwrap();
        let SinkConfig::OpenTsdb(c) = cfg.sink else {
            panic!("{cfg:?}")
        };
        assert_eq!(c.url, "http://127.0.0.1:4242");
        assert_eq!(c.batch_size, 5000);
        assert!(c.gzip);
        assert_eq!(c.max_retries, 8);

        let cfg: WaggToml =
            toml::from_str("[sink]\nkind = \"file\"\npath = \"/tmp/p.jsonl\"\n").unwrap();
        assert_eq!(
            cfg.sink,
            SinkConfig::File(FileSinkConfig {
                path: "/tmp/p.jsonl".into()
            })
        );
    }

    #[test]
    fn sink_config_error_names_the_bad_field() {
        let err = toml::from_str::<WaggToml>(
            "[sink]\nkind = \"opentsdb\"\nurl = \"http://x\"\nbatchsize = 10\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("batchsize"), "{err}");
        let err =
            toml::from_str::<WaggToml>("[sink]\nkind = \"file\"\npath = \"p\"\ngzip = true\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("gzip"), "{err}");
        let err = toml::from_str::<WaggToml>("[sink]\nkind = \"kafka\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka"), "{err}");
    }

    #[test]
    fn from_config_rejects_unusable_settings() {
        let mut c = OpenTsdbConfig::new("http://127.0.0.1:4242");
        c.batch_size = 0;
        let err = Sink::from_config(&SinkConfig::OpenTsdb(c)).unwrap_err();
        assert!(
            matches!(err, SinkError::Config(ref m) if m.contains("batch_size")),
            "{err}"
        );
        let err = Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig::new("127.0.0.1:4242")))
            .unwrap_err();
        assert!(
            matches!(err, SinkError::Config(ref m) if m.contains("url")),
            "{err}"
        );
    }
}
