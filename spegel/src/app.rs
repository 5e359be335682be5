//! Composition of the `registry` daemon: one typed configuration built once from the flags
//! ([`AppConfig::from_args`]), and [`App::start`], which builds the store, router, advertiser,
//! mirror, registry and admin from it, binds every listener and returns the running [`App`].

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use libp2p::Multiaddr;
use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    activity::{self, Activity},
    admin::{
        Admin, AdminState,
        ui::{AdminUi, UiConfig, UiSources},
    },
    advertise::{Advertiser, InProgressAdvertiser},
    auth::{self, AuthError, BasicAuth},
    config::{BootstrapKind, RegistryArgs},
    http::{self, Limits, Timeouts},
    mirror::{MirrorConfig, MirrorError, PeerMirror, selector_for},
    net::{AddrError, parse_listen_addr, split_host_port},
    oci::{FilterError, Filters},
    registry::{CheckedRegistry, Registry},
    routing::{Bootstrapper, P2pConfig, P2pRouter, Router, RoutingError, serve_http_bootstrap},
    store::{
        CheckedStore, ContainerdStore, ContainerdStoreConfig, DEFAULT_VERIFY_BYTES_PER_SECOND,
        Integrity, Store, StoreError, abort_poisoned_ingests,
    },
    telemetry::{self, EbpfMode, KernelTelemetry, PeerSelection, TelemetryError, peer_socket_addr},
};

/// How often per-peer metrics are exported and, without eBPF, unmeasured peers probed.
const TELEMETRY_UPKEEP: Duration = Duration::from_secs(10);

/// Why the flags do not make a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A listen address flag is invalid.
    #[error("--{flag}: {source}")]
    Addr {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        source: AddrError,
    },
    /// `--mirrored-registries` or `--registry-filters` is invalid.
    #[error(transparent)]
    Filters(#[from] FilterError),
    /// The bootstrap flags are inconsistent.
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    /// The basic-auth files are unusable.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// containerd could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener could not be bound.
    #[error("listening on {what} address {addr}: {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Bind error.
        source: std::io::Error,
    },
    /// The router could not start.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// The mirror could not be built.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// A server stopped with an error.
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    /// A server task panicked.
    #[error("server task panicked")]
    Panicked,
    /// `--ebpf=on` and the probes could not be loaded.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// Listen addresses.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// The OCI registry.
    pub registry: SocketAddr,
    /// Metrics and admin routes.
    pub metrics: SocketAddr,
    /// The router, Go style (`:5001`): an empty host listens on IPv4 and IPv6.
    pub router: String,
    /// HTTP bootstrap `/id`, if served.
    pub http_bootstrap: Option<SocketAddr>,
}

/// Router settings.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Identity directory; empty for an ephemeral identity.
    pub data_dir: String,
    /// Provider record lifetime.
    pub advertise_ttl: Duration,
    /// Where first peers come from; `None` for a lone node.
    pub bootstrap: Option<Bootstrapper>,
}

/// Peer telemetry and selection.
#[derive(Debug, Clone, Copy)]
pub struct TelemetryConfig {
    /// Whether to load the eBPF probes.
    pub ebpf: EbpfMode,
    /// The selector the flag asks for; `None` picks by what telemetry is available.
    pub peer_selection: Option<PeerSelection>,
}

/// Mirror settings.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// Longest wait for a provider while nothing is in flight.
    pub resolve_timeout: Duration,
    /// Providers asked of the router per lookup.
    pub resolve_retries: usize,
    /// Lower bound of a race's wait for response headers.
    pub race_timeout_floor: Duration,
    /// Resumes of a broken blob body.
    pub max_resumes: usize,
    /// Stall after which a peer body counts as broken.
    pub body_stall_timeout: Duration,
    /// Longest wait for another node fetching a blob missed at the same time; zero disables.
    pub intent_wait: Duration,
}

