//! The `wagg` binary: parses arguments, sets up logging, runs a command.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use wagg::admin::Registry;
use wagg::admin::client::{self as admin_client, AdminClient};
use wagg::admin::controller::{self, Controller};
use wagg::admin::http::{self as admin_http, AdminState};
use wagg::config::{Config, EXAMPLE};
use wagg::pipeline::{self, Drain, Parts, PipelineControl, PipelineCounters};
use wagg::runtime::{self, LoadedModule, Runtime};
use wagg::shard::Assignment;
use wagg::sink::{FileSinkConfig, Point, Sink, SinkConfig};
use wagg::source::amqp::AmqpSource;
use wagg::source::generator::{Generator, GeneratorSource};
use wagg::source::json::JsonDecoder;

#[derive(Debug, Parser)]
#[command(
    name = "wagg",
    version,
    about = "WebAssembly-sandboxed metrics aggregation"
)]
struct Cli {
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = "WAGG_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline: RabbitMQ in, the configured sink out.
    Run {
        /// Configuration file (TOML); defaults apply without one.
        #[arg(long, short, env = "WAGG_CONFIG")]
        config: Option<PathBuf>,
        /// Override `router.shards`.
        #[arg(long)]
        shards: Option<u32>,
        /// Override `module.strategy`.
        #[arg(long)]
        strategy: Option<String>,
    },
    /// Run the real pipeline on generated traffic: no broker, no TSDB. Points
    /// go to a file; at the end their totals are checked against what was
    /// generated.
    Demo {
        /// How long to generate (e.g. `5s`, `2m`); until Ctrl-C without it.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Configuration file (TOML) for the generator, router, module.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override `router.shards`.
        #[arg(long)]
        shards: Option<u32>,
        /// Override `module.strategy`.
        #[arg(long)]
        strategy: Option<String>,
        /// File the points are written to (replaced).
        #[arg(long, default_value = "wagg-demo-points.jsonl")]
        out: PathBuf,
    },
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Aggregation modules.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Show the rollout of a running host, or set it: CANDIDATE on
    /// `--weight` percent of the shards (whole shards, hot-swapped).
    Rollout {
        /// The candidate: `name@version`, an id or id prefix.
        #[arg(requires = "weight")]
        candidate: Option<String>,
        /// Share of shards on the candidate, percent (0 keeps it on none).
        #[arg(long, requires = "candidate", value_parser = clap::value_parser!(u8).range(0..=100))]
        weight: Option<u8>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the candidate the incumbent on every shard of a running host.
    Promote {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run a module in shadow beside the incumbent (its output is compared,
    /// never written), or stop the shadow.
    Shadow {
        /// The module (`name@version`, name, id); omit with `--stop`.
        #[arg(required_unless_present = "stop")]
        candidate: Option<String>,
        /// Shards to shadow, e.g. `2,3` (default: every incumbent shard).
        #[arg(long, value_delimiter = ',', conflicts_with = "share")]
        shards: Option<Vec<u32>>,
        /// Share of the incumbent's shards to shadow, percent.
        #[arg(long)]
        share: Option<u8>,
        /// Stop the shadow.
        #[arg(long, conflicts_with_all = ["candidate", "shards", "share"])]
        stop: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the A/B report of the running shadow against the incumbent.
    Ab {
        /// Refresh every this many seconds until Ctrl-C.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Take the candidate off every shard of a running host.
    Rollback {
        /// Why, recorded with the module (shown by `wagg module list`).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Publish generated traffic (Zipf-skewed, seedable, rate-held) to
    /// RabbitMQ and print the totals a sink should end up with.
    Loadgen(wagg::traffic::LoadgenArgs),
    /// Copy live traffic into a recording file through a queue of its own.
    Record(wagg::traffic::RecordArgs),
    /// Publish a recording again: original pace, a multiple, or a rate.
    Replay(wagg::traffic::ReplayArgs),
    /// Benchmark modules offline on a recording or generated workload.
    Bench(wagg::traffic::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print a documented configuration with every default.
    Example,
    /// Check a configuration file.
    Check {
        /// The file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    /// Check a module against the wagg world: prints what it exports, or
    /// why it is refused (and exits non-zero).
    Validate {
        /// The `.wasm` component, or a built-in's name.
        file: String,
    },
    /// Upload a component to a running host: validated, compiled and
    /// test-run there, then stored (a restart keeps it).
    Upload {
        /// The `.wasm` component.
        file: PathBuf,
        /// Its name (letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        name: String,
        /// Its version (same characters; `builtin` is reserved).
        #[arg(long)]
        version: String,
        /// An option for its `configure`, `key=value`; repeat for more.
        #[arg(long = "option", value_name = "KEY=VALUE", value_parser = parse_module_option)]
        options: Vec<(String, String)>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a running host's modules: state, shards, memory, live series,
    /// failures, why one was rolled back.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove an idle module from a running host.
    Remove {
        /// `name@version`, an id or an id prefix (8+ hex digits).
        key: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the admin API of a running host is, and its token.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The admin API's URL (`[admin] listen` of the running host).
    #[arg(long = "admin", env = admin_client::ADMIN_URL_ENV, default_value = admin_client::DEFAULT_ADMIN_URL)]
    url: String,
    /// Bearer token for changes (`[admin] token` of the running host).
    #[arg(long, env = admin_http::TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(&self.url, self.token.clone())?)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Config(ConfigCommand::Example) => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            load_config(Some(&file))?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Module(ModuleCommand::Validate { file }) => validate(&file),
        Command::Module(ModuleCommand::Upload {
            file,
            name,
            version,
            options,
            admin,
        }) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let client = admin.client()?;
            let record = tokio_runtime()?
                .block_on(client.upload(bytes, &name, &version, &options))
                .with_context(|| format!("{} was not uploaded", file.display()))?;
            println!("uploaded {} as {}", record.label(), record.id);
            println!(
                "roll it out with: wagg rollout {} --weight 25",
                record.label()
            );
            Ok(())
        }
        Command::Module(ModuleCommand::List { admin }) => {
            let client = admin.client()?;
            let modules = tokio_runtime()?.block_on(client.list())?;
            print!("{}", admin_client::module_table(&modules));
            Ok(())
        }
        Command::Module(ModuleCommand::Remove { key, admin }) => {
            let client = admin.client()?;
            let record = tokio_runtime()?
                .block_on(client.remove(&key))
                .with_context(|| format!("`{key}` was not removed"))?;
            println!("removed {} ({})", record.label(), record.id);
            Ok(())
        }
        Command::Rollout {
            candidate,
            weight,
            admin,
        } => {
            let client = admin.client()?;
            let view = match (candidate, weight) {
                (Some(candidate), Some(weight)) => tokio_runtime()?
                    .block_on(client.set_rollout(&candidate, weight))
                    .with_context(|| format!("the rollout of {candidate} was not changed"))?,
                _ => tokio_runtime()?.block_on(client.rollout())?,
            };
            print!("{}", admin_client::rollout_summary(&view));
            Ok(())
        }
        Command::Promote { admin } => {
            let client = admin.client()?;
            let view = tokio_runtime()?
                .block_on(client.promote())
                .context("the candidate was not promoted")?;
            print!("{}", admin_client::rollout_summary(&view));
            Ok(())
        }
        Command::Shadow {
            candidate,
            shards,
            share,
            stop,
            admin,
        } => {
            let client = admin.client()?;
            let rt = tokio_runtime()?;
            let answer = match candidate {
                Some(c) if !stop => rt.block_on(client.start_shadow(&c, shards, share)),
                _ => rt.block_on(client.stop_shadow()),
            }
            .context("the shadow was not changed")?;
            println!("{answer}");
            Ok(())
        }
        Command::Ab { watch, json, admin } => {
            let client = admin.client()?;
            let rt = tokio_runtime()?;
            loop {
                let report = rt.block_on(client.ab()).context("no A/B report")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    if watch.is_some() {
                        // Clear the screen so the table stays in place.
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", admin_client::ab_table(&report));
                }
                match watch {
                    Some(secs) => std::thread::sleep(Duration::from_secs(secs.max(1))),
                    None => return Ok(()),
                }
            }
        }
        Command::Rollback { reason, admin } => {
            let client = admin.client()?;
            let view = tokio_runtime()?
                .block_on(client.rollback(reason.as_deref()))
                .context("the candidate was not rolled back")?;
            print!("{}", admin_client::rollout_summary(&view));
            Ok(())
        }
        Command::Run {
            config,
            shards,
            strategy,
        } => {
            let mut cfg = load_config(config.as_deref())?;
            apply_overrides(&mut cfg, shards, strategy)?;
            tokio_runtime()?.block_on(run_pipeline(cfg))
        }
        Command::Demo {
            duration,
            config,
            shards,
            strategy,
            out,
        } => {
            let mut cfg = load_config(config.as_deref())?;
            apply_overrides(&mut cfg, shards, strategy)?;
            tokio_runtime()?.block_on(demo(cfg, duration, out))
        }
        Command::Loadgen(args) => Ok(wagg::traffic::cli::run_loadgen(args)?),
        Command::Record(args) => Ok(wagg::traffic::cli::run_record(args)?),
        Command::Replay(args) => Ok(wagg::traffic::cli::run_replay(args)?),
        Command::Bench(args) => Ok(wagg::traffic::cli::run_bench(args)?),
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Config::from_toml(&text).with_context(|| format!("invalid configuration {}", path.display()))
}

fn apply_overrides(
    cfg: &mut Config,
    shards: Option<u32>,
    strategy: Option<String>,
) -> anyhow::Result<()> {
    if let Some(s) = shards {
        cfg.router.shards = s;
    }
    if let Some(s) = strategy {
        cfg.module.strategy = s;
    }
    cfg.validate().context("invalid configuration")?;
    Ok(())
}

/// `key=value` of `wagg module upload --option`.
fn parse_module_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not `key=value`")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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
    Ok(Duration::from_secs_f64(secs))
}

/// A strategy's bytes: a built-in's name, or a file.
fn module_bytes(strategy: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(bytes) = runtime::builtin(strategy) {
        return Ok(bytes.to_vec());
    }
    std::fs::read(strategy).with_context(|| {
        format!(
            "`{strategy}` is neither a built-in strategy ({}) nor a readable file",
            runtime::builtin_names().join(", ")
        )
    })
}

fn validate(file: &str) -> anyhow::Result<()> {
    let bytes = module_bytes(file)?;
    let runtime = Runtime::new(Default::default(), None)?;
    match runtime.load(&bytes) {
        Ok(module) => {
            let info = module.info();
            println!("ok: {file}");
            println!("  world:   {}@{}", info.world, info.version);
            println!("  exports: {}", info.exports.join(", "));
            println!("  id:      {}", info.id);
            println!(
                "  size:    {} bytes, compiled in {:.1?}",
                info.size_bytes, info.compile_time
            );
            Ok(())
        }
        Err(err) => bail!("{file} is refused: {err}"),
    }
}

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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutting down: flushing complete buckets and acknowledging what is written.");
}

async fn run_pipeline(cfg: Config) -> anyhow::Result<()> {
    // The admin API listens first: a taken address fails before anything
    // else starts. It serves /healthz and /metrics at once, /readyz and the
    // controller's calls once the controller runs, until the pipeline ends.
    let listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the admin API (set [admin] listen to a free address)",
                cfg.admin.listen
            )
        })?;
    if admin_http::configured_token(&cfg.admin).is_none() {
        tracing::warn!(
            "No admin token is configured ([admin] token or {}): the admin API refuses every change.",
            admin_http::TOKEN_ENV
        );
    }
    let metrics = wagg::telemetry::Metrics::new();
    let admin = AdminState::from_config(&cfg.admin, metrics.clone());
    let (stop_admin, stop_admin_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let admin = admin.clone();
        async move {
            let result = admin_http::serve(listener, admin, async {
                let _ = stop_admin_rx.await;
            })
            .await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "The admin API stopped serving.");
            }
            result
        }
    });
    let data_dir = cfg.pipeline.data_dir.clone();
    let sink = Sink::from_config(&cfg.sink).context("cannot set up the sink")?;
    let runtime = Runtime::new(cfg.runtime.clone(), Some(&data_dir.join("compiled")))?;
    let (registry, incumbent, fallback) = {
        let runtime = runtime.clone();
        let strategy = cfg.module.strategy.clone();
        let options = cfg.module_options();
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || open_registry(&data_dir, runtime, &strategy, options))
            .await??
    };
    let (control, control_rx) = PipelineControl::new(cfg.router.shards);
    let events = tokio::sync::broadcast::channel(1024).0;
    let events_rx = events.subscribe();
    let parts = Parts {
        config: cfg.pipeline.clone(),
        router: Arc::new(cfg.router.clone()),
        runtime,
        assignment: incumbent.clone(),
        fallback,
        events,
        control: Some(control_rx),
        decoder: Arc::new(JsonDecoder::new(cfg.decode)),
        sink: Arc::new(sink),
        metrics: metrics.clone(),
    };
    let source = AmqpSource::connect(cfg.source.amqp.clone())
        .await
        .context("cannot connect to RabbitMQ")?;
    tracing::info!(shards = cfg.router.shards, incumbent = %incumbent.label, "Pipeline running.");
    let counters = Arc::new(PipelineCounters::default());
    let shutdown = {
        let admin = admin.clone();
        async move {
            shutdown_signal().await;
            admin.set_draining();
        }
    };
    let pipeline = tokio::spawn(pipeline::run(
        parts,
        source,
        counters,
        Drain::Complete,
        shutdown,
    ));
    let controller = Controller::start(
        registry,
        incumbent.module.id(),
        control,
        events_rx,
        cfg.admin.clone(),
        &data_dir,
        metrics.clone(),
    )
    .await
    .context("cannot apply the saved rollout")?;
    admin.set_controller(controller.clone());
    let result = pipeline.await.context("the pipeline task failed")?;
    admin.set_draining();
    let _ = stop_admin.send(());
    let served = server.await.context("the admin API task failed")?;
    drop(controller);
    result?;
    served.context("the admin API failed")?;
    Ok(())
}

