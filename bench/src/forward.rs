//! A port-forward into a network namespace, like `kubectl port-forward`: listens on loopback
//! in the root namespace and makes each upstream connection from a thread that has entered
//! the target namespace, to an address inside it. Nothing is ever sent to 10.x from the root
//! namespace.

use std::{
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;

/// Most connections forwarded at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// A running forward; stops accepting when dropped.
pub struct PortForward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl PortForward {
    /// Forwards `127.0.0.1:<port>` (0 picks a free port) to `target` inside `netns`.
    pub fn start(netns: &str, target: SocketAddr, port: u16) -> anyhow::Result<PortForward> {
        let listener = TcpListener::bind(("127.0.0.1", port)).context("binding the forward")?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let ns_path = format!("/var/run/netns/{netns}");
        std::fs::metadata(&ns_path).with_context(|| format!("namespace {netns}"))?;
        let active = Arc::new(AtomicUsize::new(0));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let ns_path = ns_path.clone();
                        let active = active.clone();
                        active.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || {
                            let _ = forward_one(client, &ns_path, target);
                            active.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Ok(PortForward { local, stop })
    }

    /// The loopback address to open.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn forward_one(client: TcpStream, ns_path: &str, target: SocketAddr) -> anyhow::Result<()> {
    // This thread enters the namespace, so the upstream socket is created inside it.
    let file = std::fs::File::open(ns_path)?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let upstream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = std::io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}
