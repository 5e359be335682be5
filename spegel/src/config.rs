//! Command line and environment configuration, compatible with the original's flags.
//!
//! Every flag may also come from its environment variable. List flags take several values after
//! the flag (`--mirrored-registries a b`) or a comma-separated value; from the environment they
//! are comma-separated. Durations use Go syntax (`20ms`, `1m30s`).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum, builder::BoolishValueParser};

pub use crate::telemetry::{EbpfMode, PeerSelection};

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "spegel",
    about = "Stateless cluster local OCI registry mirror",
    version
)]
pub struct Cli {
    /// Minimum log level.
    #[arg(long, env = "LOG_LEVEL", default_value = "INFO", global = true, value_parser = parse_log_level)]
    pub log_level: tracing::Level,

    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write containerd mirror configuration (hosts.toml) and exit.
    Configuration(ConfigurationArgs),
    /// Run the registry mirror daemon.
    Registry(Box<RegistryArgs>),
    /// Restore containerd mirror configuration and serve a readiness probe until stopped.
    Cleanup(CleanupArgs),
    /// Wait until every cleanup instance behind a DNS name reports ready.
    CleanupWait(CleanupWaitArgs),
    /// Print version information.
    Version(VersionArgs),
}

/// Output format of `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionFormat {
    /// `<name> version <version> <commit>`.
    Text,
    /// JSON document with build and runtime information.
    Json,
}

/// Flags of `version`.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Output format: text or json.
    #[arg(long, default_value = "text")]
    pub format: VersionFormat,
}

/// Flags of `configuration`.
#[derive(Debug, Args)]
pub struct ConfigurationArgs {
    /// Directory where containerd reads hosts.toml files from.
    #[arg(
        long,
        env = "CONTAINERD_REGISTRY_CONFIG_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    pub containerd_registry_config_path: std::path::PathBuf,
    /// Registries to mirror; empty mirrors all.
    #[arg(long, env = "MIRRORED_REGISTRIES", num_args = 0.., value_delimiter = ',')]
    pub mirrored_registries: Vec<String>,
    /// Mirror endpoints, in order.
    #[arg(long, env = "MIRROR_TARGETS", num_args = 1.., value_delimiter = ',', required = true)]
    pub mirror_targets: Vec<String>,
    /// Let containerd ask the mirror to resolve tags.
    #[arg(long, env = "RESOLVE_TAGS", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub resolve_tags: bool,
    /// Keep existing host entries, placed after ours.
    #[arg(long, env = "PREPEND_EXISTING", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub prepend_existing: bool,
}

/// Flags of `cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Address for the readiness probe server.
    #[arg(long, env = "ADDR", required = true)]
    pub addr: String,
    /// Directory where containerd reads hosts.toml files from.
    #[arg(
        long,
        env = "CONTAINERD_REGISTRY_CONFIG_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    pub containerd_registry_config_path: std::path::PathBuf,
}

/// Flags of `cleanup-wait`.
#[derive(Debug, Args)]
pub struct CleanupWaitArgs {
    /// `host:port` whose host resolves to every cleanup instance.
    #[arg(long, env = "PROBE_ENDPOINT", required = true)]
    pub probe_endpoint: String,
    /// Consecutive successful probe rounds needed.
    #[arg(long, env = "THRESHOLD", default_value = "3")]
    pub threshold: u32,
    /// Interval between probe rounds.
    #[arg(long, env = "PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub period: Duration,
}

/// How the router finds its first peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootstrapKind {
    /// Resolve a DNS name to peer addresses.
    Dns,
    /// Fetch peers from an HTTP endpoint.
    Http,
    /// A fixed list of multiaddrs.
    Static,
}

