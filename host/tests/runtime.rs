//! The module runtime against real components: one conformance suite run
//! against every strategy natively and as a component, limit pairs (obeyed
//! and violated) against purpose-built fixtures, and load-time refusals.

use std::sync::Arc;

use wagg::runtime::{
    Aggregates, Batch, Instance, InstanceError, LoadError, LoadedModule, Runtime, RuntimeLimits,
};
use wagg_artifacts::{BTREE, Guest, HASHMAP, IMPORTS, LEAKY, MISBEHAVE, OTHERWORLD, SORTED};
use wagg_guest::{Aggregator, Driver};

const WIDTH: u32 = 60;
const T0: u64 = 1_764_133_200;

/// One row as (series, bucket, count, sum, min, max), for comparisons
/// between the SDK's and the host's aggregate types.
type Row = (u64, u64, u64, f64, f64, f64);

fn rows_host(a: &Aggregates) -> Vec<Row> {
    let mut v: Vec<Row> = (0..a.len())
        .map(|i| {
            (
                a.series[i],
                a.bucket_start[i],
                a.count[i],
                a.sum[i],
                a.min[i],
                a.max[i],
            )
        })
        .collect();
    v.sort_by_key(|r| (r.0, r.1));
    v
}

fn rows_sdk(a: &wagg_guest::Aggregates) -> Vec<Row> {
    let mut v: Vec<Row> = a
        .rows()
        .map(|(s, b, g)| (s, b, g.count, g.sum, g.min, g.max))
        .collect();
    v.sort_by_key(|r| (r.0, r.1));
    v
}

/// What the suite drives: a strategy natively or as a component.
trait Subject {
    fn put(&mut self, b: &Batch) -> u32;
    fn flush(&mut self, watermark: u64) -> Vec<Row>;
    fn export(&mut self) -> Vec<Row>;
    fn merge(&mut self, rows: &[Row]);
}

impl<A: Aggregator> Subject for Driver<A> {
    fn put(&mut self, b: &Batch) -> u32 {
        let (s, t, v) = b.columns();
        Driver::put(self, s, t, v)
    }
    fn flush(&mut self, watermark: u64) -> Vec<Row> {
        rows_sdk(&Driver::flush(self, watermark))
    }
    fn export(&mut self) -> Vec<Row> {
        rows_sdk(&self.export_state())
    }
    fn merge(&mut self, rows: &[Row]) {
        let mut a = wagg_guest::Aggregates::default();
        for r in rows {
            a.push(
                r.0,
                r.1,
                &wagg_guest::Agg {
                    count: r.2,
                    sum: r.3,
                    min: r.4,
                    max: r.5,
                },
            );
        }
        Driver::merge(self, &a).unwrap();
    }
}

impl Subject for Instance {
    fn put(&mut self, b: &Batch) -> u32 {
        Instance::put(self, b).unwrap()
    }
    fn flush(&mut self, watermark: u64) -> Vec<Row> {
        rows_host(&Instance::flush(self, watermark, &|_| true).unwrap())
    }
    fn export(&mut self) -> Vec<Row> {
        rows_host(&self.export_state(&|_| true).unwrap())
    }
    fn merge(&mut self, rows: &[Row]) {
        let mut a = Aggregates::empty();
        for r in rows {
            a.series.push(r.0);
            a.bucket_start.push(r.1);
            a.count.push(r.2);
            a.sum.push(r.3);
            a.min.push(r.4);
            a.max.push(r.5);
        }
        Instance::merge(self, &a).unwrap();
    }
}

fn native<A: Aggregator + 'static>() -> Box<dyn Subject> {
    let mut d = Driver::<A>::new();
    d.configure(WIDTH, &[]).unwrap();
    Box::new(d)
}

fn runtime(limits: RuntimeLimits) -> Runtime {
    Runtime::new(limits, None).unwrap()
}

fn load(rt: &Runtime, g: &Guest) -> Arc<LoadedModule> {
    rt.load(g.bytes)
        .unwrap_or_else(|e| panic!("{} refused: {e}", g.name))
}

/// Every strategy, natively and as a component: `make(i)` builds the i-th
/// subject afresh.
struct Subjects {
    rt: Runtime,
    modules: Vec<Arc<LoadedModule>>,
}