/// Opens the module registry and picks the incumbent: the saved rollout's,
/// else the configured strategy (registered first if it is a file).
fn open_registry(
    data_dir: &Path,
    runtime: Runtime,
    strategy: &str,
    options: Vec<(String, String)>,
) -> anyhow::Result<(Registry, Assignment, Assignment)> {
    let mut registry =
        Registry::open(data_dir, runtime).context("cannot open the module registry")?;
    let strategy = if registry.resolve(strategy).is_some() {
        strategy.to_string()
    } else {
        let bytes = std::fs::read(strategy).with_context(|| {
            format!(
                "`{strategy}` is neither a built-in ({}), a registered module, nor a readable file",
                runtime::builtin_names().join(", ")
            )
        })?;
        let name = Path::new(strategy)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("module")
            .replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                "_",
            );
        let version = format!("file-{}", &wagg::runtime::content_id(&bytes)[..8]);
        match registry.resolve(&format!("{name}@{version}")) {
            Some(r) => r.label(),
            None => registry
                .add(&bytes, &name, &version, options.clone())?
                .label(),
        }
    };
    let mut incumbent = controller::starting_incumbent(data_dir, &registry, &strategy)?;
    if registry
        .get(incumbent.module.id())
        .is_some_and(|r| r.builtin)
        && !options.is_empty()
    {
        // Options in [module.options] apply to a built-in incumbent.
        incumbent.options = options;
    }
    let fallback = registry
        .resolve("hashmap@builtin")
        .and_then(|r| registry.assignment(&r.id))
        .context("the built-in hashmap is missing")?;
    Ok((registry, incumbent, fallback))
}

async fn demo(mut cfg: Config, duration: Option<Duration>, out: PathBuf) -> anyhow::Result<()> {
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
        let rollup = p.tags.get("rollup").cloned().unwrap_or_default();
        *per_rollup.entry(rollup.clone()).or_default() += p.value;
        if rollup == "customer" {
            customer_points += 1;
            let customer: u64 = p
                .tags
                .get("customer")
                .and_then(|c| c.parse().ok())
                .unwrap_or(u64::MAX);
            let pop = p.tags.get("pop").cloned().unwrap_or_default();
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
