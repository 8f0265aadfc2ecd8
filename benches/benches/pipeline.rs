//! The host's per-item costs around the module: JSON decode per metric,
//! routing (shard hashing and series-key building) per metric, dictionary
//! interning per sample, OpenTSDB JSON encoding per point, a checkpoint's
//! encoding per open row, and one shard's rows read back from a checkpoint
//! file (what a module's rebuild reads).
//!
//! `cargo bench -p wagg-benches --bench pipeline`
//!
//! Input is the generator's default traffic (100 metrics per message,
//! 1000 customers, Zipf 1.1, 25 POPs) and the default router (2 shards,
//! three rollups: every metric becomes three samples).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wagg::pipeline::checkpoint::{Checkpoint, CheckpointStore, Rows, VERSION};
use wagg::pipeline::saved_state;
use wagg::router::{KeyBatch, Router, RouterConfig, SharedKey, encode_key};
use wagg::shard::{Dictionary, StateRow};
use wagg::sink::{KeyLayout, Point, encode_json};
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg::source::json::{Decoder, JsonDecoder};

const BUCKET_SECONDS: u32 = 60;
/// Messages cycled through.
const MESSAGES: usize = 64;
/// Points per OpenTSDB request body.
const POINTS: usize = 1000;

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

fn messages() -> (Vec<Vec<u8>>, usize) {
    let cfg = GeneratorConfig::default();
    let per_message = cfg.metrics_per_message;
    let start = cfg.start_time;
    let mut generator = Generator::new(cfg, BUCKET_SECONDS).unwrap();
    let bodies = (0..MESSAGES as u64)
        .map(|i| generator.message(start + i))
        .collect();
    (bodies, per_message)
}

fn decode(c: &mut Criterion) {
    let (bodies, per_message) = messages();
    let decoder = JsonDecoder::default();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(per_message as u64));
    let mut k = 0;
    group.bench_function("json/per-metric", |b| {
        b.iter(|| {
            k = (k + 1) % bodies.len();
            black_box(decoder.decode(&bodies[k]).unwrap());
        })
    });
    group.finish();
}

fn route(c: &mut Criterion) {
    let (bodies, per_message) = messages();
    let decoder = JsonDecoder::default();
    let decoded: Vec<_> = bodies.iter().map(|b| decoder.decode(b).unwrap()).collect();
    let config = Arc::new(RouterConfig::default());
    let router = Router::new(config.clone());
    let mut batches: Vec<KeyBatch> = (0..config.shards)
        .map(|_| KeyBatch::with_capacity(4 * per_message))
        .collect();

    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(per_message as u64));
    let mut k = 0;
    group.bench_function("hash+keys/per-metric", |b| {
        b.iter(|| {
            k = (k + 1) % decoded.len();
            batches.iter_mut().for_each(KeyBatch::clear);
            black_box(router.route(&decoded[k], &mut batches));
        })
    });
    group.finish();

    // Interning: every message's samples, in steady state (every key
    // already known, as for a series seen before in the window).
    let routed: Vec<Vec<KeyBatch>> = decoded
        .iter()
        .map(|msg| {
            let mut out: Vec<KeyBatch> = (0..config.shards).map(|_| KeyBatch::default()).collect();
            router.route(msg, &mut out);
            out
        })
        .collect();
    let bucket = 1_764_133_200;
    let mut dict = Dictionary::new();
    for batch in routed.iter().flatten() {
        for s in batch.samples() {
            dict.intern(batch.key(s), bucket);
        }
    }
    let samples = routed.iter().flatten().map(KeyBatch::len).sum::<usize>();
    let mut group = c.benchmark_group("dictionary");
    group.throughput(Throughput::Elements(samples as u64));
    group.bench_function("intern/per-sample", |b| {
        b.iter(|| {
            for batch in routed.iter().flatten() {
                for s in batch.samples() {
                    black_box(dict.intern(batch.key(s), bucket));
                }
            }
        })
    });
    group.finish();
    intern_live(c);
}

/// Interning against a dictionary of many live series, in batches of
/// samples of series spread over all of them: unlike a few messages' keys,
/// the table and the keys are not in cache, as in a host at that scale
/// (a million: the end-to-end bench's 30 000 messages make ~830 000).
fn intern_live(c: &mut Criterion) {
    const BATCH: usize = 300;
    let bucket = 1_764_133_200;
    let mut group = c.benchmark_group("dictionary/intern");
    group.throughput(Throughput::Elements(BATCH as u64));
    for live in [1_000usize, 100_000, 1_000_000] {
        let (keys, order) = live_keys(live);
        let mut dict = Dictionary::new();
        for key in &keys {
            dict.intern(key, bucket);
        }
        // Batches of keys in the scattered order, three times as many
        // samples as series between them.
        let batches: Vec<KeyBatch> = (0..1024)
            .map(|b| {
                let mut batch = KeyBatch::with_capacity(BATCH);
                for j in 0..BATCH {
                    batch.push_raw(&keys[order(b * BATCH + j)], bucket, 1.0);
                }
                batch
            })
            .collect();
        let mut k = 0;
        group.bench_function(BenchmarkId::new("live", live), |b| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                let batch = &batches[k];
                for s in batch.samples() {
                    black_box(dict.intern(batch.key(s), bucket));
                }
            })
        });
        // The same batches through the shard's way, a run at a time.
        group.bench_function(BenchmarkId::new("batch/live", live), |b| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                let batch = &batches[k];
                dict.intern_batch(batch, batch.samples(), 60, |id, _| {
                    black_box(id);
                });
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    // Tags as a shard makes them: read from the series key when encoded.
    let layout = Arc::new(
        KeyLayout::new(
            ["customer", "zone", "pop"],
            [("rollup".to_string(), "zone".to_string())],
        )
        .expect("a valid layout"),
    );
    let metric: Arc<str> = "dns.queries".into();
    let points: Vec<Point> = (0..POINTS as u64)
        .map(|i| {
            let key: SharedKey = format!(
                "\x01{}\0zone-{}.example.com\0pop{:02}\0",
                i % 1000,
                i % 4,
                i % 25
            )
            .into_bytes()
            .into();
            Point {
                metric: metric.clone(),
                timestamp: 1_764_133_200 + 60 * (i % 5),
                value: (i * 37 % 1000) as f64 + 0.5,
                tags: layout.tags(&key).expect("the key fits the layout"),
            }
        })
        .collect();
    let mut out = Vec::with_capacity(256 * POINTS);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(POINTS as u64));
    group.bench_function("opentsdb-json/per-point", |b| {
        b.iter(|| {
            out.clear();
            encode_json(&points, &mut out);
            black_box(out.len());
        })
    });
    group.finish();
    encode_live(c);
}

