//! The `spegel` binary: subcommands `registry`, `configuration`, `cleanup`, `cleanup-wait`, `version`.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use spegel::{
    auth,
    config::{Cli, Command, RegistryArgs, VersionArgs, VersionFormat, bind_listen_addr},
    registry::{self, Filters, Registry, Timeouts, http},
    store::{ContainerdStore, ContainerdStoreConfig, Store},
};
use tokio::sync::watch;
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_current_span(true)
        .with_span_list(false)
        .init();
    if let Command::Version(args) = &cli.command {
        return version(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => {
            info!("exit gracefully");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "exit with error");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Configuration(args) => Ok(spegel::host_config::run_configuration(&args).await?),
        Command::Cleanup(args) => Ok(spegel::cleanup::run_cleanup(&args, shutdown_signal()).await?),
        Command::CleanupWait(args) => tokio::select! {
            r = spegel::cleanup::run_cleanup_wait(&args) => Ok(r?),
            _ = shutdown_signal() => anyhow::bail!("interrupted before every cleanup instance was ready"),
        },
        Command::Registry(args) => run_registry(*args).await,
        Command::Version(_) => Ok(()),
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run_registry(args: RegistryArgs) -> anyhow::Result<()> {
    let filters = Filters::new(&args.mirrored_registries, &args.registry_filters)?;
    let basic_auth = auth::load(std::path::Path::new(auth::DEFAULT_DIR))?;
    let store: Arc<dyn Store> = Arc::new(
        ContainerdStore::connect(ContainerdStoreConfig {
            socket: args.containerd_sock.clone(),
            namespace: args.containerd_namespace.clone(),
            content_path: args.containerd_content_path.clone(),
        })
        .await?,
    );
    let registry_listener = bind_listen_addr(&args.registry_addr)
        .await
        .with_context(|| format!("listening on registry address {}", args.registry_addr))?;
    let metrics_listener = bind_listen_addr(&args.metrics_addr)
        .await
        .with_context(|| format!("listening on metrics address {}", args.metrics_addr))?;

    let registry = Arc::new(Registry {
        store,
        filters,
        mirror: None,
        auth: basic_auth,
        // Without peers a node serves its own content but is not ready (§3.5).
        ready: Arc::new(|| false),
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let timeouts = Timeouts::default();
    let registry_task = tokio::spawn(registry::serve(
        registry_listener,
        registry,
        timeouts,
        shutdown_rx.clone(),
    ));
    let metrics_task = tokio::spawn(registry::serve(
        metrics_listener,
        Arc::new(MetricsHandler),
        timeouts,
        shutdown_rx.clone(),
    ));
    info!(registry = %args.registry_addr, router = %args.router_addr, "running Spegel");

    shutdown_signal().await;
    info!("shutting down");
    let _ = shutdown_tx.send(true);
    for task in [registry_task, metrics_task] {
        task.await
            .context("server task panicked")?
            .context("server failed")?;
    }
    Ok(())
}

/// `/metrics` on the metrics listener.
struct MetricsHandler;

#[async_trait::async_trait]
impl registry::Handler for MetricsHandler {
    async fn handle(&self, req: &http::Request) -> http::Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/metrics") => http::Response::empty(200)
                .header("Content-Type", "text/plain; version=0.0.4")
                .body(http::Body::Bytes(spegel::metrics::global().encode().into())),
            _ => http::Response::empty(404),
        }
    }
}

fn version(args: &VersionArgs) -> ExitCode {
    let name = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "spegel".into());
    let version = env!("CARGO_PKG_VERSION");
    let commit = option_env!("SPEGEL_COMMIT").unwrap_or("unknown");
    match args.format {
        VersionFormat::Text => println!("{name} version {version} {commit}"),
        VersionFormat::Json => {
            let distro = std::fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        l.strip_prefix("PRETTY_NAME=")
                            .map(|v| v.trim_matches('"').to_string())
                    })
                })
                .unwrap_or_else(|| "unknown".into());
            let doc = serde_json::json!({
                "build": {"rustVersion": option_env!("SPEGEL_RUSTC").unwrap_or("unknown"), "version": version, "commit": commit},
                "runtime": {"distro": distro, "os": std::env::consts::OS, "arch": std::env::consts::ARCH},
            });
            print!("{doc}");
        }
    }
    ExitCode::SUCCESS
}
