//! The `wagg loadgen | record | replay | bench` commands: flags, and the
//! glue from flags to the library. `main.rs` only dispatches here.
//!
//! Broker settings come from `[source.amqp]` of `--config` (the host's own
//! file, so the tools talk to what the host consumes) and each can be
//! overridden by a flag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::TrafficError;
use super::bench::{self, BenchOptions, Workload};
use super::loadgen::{self, EventTime, Format, LoadgenOptions, Rate};
use super::progress::{Progress, ProgressMode};
use super::publish::Target;
use super::record::{RecordLimits, RecordSource, Recorder};
use super::recording::RecordingWriter;
use super::replay::{self, Pace, ReplayOptions};
use crate::config::Config;
use crate::source::generator::Churn;

/// How progress is shown (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressFlag {
    /// A bar on a terminal, a line per second otherwise.
    Auto,
    /// A line per second.
    Lines,
    /// Nothing.
    None,
}

impl ProgressFlag {
    fn mode(self) -> ProgressMode {
        match self {
            ProgressFlag::Auto => ProgressMode::Auto,
            ProgressFlag::Lines => ProgressMode::Lines,
            ProgressFlag::None => ProgressMode::Hidden,
        }
    }
}

/// What loadgen publishes (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatFlag {
    /// wagg's JSON messages.
    Json,
    /// collectd `PUTVAL` commands (`text/collectd`), one message per metric:
    /// the same workload for collectd's `amqp` plugin (identifiers in
    /// `wagg::traffic::putval`).
    Putval,
}

impl FormatFlag {
    fn format(self) -> Format {
        match self {
            FormatFlag::Json => Format::Json,
            FormatFlag::Putval => Format::Putval,
        }
    }
}

/// Broker flags shared by loadgen, record and replay.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Configuration file (TOML): its `[source.amqp]` gives the broker,
    /// exchange and routing key; its `[generator]`, `[router]` and
    /// `[pipeline]` the defaults of the other flags.
    #[arg(long, short, env = "WAGG_CONFIG")]
    pub config: Option<PathBuf>,
    /// AMQP URI (overrides `source.amqp.uri`).
    #[arg(long)]
    pub uri: Option<String>,
    /// Exchange (overrides `source.amqp.exchange`).
    #[arg(long)]
    pub exchange: Option<String>,
    /// Routing key, or binding key for `record` (overrides
    /// `source.amqp.routing_key`).
    #[arg(long)]
    pub routing_key: Option<String>,
    /// Progress display.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressFlag,
}

/// `wagg loadgen`.
#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// Broker and progress flags.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Distinct customers.
    #[arg(long)]
    pub customers: Option<u32>,
    /// Zones per customer.
    #[arg(long)]
    pub zones: Option<u32>,
    /// Records per zone.
    #[arg(long)]
    pub records: Option<u32>,
    /// POPs.
    #[arg(long)]
    pub pops: Option<u32>,
    /// Metrics per message (the bulk size).
    #[arg(long)]
    pub metrics_per_message: Option<usize>,
    /// Zipf exponent of customer, zone and record popularity (0: uniform).
    #[arg(long)]
    pub zipf: Option<f64>,
    /// Seed: the same seed gives the same messages.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Target rate in messages per second (default: as fast as the broker
    /// confirms).
    #[arg(long, conflicts_with = "sample_rate")]
    pub rate: Option<f64>,
    /// Target rate in samples per second (metrics × rollups).
    #[arg(long)]
    pub sample_rate: Option<f64>,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (`30s`, `5m`); until Ctrl-C without it or
    /// `--count`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Series churn: share of records renamed every `--churn-every` of event
    /// time (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Period of the churn, event time.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub churn_every: Duration,
    /// Event time of the first message (seconds since the epoch); default:
    /// the wall clock.
    #[arg(long)]
    pub start_time: Option<u64>,
    /// Seconds of event time per second of wall time (with `--start-time`).
    #[arg(long, default_value_t = 1.0, requires = "start_time")]
    pub time_scale: f64,
    /// Instead of `--time-scale`: event time advances one second every N
    /// messages, whatever the publishing speed, so that two runs with the
    /// same seed publish the same times (with `--start-time`).
    #[arg(long, requires = "start_time", conflicts_with = "time_scale")]
    pub messages_per_event_second: Option<f64>,
    /// Bucket width the totals are kept per (default: `pipeline.bucket_seconds`).
    #[arg(long)]
    pub bucket_seconds: Option<u32>,
    /// Publish transient messages (cheaper for the broker) instead of
    /// persistent ones.
    #[arg(long)]
    pub transient: bool,
    /// Write the totals (and every point of the `customer` rollup:
    /// customer, pop, bucket, sum) to this JSON file.
    #[arg(long)]
    pub totals_json: Option<PathBuf>,
    /// Message format. `putval` publishes each metric as a collectd
    /// `PUTVAL` command (host = pop, plugin instance = `c<customer>`), the
    /// same metrics and totals as `json` for the same flags; `--count` and
    /// `--rate` still count generated messages.
    #[arg(long, value_enum, default_value = "json")]
    pub format: FormatFlag,
}

