//! Per-peer telemetry as Prometheus metrics, for the peers the router knows only, and the
//! periodic upkeep (probing, exporting) the daemon runs.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use super::{NetTelemetry, UserspaceTelemetry, canonical, monotonic_now};
use crate::metrics::Metrics;

/// Most peers with metric labels at once; beyond this, peers are left out (lowest address first
/// kept, so the set is stable).
pub const MAX_PEER_LABELS: usize = 256;
/// A probe is repeated once an address's facts are this old.
const PROBE_AFTER: Duration = Duration::from_secs(60);
/// Longest wait for one probe connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps `spegel_peer_*` series in line with the peers the router knows.
pub struct PeerMetricsExporter {
    metrics: &'static Metrics,
    /// Exported peers and their retransmit count as last exported (the counter's value).
    exported: HashMap<IpAddr, u64>,
}

impl PeerMetricsExporter {
    /// Exports into `metrics`.
    pub fn new(metrics: &'static Metrics) -> Self {
        PeerMetricsExporter {
            metrics,
            exported: HashMap::new(),
        }
    }

    /// Peers with series right now.
    pub fn exported(&self) -> usize {
        self.exported.len()
    }

    /// Sets the series of every `known` peer (capped at [`MAX_PEER_LABELS`]) and removes
    /// those of peers no longer known.
    pub fn update(
        &mut self,
        known: &[IpAddr],
        telemetry: Option<&dyn NetTelemetry>,
        throughput: &dyn Fn(IpAddr) -> Option<f64>,
    ) {
        let mut known: Vec<IpAddr> = known.iter().map(|ip| canonical(*ip)).collect();
        known.sort_unstable();
        known.dedup();
        known.truncate(MAX_PEER_LABELS);
        let gone: Vec<IpAddr> = self
            .exported
            .keys()
            .filter(|ip| known.binary_search(ip).is_err())
            .copied()
            .collect();
        for ip in gone {
            self.remove(ip);
        }
        let m = self.metrics;
        for ip in known {
            let stats = telemetry.and_then(|t| t.peer(ip));
            let rate = throughput(ip);
            if stats.is_none() && rate.is_none() {
                continue;
            }
            let label = ip.to_string();
            let labels = [label.as_str()];
            let last = self.exported.entry(ip).or_insert(0);
            // Series appear together so a dashboard never shows a peer half-described.
            let retrans = m.peer_retransmits_total.with_label_values(&labels);
            if let Some(s) = stats {
                m.peer_rtt
                    .with_label_values(&labels)
                    .set(s.srtt.as_secs_f64());
                m.peer_min_rtt
                    .with_label_values(&labels)
                    .set(s.min_rtt.as_secs_f64());
                // The source's count restarts when it forgot the peer: count on from there.
                let delta = if s.retransmits >= *last {
                    s.retransmits - *last
                } else {
                    s.retransmits
                };
                retrans.inc_by(delta);
                *last = s.retransmits;
            }
            if let Some(rate) = rate {
                m.peer_throughput.with_label_values(&labels).set(rate);
            }
        }
    }

    fn remove(&mut self, ip: IpAddr) {
        let label = ip.to_string();
        let labels = [label.as_str()];
        let m = self.metrics;
        let _ = m.peer_rtt.remove_label_values(&labels);
        let _ = m.peer_min_rtt.remove_label_values(&labels);
        let _ = m.peer_retransmits_total.remove_label_values(&labels);
        let _ = m.peer_throughput.remove_label_values(&labels);
        self.exported.remove(&ip);
    }
}

/// The IP and TCP port of a multiaddr such as `/ip4/10.0.0.2/tcp/5001/p2p/…`.
pub fn multiaddr_socket_addr(addr: &str) -> Option<SocketAddr> {
    let mut parts = addr.split('/').filter(|p| !p.is_empty());
    let ip: IpAddr = match (parts.next()?, parts.next()?) {
        ("ip4", ip) | ("ip6", ip) => ip.parse().ok()?,
        _ => return None,
    };
    match (parts.next()?, parts.next()?) {
        ("tcp", port) => Some(SocketAddr::new(ip, port.parse().ok()?)),
        _ => None,
    }
}

/// The socket address of a peer as the router lists it: a multiaddr, or a bare IP (what
/// [`RouterView::peers`](crate::routing::RouterView::peers) reports), then at `port` (the
/// router port, the same on every node of a cluster).
pub fn peer_socket_addr(addr: &str, port: u16) -> Option<SocketAddr> {
    multiaddr_socket_addr(addr)
        .or_else(|| Some(SocketAddr::new(addr.parse::<IpAddr>().ok()?, port)))
}