/// The whole daemon configuration, validated.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Listen addresses.
    pub listen: ListenConfig,
    /// containerd connection.
    pub store: ContainerdStoreConfig,
    /// Router.
    pub routing: RoutingConfig,
    /// What is mirrored and advertised.
    pub filters: Filters,
    /// Advertise and resolve tags.
    pub resolve_tags: bool,
    /// Peer forwarding.
    pub mirror: MirrorSettings,
    /// Peer telemetry and selection.
    pub telemetry: TelemetryConfig,
    /// Basic auth required of clients and sent to peers.
    pub auth: Option<BasicAuth>,
    /// Serve `/debug/web/*` on the metrics listener.
    pub debug_web: bool,
    /// Record requests and serve `/visualize` on the metrics listener.
    pub visualize: bool,
    /// Connection timeouts of every listener (fixed).
    pub timeouts: Timeouts,
    /// Connection limits, applied to the registry and the metrics listener separately.
    pub limits: Limits,
}

impl AppConfig {
    /// Validates the flags; basic-auth files are read from `auth_dir`.
    pub fn from_args(args: &RegistryArgs, auth_dir: &Path) -> Result<Self, ConfigError> {
        let addr = |flag: &'static str, value: &str| {
            parse_listen_addr(value).map_err(|source| ConfigError::Addr { flag, source })
        };
        let registry = addr("registry-addr", &args.registry_addr)?;
        let metrics = addr("metrics-addr", &args.metrics_addr)?;
        let (_, router_port) =
            split_host_port(&args.router_addr).map_err(|source| ConfigError::Addr {
                flag: "router-addr",
                source,
            })?;
        let http_bootstrap = match args.http_bootstrap_addr.as_str() {
            "" => None,
            a => Some(addr("http-bootstrap-addr", a)?),
        };
        Ok(AppConfig {
            listen: ListenConfig {
                registry,
                metrics,
                router: args.router_addr.clone(),
                http_bootstrap,
            },
            store: ContainerdStoreConfig {
                socket: args.containerd_sock.clone(),
                namespace: args.containerd_namespace.clone(),
                content_path: args.containerd_content_path.clone(),
            },
            routing: RoutingConfig {
                data_dir: args.data_dir.clone(),
                advertise_ttl: args.advertise_ttl,
                bootstrap: bootstrapper(args, router_port)?,
            },
            filters: Filters::new(
                &args.mirrored_registries,
                &args.effective_registry_filters(),
            )?,
            resolve_tags: args.resolve_tags,
            mirror: MirrorSettings {
                resolve_timeout: args.mirror_resolve_timeout,
                resolve_retries: args.mirror_resolve_retries.max(1),
                race_timeout_floor: args.mirror_race_timeout_floor,
                max_resumes: args.mirror_max_resumes,
                body_stall_timeout: args.mirror_body_stall_timeout,
                intent_wait: args.mirror_intent_wait,
            },
            telemetry: TelemetryConfig {
                ebpf: args.ebpf,
                peer_selection: args.peer_selection,
            },
            auth: auth::load(auth_dir)?,
            debug_web: args.debug_web_enabled,
            visualize: args.visualize_enabled,
            timeouts: Timeouts::default(),
            limits: Limits {
                max_connections: args.max_connections.max(1),
                max_per_ip: args.max_connections_per_ip.max(1),
                first_byte: args.connection_first_byte_timeout,
                min_rate: args.min_transfer_rate,
                ..Limits::default()
            },
        })
    }
}

