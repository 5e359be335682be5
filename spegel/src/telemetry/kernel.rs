//! The kernel source: `spegel-ebpf`'s sock_ops probes, read through [`NetTelemetry`].
//!
//! The probes' map is walked at most every [`REFRESH`], not on every query: the selector asks
//! per candidate of every request, and a map walk is a syscall per entry.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use spegel_ebpf::{CgroupPlacement, EbpfError, PeerRecord, Probes};

use super::{NetTelemetry, PeerNetStats, canonical};

/// Longest age of the cached map snapshot.
const REFRESH: Duration = Duration::from_millis(250);

/// The loaded probes and the cgroup they watch.
pub struct KernelTelemetry {
    probes: Probes,
    placement: CgroupPlacement,
    cache: Mutex<(Option<Instant>, HashMap<IpAddr, PeerNetStats>)>,
}

impl KernelTelemetry {
    /// Moves the daemon into its cgroup and attaches the probes there. Call before any
    /// listener is bound or peer dialed: only sockets created afterwards are seen.
    pub fn load() -> Result<Self, EbpfError> {
        let placement = spegel_ebpf::place_in_cgroup()?;
        let probes = match Probes::attach(&placement.path) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(log = e.verifier_log().unwrap_or(""), "eBPF load failed");
                let _ = placement.release();
                return Err(e);
            }
        };
        Ok(KernelTelemetry {
            probes,
            placement,
            cache: Mutex::new((None, HashMap::new())),
        })
    }

    /// Moves the daemon back out of the cgroup it created and removes that cgroup (at
    /// shutdown; the probes detach when this is dropped).
    pub fn release(&self) {
        if let Err(e) = self.placement.release() {
            tracing::warn!(error = %e, "could not remove the daemon's cgroup");
        }
    }

    fn snapshot(&self) -> HashMap<IpAddr, PeerNetStats> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.is_none_or(|at| at.elapsed() >= REFRESH) {
            match self.probes.peers() {
                Ok(records) => {
                    cache.1 = records
                        .iter()
                        .map(|r| (canonical(IpAddr::V6(r.addr)), stats_of(r)))
                        .collect();
                }
                Err(e) => tracing::debug!(error = %e, "reading the eBPF peer map failed"),
            }
            cache.0 = Some(Instant::now());
        }
        cache.1.clone()
    }
}

fn stats_of(r: &PeerRecord) -> PeerNetStats {
    PeerNetStats {
        srtt: r.srtt,
        min_rtt: r.min_rtt,
        connect_time: r.connect_time,
        connects: r.connects,
        connect_failures: r.connect_failures,
        retransmits: r.retransmits,
        rto_events: r.rto_events,
        bytes_acked: r.bytes_acked,
        bytes_received: r.bytes_received,
        last_seen: r.last_seen,
    }
}

impl Drop for KernelTelemetry {
    /// Also on a start that failed after the probes loaded, so no empty cgroup is left.
    fn drop(&mut self) {
        self.release();
    }
}

impl NetTelemetry for KernelTelemetry {
    fn peer(&self, ip: IpAddr) -> Option<PeerNetStats> {
        self.snapshot().get(&canonical(ip)).copied()
    }

    fn peers(&self) -> Vec<(IpAddr, PeerNetStats)> {
        self.snapshot().into_iter().collect()
    }

    fn source(&self) -> &'static str {
        "ebpf"
    }
}
