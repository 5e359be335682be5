//! The delayed link of the testbed: TCP over it sees the configured round-trip time, data
//! crosses it intact, shaping and counters still work on it, and it is torn down on drop.
//! Needs root (network namespaces, TAP devices).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use bench::{
    delay::LinkSpec,
    images::in_netns,
    netns::{Network, tx_bytes},
};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: needs root (network namespaces and TAP devices)");
            return Ok(());
        }
    };
}

fn listen_in(ns: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    in_netns(ns, move || Ok(TcpListener::bind(addr)?))
}

fn connect_in(ns: &str, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    in_netns(ns, move || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(10))?)
    })
}

/// Echoes every byte back until the peer shuts down, for `conns` connections.
fn echo_server(listener: TcpListener, conns: usize) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut total = 0;
        for _ in 0..conns {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let mut buf = [0u8; 65536];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
                total += n as u64;
            }
        }
        total
    })
}

/// Round trips of one byte over `s`: each the time from write to the echoed byte.
fn ping(s: &mut TcpStream, count: usize) -> anyhow::Result<Vec<Duration>> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        s.write_all(&[i as u8])?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        anyhow::ensure!(b[0] == i as u8, "echo mismatch");
        out.push(t.elapsed());
    }
    Ok(out)
}

#[test]
fn delayed_link_adds_its_round_trip_time_and_keeps_data_intact() -> anyhow::Result<()> {
    require_root!();
    let delay = Duration::from_millis(20);
    let mut net = Network::create_with(3, &[LinkSpec::delayed(3, delay)])?;
    assert!(net.link(3).is_some() && net.link(2).is_none());
    let near: SocketAddr = format!("{}:7000", net.node_ip(2)).parse()?;
    let far: SocketAddr = format!("{}:7000", net.node_ip(3)).parse()?;
    let near_srv = echo_server(listen_in(&net.node(2), near)?, 1);
    let far_srv = echo_server(listen_in(&net.node(3), far)?, 2);

    let mut c = connect_in(&net.node(1), far)?;
    let far_rtts = ping(&mut c, 10)?;
    let mut n = connect_in(&net.node(1), near)?;
    let near_rtts = ping(&mut n, 10)?;
    let (far_min, near_min) = (
        far_rtts.iter().min().copied().unwrap_or_default(),
        near_rtts.iter().min().copied().unwrap_or_default(),
    );
    eprintln!("echo RTT: delayed node min {far_min:?}, plain node min {near_min:?}");
    assert!(far_min >= delay, "delayed RTT {far_min:?} below {delay:?}");
    n.shutdown(Shutdown::Write)?;

    // The delay changes at once on a running link.
    let longer = Duration::from_millis(60);
    net.delay_node(3, longer)?;
    let later = ping(&mut c, 3)?;
    eprintln!("after raising the delay to {longer:?}: {later:?}");
    assert!(later.iter().all(|r| *r >= longer), "{later:?}");
    net.delay_node(3, delay)?;
    c.shutdown(Shutdown::Write)?;

    // Bulk data over the delayed link arrives byte for byte, with the node's eth0 counting
    // what it sent and tbf shaping still accepted on it.
    net.shape(&net.node(3), "1gbit")?;
    let before = tx_bytes(&net.node(3))?;
    let mut bulk = connect_in(&net.node(1), far)?;
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let writer = {
        let mut w = bulk.try_clone()?;
        let data = data.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)
        })
    };
    bulk.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut back = Vec::with_capacity(data.len());
    bulk.read_to_end(&mut back)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    let sent = tx_bytes(&net.node(3))? - before;
    assert!(
        sent >= data.len() as u64,
        "eth0 of node 3 sent {sent} bytes"
    );

    assert_eq!(near_srv.join().map_err(|_| anyhow::anyhow!("server"))?, 10);
    assert_eq!(
        far_srv.join().map_err(|_| anyhow::anyhow!("server"))?,
        13 + data.len() as u64
    );
    let counters = net.link(3).map(|l| l.counters());
    let load = |f: fn(&bench::delay::LinkCounters) -> &std::sync::atomic::AtomicU64| {
        counters.map_or(0, |c| f(c).load(std::sync::atomic::Ordering::Relaxed))
    };
    let (frames, bytes) = (load(|c| &c.forwarded), load(|c| &c.bytes));
    eprintln!("delayer forwarded {frames} frames, {bytes} bytes");
    // The bulk data crossed the delayer once each way.
    assert!(bytes > 2 * data.len() as u64, "{bytes} bytes");

    let hub = net.hub();
    drop(net);
    assert!(
        !std::path::Path::new(&format!("/var/run/netns/{hub}")).exists(),
        "namespaces torn down"
    );
    Ok(())
}

#[test]
fn link_specs_for_missing_nodes_are_refused() -> anyhow::Result<()> {
    require_root!();
    assert!(Network::create_with(2, &[LinkSpec::delayed(3, Duration::from_millis(5))]).is_err());
    assert!(Network::create_with(2, &[LinkSpec::delayed(0, Duration::from_millis(5))]).is_err());
    let mut net = Network::create(1)?;
    assert!(net.delay_node(2, Duration::from_millis(5)).is_err());
    Ok(())
}
