//! Loading the sock_ops program into a cgroup and reading its per-peer map.

use std::{
    fs::File,
    io,
    net::Ipv6Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{CgroupAttachMode, ProgramError, SockOps},
};

use crate::EbpfError;

/// The sock_ops object built from `src/bpf/sockops.bpf.c` by build.rs.
static SOCKOPS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockops.bpf.o"));

const PROGRAM: &str = "peer_tcp";
const PEERS: &str = "PEERS";

/// Key of `PEERS`: the remote address, IPv4 mapped into IPv6 (`struct peer_key`).
#[repr(C)]
#[derive(Clone, Copy)]
struct PeerKey {
    addr: [u8; 16],
}

// SAFETY: plain bytes, no padding, same layout as the C struct.
unsafe impl aya::Pod for PeerKey {}

/// Value of `PEERS` (`struct peer_stats`): ten u64, so no padding.
#[repr(C)]
#[derive(Clone, Copy)]
struct PeerStats {
    srtt_us: u64,
    min_rtt_us: u64,
    connect_ns: u64,
    connects: u64,
    connect_failures: u64,
    retransmits: u64,
    rto_events: u64,
    bytes_acked: u64,
    bytes_received: u64,
    last_seen_ns: u64,
}

// SAFETY: integers only, no padding, same layout as the C struct.
unsafe impl aya::Pod for PeerStats {}

/// What the kernel measured for one remote address, over every socket of the cgroup to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerRecord {
    /// Remote address (IPv4 peers as `::ffff:a.b.c.d`).
    pub addr: Ipv6Addr,
    /// Smoothed RTT of the socket that reported last (the kernel's own estimator).
    pub srtt: Duration,
    /// The kernel's windowed minimum RTT (5 minutes by default) of that socket: the distance.
    pub min_rtt: Duration,
    /// SYN to ESTABLISHED of the last successful outgoing connect, if there was one.
    pub connect_time: Option<Duration>,
    /// Outgoing connect attempts.
    pub connects: u64,
    /// Outgoing connects that closed without being established (refused, timed out, aborted).
    pub connect_failures: u64,
    /// Segments retransmitted to the peer.
    pub retransmits: u64,
    /// Retransmission timeouts on sockets to the peer.
    pub rto_events: u64,
    /// Bytes sent to the peer and acknowledged by it.
    pub bytes_acked: u64,
    /// Bytes received from the peer (brought up to date on each callback of a socket: RTT
    /// sample, timeout, state change; complete once the socket closes).
    pub bytes_received: u64,
    /// When the peer was last seen: CLOCK_MONOTONIC since boot, as bpf_ktime_get_ns (compare
    /// with [`monotonic_now`]).
    pub last_seen: Duration,
}

impl PeerRecord {
    fn from_map(key: PeerKey, v: PeerStats) -> PeerRecord {
        PeerRecord {
            addr: Ipv6Addr::from(key.addr),
            srtt: Duration::from_micros(v.srtt_us),
            min_rtt: Duration::from_micros(v.min_rtt_us),
            connect_time: (v.connect_ns > 0).then(|| Duration::from_nanos(v.connect_ns)),
            connects: v.connects,
            connect_failures: v.connect_failures,
            retransmits: v.retransmits,
            rto_events: v.rto_events,
            bytes_acked: v.bytes_acked,
            bytes_received: v.bytes_received,
            last_seen: Duration::from_nanos(v.last_seen_ns),
        }
    }
}

/// A source of per-peer kernel telemetry: [`Probes`], or a fake in tests.
pub trait PeerSource: Send + Sync {
    /// Snapshot of every peer recorded.
    fn peers(&self) -> Result<Vec<PeerRecord>, EbpfError>;
    /// Drops what was recorded for `addr` (a peer that left).
    fn forget(&self, addr: Ipv6Addr) -> Result<(), EbpfError>;
}

/// The loaded and attached sock_ops program; dropping it detaches the program (aya uses bpf
/// links, so nothing is pinned and nothing outlives the process).
pub struct Probes {
    peers: Mutex<HashMap<MapData, PeerKey, PeerStats>>,
    cgroup: PathBuf,
    // Owns the program and its link; declared last so the map handle goes first.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl Probes {
    /// Loads the sock_ops program and attaches it to cgroup v2 directory `cgroup`. Only
    /// sockets created afterwards inside that cgroup are seen (accepted sockets count as
    /// their listener's), so attach before binding listeners or dialing peers.
    pub fn attach(cgroup: &Path) -> Result<Probes, EbpfError> {
        check_capabilities()?;
        raise_memlock_limit();
        let dir = File::open(cgroup).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => {
                EbpfError::NoCgroupV2(format!("{} does not exist", cgroup.display()))
            }
            _ => EbpfError::Cgroup {
                path: cgroup.to_path_buf(),
                what: "opening",
                source,
            },
        })?;
        if !is_cgroup2(&dir) {
            return Err(EbpfError::NoCgroupV2(format!(
                "{} is not on a cgroup2 filesystem",
                cgroup.display()
            )));
        }
        let mut ebpf = EbpfLoader::new()
            .load(SOCKOPS_OBJECT)
            .map_err(object_error)?;
        let program: &mut SockOps = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| load_error(format!("program `{PROGRAM}` missing from the object")))?
            .try_into()
            .map_err(|e: ProgramError| load_error(e.to_string()))?;
        program.load().map_err(program_error)?;
        program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| attach_error(e, cgroup))?;
        let map = ebpf
            .take_map(PEERS)
            .ok_or_else(|| map_error("missing from the object".into()))?;
        let peers = HashMap::try_from(map).map_err(|e| map_error(e.to_string()))?;
        tracing::info!(cgroup = %cgroup.display(), "eBPF sock_ops probe attached");
        Ok(Probes {
            peers: Mutex::new(peers),
            cgroup: cgroup.to_path_buf(),
            _ebpf: ebpf,
        })
    }

    /// The cgroup the program is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Snapshot of the per-peer map.
    pub fn peers(&self) -> Result<Vec<PeerRecord>, EbpfError> {
        let map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|entry| {
                entry
                    .map(|(k, v)| PeerRecord::from_map(k, v))
                    .map_err(|e| map_error(e.to_string()))
            })
            .collect()
    }

    /// Drops what was recorded for `addr` (a peer that left); absent peers are fine.
    pub fn forget(&self, addr: Ipv6Addr) -> Result<(), EbpfError> {
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match map.remove(&PeerKey {
            addr: addr.octets(),
        }) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(map_error(e.to_string())),
        }
    }
}