/// Upkeep every `every`: probes known peers not measured lately (when `probe` is set, i.e.
/// without kernel telemetry) and exports the per-peer metrics. Runs until aborted.
pub async fn maintain(
    known: impl Fn() -> Vec<SocketAddr> + Send,
    probe: Option<Arc<UserspaceTelemetry>>,
    telemetry: Option<Arc<dyn NetTelemetry>>,
    throughput: impl Fn(IpAddr) -> Option<f64> + Send,
    every: Duration,
) {
    let mut exporter = PeerMetricsExporter::new(crate::metrics::global());
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut addrs = known();
        // One address per IP: a probe measures the path, not the port.
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(canonical(a.ip())));
        addrs.truncate(MAX_PEER_LABELS);
        if let Some(userspace) = &probe {
            let now = monotonic_now();
            let stale: Vec<SocketAddr> = addrs
                .iter()
                .filter(|a| {
                    userspace
                        .peer(a.ip())
                        .is_none_or(|s| now.saturating_sub(s.last_seen) >= PROBE_AFTER)
                })
                .copied()
                .collect();
            userspace.probe(&stale, PROBE_TIMEOUT).await;
        }
        let ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
        exporter.update(&ips, telemetry.as_deref(), &throughput);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{PeerNetStats, StaticTelemetry};

    fn text() -> String {
        String::from_utf8(crate::metrics::global().encode()).unwrap()
    }

    #[test]
    fn multiaddrs() {
        assert_eq!(
            multiaddr_socket_addr("/ip4/10.0.0.2/tcp/5001/p2p/12D3KooW"),
            "10.0.0.2:5001".parse().ok()
        );
        assert_eq!(
            multiaddr_socket_addr("/ip6/fd00::2/tcp/5001"),
            "[fd00::2]:5001".parse().ok()
        );
        assert_eq!(
            peer_socket_addr("10.0.0.3", 5001),
            "10.0.0.3:5001".parse().ok()
        );
        assert_eq!(
            peer_socket_addr("/ip4/10.0.0.2/tcp/6001", 5001),
            "10.0.0.2:6001".parse().ok()
        );
        assert_eq!(
            peer_socket_addr("fd00::2", 5001),
            "[fd00::2]:5001".parse().ok()
        );
        assert_eq!(peer_socket_addr("node-2", 5001), None);
        for bad in [
            "",
            "/dns4/x/tcp/1",
            "/ip4/10.0.0.2/udp/1",
            "/ip4/nope/tcp/1",
            "/ip4/1.2.3.4",
        ] {
            assert_eq!(multiaddr_socket_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn series_follow_known_peers_and_are_capped() {
        // Addresses unique to this test: the registry is process-wide.
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut stats = StaticTelemetry::rtt(Duration::from_millis(20));
        stats.retransmits = 3;
        let t = StaticTelemetry::new(vec![
            (a, stats),
            (b, StaticTelemetry::rtt(Duration::from_millis(1))),
        ]);
        let mut e = PeerMetricsExporter::new(crate::metrics::global());
        let rate = |ip: IpAddr| (ip == a).then_some(1e6);
        e.update(&[a, b], Some(&t), &rate);
        let out = text();
        assert!(
            out.contains(r#"spegel_peer_rtt_seconds{peer="192.0.2.1"} 0.02"#),
            "{out}"
        );
        assert!(out.contains(r#"spegel_peer_min_rtt_seconds{peer="192.0.2.2"} 0.001"#));
        assert!(out.contains(r#"spegel_peer_retransmits_total{peer="192.0.2.1"} 3"#));
        assert!(
            out.contains(r#"spegel_peer_throughput_bytes_per_second{peer="192.0.2.1"} 1000000"#)
        );
        // Counters keep counting when the source's count grows or restarts.
        let mut more = stats;
        more.retransmits = 5;
        let t2 = StaticTelemetry::new(vec![(a, more)]);
        e.update(&[a], Some(&t2), &rate);
        let out = text();
        assert!(
            out.contains(r#"spegel_peer_retransmits_total{peer="192.0.2.1"} 5"#),
            "{out}"
        );
        assert!(!out.contains(r#"peer="192.0.2.2""#), "b left: {out}");
        let mut reset = stats;
        reset.retransmits = 1;
        e.update(&[a], Some(&StaticTelemetry::new(vec![(a, reset)])), &rate);
        assert!(text().contains(r#"spegel_peer_retransmits_total{peer="192.0.2.1"} 6"#));
        e.update(&[], Some(&t), &rate);
        assert!(!text().contains("192.0.2."));
        assert_eq!(e.exported(), 0);

        let many: Vec<(IpAddr, PeerNetStats)> = (0..(MAX_PEER_LABELS as u32 + 50))
            .map(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + i));
                (ip, StaticTelemetry::rtt(Duration::from_millis(1)))
            })
            .collect();
        let ips: Vec<IpAddr> = many.iter().map(|(ip, _)| *ip).collect();
        let t = StaticTelemetry::new(many);
        e.update(&ips, Some(&t), &|_| None);
        assert_eq!(e.exported(), MAX_PEER_LABELS);
        e.update(&[], None, &|_| None);
        assert_eq!(e.exported(), 0);
    }
}
