//! Bad input: the message decoder and module validation under arbitrary
//! and hostile bytes, and a corpus of hostile messages through a real
//! pipeline (RabbitMQ in, VictoriaMetrics out).
//!
//! The fuzz targets are proptests: cargo-fuzz needs a nightly toolchain,
//! which CI does not have. The default run is short; a longer one:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test -p wagg-tests bad_input::decoder
//! PROPTEST_CASES=1000 cargo test -p wagg-tests bad_input::module   # ~1 s a case
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Value, json};
use wagg::runtime::{Runtime, RuntimeLimits};
use wagg::source::amqp::AmqpPublisher;
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg::source::json::{DecodeError, DecodeLimits, Decoder as _, JsonDecoder};
use wagg_tests::VictoriaMetrics;

use crate::amqp::{KEY, Names, ready};
use crate::faults::metric;
use crate::harness::{Running, Setup, WIDTH, compare, expected, read_back};

const T0: u64 = 1_764_000_000;

/// Cases per property: `PROPTEST_CASES` if set, else `default`.
pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A runner configuration: [`cases`], no regression files.
pub(crate) fn proptest_config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The reason codes the README documents; a refusal must carry one.
const CODES: [&str; 3] = ["bad_json", "bad_field", "too_large"];

/// Checks one decoder outcome: a refusal names a documented code and a
/// reason; an acceptance satisfies every documented limit.
fn check_outcome(limits: &DecodeLimits, body: &[u8], outcome: Result<(), DecodeError>) {
    match outcome {
        Err(e) => {
            assert!(CODES.contains(&e.code()), "unknown code {}", e.code());
            assert!(!e.to_string().is_empty());
            if body.len() > limits.max_message_bytes {
                assert_eq!(e.code(), "too_large");
            }
        }
        Ok(()) => {
            let msg = JsonDecoder::new(*limits).decode(body).unwrap();
            assert!(body.len() <= limits.max_message_bytes);
            assert!((limits.min_time..=limits.max_time).contains(&msg.time));
            assert!(msg.metrics.len() <= limits.max_metrics);
            for s in [&msg.pop, &msg.host] {
                assert!((1..=limits.max_field_bytes).contains(&s.len()));
            }
            for m in &msg.metrics {
                assert!(m.count.is_finite() && m.count >= 0.0, "{}", m.count);
                assert!(m.count <= limits.max_count as f64, "{}", m.count);
                for s in [&m.zone, &m.record, &m.rtype] {
                    assert!((1..=limits.max_field_bytes).contains(&s.len()));
                }
            }
        }
    }
}

fn decode_checked(limits: &DecodeLimits, body: &[u8]) {
    let outcome = JsonDecoder::new(*limits).decode(body).map(drop);
    check_outcome(limits, body, outcome);
}

/// Small limits, so that the mutations reach every one of them.
fn small_limits() -> DecodeLimits {
    DecodeLimits {
        max_message_bytes: 2048,
        max_metrics: 4,
        max_field_bytes: 16,
        ..DecodeLimits::default()
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z.-]{1,12}",
        "[a-z]{0,20}",
        any::<String>().prop_map(|s| s.chars().take(20).collect()),
    ]
}

/// A JSON value of any shape, for replacing a field.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid message (under [`small_limits`]).
fn valid_message() -> impl Strategy<Value = Value> {
    // Counts up to and including `max_count` (2^53), fractional ones too.
    let count = prop_oneof![
        (0u32..1_000_000).prop_map(|c| f64::from(c) / 4.0),
        ((1u64 << 53) - 1000..=1u64 << 53).prop_map(|c| c as f64),
    ];
    let metric = (any::<u64>(), text(), text(), text(), count).prop_map(
        |(customer, zone, record, rtype, count)| {
            json!({"customer": customer, "zone": zone, "record": record,
                   "type": rtype, "count": count})
        },
    );
    (
        text(),
        text(),
        prop_oneof![
            1_000_000_000u64..9_999_999_999,
            Just(1_000_000_000u64),
            Just(9_999_999_999u64),
        ],
        prop::collection::vec(metric, 0..4),
    )
        .prop_map(|(pop, host, time, metrics)| {
            json!({"pop": pop, "host": host, "time": time, "metrics": metrics})
        })
}