/// Flags of `registry`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Metrics HTTP listener.
    #[arg(long, env = "METRICS_ADDR", default_value = ":9090")]
    pub metrics_addr: String,
    /// containerd gRPC socket.
    #[arg(
        long,
        env = "CONTAINERD_SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_sock: String,
    /// containerd namespace to read images from.
    #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub containerd_namespace: String,
    /// containerd content store root, read directly; empty asks containerd.
    #[arg(
        long,
        env = "CONTAINERD_CONTENT_PATH",
        default_value = "/var/lib/containerd/io.containerd.content.v1.content"
    )]
    pub containerd_content_path: String,
    /// Directory where the router identity is persisted; empty for an ephemeral identity.
    #[arg(long, env = "DATA_DIR", default_value = "")]
    pub data_dir: String,
    /// Router (libp2p) listen address.
    #[arg(long, env = "ROUTER_ADDR", default_value = ":5001")]
    pub router_addr: String,
    /// Registry HTTP listen address.
    #[arg(long, env = "REGISTRY_ADDR", default_value = ":5000")]
    pub registry_addr: String,
    /// Registries to mirror; others get 404 and are not advertised. Empty mirrors all.
    #[arg(long, env = "MIRRORED_REGISTRIES", num_args = 0.., value_delimiter = ',')]
    pub mirrored_registries: Vec<String>,
    /// Regexes over `registry/repository[:tag]`; a match is not mirrored. Each value is one
    /// regex (commas allowed); from the environment, REGISTRY_FILTERS is comma-separated.
    #[arg(long, num_args = 0..)]
    pub registry_filters: Vec<String>,
    /// Longest wait for a new peer while no fetch is in flight.
    #[arg(long, env = "MIRROR_RESOLVE_TIMEOUT", default_value = "20ms", value_parser = parse_duration)]
    pub mirror_resolve_timeout: Duration,
    /// Most providers to discover per lookup.
    #[arg(long, env = "MIRROR_RESOLVE_RETRIES", default_value = "3")]
    pub mirror_resolve_retries: usize,
    /// Lower bound of the wait for a peer's response headers before a race gives up
    /// (the wait is `max(2 x p90 latency, this)`). Not a flag of the original.
    #[arg(long, env = "MIRROR_RACE_TIMEOUT_FLOOR", default_value = "100ms", value_parser = parse_duration)]
    pub mirror_race_timeout_floor: Duration,
    /// Times a broken blob body from a peer is resumed from another. Not a flag of the original.
    #[arg(long, env = "MIRROR_MAX_RESUMES", default_value = "5")]
    pub mirror_max_resumes: usize,
    /// A peer body that delivers nothing for this long counts as broken. Not a flag of the
    /// original.
    #[arg(long, env = "MIRROR_BODY_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub mirror_body_stall_timeout: Duration,
    /// Longest a blob miss waits for another node that missed it at the same moment and is
    /// fetching it from upstream (elected by rendezvous hash); 0 disables. Not a flag of the
    /// original.
    #[arg(long, env = "MIRROR_INTENT_WAIT", default_value = "300ms", value_parser = parse_duration)]
    pub mirror_intent_wait: Duration,
    /// Connections served at once on each listener (registry, metrics); more are closed at
    /// once, past a small reserve kept for /readyz, /livez and /metrics. Not a flag of the original.
    #[arg(long, env = "MAX_CONNECTIONS", default_value = "1024")]
    pub max_connections: usize,
    /// Connections served at once from one IP address on each listener. Not a flag of the
    /// original.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value = "256")]
    pub max_connections_per_ip: usize,
    /// Time a new connection has to send its first byte. Not a flag of the original.
    #[arg(long, env = "CONNECTION_FIRST_BYTE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connection_first_byte_timeout: Duration,
    /// Least rate, in bytes/s, at which a client must read a response (measured over 30 s
    /// while data waits for it); 0 disables. Not a flag of the original.
    #[arg(long, env = "MIN_TRANSFER_RATE", default_value = "4096")]
    pub min_transfer_rate: u64,
    /// Serve the debug web UI on the metrics listener.
    #[arg(long, env = "DEBUG_WEB_ENABLED", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub debug_web_enabled: bool,
    /// Record requests and serve the live `/visualize` page on the metrics listener.
    #[arg(long, env = "VISUALIZE_ENABLED", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub visualize_enabled: bool,
    /// Advertise and resolve tags.
    #[arg(long, env = "RESOLVE_TAGS", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub resolve_tags: bool,
    /// Bootstrap kind: dns, http or static.
    #[arg(long, env = "BOOTSTRAP_KIND")]
    pub bootstrap_kind: Option<BootstrapKind>,
    /// DNS name resolved for DNS bootstrap.
    #[arg(long, env = "DNS_BOOTSTRAP_DOMAIN", default_value = "")]
    pub dns_bootstrap_domain: String,
    /// Serve `/id` on this address for HTTP bootstrap.
    #[arg(long, env = "HTTP_BOOTSTRAP_ADDR", default_value = "")]
    pub http_bootstrap_addr: String,
    /// URL of an HTTP bootstrap endpoint.
    #[arg(long, env = "HTTP_BOOTSTRAP_URL", default_value = "")]
    pub http_bootstrap_url: String,
    /// Directory with ca.crt, tls.crt and tls.key for the HTTP bootstrap client.
    #[arg(long, env = "HTTP_BOOTSTRAP_CERT_DIR", default_value = "")]
    pub http_bootstrap_cert_dir: String,
    /// Full p2p multiaddrs of bootstrap peers.
    #[arg(long, env = "STATIC_BOOTSTRAP_PEERS", num_args = 0.., value_delimiter = ',')]
    pub static_bootstrap_peers: Vec<String>,
    /// How long a provider record lives without being re-provided.
    #[arg(long, env = "ADVERTISE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub advertise_ttl: Duration,
    /// Kernel telemetry: auto (load if possible), on (failure is fatal) or off.
    #[arg(long, env = "EBPF", default_value = "auto")]
    pub ebpf: EbpfMode,
    /// Peer choice: telemetry, latency or least-used; default telemetry whenever a telemetry
    /// source runs (userspace measurements count), else latency.
    #[arg(long, env = "PEER_SELECTION")]
    pub peer_selection: Option<PeerSelection>,
}

