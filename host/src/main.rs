//! The `wagg` binary: parses arguments, sets up logging, runs a command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use wagg::admin::client::{self as admin_client, AdminClient};
use wagg::admin::http as admin_http;
use wagg::config::{Config, EXAMPLE};

mod cmd;

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
        #[arg(long, value_parser = wagg::traffic::cli::parse_duration)]
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
    /// Write every open bucket of a running host now, as if its stream had
    /// ended (before stopping it for good, or after a replay). A sample that
    /// arrives later for one of those buckets is late. A plain stop
    /// (SIGTERM) keeps open buckets in the checkpoint instead.
    Flush {
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
        Command::Module(ModuleCommand::Validate { file }) => cmd::module::validate(&file),
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
        Command::Flush { admin } => {
            let client = admin.client()?;
            let watermark = tokio_runtime()?
                .block_on(client.flush())
                .context("the open buckets were not flushed")?;
            println!(
                "every open bucket flushed to the sink's queue (watermark {watermark}); a stop now writes what the sink has not confirmed at the next start"
            );
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
            tokio_runtime()?.block_on(cmd::run::run_pipeline(cfg))
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
            tokio_runtime()?.block_on(cmd::demo::demo(cfg, duration, out))
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