/// The bootstrapper the flags ask for; `None` for a lone node.
fn bootstrapper(
    args: &RegistryArgs,
    router_port: u16,
) -> Result<Option<Bootstrapper>, ConfigError> {
    let bad = |m: String| ConfigError::Bootstrap(m);
    let Some(kind) = args.bootstrap_kind else {
        return Ok(None);
    };
    Ok(Some(match kind {
        BootstrapKind::Static => {
            if args.static_bootstrap_peers.is_empty() {
                return Err(bad(
                    "--static-bootstrap-peers is required with --bootstrap-kind=static".into(),
                ));
            }
            let addrs = args
                .static_bootstrap_peers
                .iter()
                .map(|a| {
                    a.parse::<Multiaddr>()
                        .map_err(|e| bad(format!("invalid multiaddr {a:?}: {e}")))
                })
                .collect::<Result<_, _>>()?;
            Bootstrapper::Static(addrs)
        }
        BootstrapKind::Dns => {
            if args.dns_bootstrap_domain.is_empty() {
                return Err(bad(
                    "--dns-bootstrap-domain is required with --bootstrap-kind=dns".into(),
                ));
            }
            Bootstrapper::Dns {
                domain: args.dns_bootstrap_domain.trim_end_matches('.').to_string(),
                port: router_port,
            }
        }
        BootstrapKind::Http => {
            if args.http_bootstrap_url.is_empty() {
                return Err(bad(
                    "--http-bootstrap-url is required with --bootstrap-kind=http".into(),
                ));
            }
            if !args.http_bootstrap_url.starts_with("http://") {
                return Err(bad(format!(
                    "only http:// bootstrap URLs are supported, not {:?}",
                    args.http_bootstrap_url
                )));
            }
            if !args.http_bootstrap_cert_dir.is_empty() {
                return Err(bad(
                    "--http-bootstrap-cert-dir needs an https URL, which is not supported".into(),
                ));
            }
            Bootstrapper::Http {
                url: args.http_bootstrap_url.clone(),
            }
        }
    }))
}

