//! Load and attach: the sock_ops probe in a fresh child cgroup of this test process, TCP
//! between network namespaces over a delayed link (20 ms) and a plain one, and the per-peer
//! map read back: RTT of the order of each link's latency, bytes, connects and failures.
//! Needs root; the one test that makes sockets is alone in this binary, since cgroup
//! membership is per process.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    time::Duration,
};

use bench::{delay::LinkSpec, images::in_netns, netns::Network};
use spegel_ebpf::{
    CgroupPlacement, EbpfError, PeerRecord, Probes, monotonic_now, own_cgroup_dir, place_in_cgroup,
};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the process back to where it was and removes the cgroup made for the test, also
/// when the test fails: through [`CgroupPlacement::release`] when `place_in_cgroup` made it.
struct CgroupGuard {
    original: PathBuf,
    placement: Option<CgroupPlacement>,
    created: Option<PathBuf>,
}

impl CgroupGuard {
    /// Releases the cgroup now, reporting failures (the drop only logs them).
    fn release(mut self) -> anyhow::Result<()> {
        if let Some(p) = self.placement.take() {
            p.release()?;
            anyhow::ensure!(!p.path.exists(), "{} still exists", p.path.display());
            anyhow::ensure!(own_cgroup_dir()? == self.original, "process moved back");
        }
        Ok(())
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(p) = self.placement.take()
            && let Err(e) = p.release()
        {
            eprintln!("releasing {}: {e}", p.path.display());
        }
        let _ = std::fs::write(
            self.original.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Some(dir) = &self.created
            && let Err(e) = std::fs::remove_dir(dir)
        {
            eprintln!("removing {}: {e}", dir.display());
        }
    }
}

/// Puts the process in a fresh cgroup of its own: the one `place_in_cgroup` makes when the
/// process sits in the machine's root, else a new child of its current cgroup.
fn fresh_cgroup() -> anyhow::Result<(CgroupGuard, PathBuf)> {
    let original = own_cgroup_dir()?;
    let placement = place_in_cgroup()?;
    if placement.created {
        assert_eq!(placement.path.parent(), Some(original.as_path()));
        assert_eq!(
            own_cgroup_dir()?,
            placement.path,
            "process joined the child"
        );
        let path = placement.path.clone();
        let guard = CgroupGuard {
            original,
            placement: Some(placement),
            created: None,
        };
        return Ok((guard, path));
    }
    assert_eq!(placement.path, original, "a non-root cgroup is used as is");
    let dir = original.join(format!("spegel-ebpf-test-{}", std::process::id()));
    std::fs::create_dir(&dir)?;
    let guard = CgroupGuard {
        original,
        placement: None,
        created: Some(dir.clone()),
    };
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
    Ok((guard, dir))
}

fn listen_in(ns: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    in_netns(ns, move || Ok(TcpListener::bind(addr)?))
}

fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    in_netns(ns, move || Ok(TcpStream::connect_timeout(&addr, timeout)?))
}

const SENT: usize = 256 * 1024;
const REPLY: usize = 64 * 1024;
const CONNS: usize = 3;

/// For each of `conns` connections: reads until the peer's FIN, checks SENT bytes came, answers
/// REPLY bytes and closes.
fn server(listener: TcpListener, conns: usize) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        for _ in 0..conns {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            anyhow::ensure!(got.len() == SENT, "server got {} bytes", got.len());
            s.write_all(&vec![0x5a; REPLY])?;
        }
        Ok(())
    })
}

fn exchange(ns: &str, to: SocketAddr) -> anyhow::Result<()> {
    let mut s = connect_in(ns, to, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&vec![0xa5; SENT])?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    anyhow::ensure!(back.len() == REPLY, "client got {} bytes", back.len());
    Ok(())
}