const STRATEGIES: [Guest; 4] = [HASHMAP, BTREE, SORTED, LEAKY];

impl Subjects {
    fn new() -> Self {
        let rt = runtime(RuntimeLimits::default());
        let modules = STRATEGIES.iter().map(|g| load(&rt, g)).collect();
        Subjects { rt, modules }
    }

    fn len(&self) -> usize {
        2 * STRATEGIES.len()
    }

    fn make(&self, i: usize) -> (String, Box<dyn Subject>) {
        let n = STRATEGIES.len();
        if i >= n {
            let m = &self.modules[i - n];
            let name = format!("{}/component", STRATEGIES[i - n].name);
            return (name, Box::new(self.rt.instantiate(m, WIDTH, &[]).unwrap()));
        }
        let subject = match i {
            0 => native::<wagg_hashmap::HashMapAgg>(),
            1 => native::<wagg_btree::BTreeAgg>(),
            2 => native::<wagg_sorted::SortedAgg>(),
            _ => native::<wagg_leaky::LeakyAgg>(),
        };
        (format!("{}/native", STRATEGIES[i].name), subject)
    }
}

/// A deterministic workload: `n` samples over `series` series and five
/// buckets, in arrival (not time) order, with a few non-finite values.
fn workload(n: usize, series: u64, seed: u64) -> (Batch, u32) {
    let mut b = Batch::with_capacity(n);
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut bad = 0;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let value = match i % 997 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            _ => (x % 1000) as f64 - 100.0,
        };
        if !value.is_finite() {
            bad += 1;
        }
        b.push(x % series, T0 + (x >> 20) % 300, value);
    }
    (b, bad)
}

#[test]
fn every_strategy_gives_identical_aggregates_natively_and_as_a_component() {
    let (batch, bad) = workload(20_000, 300, 1);
    let mut reference: Option<(String, Vec<Row>, Vec<Row>)> = None;
    let subjects = Subjects::new();
    for i in 0..subjects.len() {
        let (name, mut s) = subjects.make(i);
        assert_eq!(s.put(&batch), bad, "{name}: skipped count");
        // Only buckets ending by the watermark, each once.
        let first = s.flush(T0 + 120);
        assert!(
            first.iter().all(|r| r.1 + u64::from(WIDTH) <= T0 + 120),
            "{name}"
        );
        assert!(!first.is_empty());
        assert!(
            s.flush(T0 + 120).is_empty(),
            "{name}: a bucket flushed twice"
        );
        let rest = s.flush(u64::MAX / 2);
        assert!(rest.iter().all(|r| r.1 >= T0 + 120), "{name}");
        assert!(s.flush(u64::MAX / 2).is_empty(), "{name}");
        match &reference {
            None => reference = Some((name, first, rest)),
            Some((rname, f, r)) => {
                assert_eq!(&first, f, "{name} differs from {rname}");
                assert_eq!(&rest, r, "{name} differs from {rname}");
            }
        }
    }
}

#[test]
fn export_then_merge_carries_state_across_strategies() {
    let (batch, _) = workload(5_000, 100, 2);
    let mut expected: Option<Vec<Row>> = None;
    let subjects = Subjects::new();
    for from in 0..subjects.len() {
        for to in 0..subjects.len() {
            let (from_name, mut a) = subjects.make(from);
            let (to_name, mut b) = subjects.make(to);
            a.put(&batch);
            let state = a.export();
            // Export does not remove anything.
            assert_eq!(a.export(), state, "{from_name}");
            b.merge(&state);
            let got = b.flush(u64::MAX / 2);
            let want = a.flush(u64::MAX / 2);
            assert_eq!(got, want, "{from_name} -> {to_name}");
            if let Some(e) = &expected {
                assert_eq!(&got, e, "{from_name} -> {to_name}");
            }
            expected = Some(got);
        }
    }
}