/// Where the daemon reaches its own registry: loopback when it listens on every address.
fn own_address(bound: SocketAddr) -> SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// The running daemon.
pub struct App {
    router: P2pRouter,
    router_task: JoinHandle<()>,
    advertise_task: JoinHandle<()>,
    in_progress_task: JoinHandle<()>,
    upkeep_task: JoinHandle<()>,
    verify_task: JoinHandle<()>,
    kernel: Option<Arc<KernelTelemetry>>,
    servers: Vec<JoinHandle<std::io::Result<()>>>,
    shutdown: watch::Sender<bool>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, AppError> {
    crate::net::bind(addr)
        .await
        .map_err(|source| AppError::Listen { what, addr, source })
}

impl App {
    /// Connects to containerd, binds the listeners, starts the router and the advertiser, and
    /// serves the registry, admin and (when configured) HTTP bootstrap endpoints.
    pub async fn start(config: AppConfig) -> Result<App, AppError> {
        // First: the probes see only sockets created after they attach.
        let mut kernel = None;
        let telemetry = telemetry::setup(config.telemetry.ebpf, || {
            KernelTelemetry::load().map(|k| {
                let k = Arc::new(k);
                kernel = Some(k.clone());
                k
            })
        })?;
        let selection = telemetry::choose_selection(config.telemetry.peer_selection, true);
        let selector = selector_for(selection, Some(telemetry.source.clone()));
        info!(selection = ?selection, telemetry = telemetry.source.source(), "peer selection");
        let containerd: Arc<dyn Store> = Arc::new(ContainerdStore::connect(config.store).await?);
        // Everything serves and advertises through the check that hides blobs found corrupt.
        let integrity = Integrity::new(DEFAULT_VERIFY_BYTES_PER_SECOND);
        let verify_task = tokio::spawn(integrity.clone().run(containerd.clone()));
        let store: Arc<dyn Store> =
            Arc::new(CheckedStore::new(containerd.clone(), integrity.clone()));
        let registry_listener = bind("registry", config.listen.registry).await?;
        let metrics_listener = bind("metrics", config.listen.metrics).await?;

        let (router, router_task) = P2pRouter::start(P2pConfig {
            router_addr: config.listen.router.clone(),
            registry_port: config.listen.registry.port(),
            data_dir: config.routing.data_dir,
            advertise_ttl: config.routing.advertise_ttl,
            bootstrap: config.routing.bootstrap,
            idle_connection_timeout: crate::routing::IDLE_CONNECTION_TIMEOUT,
        })
        .await?;
        let shared_router: Arc<dyn Router> = Arc::new(router.clone());

        let advertiser = Advertiser::new(
            store.clone(),
            shared_router.clone(),
            config.filters.clone(),
            config.resolve_tags,
        );
        let advertised = advertiser.view();
        let advertise_task = tokio::spawn(advertiser.run());
        let in_progress_task = tokio::spawn(
            InProgressAdvertiser::new(store.clone(), shared_router.clone())
                .with_images(advertised.clone())
                .run(),
        );

        // Off by default: a disabled record costs one branch per request.
        let activity = if config.visualize {
            Activity::enabled(activity::DEFAULT_CAPACITY)
        } else {
            Activity::disabled()
        };
        let mirror = PeerMirror::new(
            shared_router,
            MirrorConfig {
                resolve_timeout: config.mirror.resolve_timeout,
                resolve_retries: config.mirror.resolve_retries,
                basic_auth_header: config.auth.as_ref().map(|a| a.header_value()),
                selector: selector.clone(),
                race_timeout_floor: config.mirror.race_timeout_floor,
                max_resumes: config.mirror.max_resumes,
                body_stall_timeout: config.mirror.body_stall_timeout,
                telemetry: Some(telemetry.source.clone()),
                connection_telemetry: Some(telemetry.userspace.clone()),
                activity: activity.clone(),
                // containerd has written the wrong bytes it got; its retry must start afresh.
                on_corrupt_blob: Some(Arc::new(move |digest: &crate::oci::Digest| {
                    abort_poisoned_ingests(containerd.clone(), digest.clone())
                })),
                local_peer_id: Some(router.local_peer_id()),
                intent_wait: config.mirror.intent_wait,
                ..Default::default()
            },
        )?;
        let upkeep_router = router.clone();
        // The router lists peers by IP; probes and series are per IP, the port only lets a
        // probe connect (every node listens for the router on the same port).
        let router_port = split_host_port(&config.listen.router)
            .map(|(_, port)| port)
            .unwrap_or(5001);
        let throughput = selector.clone();
        let upkeep_task = tokio::spawn(telemetry::maintain(
            move || {
                upkeep_router
                    .peers()
                    .into_iter()
                    .flat_map(|(_, addrs)| addrs)
                    .filter_map(|a| peer_socket_addr(&a, router_port))
                    .collect()
            },
            (!telemetry.ebpf_enabled).then(|| telemetry.userspace.clone()),
            Some(telemetry.source.clone()),
            move |ip| throughput.throughput(ip),
            TELEMETRY_UPKEEP,
        ));
        let ui = AdminUi::new(
            UiConfig {
                debug_web: config.debug_web,
                visualize: config.visualize,
                registry: own_address(registry_listener.local_addr().map_err(|source| {
                    AppError::Listen {
                        what: "registry",
                        addr: config.listen.registry,
                        source,
                    }
                })?),
                authorization: config.auth.as_ref().map(|a| a.header_value()),
            },
            UiSources {
                node: Arc::new(router.clone()),
                images: Arc::new(advertised.clone()),
                selector: selector.clone(),
                lookup: Arc::new(router.clone()),
                activity: activity.clone(),
            },
        );
        let ready_router = router.clone();
        if let Some(hosts) = config.filters.registries() {
            crate::metrics::global()
                .registry_labels
                .add_known(hosts.iter().map(String::as_str));
        }
        let registry = Registry {
            store,
            filters: config.filters,
            mirror: Some(Arc::new(mirror)),
            auth: config.auth,
            // A lone node serves its own content but is not ready (§3.5).
            ready: Arc::new(move || ready_router.ready()),
            activity,
            searching: Default::default(),
        };
        let admin = Admin::new(
            AdminState {
                router: Arc::new(router.clone()),
                advertised: Arc::new(advertised),
                selector,
            },
            config.debug_web,
        )
        .with_ui(ui);

        let (shutdown, shutdown_rx) = watch::channel(false);
        let timeouts = config.timeouts;
        let mut servers = vec![
            // Each listener counts its own connections: a full registry port leaves metrics up.
            tokio::spawn(http::serve_with(
                registry_listener,
                Arc::new(CheckedRegistry {
                    registry,
                    integrity,
                }),
                timeouts,
                config.limits,
                shutdown_rx.clone(),
            )),
            tokio::spawn(http::serve_with(
                metrics_listener,
                Arc::new(admin),
                timeouts,
                config.limits,
                shutdown_rx.clone(),
            )),
        ];
        if let Some(addr) = config.listen.http_bootstrap {
            let listener = bind("HTTP bootstrap", addr).await?;
            let r = router.clone();
            let info = Arc::new(move || (r.local_peer_id(), r.listen_addrs()));
            servers.push(tokio::spawn(serve_http_bootstrap(
                listener,
                info,
                shutdown_rx.clone(),
            )));
        }
        info!(registry = %config.listen.registry, router = %config.listen.router, "running Spegel");
        Ok(App {
            router,
            router_task,
            advertise_task,
            in_progress_task,
            upkeep_task,
            verify_task,
            kernel,
            servers,
            shutdown,
        })
    }