impl RegistryArgs {
    /// The registry filters: the flag's values, else `REGISTRY_FILTERS` split on commas.
    ///
    /// Not a clap delimiter, which would also split a regex such as `a{1,3}` given on the
    /// command line.
    pub fn effective_registry_filters(&self) -> Vec<String> {
        if !self.registry_filters.is_empty() {
            return self.registry_filters.clone();
        }
        std::env::var("REGISTRY_FILTERS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Error returned for an unparsable Go-style duration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: expected a number with a unit (ns, us, ms, s, m, h), e.g. 20ms or 1m30s"
)]
pub struct DurationError(String);

/// Parses a Go-style duration such as `20ms`, `1.5s` or `1h2m3s`; `0` alone is zero.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(input.to_string());
    let s = input.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(err());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total_ns: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(err()),
        };
        rest = &rest[unit_end..];
        total_ns += value * scale;
    }
    if !total_ns.is_finite() || total_ns > u64::MAX as f64 {
        return Err(err());
    }
    Ok(Duration::from_nanos(total_ns.round() as u64))
}

/// Filter directives for `--log-level`: the level applies to spegel's own code; dependencies
/// (libp2p, h2, tonic, ...) log at INFO at most, since their DEBUG output (every HTTP/2 frame,
/// every yamux stream) buries the daemon's own and costs CPU on every request. `RUST_LOG`
/// overrides this when a dependency needs debugging.
pub fn log_directives(level: tracing::Level) -> String {
    let deps = if level > tracing::Level::INFO {
        tracing::Level::INFO
    } else {
        level
    };
    let name = |l: tracing::Level| l.as_str().to_ascii_lowercase();
    format!(
        "{deps},spegel={own},spegel_ebpf={own}",
        deps = name(deps),
        own = name(level)
    )
}

fn parse_log_level(s: &str) -> Result<tracing::Level, String> {
    match s.to_ascii_uppercase().as_str() {
        "DEBUG" => Ok(tracing::Level::DEBUG),
        "INFO" => Ok(tracing::Level::INFO),
        "WARN" | "WARNING" => Ok(tracing::Level::WARN),
        "ERROR" => Ok(tracing::Level::ERROR),
        "TRACE" => Ok(tracing::Level::TRACE),
        _ => Err(format!(
            "unknown log level {s:?}: expected DEBUG, INFO, WARN or ERROR"
        )),
    }
}