#[test]
fn empty_and_large_batches() {
    let rt = runtime(RuntimeLimits::default());
    for g in [HASHMAP, BTREE, SORTED, LEAKY] {
        let mut i = rt.instantiate(&load(&rt, &g), WIDTH, &[]).unwrap();
        assert_eq!(i.put(&Batch::default()).unwrap(), 0);
        // More than one WIT batch: the host splits it.
        let (big, bad) = workload(150_000, 5_000, 3);
        assert_eq!(i.put(&big).unwrap(), bad, "{}", g.name);
        let total: u64 = rows_host(&i.flush(u64::MAX / 2, &|_| true).unwrap())
            .iter()
            .map(|r| r.2)
            .sum();
        assert_eq!(total, 150_000 - u64::from(bad), "{}", g.name);
        let stats = i.stats().unwrap();
        assert_eq!(stats.live_buckets, 0);
        assert!(stats.memory_peak_bytes >= stats.memory_bytes);
    }
}

fn misbehave(rt: &Runtime, opts: &[(&str, &str)]) -> Instance {
    let opts: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    rt.instantiate(&load(rt, &MISBEHAVE), WIDTH, &opts).unwrap()
}

fn small_batch() -> Batch {
    let mut b = Batch::default();
    for i in 0..100 {
        b.push(i % 10, T0 + i, 1.0);
    }
    b
}

#[test]
fn leaky_obeys_its_memory_limit_for_a_while_then_exceeds_it_alone() {
    let limits = RuntimeLimits {
        memory_limit_bytes: 4 << 20,
        ..RuntimeLimits::default()
    };
    let rt = runtime(limits);
    let mut leaky = rt.instantiate(&load(&rt, &LEAKY), WIDTH, &[]).unwrap();
    let mut hashmap = rt.instantiate(&load(&rt, &HASHMAP), WIDTH, &[]).unwrap();
    // Load: 2 000 series per one-minute window, flushed every window.
    let window = |w: u64| {
        let mut b = Batch::with_capacity(2000);
        for s in 0..2000 {
            b.push(s, T0 + w * 60, 1.0);
        }
        b
    };
    let mut failed_at = None;
    for w in 0..400u64 {
        let b = window(w);
        let wm = T0 + (w + 1) * 60;
        hashmap.put(&b).unwrap();
        hashmap.flush(wm, &|_| true).unwrap();
        if failed_at.is_none() {
            let r = leaky
                .put(&b)
                .and_then(|_| leaky.flush(wm, &|_| true).map(drop));
            if let Err(e) = r {
                assert!(
                    matches!(e, InstanceError::MemoryLimit { limit, .. } if limit == 4 << 20),
                    "{e}"
                );
                failed_at = Some(w);
            }
        }
    }
    let failed_at = failed_at.expect("leaky never hit its limit");
    // It stayed under the limit for several windows first: a leak, not a
    // module that cannot start.
    assert!(failed_at >= 5, "failed at window {failed_at}");
    // The trapped instance is never entered again.
    assert!(matches!(leaky.stats(), Err(InstanceError::Poisoned(_))));
    // The hashmap under the same limit and load is fine, and small.
    assert!(hashmap.stats().unwrap().memory_peak_bytes < 4 << 20);
}

#[test]
fn an_endless_loop_is_stopped_by_the_cpu_budget() {
    let rt = runtime(RuntimeLimits::default());
    let mut ok = misbehave(&rt, &[("mode", "ok")]);
    ok.put(&small_batch()).unwrap();
    let mut looping = misbehave(&rt, &[("mode", "loop")]);
    let err = looping.put(&small_batch()).unwrap_err();
    assert!(
        matches!(err, InstanceError::CpuBudget { call: "put", .. }),
        "{err}"
    );
    assert!(matches!(
        looping.put(&small_batch()),
        Err(InstanceError::Poisoned(_))
    ));
    // The other instance of the same module is unaffected.
    ok.put(&small_batch()).unwrap();
    assert_eq!(
        rows_host(&ok.flush(u64::MAX / 2, &|_| true).unwrap())
            .iter()
            .map(|r| r.2)
            .sum::<u64>(),
        200
    );
}