/// `wagg record FILE`.
#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    /// The recording; continued if it exists.
    pub file: PathBuf,
    /// Broker and progress flags.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop once the file is this large (`500M`, `2G`, or bytes).
    #[arg(long, value_parser = parse_bytes)]
    pub max_bytes: Option<u64>,
}

/// `wagg replay FILE`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The recording.
    pub file: PathBuf,
    /// Broker and progress flags.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Replay at this multiple of the recorded pace (default 1: the
    /// original pace).
    #[arg(long, conflicts_with_all = ["rate", "unthrottled"])]
    pub speed: Option<f64>,
    /// Replay at a fixed number of messages per second.
    #[arg(long, conflicts_with = "unthrottled")]
    pub rate: Option<f64>,
    /// Replay as fast as the broker confirms.
    #[arg(long)]
    pub unthrottled: bool,
    /// Start again at the end (until `--count`, `--duration` or Ctrl-C).
    #[arg(long = "loop")]
    pub repeat: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Publish transient messages instead of persistent ones.
    #[arg(long)]
    pub transient: bool,
}

/// `wagg bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Module to run: a built-in name or a `.wasm` file; repeat to compare
    /// (the first is the reference).
    #[arg(long = "strategy", visible_alias = "module", default_value = "hashmap")]
    pub strategies: Vec<String>,
    /// Run on this recording instead of a generated workload.
    #[arg(long)]
    pub recording: Option<PathBuf>,
    /// Messages of the generated workload.
    #[arg(long, default_value_t = 2_000)]
    pub messages: u64,
    /// Customers of the generated workload.
    #[arg(long)]
    pub customers: Option<u32>,
    /// Zipf exponent of the generated workload.
    #[arg(long)]
    pub zipf: Option<f64>,
    /// Seed of the generated workload.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Live-series sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = bench::DEFAULT_SIZES)]
    pub sizes: Vec<u64>,
    /// Rounds (put the whole stream, flush) per size.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Samples per put.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// Most samples taken from the workload (a long recording is cut here,
    /// keeping a run to seconds per module).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_samples: usize,
    /// Configuration file: rollups (`[router]`), limits (`[runtime]`),
    /// bucket width (`[pipeline]`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Save the results (JSON) for a later `--baseline`.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Compare with a saved result; exits non-zero on a regression.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Relative change below which nothing is flagged against the baseline
    /// (two runs of one binary on this kind of VM differed by up to ~11 %).
    #[arg(long, default_value_t = 0.15)]
    pub noise: f64,
    /// Progress display.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressFlag,
}

/// Parses `500ms`, `5s`, `2m`, `1h` (a bare number is seconds).
///
/// # Errors
///
/// A message naming the bad input.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 5s, 500ms, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// Parses `1024`, `64K`, `500M`, `2G` (binary multiples).
///
/// # Errors
///
/// A message naming the bad input.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 1048576, 64K, 500M, 2G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn load_config(path: Option<&Path>) -> Result<Config, TrafficError> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| TrafficError::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    Config::from_toml(&text)
        .map_err(|e| TrafficError::Config(format!("invalid configuration {}: {e}", path.display())))
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, TrafficError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| TrafficError::Io {
            what: "cannot start the async runtime".into(),
            source,
        })
}

/// Ctrl-C; a failure to listen for it waits forever (the run then ends by
/// its own limits).
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn target(cfg: &Config, b: &BrokerArgs, persistent: bool) -> Target {
    let amqp = &cfg.source.amqp;
    Target {
        uri: b.uri.clone().unwrap_or_else(|| amqp.uri.clone()),
        exchange: b.exchange.clone().unwrap_or_else(|| amqp.exchange.clone()),
        routing_key: b
            .routing_key
            .clone()
            .unwrap_or_else(|| amqp.routing_key.clone()),
        persistent,
    }
}

