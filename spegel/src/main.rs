//! The `spegel` binary: subcommands `registry`, `configuration`, `cleanup`, `cleanup-wait`, `version`.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use spegel::{
    activity::{self, Activity},
    admin_ui::{AdminUi, StoreImages, UiConfig, UiSources},
    advertise::Advertiser,
    auth,
    config::{
        Cli, Command, RegistryArgs, VersionArgs, VersionFormat, bind_listen_addr, parse_listen_addr,
    },
    mirror::{LatencySelector, MirrorConfig, PeerMirror},
    registry::{self, Filters, Registry, Timeouts, http},
    routing::{Bootstrapper, P2pConfig, P2pRouter, Router, serve_http_bootstrap},
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
    let filters = Filters::new(
        &args.mirrored_registries,
        &args.effective_registry_filters(),
    )?;
    let basic_auth = auth::load(std::path::Path::new(auth::DEFAULT_DIR))?;
    let registry_port = parse_listen_addr(&args.registry_addr)
        .map_err(anyhow::Error::msg)?
        .port();
    let router_port = parse_listen_addr(&args.router_addr)
        .map_err(anyhow::Error::msg)?
        .port();
    let bootstrap = Bootstrapper::from_args(&args, router_port)?;
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

    let (router, router_task) = P2pRouter::start(P2pConfig {
        router_addr: args.router_addr.clone(),
        registry_port,
        data_dir: args.data_dir.clone(),
        advertise_ttl: args.advertise_ttl,
        bootstrap,
    })
    .await?;
    let shared_router: Arc<dyn Router> = Arc::new(router.clone());

    let advertiser = Advertiser::new(
        store.clone(),
        shared_router.clone(),
        filters.clone(),
        args.resolve_tags,
    );
    let advertise_task = tokio::spawn(advertiser.run());

    // Off by default: a disabled record costs one branch per request and holds nothing.
    let activity = if args.visualize_enabled {
        Activity::enabled(activity::DEFAULT_CAPACITY)
    } else {
        Activity::disabled()
    };
    let selector = Arc::new(LatencySelector::new());
    let mirror = PeerMirror::new(
        shared_router.clone(),
        MirrorConfig {
            resolve_timeout: args.mirror_resolve_timeout,
            resolve_retries: args.mirror_resolve_retries.max(1),
            basic_auth_header: basic_auth.as_ref().map(|a| a.header_value()),
            selector: selector.clone(),
            activity: activity.clone(),
            ..Default::default()
        },
    )?;
    let ui = Arc::new(AdminUi::new(
        UiConfig {
            debug_web: args.debug_web_enabled,
            visualize: args.visualize_enabled,
            registry: own_address(registry_listener.local_addr()?),
            authorization: basic_auth.as_ref().map(|a| a.header_value()),
        },
        UiSources {
            node: Arc::new(router.clone()),
            images: Arc::new(StoreImages {
                store: store.clone(),
                filters: filters.clone(),
            }),
            selector,
            lookup: Arc::new(router.clone()),
            activity: activity.clone(),
        },
    ));
    let ready_router = router.clone();
    let registry = Arc::new(Registry {
        store,
        filters,
        mirror: Some(Arc::new(mirror)),
        auth: basic_auth,
        // A lone node serves its own content but is not ready (§3.5).
        ready: Arc::new(move || ready_router.ready()),
        activity,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let timeouts = Timeouts::default();
    let mut servers = vec![
        tokio::spawn(registry::serve(
            registry_listener,
            registry,
            timeouts,
            shutdown_rx.clone(),
        )),
        tokio::spawn(registry::serve(
            metrics_listener,
            Arc::new(MetricsHandler {
                router: router.clone(),
                debug_web: args.debug_web_enabled,
                ui,
            }),
            timeouts,
            shutdown_rx.clone(),
        )),
    ];
    if !args.http_bootstrap_addr.is_empty() {
        let listener = bind_listen_addr(&args.http_bootstrap_addr)
            .await
            .with_context(|| {
                format!(
                    "listening on HTTP bootstrap address {}",
                    args.http_bootstrap_addr
                )
            })?;
        let r = router.clone();
        let info = Arc::new(move || (r.local_peer_id(), r.listen_addrs()));
        servers.push(tokio::spawn(serve_http_bootstrap(
            listener,
            info,
            shutdown_rx.clone(),
        )));
    }
    info!(registry = %args.registry_addr, router = %args.router_addr, "running Spegel");

    shutdown_signal().await;
    info!("shutting down");
    // Tell peers first, so they stop routing to us while in-flight requests finish.
    router.shutdown().await;
    advertise_task.abort();
    let _ = shutdown_tx.send(true);
    for task in servers {
        task.await
            .context("server task panicked")?
            .context("server failed")?;
    }
    router_task.abort();
    Ok(())
}

/// Where this process reaches its own listener: a wildcard bind is reached on loopback.
fn own_address(bound: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bound.port())
        }
        _ => bound,
    }
}

/// The metrics listener: `/metrics`, the UI pages, and `/debug/web/metadata` when the debug
/// web is enabled.
struct MetricsHandler {
    router: P2pRouter,
    debug_web: bool,
    ui: Arc<AdminUi>,
}

#[async_trait::async_trait]
impl registry::Handler for MetricsHandler {
    async fn handle(&self, req: &http::Request) -> http::Response {
        if let Some(response) = self.ui.handle(req).await {
            return response;
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/metrics") => http::Response::empty(200)
                .header("Content-Type", "text/plain; version=0.0.4")
                .body(http::Body::Bytes(spegel::metrics::global().encode().into())),
            ("GET" | "HEAD", "/debug/web/metadata") if self.debug_web => {
                let doc = serde_json::json!({"libp2p": {"id": self.router.local_peer_id()}});
                http::Response::empty(200)
                    .header("Content-Type", "application/json")
                    .body(http::Body::Bytes(doc.to_string().into_bytes().into()))
            }
            ("GET" | "HEAD", "/debug/web/peers") if self.debug_web => {
                let peers: Vec<_> = self
                    .router
                    .peers()
                    .into_iter()
                    .map(|(id, addrs)| serde_json::json!({"id": id, "addrs": addrs}))
                    .collect();
                http::Response::empty(200)
                    .header("Content-Type", "application/json")
                    .body(http::Body::Bytes(
                        serde_json::to_vec(&peers).unwrap_or_default().into(),
                    ))
            }
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