impl PeerSource for Probes {
    fn peers(&self) -> Result<Vec<PeerRecord>, EbpfError> {
        Probes::peers(self)
    }
    fn forget(&self, addr: Ipv6Addr) -> Result<(), EbpfError> {
        Probes::forget(self, addr)
    }
}

/// CLOCK_MONOTONIC now, the clock of [`PeerRecord::last_seen`].
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Says which capability is missing before the kernel answers a bare EPERM.
fn check_capabilities() -> Result<(), EbpfError> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(()); // let the kernel decide
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return Ok(());
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")]
        .iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| *n)
        .collect();
    Err(EbpfError::NoPrivileges(format!(
        "missing {} (effective capabilities {eff:#x})",
        missing.join(" and ")
    )))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass; failure just leaves the limit as is.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

fn is_cgroup2(dir: &File) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    // SAFETY: fstatfs fills a statfs we own, on an fd that `dir` keeps open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

fn is_eperm(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

fn load_error(message: String) -> EbpfError {
    EbpfError::Load {
        program: PROGRAM.into(),
        message,
        log: String::new(),
    }
}

fn map_error(message: String) -> EbpfError {
    EbpfError::Map {
        map: PEERS.into(),
        message,
    }
}

fn object_error(e: aya::EbpfError) -> EbpfError {
    if let aya::EbpfError::MapError(MapError::CreateError { name, io_error }) = &e {
        if is_eperm(io_error) {
            return EbpfError::NoPrivileges(format!("creating map `{name}`: {io_error}"));
        }
        return EbpfError::Load {
            program: format!("map {name}"),
            message: io_error.to_string(),
            log: String::new(),
        };
    }
    load_error(e.to_string())
}

fn program_error(e: ProgramError) -> EbpfError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if is_eperm(&io_error) && log.trim().is_empty() {
                EbpfError::NoPrivileges(format!("BPF_PROG_LOAD: {io_error}"))
            } else {
                EbpfError::Load {
                    program: PROGRAM.into(),
                    message: format!("BPF_PROG_LOAD: {io_error}"),
                    log,
                }
            }
        }
        ProgramError::SyscallError(s) if is_eperm(&s.io_error) => {
            EbpfError::NoPrivileges(format!("{}: {}", s.call, s.io_error))
        }
        other => load_error(other.to_string()),
    }
}

fn attach_error(e: ProgramError, cgroup: &Path) -> EbpfError {
    if let ProgramError::SyscallError(s) = &e
        && is_eperm(&s.io_error)
    {
        return EbpfError::NoPrivileges(format!("{}: {}", s.call, s.io_error));
    }
    EbpfError::Attach {
        program: PROGRAM.into(),
        path: cgroup.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_layout_matches_the_c_structs() {
        assert_eq!(std::mem::size_of::<PeerKey>(), 16);
        assert_eq!(std::mem::size_of::<PeerStats>(), 80);
    }

    #[test]
    fn records_convert_units_and_map_addresses() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[10, 99, 0, 3]);
        let stats = PeerStats {
            srtt_us: 20_500,
            min_rtt_us: 20_100,
            connect_ns: 0,
            connects: 2,
            connect_failures: 1,
            retransmits: 3,
            rto_events: 4,
            bytes_acked: 5,
            bytes_received: 6,
            last_seen_ns: 7_000_000_001,
        };
        let r = PeerRecord::from_map(PeerKey { addr }, stats);
        assert_eq!(r.addr.to_ipv4_mapped(), Some("10.99.0.3".parse().unwrap()));
        assert_eq!(r.srtt, Duration::from_micros(20_500));
        assert_eq!(r.min_rtt, Duration::from_micros(20_100));
        assert_eq!(r.connect_time, None);
        assert_eq!(r.last_seen, Duration::new(7, 1));
        let r = PeerRecord::from_map(
            PeerKey { addr },
            PeerStats {
                connect_ns: 1500,
                ..stats
            },
        );
        assert_eq!(r.connect_time, Some(Duration::from_nanos(1500)));
    }

    #[test]
    fn the_embedded_object_is_an_ebpf_elf_with_btf() {
        assert_eq!(&SOCKOPS_OBJECT[..4], b"\x7fELF");
        // e_machine EM_BPF (247), little endian
        assert_eq!(
            u16::from_le_bytes([SOCKOPS_OBJECT[18], SOCKOPS_OBJECT[19]]),
            247
        );
        let has = |needle: &[u8]| SOCKOPS_OBJECT.windows(needle.len()).any(|w| w == needle);
        assert!(has(b".BTF\0") && has(b"peer_tcp\0") && has(b"PEERS\0"));
    }

    #[test]
    fn probes_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Probes>();
    }
}
