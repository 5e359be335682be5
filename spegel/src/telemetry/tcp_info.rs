//! `getsockopt(TCP_INFO)` on a connected socket: the kernel's view of one connection.

use std::{io, os::fd::AsFd, time::Duration};

/// The kernel's `struct tcp_info` (linux/tcp.h) up to `tcpi_min_rtt`, the fields read here.
///
/// The kernel copies `min(optlen, sizeof)` bytes, so a shorter prefix of the real struct is
/// valid on every kernel; the returned length says which fields were filled.
#[repr(C)]
#[derive(Default)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
}

/// What one `TCP_INFO` read showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpInfoSample {
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Minimum RTT of the connection (zero on kernels older than 4.6).
    pub min_rtt: Duration,
    /// Retransmitted segments over the connection's life.
    pub total_retrans: u64,
    /// Consecutive retransmission timeouts now pending (backoff exponent).
    pub backoff: u8,
    /// Bytes sent and acknowledged.
    pub bytes_acked: u64,
    /// Bytes received.
    pub bytes_received: u64,
}

/// Reads `TCP_INFO` of a TCP socket.
pub fn tcp_info(socket: &impl AsFd) -> io::Result<TcpInfoSample> {
    use std::os::fd::AsRawFd;
    let mut raw = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `raw` is a plain repr(C) struct of integers, valid for `len` bytes, and the
    // kernel writes at most `len` bytes into it.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut raw as *mut RawTcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let filled = |end: usize| len as usize >= end;
    let bytes_end = std::mem::offset_of!(RawTcpInfo, bytes_received) + 8;
    let min_rtt_end = std::mem::offset_of!(RawTcpInfo, min_rtt) + 4;
    Ok(TcpInfoSample {
        srtt: Duration::from_micros(raw.rtt.into()),
        min_rtt: if filled(min_rtt_end) && raw.min_rtt != u32::MAX {
            Duration::from_micros(raw.min_rtt.into())
        } else {
            Duration::ZERO
        },
        total_retrans: raw.total_retrans.into(),
        backoff: raw.backoff,
        bytes_acked: if filled(bytes_end) {
            raw.bytes_acked
        } else {
            0
        },
        bytes_received: if filled(bytes_end) {
            raw.bytes_received
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn layout_matches_the_kernel_header() {
        // Offsets from linux/tcp.h; a mismatch would read garbage silently.
        assert_eq!(std::mem::offset_of!(RawTcpInfo, rtt), 68);
        assert_eq!(std::mem::offset_of!(RawTcpInfo, total_retrans), 100);
        assert_eq!(std::mem::offset_of!(RawTcpInfo, bytes_acked), 120);
        assert_eq!(std::mem::offset_of!(RawTcpInfo, bytes_received), 128);
        assert_eq!(std::mem::offset_of!(RawTcpInfo, min_rtt), 148);
    }

    #[test]
    fn loopback_connection_counts_bytes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&vec![7u8; 100_000]).unwrap();
            let mut buf = [0u8; 1];
            let _ = s.read(&mut buf);
        });
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let mut got = vec![0u8; 100_000];
        client.read_exact(&mut got).unwrap();
        client.write_all(b"x").unwrap();
        let sample = tcp_info(&client).unwrap();
        server.join().unwrap();
        // The counter may include the SYN's sequence number.
        assert!(
            (100_000..=100_001).contains(&sample.bytes_received),
            "{sample:?}"
        );
        assert!(sample.srtt > Duration::ZERO, "{sample:?}");
        assert!(sample.min_rtt <= sample.srtt.max(sample.min_rtt));
        let not_tcp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(tcp_info(&not_tcp).is_err());
    }
}