pub use crate::net::{bind_listen_addr, parse_listen_addr};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_level_is_the_daemon_s_and_dependencies_stay_at_info() {
        use tracing::Level;
        assert_eq!(
            log_directives(Level::DEBUG),
            "info,spegel=debug,spegel_ebpf=debug"
        );
        assert_eq!(
            log_directives(Level::WARN),
            "warn,spegel=warn,spegel_ebpf=warn"
        );
        for level in [
            Level::TRACE,
            Level::DEBUG,
            Level::INFO,
            Level::WARN,
            Level::ERROR,
        ] {
            let directives = log_directives(level);
            assert!(
                tracing_subscriber::EnvFilter::try_new(&directives).is_ok(),
                "{directives}"
            );
        }
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("20ms"), Ok(ms(20)));
        assert_eq!(parse_duration("2s"), Ok(ms(2000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "20", "ms", "-1s", "1x", "1.2.3s", "s1"] {
            assert!(parse_duration(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn listen_addrs() {
        assert_eq!(parse_listen_addr(":5000").unwrap().port(), 5000);
        assert!(parse_listen_addr(":5000").unwrap().ip().is_unspecified());
        assert_eq!(
            parse_listen_addr("127.0.0.1:5000").unwrap().to_string(),
            "127.0.0.1:5000"
        );
        assert!(parse_listen_addr("nope").is_err());
    }

    #[test]
    fn registry_flags_and_env_lists() {
        let cli = Cli::try_parse_from([
            "spegel",
            "registry",
            "--mirrored-registries",
            "https://docker.io",
            "https://ghcr.io",
            "--mirror-resolve-timeout=50ms",
            "--debug-web-enabled=false",
        ])
        .unwrap();
        let Command::Registry(args) = cli.command else {
            panic!("expected registry")
        };
        assert_eq!(
            args.mirrored_registries,
            ["https://docker.io", "https://ghcr.io"]
        );
        assert_eq!(args.mirror_resolve_timeout, Duration::from_millis(50));
        assert!(!args.debug_web_enabled);
        assert!(!args.visualize_enabled);
        assert_eq!(args.mirror_resolve_retries, 3);
        assert_eq!(args.mirror_race_timeout_floor, Duration::from_millis(100));
        assert_eq!(args.mirror_max_resumes, 5);
        assert_eq!(args.mirror_body_stall_timeout, Duration::from_secs(30));
        assert_eq!(args.mirror_intent_wait, Duration::from_millis(300));
        assert_eq!(args.registry_addr, ":5000");

        let cli = Cli::try_parse_from([
            "spegel",
            "registry",
            "--registry-filters",
            "a{1,3}",
            ":latest$",
        ])
        .unwrap();
        let Command::Registry(args) = cli.command else {
            panic!("expected registry")
        };
        assert_eq!(args.effective_registry_filters(), ["a{1,3}", ":latest$"]);
    }

    #[test]
    fn telemetry_flags() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["spegel", "registry"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Registry(args)) => Ok((args.ebpf, args.peer_selection)),
                Ok(_) => panic!("expected registry"),
                Err(e) => Err(e),
            }
        };
        assert_eq!(parse(&[]).unwrap(), (EbpfMode::Auto, None));
        assert_eq!(
            parse(&["--ebpf=on", "--peer-selection=latency"]).unwrap(),
            (EbpfMode::On, Some(PeerSelection::Latency))
        );
        assert_eq!(
            parse(&["--ebpf", "off", "--peer-selection", "least-used"]).unwrap(),
            (EbpfMode::Off, Some(PeerSelection::LeastUsed))
        );
        assert!(parse(&["--ebpf=maybe"]).is_err());
        assert!(parse(&["--peer-selection=random"]).is_err());
    }

    #[test]
    fn unknown_bootstrap_kind_is_an_error() {
        assert!(Cli::try_parse_from(["spegel", "registry", "--bootstrap-kind", "foo"]).is_err());
    }
}