/// One structure-aware change to a message.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace a top-level field's value.
    Replace(usize, Value),
    /// Replace a field of a metric.
    ReplaceInMetric(usize, usize, Value),
    /// Remove a top-level field.
    Remove(usize),
    /// Add an unknown field.
    Unknown(String, Value),
    /// Replace a textual token in the serialized form (NaN, huge numbers,
    /// duplicate keys, invalid escapes...).
    Token(usize, &'static str),
    /// Cut the serialized form.
    Truncate(usize),
    /// Overwrite one byte of the serialized form.
    Byte(usize, u8),
    /// Nest the message `n` levels deep in arrays.
    Nest(usize),
    /// Repeat the metrics array's content `n` times.
    Repeat(usize),
}

const FIELDS: [&str; 4] = ["pop", "host", "time", "metrics"];
const METRIC_FIELDS: [&str; 5] = ["customer", "zone", "record", "type", "count"];
const TOKENS: [&str; 25] = [
    // At and just past the limits: `max_count` (2^53 by default; 2^53 + 2
    // is the next f64), `f64::MAX`, u64's end, `min_time`/`max_time`.
    "9007199254740992",
    "9007199254740994",
    "9.007199254740992e15",
    "1e308",
    "1.7976931348623157e308",
    "18446744073709551615",
    "18446744073709551615.0",
    "9999999999",
    "10000000000",
    "999999999",
    "1000000000",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1",
    "18446744073709551616",
    "\"\\ud800\"",
    "\"\\u00\"",
    "\"\u{0}\"",
    "0.0000000000000000000000001",
    "-0.0",
    "\"\\\"",
    "[]",
    "{}",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..FIELDS.len(), any_json()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        (0usize..4, 0..METRIC_FIELDS.len(), any_json())
            .prop_map(|(m, f, v)| Mutation::ReplaceInMetric(m, f, v)),
        (0..FIELDS.len()).prop_map(Mutation::Remove),
        ("[a-z]{1,8}", any_json()).prop_map(|(k, v)| Mutation::Unknown(k, v)),
        (any::<usize>(), prop::sample::select(TOKENS.to_vec()))
            .prop_map(|(at, t)| Mutation::Token(at, t)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Byte(at, b)),
        (1usize..300).prop_map(Mutation::Nest),
        (2usize..8).prop_map(Mutation::Repeat),
    ]
}

fn apply(mut msg: Value, mutations: &[Mutation]) -> Vec<u8> {
    let mut raw: Option<Vec<u8>> = None;
    for m in mutations {
        // Byte-level mutations apply to the serialized form; once there,
        // the rest apply to it too.
        let bytes = raw.get_or_insert_with(Vec::new);
        match m {
            // Field edits apply to an object; after a `Nest` there is none.
            Mutation::Replace(i, v) if bytes.is_empty() => {
                if let Some(o) = msg.as_object_mut() {
                    o.insert(FIELDS[*i].into(), v.clone());
                }
            }
            Mutation::ReplaceInMetric(i, f, v) if bytes.is_empty() => {
                let metric = msg
                    .get_mut("metrics")
                    .and_then(|m| m.get_mut(*i))
                    .and_then(Value::as_object_mut);
                if let Some(metric) = metric {
                    metric.insert(METRIC_FIELDS[*f].into(), v.clone());
                }
            }
            Mutation::Remove(i) if bytes.is_empty() => {
                if let Some(o) = msg.as_object_mut() {
                    o.remove(FIELDS[*i]);
                }
            }
            Mutation::Unknown(k, v) if bytes.is_empty() => {
                if let Some(o) = msg.as_object_mut() {
                    o.insert(k.clone(), v.clone());
                }
            }
            Mutation::Repeat(n) if bytes.is_empty() => {
                if let Some(Value::Array(a)) = msg.get_mut("metrics") {
                    *a = a.iter().cycle().take(a.len() * n).cloned().collect();
                }
            }
            Mutation::Nest(n) if bytes.is_empty() => {
                for _ in 0..*n {
                    msg = Value::Array(vec![msg]);
                }
            }
            _ => {
                if bytes.is_empty() {
                    *bytes = serde_json::to_vec(&msg).unwrap();
                }
                let len = bytes.len();
                match m {
                    Mutation::Token(at, t) => {
                        // Replace the value after the `at`-th colon.
                        let colons: Vec<usize> = (0..len).filter(|&i| bytes[i] == b':').collect();
                        if let Some(&c) = colons.get(at % colons.len().max(1)) {
                            let end = (c + 1..len)
                                .find(|&i| matches!(bytes[i], b',' | b'}' | b']'))
                                .unwrap_or(len);
                            bytes.splice(c + 1..end, t.bytes());
                        }
                    }
                    Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
                    Mutation::Byte(at, b) if len > 0 => bytes[at % len] = *b,
                    _ => {}
                }
            }
        }
    }
    match raw {
        Some(b) if !b.is_empty() => b,
        _ => serde_json::to_vec(&msg).unwrap(),
    }
}