#[test]
fn bad_output_is_refused_without_a_host_panic() {
    let limits = RuntimeLimits {
        max_output_rows: 10_000,
        ..RuntimeLimits::default()
    };
    let rt = runtime(limits);
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("mode", "oversize"), ("rows", "50000")],
            "more than the limit",
        ),
        (&[("mode", "unknown-ids")], "unknown series"),
        (&[("mode", "ragged")], "rows, `series` has"),
        (&[("mode", "nan")], "non-finite"),
        (&[("mode", "ok")], ""),
    ];
    for (opts, expected) in cases {
        let mut i = misbehave(&rt, opts);
        i.put(&small_batch()).unwrap();
        let r = i.flush(u64::MAX / 2, &|id| id < 10);
        if expected.is_empty() {
            // 10 series over two buckets.
            assert_eq!(r.unwrap().len(), 20);
        } else {
            let err = r.unwrap_err();
            assert!(
                matches!(err, InstanceError::BadOutput { call: "flush", .. }),
                "{err}"
            );
            assert!(err.to_string().contains(expected), "{opts:?}: {err}");
        }
    }
}

#[test]
fn traps_become_typed_errors_for_that_instance_alone() {
    let rt = runtime(RuntimeLimits::default());
    let mut t = misbehave(&rt, &[("mode", "trap-on"), ("n", "3")]);
    t.put(&small_batch()).unwrap();
    t.put(&small_batch()).unwrap();
    let err = t.put(&small_batch()).unwrap_err();
    assert!(
        matches!(err, InstanceError::Trap { call: "put", .. }),
        "{err}"
    );
    // A stack overflow in a guest runs off the bottom of its linear memory.
    let mut s = misbehave(&rt, &[("mode", "stack-overflow")]);
    let err = s.put(&small_batch()).unwrap_err();
    assert!(matches!(err, InstanceError::Trap { .. }), "{err}");
    let limits = RuntimeLimits {
        memory_limit_bytes: 8 << 20,
        ..RuntimeLimits::default()
    };
    let rt = runtime(limits);
    let mut g = misbehave(&rt, &[("mode", "grow")]);
    let err = (0..100)
        .find_map(|_| g.put(&small_batch()).err())
        .expect("grow never hit the limit");
    assert!(matches!(err, InstanceError::MemoryLimit { .. }), "{err}");
}

#[test]
fn configure_refusals_name_the_option() {
    let rt = runtime(RuntimeLimits::default());
    let opts = vec![("mode".to_string(), "evil".to_string())];
    let err = rt
        .instantiate(&load(&rt, &MISBEHAVE), WIDTH, &opts)
        .unwrap_err();
    assert!(
        matches!(
            err,
            InstanceError::Refused {
                call: "configure",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("evil"), "{err}");
}

#[test]
fn load_refuses_what_is_not_an_aggregator_with_the_reason() {
    let rt = runtime(RuntimeLimits::default());
    let err = rt.load(IMPORTS.bytes).unwrap_err();
    assert!(
        matches!(&err, LoadError::Import(name) if name == "wagg:evil/env@0.1.0"),
        "{err}"
    );
    let err = rt.load(OTHERWORLD.bytes).unwrap_err();
    assert!(err.to_string().contains("it exports: greet"), "{err}");
    let err = rt.load(b"garbage bytes here").unwrap_err();
    assert!(matches!(err, LoadError::NotWasm(_)), "{err}");
    let err = rt.load(b"\0asm\x01\0\0\0").unwrap_err();
    assert!(matches!(err, LoadError::CoreModule), "{err}");
    let mut truncated = HASHMAP.bytes.to_vec();
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(
        rt.load(&truncated).unwrap_err(),
        LoadError::Compile(_)
    ));
    let engine = wasmtime::Engine::default();
    let precompiled = engine.precompile_component(HASHMAP.bytes).unwrap();
    assert!(matches!(
        rt.load(&precompiled).unwrap_err(),
        LoadError::Precompiled
    ));
}

#[test]
fn compiled_modules_are_cached_and_a_tampered_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeLimits::default(), Some(dir.path())).unwrap();
    assert!(!rt.load(BTREE.bytes).unwrap().info().from_cache);
    let cached = rt.load(BTREE.bytes).unwrap();
    assert!(cached.info().from_cache);
    // Flip a byte of the cached artifact: it must not be loaded.
    let artifact = walk(dir.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();
    let reloaded = rt.load(BTREE.bytes).unwrap();
    assert!(
        !reloaded.info().from_cache,
        "a tampered artifact was loaded"
    );
    let mut i = rt.instantiate(&reloaded, WIDTH, &[]).unwrap();
    i.put(&small_batch()).unwrap();
    assert_eq!(i.flush(u64::MAX / 2, &|_| true).unwrap().len(), 20);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
