//! `wagg demo`: the real pipeline on generated traffic, checked at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use wagg::config::Config;
use wagg::pipeline::{self, Drain, Parts, PipelineCounters};
use wagg::runtime::{LoadedModule, Runtime};
use wagg::shard::Assignment;
use wagg::sink::{FileSinkConfig, Point, Sink, SinkConfig};
use wagg::source::generator::{Generator, GeneratorSource};
use wagg::source::json::JsonDecoder;

use super::module::module_bytes;
use super::run::shutdown_signal;

fn load_modules(
    cfg: &Config,
    runtime: &Runtime,
) -> anyhow::Result<(Arc<LoadedModule>, Arc<LoadedModule>)> {
    let load = |name: &str| -> anyhow::Result<Arc<LoadedModule>> {
        let bytes = module_bytes(name)?;
        runtime
            .load(&bytes)
            .with_context(|| format!("module `{name}` is refused"))
    };
    let fallback = load("hashmap")?;
    let module = if cfg.module.strategy == "hashmap" {
        fallback.clone()
    } else {
        load(&cfg.module.strategy)?
    };
    Ok((module, fallback))
}

fn parts(cfg: &Config, sink: Sink) -> anyhow::Result<Parts> {
    let runtime = Runtime::new(
        cfg.runtime.clone(),
        Some(&cfg.pipeline.data_dir.join("compiled")),
    )?;
    let (module, fallback) = load_modules(cfg, &runtime)?;
    Ok(Parts {
        config: cfg.pipeline.clone(),
        router: Arc::new(cfg.router.clone()),
        runtime,
        assignment: Assignment::new(module, cfg.module_options(), &cfg.module.strategy),
        fallback: Assignment::plain(fallback),
        events: tokio::sync::broadcast::channel(1024).0,
        control: None,
        decoder: Arc::new(JsonDecoder::new(cfg.decode)),
        sink: Arc::new(sink),
        metrics: wagg::telemetry::Metrics::new(),
    })
}

pub(crate) async fn demo(
    mut cfg: Config,
    duration: Option<Duration>,
    out: PathBuf,
) -> anyhow::Result<()> {
    // A fresh data directory: a demo never resumes an old checkpoint.
    let data = tempfile::tempdir().context("cannot create a temporary directory")?;
    cfg.pipeline.data_dir = data.path().to_path_buf();
    cfg.pipeline.idle_flush_secs = 0;
    match std::fs::remove_file(&out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", out.display())),
    }
    let sink = Sink::from_config(&SinkConfig::File(FileSinkConfig { path: out.clone() }))?;
    let parts = parts(&cfg, sink)?;
    let generator = Generator::new(cfg.generator.clone(), cfg.pipeline.bucket_seconds)
        .map_err(anyhow::Error::msg)?;
    let source = GeneratorSource::new(generator, None);
    let totals = source.totals();
    let counters = Arc::new(PipelineCounters::default());
    eprintln!(
        "wagg demo: {} shards running `{}`, bucket {} s, event time x{}; points to {}",
        cfg.router.shards,
        cfg.module.strategy,
        cfg.pipeline.bucket_seconds,
        cfg.generator.time_scale,
        out.display()
    );
    let status = tokio::spawn(status_line(counters.clone()));
    let stop = async move {
        match duration {
            Some(d) => {
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = shutdown_signal() => {}
                }
            }
            None => shutdown_signal().await,
        }
    };
    let started = Instant::now();
    pipeline::run(parts, source, counters.clone(), Drain::Everything, stop).await?;
    status.abort();
    let elapsed = started.elapsed();
    eprintln!();
    let totals = totals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let samples = counters.samples.load(Ordering::Relaxed);
    println!(
        "generated {} messages, {} metrics, {} samples in {:.2?}: {:.0} samples/s",
        totals.messages,
        totals.metrics,
        samples,
        elapsed,
        samples as f64 / elapsed.as_secs_f64()
    );
    check_demo_output(&out, &cfg, &totals)
}

/// Reads the demo's points back and compares them with what was generated:
/// every rollup's points must add up to the generated total, and every
/// point of the `customer` rollup must equal its generated total exactly.
fn check_demo_output(
    out: &Path,
    cfg: &Config,
    totals: &wagg::source::generator::Totals,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(out).with_context(|| format!("cannot read {}", out.display()))?;
    let mut per_rollup: std::collections::BTreeMap<String, f64> = Default::default();
    let mut customer_points = 0usize;
    let mut mismatches = 0usize;
    for line in text.lines() {
        let p: Point =
            serde_json::from_str(line).context("the sink file holds a line that is not a point")?;
        let rollup = p.tags.get("rollup").unwrap_or_default().to_string();
        *per_rollup.entry(rollup.clone()).or_default() += p.value;
        if rollup == "customer" {
            customer_points += 1;
            let customer: u64 = p
                .tags
                .get("customer")
                .and_then(|c| c.parse().ok())
                .unwrap_or(u64::MAX);
            let pop = p.tags.get("pop").unwrap_or_default().to_string();
            if totals.per_customer.get(&(customer, pop, p.timestamp)) != Some(&p.value) {
                mismatches += 1;
            }
        }
    }
    let mut ok = mismatches == 0 && customer_points == totals.per_customer.len();
    for rollup in &cfg.router.rollups {
        let got = per_rollup.get(&rollup.name).copied().unwrap_or(0.0);
        let exact = got == totals.count_sum;
        ok &= exact;
        println!(
            "rollup {:<10} total {:>14} (generated {:>14}) {}",
            rollup.name,
            got,
            totals.count_sum,
            if exact { "exact" } else { "MISMATCH" }
        );
    }
    println!(
        "customer points: {customer_points} written, {} expected, {mismatches} differ",
        totals.per_customer.len()
    );
    if !ok {
        bail!("the points written do not match what was generated");
    }
    println!("ok: totals exact");
    Ok(())
}

async fn status_line(counters: Arc<PipelineCounters>) {
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let samples = counters.samples.load(Ordering::Relaxed);
        let rate = (samples - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), samples);
        let (series, memory) = counters.shards.get().map_or((0, 0), |shards| {
            shards.iter().fold((0, 0), |(s, m), c| {
                (
                    s + c.live_series.load(Ordering::Relaxed),
                    m + c.memory_bytes.load(Ordering::Relaxed),
                )
            })
        });
        eprint!(
            "\r{:>10.0} samples/s | {:>8} live series | {:>4} flushes | {:>8} points | module memory {:>6.1} MiB   ",
            rate,
            series,
            counters.flushes.load(Ordering::Relaxed),
            counters.points_written.load(Ordering::Relaxed),
            memory as f64 / (1 << 20) as f64
        );
    }
}
