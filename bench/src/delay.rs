//! Links with added latency for the testbed. The kernels here have no delay qdisc (no netem,
//! no fq), and a TCP proxy would hide the delay from the kernel's RTT (TCP measures each hop),
//! so a delayed node's link to the bridge is a pair of TAP devices with a userspace delayer
//! between them: the node's `eth0` is one TAP (in its namespace), the other is a port of the
//! hub's bridge, and a thread moves Ethernet frames between the two after a fixed delay, in
//! both directions, through a bounded queue (a full queue drops, as a real one does).
//!
//! Being layer 2, the link needs no routes, proxy ARP or extra addresses; the node keeps its
//! `eth0` and 10.99.0.k, so `tc tbf` shaping and `tx_bytes` work on it as on a veth. Both TAPs
//! carry virtio-net headers with TSO and checksum offload, so bulk data crosses the delayer in
//! 64 KiB packets (measured here: 128 MiB at 116 MB/s over a 20 ms link, TCP-window bound, in
//! about 4 100 packets).

use std::{
    collections::VecDeque,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// How one node's link to the bridge differs from a plain veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    /// Node (1-based).
    pub node: usize,
    /// Round-trip time added between the node and the bridge (half in each direction);
    /// between two delayed nodes the delays add up.
    pub delay: Duration,
    /// Sending rate limit of the node (`tc tbf` on its `eth0`), e.g. `50mbit`.
    pub rate: Option<String>,
}

impl LinkSpec {
    /// A link to node `node` with `delay` of added round-trip time and no rate limit.
    pub fn delayed(node: usize, delay: Duration) -> LinkSpec {
        LinkSpec {
            node,
            delay,
            rate: None,
        }
    }
}

/// Frames one direction may hold in flight; at 1 Gbit/s and 50 ms that is about 4 000 frames.
const QUEUE_FRAMES: usize = 16_384;
/// Longest wait between checks of the stop flag.
const POLL_CAP: Duration = Duration::from_millis(20);
/// Frames read per direction per round, so due frames are never starved by a busy reader.
const READ_BATCH: usize = 256;

/// Frame counters of a delayer.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Frames delivered (both directions; one TSO packet counts once).
    pub forwarded: AtomicU64,
    /// Bytes of the frames delivered, virtio-net headers included.
    pub bytes: AtomicU64,
    /// Frames dropped because a direction's queue was full or a write failed.
    pub dropped: AtomicU64,
}

/// A running delayer between two TAP file descriptors; stops (and closes both devices) on drop.
pub struct DelayLink {
    one_way_ns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    counters: Arc<LinkCounters>,
    thread: Option<JoinHandle<()>>,
}

impl DelayLink {
    /// Starts moving frames between `a` and `b` (non-blocking TAP fds) with `delay` of added
    /// round-trip time.
    pub fn start(a: OwnedFd, b: OwnedFd, delay: Duration) -> anyhow::Result<DelayLink> {
        let one_way_ns = Arc::new(AtomicU64::new(one_way(delay)));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(LinkCounters::default());
        let thread = {
            let (one_way_ns, stop, counters) = (one_way_ns.clone(), stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name("delay-link".into())
                .spawn(move || relay([a, b], &one_way_ns, &stop, &counters))
                .context("starting the delayer thread")?
        };
        Ok(DelayLink {
            one_way_ns,
            stop,
            counters,
            thread: Some(thread),
        })
    }

    /// Changes the added round-trip time; frames already queued keep their delivery time.
    pub fn set_delay(&self, delay: Duration) {
        self.one_way_ns.store(one_way(delay), Ordering::Relaxed);
    }

    /// The added round-trip time.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.one_way_ns.load(Ordering::Relaxed) * 2)
    }

    /// Frames forwarded and dropped so far.
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn one_way(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos() / 2).unwrap_or(u64::MAX)
}

