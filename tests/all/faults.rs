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
