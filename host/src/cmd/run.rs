//! `wagg run`: the pipeline on RabbitMQ, steered by the admin API.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use wagg::admin::Registry;
use wagg::admin::controller::{self, Controller};
use wagg::admin::http::{self as admin_http, AdminState};
use wagg::config::Config;
use wagg::pipeline::data_dir::DataDir;
use wagg::pipeline::{self, Drain, Parts, PipelineControl, PipelineCounters};
use wagg::runtime::{self, Runtime};
use wagg::shard::Assignment;
use wagg::sink::Sink;
use wagg::source::amqp::AmqpSource;
use wagg::source::json::JsonDecoder;

pub(crate) async fn shutdown_signal() {
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

pub(crate) async fn run_pipeline(cfg: Config) -> anyhow::Result<()> {
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
    // Held until this function returns: no second host on this directory.
    let taken = DataDir::take(&data_dir)?;
    for (path, bytes) in &taken.removed {
        tracing::warn!(
            path = %path.display(),
            bytes,
            "Removed a temporary file a killed wagg left half-written."
        );
    }
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
    drop(taken);
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