/// The delayer loop: `queues[i]` holds frames read from `fds[i]`, due for `fds[1 - i]`.
fn relay(fds: [OwnedFd; 2], one_way_ns: &AtomicU64, stop: &AtomicBool, counters: &LinkCounters) {
    let mut queues: [VecDeque<(Instant, Vec<u8>)>; 2] = [VecDeque::new(), VecDeque::new()];
    // A virtio-net header plus the largest GSO packet.
    let mut buf = vec![0u8; 80_000];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for (i, queue) in queues.iter_mut().enumerate() {
            while queue.front().is_some_and(|(due, _)| *due <= now) {
                let Some((_, frame)) = queue.pop_front() else {
                    break;
                };
                // SAFETY: writing an owned buffer to an fd this thread owns.
                let n = unsafe {
                    libc::write(fds[1 - i].as_raw_fd(), frame.as_ptr().cast(), frame.len())
                };
                if n == frame.len() as isize {
                    counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    counters
                        .bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                } else {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let wait = queues
            .iter()
            .filter_map(|q| q.front().map(|(due, _)| due.saturating_duration_since(now)))
            .min()
            .unwrap_or(POLL_CAP)
            .min(POLL_CAP);
        let mut pfds = fds.each_ref().map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: two pollfds we own, a timespec we own, no signal mask.
        let ready = unsafe { libc::ppoll(pfds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if ready <= 0 {
            continue;
        }
        for (i, pfd) in pfds.iter().enumerate() {
            if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return; // a device went away (its namespace was deleted)
            }
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            for _ in 0..READ_BATCH {
                // SAFETY: reading into a buffer we own, at most its length.
                let n = unsafe { libc::read(pfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break; // EAGAIN: drained
                }
                if queues[i].len() >= QUEUE_FRAMES {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let due = Instant::now() + Duration::from_nanos(one_way_ns.load(Ordering::Relaxed));
                queues[i].push_back((due, buf[..n as usize].to_vec()));
            }
        }
    }
}

/// Creates TAP device `name` in the calling thread's network namespace (non-persistent: it
/// vanishes when the returned fd closes) and returns its non-blocking fd.
pub fn open_tap(name: &str) -> anyhow::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!(
            "interface name {name:?} must have 1 to {} bytes",
            libc::IFNAMSIZ - 1
        );
    }
    // SAFETY: a plain open(2) of a constant path; the fd is owned right below.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // With a virtio-net header on every frame the stacks on both sides hand over whole TSO/GRO
    // packets of up to 64 KiB with checksums left to do, as to a VM's NIC: the delayer moves
    // one packet per 64 KiB instead of ~45 frames, which keeps it cheap at bulk rates.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating TAP {name}"));
    }
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offloads as libc::c_ulong,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("enabling offloads on TAP {name}"));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_is_split_between_directions() {
        assert_eq!(one_way(Duration::from_millis(20)), 10_000_000);
        assert_eq!(one_way(Duration::MAX), u64::MAX);
    }

    #[test]
    fn tap_names_are_checked() {
        assert!(open_tap("").is_err());
        assert!(open_tap("a-name-that-is-too-long").is_err());
    }

    #[test]
    fn frames_cross_a_socketpair_after_the_delay_in_both_directions() {
        // Datagram socketpairs stand in for TAP fds: each read is one frame.
        let pair = || {
            let mut sv = [0; 2];
            // SAFETY: socketpair fills two fds we then own.
            let rc = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0);
            // SAFETY: fresh fds from socketpair.
            unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
        };
        let (a_outer, a_inner) = pair();
        let (b_outer, b_inner) = pair();
        let link = DelayLink::start(a_inner, b_inner, Duration::from_millis(40)).unwrap();
        let send = |fd: &OwnedFd, msg: &[u8]| {
            // SAFETY: writing a buffer we own.
            unsafe { libc::write(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len()) }
        };
        let recv = |fd: &OwnedFd| -> Vec<u8> {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own; bounded wait.
            unsafe { libc::poll(&mut pfd, 1, 5_000) };
            let mut buf = [0u8; 64];
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            buf[..n.max(0) as usize].to_vec()
        };
        let start = Instant::now();
        send(&a_outer, b"ping");
        assert_eq!(recv(&b_outer), b"ping");
        send(&b_outer, b"pong");
        assert_eq!(recv(&a_outer), b"pong");
        // Each direction waits half of the round trip; the round trip is never shorter.
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "{:?}",
            start.elapsed()
        );
        // The delayer counts a frame just after writing it, so the reader can be first.
        let counted = Instant::now() + Duration::from_secs(5);
        while link.counters().forwarded.load(Ordering::Relaxed) < 2 && Instant::now() < counted {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(link.counters().forwarded.load(Ordering::Relaxed), 2);
        assert_eq!(link.counters().dropped.load(Ordering::Relaxed), 0);
        assert_eq!(link.delay(), Duration::from_millis(40));
    }
}