fn find(peers: &[PeerRecord], ip: &str) -> anyhow::Result<PeerRecord> {
    let v4: Ipv4Addr = ip.parse()?;
    peers
        .iter()
        .find(|p| p.addr == v4.to_ipv6_mapped())
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no record for {ip} in {peers:#?}"))
}

/// Bytes counted by the kernel: the payload, plus at most SYN and FIN per connection.
fn assert_bytes(what: &str, got: u64, payload: usize, conns: usize) {
    let payload = payload as u64;
    let slack = 2 * conns as u64;
    assert!(
        (payload..=payload + slack).contains(&got),
        "{what}: {got} bytes, expected {payload} (+ up to {slack})"
    );
}

#[test]
fn sock_ops_records_rtt_bytes_and_connects_per_peer() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("SKIPPED: loading eBPF and creating namespaces needs root");
        return Ok(());
    }
    let delay = Duration::from_millis(20);
    let net = Network::create_with(4, &[LinkSpec::delayed(3, delay)])?;
    let (client, near_ip, far_ip) = (net.node(1), net.node_ip(2), net.node_ip(3));

    let (cgroup, dir) = fresh_cgroup()?;
    let started = monotonic_now();
    let probes = Probes::attach(&dir)?;
    assert_eq!(probes.cgroup(), dir.as_path());

    // Sockets made from here on are in the cgroup: listeners (and so what they accept) too.
    let near: SocketAddr = format!("{near_ip}:7000").parse()?;
    let far: SocketAddr = format!("{far_ip}:7000").parse()?;
    let near_srv = server(listen_in(&net.node(2), near)?, CONNS);
    let far_srv = server(listen_in(&net.node(3), far)?, CONNS);
    for _ in 0..CONNS {
        exchange(&client, near)?;
        exchange(&client, far)?;
    }
    // IPv6 (loopback inside node 1): both ends are in the cgroup, under the one key ::1.
    let v6: SocketAddr = "[::1]:7002".parse()?;
    let v6_srv = server(listen_in(&client, v6)?, 1);
    exchange(&client, v6)?;
    v6_srv
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    near_srv
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    far_srv
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;

    // A refused connect (closed port), and one whose SYN is dropped: node 4 listens with no
    // room in its accept queue once one connection waits there, so the second connect's SYN
    // is retransmitted after the initial 1 s RTO, and we give up before it gets in.
    let closed: SocketAddr = format!("{near_ip}:7001").parse()?;
    assert!(connect_in(&client, closed, Duration::from_secs(10)).is_err());
    let full: SocketAddr = format!("{}:7000", net.node_ip(4)).parse()?;
    let full_listener = listen_in(&net.node(4), full)?;
    // SAFETY: re-listening on our listener's fd only changes its backlog.
    assert_eq!(unsafe { libc::listen(full_listener.as_raw_fd(), 0) }, 0);
    let waiting = connect_in(&client, full, Duration::from_secs(10))?;
    assert!(connect_in(&client, full, Duration::from_millis(2500)).is_err());

    // Closing runs on the kernel's side; wait (bounded) until every FIN has been processed.
    let mut peers = probes.peers()?;
    for _ in 0..50 {
        let client_side = find(&peers, "10.99.0.1")
            .map(|p| p.bytes_received)
            .unwrap_or(0);
        if client_side >= 2 * (CONNS * SENT) as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        peers = probes.peers()?;
    }
    let now = monotonic_now();
    let n = find(&peers, &near_ip)?;
    let f = find(&peers, &far_ip)?;
    let c = find(&peers, "10.99.0.1")?;
    let x = find(&peers, &net.node_ip(4))?;
    let l = peers
        .iter()
        .find(|p| p.addr == Ipv6Addr::LOCALHOST)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no record for ::1 in {peers:#?}"))?;
    for p in [&n, &f, &c, &x, &l] {
        eprintln!(
            "{}: srtt {:?} min_rtt {:?} connect {:?} connects {} failures {} retrans {} rto {} acked {} received {}",
            p.addr,
            p.srtt,
            p.min_rtt,
            p.connect_time,
            p.connects,
            p.connect_failures,
            p.retransmits,
            p.rto_events,
            p.bytes_acked,
            p.bytes_received
        );
        assert!(p.last_seen >= started && p.last_seen <= now, "{p:?}");
    }

    // Distance: the delayed peer's RTT is at least its link's delay, the other is a LAN's.
    assert!(f.min_rtt >= Duration::from_millis(15), "{f:?}");
    assert!(f.srtt >= Duration::from_millis(15), "{f:?}");
    assert!(
        f.connect_time
            .is_some_and(|t| t >= Duration::from_millis(15)),
        "{f:?}"
    );
    assert!(n.min_rtt < Duration::from_millis(5), "{n:?}");
    assert!(
        n.min_rtt > Duration::ZERO && n.connect_time.is_some(),
        "{n:?}"
    );

    // Connects: every exchange, plus the refused one on the near peer.
    assert_eq!((f.connects, f.connect_failures), (CONNS as u64, 0));
    assert_eq!((n.connects, n.connect_failures), (CONNS as u64 + 1, 1));
    assert_eq!((x.connects, x.connect_failures), (2, 1));
    assert!(x.connect_time.is_some(), "{x:?}");
    assert!(x.rto_events >= 1 && x.retransmits >= 1, "{x:?}");
    assert_eq!(c.connects, 0, "accepted sockets are not connects");
    assert_eq!((l.connects, l.connect_failures), (1, 0));
    assert_bytes("acked over ::1", l.bytes_acked, SENT + REPLY, 2);
    assert_bytes("received over ::1", l.bytes_received, SENT + REPLY, 2);

    // Bytes: what each side sent and received, per peer.
    assert_bytes("acked by the near peer", n.bytes_acked, CONNS * SENT, CONNS);
    assert_bytes(
        "received from the near peer",
        n.bytes_received,
        CONNS * REPLY,
        CONNS,
    );
    assert_bytes("acked by the far peer", f.bytes_acked, CONNS * SENT, CONNS);
    assert_bytes(
        "received from the far peer",
        f.bytes_received,
        CONNS * REPLY,
        CONNS,
    );
    assert_bytes(
        "received by both servers",
        c.bytes_received,
        2 * CONNS * SENT,
        2 * CONNS,
    );
    assert_bytes(
        "acked to both servers",
        c.bytes_acked,
        2 * CONNS * REPLY,
        2 * CONNS,
    );

    // Forgetting a peer drops its record; forgetting it again is fine.
    probes.forget(f.addr)?;
    probes.forget(f.addr)?;
    probes.forget(Ipv6Addr::LOCALHOST)?;
    let after = probes.peers()?;
    assert!(after.iter().all(|p| p.addr != f.addr));
    assert!(after.iter().any(|p| p.addr == n.addr));

    drop((waiting, full_listener, probes));
    cgroup.release()?;
    drop(net);
    Ok(())
}

#[test]
fn attaching_elsewhere_than_a_cgroup_says_why() {
    let missing = Probes::attach(std::path::Path::new("/nonexistent/cgroup")).map(|_| ());
    let not_cgroup = Probes::attach(&std::env::temp_dir()).map(|_| ());
    for result in [missing, not_cgroup] {
        let err = result.expect_err("attach must fail");
        eprintln!("{err}");
        if is_root() {
            assert!(matches!(err, EbpfError::NoCgroupV2(_)), "{err:?}");
        } else {
            assert!(matches!(err, EbpfError::NoPrivileges(_)), "{err:?}");
        }
        assert!(!err.to_string().contains('\n'));
    }
}