/// `wagg loadgen`: publishes, then prints what it published.
///
/// # Errors
///
/// Bad flags or configuration, broker errors (see [`loadgen::loadgen`]), a
/// totals file that cannot be written.
pub fn run_loadgen(args: LoadgenArgs) -> Result<(), TrafficError> {
    let cfg = load_config(args.broker.config.as_deref())?;
    let mut generator = cfg.generator.clone();
    let g = &mut generator;
    g.customers = args.customers.unwrap_or(g.customers);
    g.zones_per_customer = args.zones.unwrap_or(g.zones_per_customer);
    g.records_per_zone = args.records.unwrap_or(g.records_per_zone);
    g.pops = args.pops.unwrap_or(g.pops);
    g.metrics_per_message = args.metrics_per_message.unwrap_or(g.metrics_per_message);
    g.zipf_exponent = args.zipf.unwrap_or(g.zipf_exponent);
    g.seed = args.seed.unwrap_or(g.seed);
    if !(0.0..=1.0).contains(&args.churn) {
        return Err(TrafficError::Config(format!(
            "--churn must be between 0 and 1, not {}",
            args.churn
        )));
    }
    let rate = match (args.rate, args.sample_rate) {
        (Some(r), _) => Some(Rate::Messages(r)),
        (None, Some(r)) => Some(Rate::Samples(r)),
        (None, None) => None,
    };
    if let Some(Rate::Messages(r) | Rate::Samples(r)) = rate
        && !(r.is_finite() && r > 0.0)
    {
        return Err(TrafficError::Config(format!(
            "the rate must be a positive number, not {r}"
        )));
    }
    let opts = LoadgenOptions {
        target: target(&cfg, &args.broker, !args.transient),
        generator,
        churn: (args.churn > 0.0).then(|| Churn {
            fraction: args.churn,
            period_secs: args.churn_every.as_secs().max(1),
        }),
        bucket_seconds: args.bucket_seconds.unwrap_or(cfg.pipeline.bucket_seconds),
        rollups: cfg.router.rollups.len(),
        rate,
        count: args.count,
        duration: args.duration,
        event_time: match (args.start_time, args.messages_per_event_second) {
            (Some(start), Some(per_second)) => EventTime::Counted { start, per_second },
            (Some(start), None) => EventTime::Scaled {
                start,
                scale: args.time_scale,
            },
            (None, _) => EventTime::Wall,
        },
    };
    let progress = Progress::new(args.broker.progress.mode(), "loadgen", args.count);
    let format = args.format.format();
    let report =
        tokio_runtime()?.block_on(loadgen::loadgen_as(&opts, format, &progress, ctrl_c()))?;
    progress.finish();
    println!(
        "published {} messages, {} metrics, {} samples, sum of counts {} in {:.2} s ({:.0} msg/s)",
        report.messages,
        report.metrics,
        report.samples,
        report.count_sum,
        report.elapsed_secs,
        report.messages as f64 / report.elapsed_secs.max(1e-9)
    );
    if format == Format::Putval {
        println!(
            "as {} PUTVAL messages ({:.0} msg/s)",
            report.published,
            report.published as f64 / report.elapsed_secs.max(1e-9)
        );
    }
    for rollup in &cfg.router.rollups {
        let points = if rollup.name == "customer" {
            format!(", {} points", report.per_customer.len())
        } else {
            String::new()
        };
        println!(
            "rollup {:<10} total {}{points}",
            rollup.name, report.count_sum
        );
    }
    if let Some(path) = &args.totals_json {
        let json = serde_json::to_vec_pretty(&report).map_err(|e| TrafficError::Io {
            what: "cannot encode the totals".into(),
            source: e.into(),
        })?;
        std::fs::write(path, json).map_err(|source| TrafficError::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })?;
        println!("totals written to {}", path.display());
    }
    Ok(())
}

/// `wagg record FILE`.
///
/// # Errors
///
/// A bad file, broker errors (see [`Recorder::start`]).
pub fn run_record(args: RecordArgs) -> Result<(), TrafficError> {
    let cfg = load_config(args.broker.config.as_deref())?;
    let t = target(&cfg, &args.broker, true);
    let source = RecordSource {
        uri: t.uri,
        exchange: t.exchange,
        exchange_kind: cfg.source.amqp.exchange_kind,
        binding_key: t.routing_key,
    };
    let limits = RecordLimits {
        count: args.count,
        duration: args.duration,
        max_bytes: args.max_bytes,
    };
    let progress = Progress::new(args.broker.progress.mode(), "record", args.count);
    // The queue first: a missing exchange leaves no file behind. Messages
    // that arrive while the file is opened wait in the queue.
    let (report, writer) = tokio_runtime()?.block_on(async {
        let recorder = Recorder::start(&source).await?;
        let (mut writer, continued) = RecordingWriter::open(&args.file)?;
        if continued.records > 0 {
            eprintln!(
                "continuing {}: {} records already recorded",
                args.file.display(),
                continued.records
            );
        }
        if let Some(tail) = continued.tail {
            eprintln!("{}: {tail}; cut off before appending", args.file.display());
        }
        let report = recorder
            .run(&mut writer, limits, &progress, ctrl_c())
            .await?;
        Ok::<_, TrafficError>((report, writer))
    })?;
    progress.finish();
    writer.finish()?;
    println!(
        "recorded {} messages ({} bytes) in {:.2} s; {} now holds {} records, {} bytes",
        report.messages,
        report.body_bytes,
        report.elapsed.as_secs_f64(),
        args.file.display(),
        report.records,
        report.file_bytes
    );
    Ok(())
}

