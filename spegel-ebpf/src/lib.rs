//! Kernel TCP telemetry per peer for spegel: a `sock_ops` eBPF program, written in C and
//! compiled by clang in build.rs, loaded with aya into the daemon's own cgroup v2.
//!
//! Usage: [`place_in_cgroup`] (before any listener is bound or peer dialed), then
//! [`Probes::attach`] on its path, then [`Probes::peers`] whenever a snapshot is wanted.
//! Failures come back as an [`EbpfError`] whose message is one log line saying why eBPF is off.
//!
//! What is recorded, per remote address (IPv4 mapped into IPv6), over every socket of the
//! cgroup to that address: smoothed and windowed-minimum RTT (the kernel's own estimators,
//! from `BPF_SOCK_OPS_RTT_CB`), connect time (`TCP_CONNECT_CB` to `ACTIVE_ESTABLISHED_CB`),
//! connect attempts and failures (an attempt that reaches CLOSE before ESTABLISHED),
//! retransmitted segments, retransmission timeouts, bytes acked and received, and the last
//! time a socket to the peer reported. The map is an LRU hash of 4096 peers, so it is bounded
//! whatever the cluster does; [`Probes::forget`] drops a peer that left.
//!
//! Request telemetry (bytes and duration of each `sendfile` transfer, throughput of each blob
//! fetched from a peer) is deliberately not taken from eBPF: the daemon already knows each
//! transfer's bytes and start and end where it writes or reads them, so counting there costs
//! nothing, while a `sys_enter/exit_sendfile64` tracepoint would run a probe on every
//! sendfile call of every process on the machine (tracepoints are system-wide, not per
//! cgroup), on the hot path of serving. The kernel gives what userspace cannot see cheaply:
//! proximity (min RTT, connect time) and health (retransmits, timeouts) of every connection,
//! including the router's, before any blob was fetched. A receiving socket gets few RTT
//! samples, so throughput is measured where the bytes are read, not here.
//!
//! Needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) in the host user namespace, a cgroup v2
//! mount, and kernel ≥ 5.7 (bpf links); no BTF of the kernel, no bpffs, no tracefs.

mod cgroup;
mod error;
mod probes;

pub use cgroup::{CgroupPlacement, own_cgroup_dir, place_in_cgroup};
pub use error::EbpfError;
pub use probes::{PeerRecord, PeerSource, Probes, monotonic_now};
