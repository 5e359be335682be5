//! The userspace telemetry source: what the daemon's own peer connections show (`TCP_INFO`
//! samples and connect outcomes), used when eBPF is off and to fill its gaps.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use tracing::debug;

use super::{NetTelemetry, PeerNetStats, TcpInfoSample, canonical, monotonic_now, tcp_info};

/// Addresses remembered; the least recently updated is forgotten beyond this.
const MAX_ADDRS: usize = 4096;
/// Probe connections made at once.
const PROBE_CONCURRENCY: usize = 8;

/// Per-address facts measured on the daemon's own sockets.
#[derive(Default)]
pub struct UserspaceTelemetry {
    peers: Mutex<HashMap<IpAddr, PeerNetStats>>,
}

impl UserspaceTelemetry {
    /// A source with nothing measured yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, ip: IpAddr, f: impl FnOnce(&mut PeerNetStats)) {
        let ip = canonical(ip);
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if !peers.contains_key(&ip)
            && peers.len() >= MAX_ADDRS
            && let Some(oldest) = peers
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| *k)
        {
            peers.remove(&oldest);
        }
        let stats = peers.entry(ip).or_default();
        f(stats);
        stats.last_seen = monotonic_now();
    }

    /// A connection attempt to `ip` ended: established after `Ok(time)`, or failed.
    pub fn record_connect(&self, ip: IpAddr, outcome: Result<Duration, ()>) {
        self.update(ip, |s| match outcome {
            Ok(time) => {
                s.connects += 1;
                s.connect_time = Some(time);
                // The handshake is an RTT sample of its own, before TCP_INFO has any.
                if s.srtt.is_zero() {
                    s.srtt = time;
                }
                if s.min_rtt.is_zero() || time < s.min_rtt {
                    s.min_rtt = time;
                }
            }
            Err(()) => s.connect_failures += 1,
        });
    }

    /// A `TCP_INFO` sample of a connection to `ip`; `previous` is the sample the same
    /// connection reported last, so cumulative counters add only what is new.
    pub fn record_sample(&self, ip: IpAddr, sample: &TcpInfoSample, previous: &TcpInfoSample) {
        self.update(ip, |s| {
            if !sample.srtt.is_zero() {
                s.srtt = sample.srtt;
            }
            let floor = if sample.min_rtt.is_zero() {
                sample.srtt
            } else {
                sample.min_rtt
            };
            if !floor.is_zero() && (s.min_rtt.is_zero() || floor < s.min_rtt) {
                s.min_rtt = floor;
            }
            s.retransmits += sample.total_retrans.saturating_sub(previous.total_retrans);
            if sample.backoff > previous.backoff {
                s.rto_events += u64::from(sample.backoff - previous.backoff);
            }
            s.bytes_acked += sample.bytes_acked.saturating_sub(previous.bytes_acked);
            s.bytes_received += sample
                .bytes_received
                .saturating_sub(previous.bytes_received);
        });
    }

    /// Measures `addrs` by opening and closing a TCP connection to each (the handshake gives
    /// the RTT), so peers are placed before the first fetch from them. Bounded by `timeout`
    /// per address.
    pub async fn probe(&self, addrs: &[SocketAddr], timeout: Duration) {
        stream::iter(addrs.iter().copied())
            .for_each_concurrent(PROBE_CONCURRENCY, |addr| async move {
                let started = Instant::now();
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        self.record_connect(addr.ip(), Ok(started.elapsed()));
                        if let Ok(sample) = tcp_info(&stream) {
                            self.record_sample(addr.ip(), &sample, &TcpInfoSample::default());
                        }
                    }
                    Ok(Err(e)) => {
                        debug!(%addr, error = %e, "probe connection failed");
                        self.record_connect(addr.ip(), Err(()));
                    }
                    Err(_) => {
                        debug!(%addr, "probe connection timed out");
                        self.record_connect(addr.ip(), Err(()));
                    }
                }
            })
            .await;
    }

    /// Forgets addresses not in `known`.
    pub fn retain(&self, known: &[IpAddr]) {
        let known: Vec<IpAddr> = known.iter().map(|ip| canonical(*ip)).collect();
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|ip, _| known.contains(ip));
    }
}

impl NetTelemetry for UserspaceTelemetry {
    fn peer(&self, ip: IpAddr) -> Option<PeerNetStats> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&canonical(ip))
            .copied()
    }

    fn peers(&self) -> Vec<(IpAddr, PeerNetStats)> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(ip, s)| (*ip, *s))
            .collect()
    }

    fn source(&self) -> &'static str {
        "tcp_info"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn samples_add_deltas_and_keep_the_minimum() {
        let t = UserspaceTelemetry::new();
        let ip: IpAddr = "10.1.0.2".parse().unwrap();
        t.record_connect(ip, Ok(ms(4)));
        t.record_connect(ip, Err(()));
        let first = TcpInfoSample {
            srtt: ms(5),
            min_rtt: ms(3),
            total_retrans: 2,
            bytes_received: 1000,
            ..Default::default()
        };
        t.record_sample(ip, &first, &TcpInfoSample::default());
        let second = TcpInfoSample {
            srtt: ms(6),
            min_rtt: ms(3),
            total_retrans: 5,
            backoff: 1,
            bytes_received: 3000,
            ..Default::default()
        };
        t.record_sample(ip, &second, &first);
        let s = t.peer(ip).unwrap();
        assert_eq!(s.srtt, ms(6));
        assert_eq!(s.min_rtt, ms(3));
        assert_eq!(s.retransmits, 5);
        assert_eq!(s.rto_events, 1);
        assert_eq!(s.bytes_received, 3000);
        assert_eq!((s.connects, s.connect_failures), (1, 1));
        assert_eq!(s.connect_time, Some(ms(4)));
        // Mapped IPv6 finds the same entry.
        let mapped: IpAddr = "::ffff:10.1.0.2".parse().unwrap();
        assert!(t.peer(mapped).is_some());
        t.retain(&[]);
        assert!(t.peer(ip).is_none());
    }

    #[test]
    fn the_address_set_is_bounded() {
        let t = UserspaceTelemetry::new();
        for i in 0..(MAX_ADDRS as u32 + 10) {
            t.record_connect(
                IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                Err(()),
            );
        }
        assert_eq!(t.peers().len(), MAX_ADDRS);
    }

    #[tokio::test]
    async fn probing_measures_reachable_and_counts_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
            l.local_addr().unwrap()
        };
        let t = UserspaceTelemetry::new();
        t.probe(&[open, closed], Duration::from_secs(2)).await;
        let s = t.peer(open.ip()).unwrap();
        assert_eq!((s.connects, s.connect_failures), (1, 0));
        assert!(s.srtt > Duration::ZERO);
        let c = t.peer(closed.ip()).unwrap();
        assert_eq!((c.connects, c.connect_failures), (0, 1));
    }
}
