//! Network telemetry about peers: round-trip times, retransmits and bytes per peer address,
//! from the kernel (eBPF, plugged in by the daemon) or from the daemon's own sockets
//! (`TCP_INFO`, always available).
//!
//! The mirror's peer choice and its timeouts read it through [`NetTelemetry`] only, so either
//! source (or a fake in tests) can feed them.

mod activation;
mod connector;
mod export;
mod kernel;
mod tcp_info;
mod timeouts;
mod userspace;

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

pub use activation::{
    Activation, EbpfMode, PeerSelection, TelemetryError, choose_selection, decide,
};
pub use connector::{TrackedStream, TrackingConnector};
pub use export::{
    MAX_PEER_LABELS, PeerMetricsExporter, maintain, multiaddr_socket_addr, peer_socket_addr,
};
pub use kernel::KernelTelemetry;
pub use tcp_info::{TcpInfoSample, tcp_info};
pub use timeouts::{AdaptiveTimeouts, adapt, quantile};
pub use userspace::UserspaceTelemetry;

/// Network facts about one peer address, from the kernel (eBPF) or userspace (`TCP_INFO`).
///
/// Counters are cumulative over every connection to the address that the source saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerNetStats {
    /// Smoothed round-trip time of the most recently sampled connection.
    pub srtt: Duration,
    /// Smallest round-trip time seen (propagation delay, free of queueing).
    pub min_rtt: Duration,
    /// Time of the most recent TCP handshake (SYN to established), if one was seen.
    pub connect_time: Option<Duration>,
    /// Connections established.
    pub connects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Retransmitted segments.
    pub retransmits: u64,
    /// Retransmission timeouts.
    pub rto_events: u64,
    /// Bytes sent to the peer and acknowledged by it.
    pub bytes_acked: u64,
    /// Bytes received from the peer.
    pub bytes_received: u64,
    /// `CLOCK_MONOTONIC` time of the last update (the clock `bpf_ktime_get_ns` reads).
    pub last_seen: Duration,
}

/// A source of per-peer network facts; implementations must be cheap to query.
pub trait NetTelemetry: Send + Sync + 'static {
    /// What is known about `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4).
    fn peer(&self, ip: IpAddr) -> Option<PeerNetStats>;
    /// Every address the source knows, for timeouts and metrics.
    fn peers(&self) -> Vec<(IpAddr, PeerNetStats)>;
    /// Short name of the source for logs (`ebpf`, `tcp_info`).
    fn source(&self) -> &'static str;
}

impl<T: NetTelemetry + ?Sized> NetTelemetry for Arc<T> {
    fn peer(&self, ip: IpAddr) -> Option<PeerNetStats> {
        (**self).peer(ip)
    }

    fn peers(&self) -> Vec<(IpAddr, PeerNetStats)> {
        (**self).peers()
    }

    fn source(&self) -> &'static str {
        (**self).source()
    }
}

/// The telemetry the daemon runs with, as [`setup`] decided.
pub struct TelemetrySetup {
    /// What every consumer reads: the kernel's facts first (when loaded), then userspace's.
    pub source: Arc<dyn NetTelemetry>,
    /// The userspace source, which the peer client's connections and probes feed.
    pub userspace: Arc<UserspaceTelemetry>,
    /// Whether the kernel probes are loaded.
    pub ebpf_enabled: bool,
}

/// Loads the kernel probes as `mode` says (with `load`), logs the outcome in one line, sets
/// `spegel_ebpf_enabled`, and layers the result over the userspace source.
///
/// Call it before any listener is bound or peer dialed: the probes only see sockets created
/// after they attach.
pub fn setup<K: NetTelemetry, E: std::fmt::Display>(
    mode: EbpfMode,
    load: impl FnOnce() -> Result<K, E>,
) -> Result<TelemetrySetup, TelemetryError> {
    let userspace = Arc::new(UserspaceTelemetry::new());
    let activation = decide(mode, load)?;
    let enabled = activation.ebpf_enabled();
    crate::metrics::global()
        .ebpf_enabled
        .set(i64::from(enabled));
    let source: Arc<dyn NetTelemetry> = match activation {
        Activation::Kernel(kernel) => {
            tracing::info!(source = kernel.source(), "eBPF telemetry active");
            Arc::new(Layered::new(Arc::new(kernel), userspace.clone()))
        }
        Activation::Userspace { reason } => {
            if mode == EbpfMode::Off {
                tracing::info!(reason = %reason, "eBPF telemetry off; peers measured from the daemon's own connections (TCP_INFO)");
            } else {
                tracing::warn!(reason = %reason, "eBPF telemetry unavailable; peers measured from the daemon's own connections (TCP_INFO)");
            }
            userspace.clone()
        }
    };
    Ok(TelemetrySetup {
        source,
        userspace,
        ebpf_enabled: enabled,
    })
}