    /// Runs until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), AppError> {
        signal.await;
        self.shutdown().await
    }

    /// Leaves the cluster, stops advertising, and lets in-flight requests finish.
    pub async fn shutdown(self) -> Result<(), AppError> {
        info!("shutting down");
        // Tell peers first, so they stop routing to us while in-flight requests finish.
        self.router.shutdown().await;
        self.advertise_task.abort();
        self.in_progress_task.abort();
        self.upkeep_task.abort();
        self.verify_task.abort();
        let _ = self.shutdown.send(true);
        for task in self.servers {
            task.await
                .map_err(|_| AppError::Panicked)?
                .map_err(AppError::Serve)?;
        }
        self.router_task.abort();
        if let Some(kernel) = &self.kernel {
            kernel.release();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn args(extra: &[&str]) -> RegistryArgs {
        let mut argv = vec!["spegel", "registry"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Registry(a) => *a,
            _ => panic!("expected registry"),
        }
    }

    #[test]
    fn config_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let c = AppConfig::from_args(
            &args(&[
                "--registry-addr=127.0.0.1:5000",
                "--router-addr=:5001",
                "--mirror-max-resumes=2",
                "--bootstrap-kind=dns",
                "--dns-bootstrap-domain=spegel.svc.",
            ]),
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.listen.registry, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(c.listen.metrics.port(), 9090);
        assert_eq!(c.listen.http_bootstrap, None);
        assert_eq!(c.mirror.max_resumes, 2);
        assert!(matches!(
            c.routing.bootstrap,
            Some(Bootstrapper::Dns { ref domain, port: 5001 }) if domain == "spegel.svc"
        ));
        assert!(c.auth.is_none());
    }

    #[test]
    fn invalid_flags_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = |extra: &[&str]| AppConfig::from_args(&args(extra), dir.path()).unwrap_err();
        assert!(matches!(
            err(&["--registry-addr=localhost:5000"]),
            ConfigError::Addr {
                flag: "registry-addr",
                ..
            }
        ));
        assert!(matches!(
            err(&["--router-addr=nope"]),
            ConfigError::Addr {
                flag: "router-addr",
                ..
            }
        ));
        assert!(matches!(
            err(&["--bootstrap-kind=static"]),
            ConfigError::Bootstrap(_)
        ));
        assert!(matches!(
            err(&["--bootstrap-kind=http", "--http-bootstrap-url=https://x/id"]),
            ConfigError::Bootstrap(_)
        ));
        assert!(matches!(
            err(&["--mirrored-registries=not a url"]),
            ConfigError::Filters(_)
        ));
    }
}
