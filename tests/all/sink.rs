//! The sinks against a real VictoriaMetrics (OpenTSDB HTTP API) and a real
//! file.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wagg::sink::{FileSinkConfig, OpenTsdbConfig, Point, Sink, SinkConfig, SinkError};
use wagg_tests::{Series, VictoriaMetrics, free_port};

/// 2025-01-01T00:00:00Z: far enough back that a default retention (one
/// month) would drop it.
const T0: u64 = 1_735_689_600;

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `per_set` points, a minute apart, for each of six tag sets. Values have
/// few significant digits: VictoriaMetrics stores floats as decimals.
fn points(metric: &str, per_set: usize) -> Vec<Point> {
    let mut out = Vec::new();
    for (set, customer) in ["customer-1", "customer-2", "us-east/3"].iter().enumerate() {
        for (k, rcode) in ["NOERROR", "NXDOMAIN"].iter().enumerate() {
            for i in 0..per_set {
                out.push(Point {
                    metric: metric.into(),
                    timestamp: T0 + 60 * i as u64,
                    value: i as f64 * 0.125 - 7.5 * (set * 2 + k) as f64 + 12_345.678,
                    tags: tags(&[
                        ("customer", customer),
                        ("rcode", rcode),
                        ("host", "ns1.example"),
                    ])
                    .into(),
                });
            }
        }
    }
    out
}

/// What VictoriaMetrics should hold after storing `points` of one metric.
fn expected_series(points: &[Point]) -> Vec<Series> {
    let mut by_tags: BTreeMap<BTreeMap<String, String>, Vec<(u64, f64)>> = BTreeMap::new();
    for p in points {
        by_tags
            .entry(p.tags.to_map())
            .or_default()
            .push((p.timestamp, p.value));
    }
    by_tags
        .into_iter()
        .map(|(tags, mut points)| {
            points.sort_by_key(|p| p.0);
            Series { tags, points }
        })
        .collect()
}

fn opentsdb_sink(vm: &VictoriaMetrics, gzip: bool) -> Sink {
    Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig {
        batch_size: 700,
        gzip,
        ..OpenTsdbConfig::new(vm.opentsdb_url())
    }))
    .expect("sink config is valid")
}

#[tokio::test]
async fn opentsdb_sink_round_trips_through_victoria_metrics() {
    let vm = VictoriaMetrics::start().await;
    for (gzip, metric) in [(true, "wagg.e2e.gzip"), (false, "wagg.e2e.plain")] {
        let sink = opentsdb_sink(&vm, gzip);
        let pts = points(metric, 500);
        let report = sink.write(&pts).await.expect("write succeeds");
        assert_eq!(report.written, 3000, "gzip={gzip}");
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(report.retries, 0);

        let got = vm.export(metric).await;
        assert_eq!(got.len(), 6, "gzip={gzip}: {got:?}");
        assert_eq!(got, expected_series(&pts), "gzip={gzip}");
    }
    assert_eq!(vm.log(), "", "VictoriaMetrics logged errors");
}

#[tokio::test]
async fn opentsdb_sink_gives_up_when_nothing_listens() {
    let url = format!("http://{}", free_port());
    let sink = Sink::from_config(&SinkConfig::OpenTsdb(OpenTsdbConfig {
        max_retries: 3,
        retry_base_ms: 1,
        retry_max_ms: 10,
        timeout_ms: 2000,
        ..OpenTsdbConfig::new(url)
    }))
    .unwrap();
    let started = std::time::Instant::now();
    let err = sink
        .write(&points("wagg.e2e.nowhere", 2))
        .await
        .unwrap_err();
    match err {
        SinkError::GaveUp {
            retries,
            written,
            ref last,
        } => {
            assert_eq!((retries, written), (3, 0));
            assert!(matches!(**last, SinkError::Transport { .. }), "{last:?}");
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// VictoriaMetrics answers 204 for a whole batch and ignores `?details`, so
/// it never refuses a point individually: unstorable points are refused by
/// the sink before sending, and the rest are written.
#[tokio::test]
async fn unstorable_points_are_refused_without_failing_the_others() {
    let vm = VictoriaMetrics::start().await;
    let sink = opentsdb_sink(&vm, true);
    let good = points("wagg.e2e.mixed", 3);
    let mut all = good.clone();
    let mut bad_metric = good[0].clone();
    bad_metric.metric = "".into();
    let mut bad_value = good[1].clone();
    bad_value.value = f64::NAN;
    all.insert(2, bad_metric.clone());
    all.push(bad_value.clone());

    let report = sink.write(&all).await.unwrap();
    assert_eq!(report.written, good.len());
    assert_eq!(report.refused.len(), 2);
    assert_eq!(report.refused[0].0, bad_metric);
    assert!(
        report.refused[0].1.contains("metric"),
        "{}",
        report.refused[0].1
    );
    assert!(report.refused[1].0.value.is_nan());
    assert_eq!(vm.export("wagg.e2e.mixed").await, expected_series(&good));
}

/// A fact the sink's docs rely on: VictoriaMetrics' 204 means "accepted",
/// not "stored". A point more than two days ahead is dropped with a log line.
#[tokio::test]
async fn victoria_metrics_drops_future_points_silently() {
    let vm = VictoriaMetrics::start().await;
    let sink = opentsdb_sink(&vm, true);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut pts = points("wagg.e2e.future", 1);
    pts[0].timestamp = now + 10 * 86_400;
    let report = sink.write(&pts).await.unwrap();
    assert_eq!((report.written, report.refused.len()), (6, 0));
    assert_eq!(
        vm.export("wagg.e2e.future").await,
        expected_series(&pts[1..])
    );
}

#[tokio::test]
async fn file_sink_writes_lines_that_parse_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("points.jsonl");
    let sink = Sink::from_config(&SinkConfig::File(FileSinkConfig { path: path.clone() })).unwrap();
    let first = points("wagg.e2e.file", 100);
    let second = points("wagg.e2e.file2", 5);
    assert_eq!(sink.write(&first).await.unwrap().written, first.len());
    assert_eq!(sink.write(&second).await.unwrap().written, second.len());

    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), first.len() + second.len());
    let back: Vec<Point> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let expected: Vec<Point> = first.into_iter().chain(second).collect();
    assert_eq!(back, expected);
}