/// The canonical form of an address: IPv4-mapped IPv6 becomes IPv4, so the kernel's mapped
/// keys and the router's IPv4 addresses meet.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// An address as the eBPF maps key it: IPv4 mapped into IPv6.
pub fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The current `CLOCK_MONOTONIC` time, comparable with [`PeerNetStats::last_seen`].
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Two sources as one: the first answers where it knows the peer, the second fills gaps (the
/// kernel sees every connection, userspace only the mirror's own).
pub struct Layered {
    primary: Arc<dyn NetTelemetry>,
    fallback: Arc<dyn NetTelemetry>,
}

impl Layered {
    /// `primary` first, `fallback` for addresses `primary` does not know.
    pub fn new(primary: Arc<dyn NetTelemetry>, fallback: Arc<dyn NetTelemetry>) -> Self {
        Layered { primary, fallback }
    }
}

impl NetTelemetry for Layered {
    fn peer(&self, ip: IpAddr) -> Option<PeerNetStats> {
        self.primary.peer(ip).or_else(|| self.fallback.peer(ip))
    }

    fn peers(&self) -> Vec<(IpAddr, PeerNetStats)> {
        let mut all = self.primary.peers();
        for (ip, stats) in self.fallback.peers() {
            if !all.iter().any(|(known, _)| *known == ip) {
                all.push((ip, stats));
            }
        }
        all
    }

    fn source(&self) -> &'static str {
        self.primary.source()
    }
}

/// A fixed table of facts, for tests and tools.
#[derive(Debug, Default, Clone)]
pub struct StaticTelemetry {
    entries: Vec<(IpAddr, PeerNetStats)>,
}

impl StaticTelemetry {
    /// A table with `entries`.
    pub fn new(entries: Vec<(IpAddr, PeerNetStats)>) -> Self {
        StaticTelemetry {
            entries: entries
                .into_iter()
                .map(|(ip, s)| (canonical(ip), s))
                .collect(),
        }
    }

    /// Facts with only a smoothed and minimum RTT, the usual first knowledge of a peer.
    pub fn rtt(srtt: Duration) -> PeerNetStats {
        PeerNetStats {
            srtt,
            min_rtt: srtt,
            ..PeerNetStats::default()
        }
    }
}

impl NetTelemetry for StaticTelemetry {
    fn peer(&self, ip: IpAddr) -> Option<PeerNetStats> {
        let ip = canonical(ip);
        self.entries.iter().find(|(k, _)| *k == ip).map(|(_, s)| *s)
    }

    fn peers(&self) -> Vec<(IpAddr, PeerNetStats)> {
        self.entries.clone()
    }

    fn source(&self) -> &'static str {
        "static"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_canonical_addresses_meet() {
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        let m = mapped(v4);
        assert_eq!(m.to_string(), "::ffff:10.0.0.7");
        assert_eq!(canonical(IpAddr::V6(m)), v4);
        let t = StaticTelemetry::new(vec![(
            IpAddr::V6(m),
            StaticTelemetry::rtt(Duration::from_millis(3)),
        )]);
        assert_eq!(t.peer(v4).map(|s| s.srtt), Some(Duration::from_millis(3)));
    }

    #[test]
    fn setup_layers_kernel_over_userspace_or_falls_back() {
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let kernel =
            StaticTelemetry::new(vec![(ip, StaticTelemetry::rtt(Duration::from_millis(2)))]);
        let on = setup(EbpfMode::Auto, || Ok::<_, String>(kernel)).unwrap();
        assert!(on.ebpf_enabled);
        assert_eq!(on.source.source(), "static");
        assert!(on.source.peer(ip).is_some());
        let off = setup(EbpfMode::Auto, || Err::<StaticTelemetry, _>("no BTF")).unwrap();
        assert!(!off.ebpf_enabled);
        assert_eq!(off.source.source(), "tcp_info");
        assert!(off.source.peer(ip).is_none());
        off.userspace
            .record_connect(ip, Ok(Duration::from_millis(1)));
        assert!(off.source.peer(ip).is_some(), "userspace feeds the source");
        assert!(setup(EbpfMode::On, || Err::<StaticTelemetry, _>("no BTF")).is_err());
        // Leave the process-wide gauge as other tests expect it.
        crate::metrics::global().ebpf_enabled.set(0);
    }

    #[test]
    fn layered_prefers_primary_and_fills_gaps() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let ms = Duration::from_millis;
        let kernel = Arc::new(StaticTelemetry::new(vec![(a, StaticTelemetry::rtt(ms(1)))]));
        let user = Arc::new(StaticTelemetry::new(vec![
            (a, StaticTelemetry::rtt(ms(9))),
            (b, StaticTelemetry::rtt(ms(2))),
        ]));
        let l = Layered::new(kernel, user);
        assert_eq!(l.peer(a).map(|s| s.srtt), Some(ms(1)));
        assert_eq!(l.peer(b).map(|s| s.srtt), Some(ms(2)));
        assert_eq!(l.peers().len(), 2);
        assert!(monotonic_now() > Duration::ZERO);
    }
}