#[test]
fn decoder_never_panics_on_arbitrary_bytes_and_names_every_refusal() {
    let limits = small_limits();
    let mut runner = TestRunner::new(proptest_config(2000));
    let bytes = prop::collection::vec(any::<u8>(), 0..3000);
    runner
        .run(&bytes, |body| {
            decode_checked(&limits, &body);
            decode_checked(&DecodeLimits::default(), &body);
            Ok(())
        })
        .unwrap();
}

#[test]
fn decoder_accepts_valid_messages_and_refuses_mutations_with_a_code() {
    let limits = small_limits();
    let mut runner = TestRunner::new(proptest_config(2000));
    let strategy = (valid_message(), prop::collection::vec(mutation(), 0..4));
    runner
        .run(&strategy, |(msg, mutations)| {
            if mutations.is_empty() {
                let body = serde_json::to_vec(&msg).unwrap();
                let decoded = JsonDecoder::new(limits).decode(&body);
                // Valid text may still be too long for the small limits.
                let fits = |s: &Value| s.as_str().is_none_or(|s| (1..=16).contains(&s.len()));
                let ok = fits(&msg["pop"])
                    && fits(&msg["host"])
                    && msg["metrics"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|m| ["zone", "record", "type"].iter().all(|f| fits(&m[*f])));
                prop_assert_eq!(decoded.is_ok(), ok, "{:?}", decoded);
                if let Ok(d) = decoded {
                    prop_assert_eq!(d.time, msg["time"].as_u64().unwrap());
                    prop_assert_eq!(d.metrics.len(), msg["metrics"].as_array().unwrap().len());
                }
            }
            let body = apply(msg, &mutations);
            decode_checked(&limits, &body);
            decode_checked(&DecodeLimits::default(), &body);
            Ok(())
        })
        .unwrap();
}

/// The fields of an object as an array, in the order the README lists
/// them: what serde's derive would read as the struct, positionally.
fn positional(object: &Value, fields: &[&str]) -> Value {
    Value::Array(fields.iter().map(|f| object[*f].clone()).collect())
}

#[test]
fn decoder_refuses_positional_arrays_for_a_message_or_any_metric() {
    let mut runner = TestRunner::new(proptest_config(500));
    let strategy = (valid_message(), any::<prop::sample::Index>());
    runner
        .run(&strategy, |(mut msg, at)| {
            let metrics = msg["metrics"].as_array().map_or(0, Vec::len);
            let whole = metrics == 0 || at.index(2) == 0;
            let body = if whole {
                serde_json::to_vec(&positional(&msg, &FIELDS)).unwrap()
            } else {
                let i = at.index(metrics);
                msg["metrics"][i] = positional(&msg["metrics"][i], &METRIC_FIELDS);
                serde_json::to_vec(&msg).unwrap()
            };
            let err = JsonDecoder::default().decode(&body).map(drop);
            prop_assert_eq!(err.map_err(|e| e.code()), Err("bad_json"));
            Ok(())
        })
        .unwrap();
}