/// The key of live series `i`, as the `record` rollup writes it (~45 bytes;
/// ~70 before session 12 wrote the record as a name in its zone).
fn live_key(i: usize) -> SharedKey {
    let zone = format!("zone-{}.example.com", i % 977);
    encode_key(
        2,
        [
            &*(i % 5000).to_string(),
            &zone,
            &format!("www{i}.{zone}"),
            "A",
            &format!("pop{:02}", i % 25),
        ],
    )
    .into()
}

/// `live` keys, allocated one after the other as a dictionary would, and
/// the order a flush or a checkpoint visits them in: scattered (a
/// multiplicative step), as a module's hash table returns its rows.
fn live_keys(live: usize) -> (Vec<SharedKey>, impl Fn(usize) -> usize) {
    let keys = (0..live).map(live_key).collect();
    (keys, move |j: usize| j.wrapping_mul(2_654_435_761) % live)
}

/// `live` open rows as a checkpoint holds them, keys from [`live_keys`] in
/// its scattered order.
fn live_rows(live: usize) -> Vec<StateRow> {
    let (keys, order) = live_keys(live);
    (0..live)
        .map(|j| StateRow {
            key: keys[order(j)].clone(),
            bucket: 1_764_133_200,
            count: 3,
            sum: j as f64 + 0.5,
            min: 0.5,
            max: 2.0,
        })
        .collect()
}

/// Encoding and checkpointing against many live series: each point's or
/// row's key is where the dictionary allocated it, not in cache, as in a
/// host at that scale (`opentsdb-json/per-point` has a thousand keys in
/// cache).
///
/// - `encode/opentsdb-json/live/<n>`: request bodies of 1000 points whose
///   tags are read from keys spread over `n` live series;
/// - `checkpoint/rows/live/<n>`: a checkpoint's open rows (`n`, one per
///   live series) in its binary encoding, without the file write.
fn encode_live(c: &mut Criterion) {
    let layout = Arc::new(
        KeyLayout::new(
            ["customer", "zone", "record", "type", "pop"],
            [("rollup".to_string(), "record".to_string())],
        )
        .expect("a valid layout"),
    );
    let metric: Arc<str> = "dns.queries".into();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(POINTS as u64));
    for live in [1_000usize, 100_000] {
        let (keys, order) = live_keys(live);
        let batches: Vec<Vec<Point>> = (0..64)
            .map(|b| {
                (0..POINTS)
                    .map(|j| Point {
                        metric: metric.clone(),
                        timestamp: 1_764_133_200,
                        value: j as f64 + 0.5,
                        tags: layout
                            .tags(&keys[order(b * POINTS + j)])
                            .expect("the key fits the layout"),
                    })
                    .collect()
            })
            .collect();
        let mut out = Vec::with_capacity(300 * POINTS);
        let mut k = 0;
        group.bench_function(BenchmarkId::new("opentsdb-json/live", live), |b| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                out.clear();
                encode_json(&batches[k], &mut out);
                black_box(out.len());
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("checkpoint/rows");
    for live in [1_000usize, 100_000] {
        let rows = Rows::from(live_rows(live));
        let mut out = Vec::with_capacity(100 * live);
        group.throughput(Throughput::Elements(live as u64));
        group.bench_function(BenchmarkId::new("live", live), |b| {
            b.iter(|| {
                out.clear();
                postcard::to_io(&rows, &mut out).expect("encodes");
                black_box(out.len());
            })
        });
    }
    group.finish();
}

/// What a rebuild after a module failure now spends before merging: one
/// shard's rows read back from the checkpoint file (every shard's rows
/// decoded, that shard's kept), at `live` open rows over the default
/// router's two shards.
fn read_back(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkpoint/read-back");
    let config = Arc::new(RouterConfig::default());
    for live in [1_000usize, 100_000] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = CheckpointStore::new(dir.path());
        let rows = live_rows(live);
        store
            .save(&Checkpoint {
                version: VERSION,
                rows: rows.into(),
                ..Checkpoint::default()
            })
            .expect("the checkpoint is written");
        let saved = saved_state(store, Router::new(config.clone()));
        assert!(!saved.load(0).expect("reads back").is_empty());
        group.throughput(Throughput::Elements(live as u64));
        group.bench_function(BenchmarkId::new("live", live), |b| {
            b.iter(|| black_box(saved.load(0).expect("reads back").len()))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = decode, route, encode, read_back
}
criterion_main!(benches);