/// `wagg replay FILE`.
///
/// # Errors
///
/// A bad file, bad pace flags, broker errors (see [`replay::replay`]).
pub fn run_replay(args: ReplayArgs) -> Result<(), TrafficError> {
    let cfg = load_config(args.broker.config.as_deref())?;
    let pace = match (args.speed, args.rate, args.unthrottled) {
        (_, _, true) => Pace::Unthrottled,
        (_, Some(r), _) => Pace::Rate(r),
        (s, None, false) => Pace::Original {
            speed: s.unwrap_or(1.0),
        },
    };
    let opts = ReplayOptions {
        target: target(&cfg, &args.broker, !args.transient),
        pace,
        repeat: args.repeat,
        count: args.count,
        duration: args.duration,
    };
    let total = std::fs::metadata(&args.file).ok().map(|m| m.len());
    let progress = Progress::new(
        args.broker.progress.mode(),
        "replay",
        if args.repeat { None } else { total },
    );
    let report =
        tokio_runtime()?.block_on(replay::replay(&args.file, &opts, &progress, ctrl_c()))?;
    progress.finish();
    println!(
        "replayed {} messages ({} bytes) in {:.2} s ({:.0} msg/s), {} pass(es)",
        report.messages,
        report.body_bytes,
        report.elapsed.as_secs_f64(),
        report.messages as f64 / report.elapsed.as_secs_f64().max(1e-9),
        report.passes
    );
    if let Some(tail) = report.tail {
        println!("{}: {tail}", args.file.display());
    }
    Ok(())
}

/// `wagg bench`.
///
/// # Errors
///
/// Unknown or refused modules, a bad recording or baseline,
/// [`TrafficError::Regressed`] when a figure regressed against the baseline.
pub fn run_bench(args: BenchArgs) -> Result<(), TrafficError> {
    let cfg = load_config(args.config.as_deref())?;
    let workload = match &args.recording {
        Some(path) => Workload::Recording(path.clone()),
        None => {
            let mut config = bench::default_workload();
            config.customers = args.customers.unwrap_or(config.customers);
            config.zipf_exponent = args.zipf.unwrap_or(config.zipf_exponent);
            config.seed = args.seed.unwrap_or(config.seed);
            Workload::Generated {
                config,
                messages: args.messages,
            }
        }
    };
    let opts = BenchOptions {
        modules: args.strategies.clone(),
        workload,
        sizes: args.sizes.clone(),
        rounds: args.rounds,
        batch_size: args.batch_size,
        router: cfg.router.clone(),
        limits: cfg.runtime.clone(),
        bucket_seconds: cfg.pipeline.bucket_seconds,
        max_samples: args.max_samples.max(1),
    };
    let baseline = args
        .baseline
        .as_deref()
        .map(bench::load_result)
        .transpose()?;
    let progress = Progress::new(
        args.progress.mode(),
        "bench",
        Some(opts.sizes.len() as u64 * u64::from(opts.rounds)),
    );
    let result = bench::bench(&opts, &progress)?;
    progress.finish();
    let json = serde_json::to_string_pretty(&result).map_err(|e| TrafficError::Io {
        what: "cannot encode the results".into(),
        source: e.into(),
    })?;
    if args.json {
        println!("{json}");
    } else {
        print!("{}", bench::render(&result));
    }
    if let Some(path) = &args.save {
        std::fs::write(path, &json).map_err(|source| TrafficError::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })?;
        eprintln!("results saved to {}", path.display());
    }
    if let Some(base) = baseline {
        let comparisons = bench::compare(&result, &base, args.noise);
        if args.json {
            eprint!("{}", bench::render_comparison(&comparisons, args.noise));
        } else {
            print!("{}", bench::render_comparison(&comparisons, args.noise));
        }
        let regressed = comparisons
            .iter()
            .filter(|c| c.verdict == bench::Verdict::Regression)
            .count();
        if regressed > 0 {
            return Err(TrafficError::Regressed(regressed));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2y").is_err());
    }
}