/// One structure-aware change to a component: bytes flipped, cut,
/// inserted, removed, or a range copied over another.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Copy(usize, usize, usize),
    /// A LEB128 length (section or vector) made huge.
    Huge(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Edit::Flip(at, x)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Edit::Insert(at, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, n)| Edit::Remove(at, n)),
        1 => (any::<usize>(), any::<usize>(), 1usize..256)
            .prop_map(|(from, to, n)| Edit::Copy(from, to, n)),
        1 => any::<usize>().prop_map(Edit::Huge),
    ]
}

fn edit_bytes(bytes: &mut Vec<u8>, e: &Edit) {
    let len = bytes.len().max(1);
    match e {
        Edit::Flip(at, x) => {
            let i = 8 + at % len.saturating_sub(8).max(1);
            if let Some(b) = bytes.get_mut(i) {
                *b ^= x;
            }
        }
        Edit::Truncate(at) => bytes.truncate(at % len),
        Edit::Insert(at, b) => {
            let i = (at % len).min(bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Edit::Remove(at, n) => {
            let i = (at % len).min(bytes.len());
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Edit::Copy(from, to, n) => {
            let (f, t) = (from % len, to % len);
            let n = (*n).min(bytes.len().saturating_sub(f.max(t)));
            let chunk = bytes[f..f + n].to_vec();
            bytes[t..t + n].copy_from_slice(&chunk);
        }
        Edit::Huge(at) => {
            let i = (8 + at % len.saturating_sub(8).max(1)).min(bytes.len());
            bytes.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
        }
    }
}

#[test]
fn module_validation_never_panics_on_mutated_components() {
    // No cache: a mutated module must not leave artifacts behind, and every
    // load goes through validation and compilation.
    let rt = Runtime::new(
        RuntimeLimits {
            memory_limit_bytes: 16 << 20,
            ..RuntimeLimits::default()
        },
        None,
    )
    .unwrap();
    let original = wagg::runtime::builtin("hashmap").unwrap().to_vec();
    let mut runner = TestRunner::new(proptest_config(12));
    let outcomes = std::cell::RefCell::new(BTreeMap::<String, u32>::new());
    runner
        .run(&prop::collection::vec(edit(), 1..4), |edits| {
            let mut bytes = original.clone();
            for e in &edits {
                edit_bytes(&mut bytes, e);
            }
            let label = match rt.load(&bytes) {
                Ok(module) => {
                    // Accepted: it passed the trial run, so it aggregates.
                    prop_assert!(!module.id().is_empty());
                    "accepted".to_string()
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    format!("{:?}", e)
                        .split(['(', ' ', '{'])
                        .next()
                        .unwrap()
                        .to_string()
                }
            };
            *outcomes.borrow_mut().entry(label).or_default() += 1;
            Ok(())
        })
        .unwrap();
    eprintln!("module validation outcomes: {:?}", outcomes.borrow());
}

/// A hostile message with the code it must be dead-lettered with.
fn hostile_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let good = |time: &str, pop: &str, count: &str| {
        format!(
            r#"{{"pop":{pop},"host":"h","time":{time},"metrics":[{{"customer":7,"zone":"z","record":"r","type":"A","count":{count}}}]}}"#
        )
        .into_bytes()
    };
    let metric = r#"{"customer":1,"zone":"z","record":"r","type":"A","count":1},"#;
    let mut huge_metrics = br#"{"pop":"p","host":"h","time":1764000000,"metrics":["#.to_vec();
    huge_metrics.extend(metric.repeat(80_000).as_bytes());
    huge_metrics.pop();
    huge_metrics.extend(b"]}");
    let mut huge_numbers = br#"{"pop":"p","host":"h","time":1764000000,"metrics":["#.to_vec();
    huge_numbers.extend("0,".repeat(1_000_000).as_bytes());
    huge_numbers.extend(b"0]}");
    let mut invalid_utf8 = good("1764000000", "\"lga\"", "1");
    invalid_utf8[9] = 0xff;
    let mut deep = br#"{"pop":"p","host":"h","time":1764000000,"metrics":"#.to_vec();
    deep.extend(vec![b'['; 100_000]);
    vec![
        ("too_large", vec![b' '; (4 << 20) + 1]),
        // 80 000 metrics, 4.7 MB: over the size limit before parsing.
        ("too_large", huge_metrics),
        // A million array items of the wrong type: refused at the first.
        ("bad_json", huge_numbers),
        ("bad_json", deep),
        ("bad_json", invalid_utf8),
        ("bad_json", good("1764000000", "\"lga\"", "NaN")),
        ("bad_json", good("1764000000", "\"lga\"", "Infinity")),
        ("bad_json", good("1764000000", "\"lga\"", "-Infinity")),
        ("bad_json", good("1764000000", "\"lga\"", "1e999")),
        ("bad_field", good("1764000000", "\"lga\"", "-1")),
        ("bad_field", good("0", "\"lga\"", "1")),
        ("bad_field", good("1", "\"lga\"", "1")),
        ("bad_field", good("99999999999", "\"lga\"", "1")),
        ("bad_field", good("18446744073709551615", "\"lga\"", "1")),
        ("bad_json", good("18446744073709551616", "\"lga\"", "1")),
        ("bad_json", good("-1764000000", "\"lga\"", "1")),
        ("bad_json", good("1764000000.5", "\"lga\"", "1")),
        ("bad_field", good("1764000000", "\"\"", "1")),
        (
            "bad_field",
            good("1764000000", &format!("\"{}\"", "x".repeat(256)), "1"),
        ),
        ("bad_json", good("1764000000", "\"\\ud800\"", "1")),
        ("bad_json", good("1764000000", "null", "1")),
        (
            "bad_json",
            br#"{"pop":"a","pop":"b","host":"h","time":1764000000,"metrics":[]}"#.to_vec(),
        ),
        ("bad_json", b"".to_vec()),
        ("bad_json", b"null".to_vec()),
        (
            "bad_json",
            good("1764000000", "\"lga\"", "1")[..40].to_vec(),
        ),
        (
            "bad_json",
            [&b"\xef\xbb\xbf"[..], &good("1764000000", "\"lga\"", "1")].concat(),
        ),
        // Counts whose sums overflowed a rollup to infinity and crash-looped
        // the host: refused at `max_count` (2^53) before any sum.
        (
            "bad_field",
            br#"{"pop":"p","host":"h","time":1764000000,"metrics":[{"customer":7,"zone":"z","record":"r","type":"A","count":1e308},{"customer":7,"zone":"z","record":"r2","type":"A","count":1e308}]}"#.to_vec(),
        ),
        ("bad_field", good("1764000000", "\"lga\"", "9e307")),
        ("bad_field", good("1764000000", "\"lga\"", "9007199254740994")),
        // 1e308 in every other numeric field.
        ("bad_json", good("1e308", "\"lga\"", "1")),
        (
            "bad_json",
            br#"{"pop":"p","host":"h","time":1764000000,"metrics":[{"customer":1e308,"zone":"z","record":"r","type":"A","count":1}]}"#.to_vec(),
        ),
        // Positional arrays, which serde's derive would read as structs.
        (
            "bad_json",
            br#"["p","h",1764000000,[{"customer":7,"zone":"z","record":"r","type":"A","count":1}]]"#.to_vec(),
        ),
        (
            "bad_json",
            br#"{"pop":"p","host":"h","time":1764000000,"metrics":[[7,"z","r","A",1]]}"#.to_vec(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_with_their_reason_and_valid_totals_stay_exact() {
    wagg_tests::require_rabbitmq();
    let corpus = hostile_corpus();
    // The decoder's verdicts first, so a failure below is the pipeline's.
    for (i, (code, body)) in corpus.iter().enumerate() {
        let got = JsonDecoder::default().decode(body).map(drop);
        assert_eq!(got.map_err(|e| e.code()), Err(*code), "hostile message {i}");
    }
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("hostile");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = Running::start(Setup {
        amqp: names.config(),
        sink_url: vm.opentsdb_url(),
        data_dir: data.path(),
        shards: 2,
        incumbent: "hashmap",
        limits: RuntimeLimits::default(),
        admin: wagg::admin::AdminConfig::default(),
    })
    .await;
    let mut generator = Generator::new(
        GeneratorConfig {
            customers: 50,
            metrics_per_message: 20,
            seed: 3,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    let valid: Vec<Vec<u8>> = (0..300u64).map(|i| generator.message(T0 + i / 3)).collect();
    let mut all: Vec<(String, Vec<u8>)> = valid.iter().map(|b| (KEY.into(), b.clone())).collect();
    for (i, (_, body)) in corpus.iter().enumerate() {
        all.insert(i * 9 + 1, (KEY.into(), body.clone()));
    }
    let publisher = AmqpPublisher::connect(&names.config().uri, &names.exchange())
        .await
        .unwrap();
    publisher.publish_many(all).await.unwrap();
    publisher.close().await.unwrap();

    let want = expected(&valid, WIDTH);
    running.wait_points(want.len()).await;
    let counters = running.counters.clone();
    let metrics = running.metrics.clone();
    running.stop().await;
    compare(&read_back(&vm).await, &want);
    assert_eq!(
        counters.dead_lettered.load(Ordering::Relaxed),
        corpus.len() as u64
    );
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");

    // `/metrics` counts each reason.
    let text = metrics.render();
    let mut by_code = BTreeMap::<&str, f64>::new();
    for (code, _) in &corpus {
        *by_code.entry(code).or_default() += 1.0;
    }
    for (code, n) in &by_code {
        assert_eq!(
            metric(
                &text,
                "wagg_messages_dead_lettered_total",
                &[("reason", code)]
            ),
            *n,
            "{code}"
        );
    }
    // The dead-letter queue holds each one, whole, with its reason code.
    let conn = Connection::connect(&names.config().uri, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut dead = Vec::new();
    while let Some(got) = channel
        .basic_get(names.dlq().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = got.delivery.properties.headers().clone().unwrap();
        let code = match headers.inner().get("x-wagg-reason-code") {
            Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
            other => panic!("reason code: {other:?}"),
        };
        assert!(headers.inner().contains_key("x-wagg-reason"));
        // The original routing key and properties stay with it.
        match headers.inner().get("x-wagg-routing-key") {
            Some(AMQPValue::LongString(s)) => assert_eq!(s.as_bytes(), KEY.as_bytes()),
            other => panic!("routing key: {other:?}"),
        }
        assert!(
            got.delivery.properties.message_id().is_some(),
            "the publisher's message_id is kept"
        );
        dead.push((code, got.delivery.data));
    }
    let _ = conn.close(200, "bye".into()).await;
    let mut want_dead: Vec<(String, Vec<u8>)> = corpus
        .iter()
        .map(|(c, b)| ((*c).to_string(), b.clone()))
        .collect();
    want_dead.sort();
    dead.sort();
    assert!(
        dead == want_dead,
        "{} dead letters, {} expected",
        dead.len(),
        want_dead.len()
    );
}

/// Tag values were sanitised byte by byte: `ünï.example` and `änï.example`
/// both became `__n__.example`, one series in the TSDB for two names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_tag_values_were_mangled_byte_by_byte_into_one_series() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("unicode");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = crate::harness::start_default(&names, &vm, data.path()).await;
    let zones = ["ünï.example", "änï.example", "例え.jp", "plain.example"];
    let bodies: Vec<Vec<u8>> = (0..40u64)
        .map(|i| {
            let zone = zones[i as usize % zones.len()];
            format!(
                r#"{{"pop":"zürich","host":"h","time":{},"metrics":[{{"customer":{},"zone":"{zone}","record":"www.{zone}","type":"A","count":{}}}]}}"#,
                T0 + i,
                i % 3,
                i + 1
            )
            .into_bytes()
        })
        .collect();
    crate::harness::publish(&names, &bodies).await;
    let want = expected(&bodies, WIDTH);
    running.wait_points(want.len()).await;
    running.stop().await;
    let got = read_back(&vm).await;
    compare(&got, &want);
    let zones_read: std::collections::BTreeSet<String> = got
        .keys()
        .filter_map(|(tags, _)| tags.get("zone").cloned())
        .collect();
    assert_eq!(
        zones_read,
        zones.iter().map(|z| (*z).to_string()).collect(),
        "each name its own series, spelled as sent"
    );
}
