//! The connection server every listener of the daemon uses: HTTP/1.1 keep-alive with
//! pipelining, idle/head/write-stall timeouts, and per-request metrics under the label the
//! [`Handler`] names.
//!
//! Each connection is one task that owns its `TcpStream`, so file bodies can be written with
//! `sendfile(2)` (see [`super::writer`]).

use std::{net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    codec::{self, ReadError, Request, Response},
    writer::write_response,
};

/// Connection timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Idle time allowed between requests on a keep-alive connection.
    pub idle: Duration,
    /// Time allowed to receive a complete request head once it started.
    pub head: Duration,
    /// Time a client may accept no bytes before the response is abandoned.
    pub write_stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(90),
            head: Duration::from_secs(30),
            write_stall: Duration::from_secs(60),
        }
    }
}

/// Connection limits of one listener (each listener has its own).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once, in total (`--max-connections`).
    pub max_connections: usize,
    /// Connections served at once from one IP address (`--max-connections-per-ip`).
    pub max_per_ip: usize,
    /// Connections accepted past the caps that may only reach the handler's reserved routes
    /// (probes, metrics); anything else on them gets 503.
    pub reserve: usize,
    /// Time a new connection has to send the first byte of its first request.
    pub first_byte: Duration,
    /// Least rate (bytes/s) a client must read a response at, measured over `rate_window`
    /// while bytes wait in the socket's send queue; slower connections are cut. 0 disables.
    pub min_rate: u64,
    /// Window of the `min_rate` check.
    pub rate_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_per_ip: 256,
            reserve: 16,
            first_byte: Duration::from_secs(10),
            min_rate: 4096,
            rate_window: Duration::from_secs(30),
        }
    }
}

/// Open connections of one listener, by IP address.
#[derive(Debug, Default)]
struct Occupancy {
    total: usize,
    reserve: usize,
    per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// What an accepted connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Within the caps.
    Regular,
    /// Past a cap, within the reserve: reserved routes only.
    Reserve,
}

/// One admitted connection's place in the [`Occupancy`]; released on drop.
struct Slot {
    occupancy: Arc<std::sync::Mutex<Occupancy>>,
    ip: std::net::IpAddr,
    admission: Admission,
}

impl Slot {
    fn admit(
        occupancy: &Arc<std::sync::Mutex<Occupancy>>,
        ip: std::net::IpAddr,
        limits: &Limits,
    ) -> Result<Slot, &'static str> {
        let mut o = occupancy.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = o.per_ip.get(&ip).copied().unwrap_or(0);
        let admission = if o.total - o.reserve >= limits.max_connections {
            if o.reserve >= limits.reserve {
                return Err("total");
            }
            Admission::Reserve
        } else if from_ip >= limits.max_per_ip {
            if o.reserve >= limits.reserve {
                return Err("per_ip");
            }
            Admission::Reserve
        } else {
            Admission::Regular
        };
        o.total += 1;
        if admission == Admission::Reserve {
            o.reserve += 1;
        }
        *o.per_ip.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            occupancy: occupancy.clone(),
            ip,
            admission,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
        o.total -= 1;
        if self.admission == Admission::Reserve {
            o.reserve -= 1;
        }
        if let Some(n) = o.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Turns a request into a response; implemented by the registry, the admin routes, the HTTP
/// bootstrap `/id` endpoint and the cleanup probe.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    async fn handle(&self, req: &Request) -> Response;

    /// The `handler` label of the request's HTTP metrics; must come from a fixed set, never
    /// from the client.
    fn label(&self, req: &Request) -> &'static str {
        let _ = req;
        "other"
    }

    /// Whether the request may be served on a connection past the caps (health probes,
    /// metrics), so those still answer while the listener is full.
    fn reserved(&self, req: &Request) -> bool {
        let _ = req;
        false
    }

    /// Whether requests under `label` are logged once served (at debug level).
    fn log_served(&self, label: &'static str) -> bool {
        let _ = label;
        false
    }
}

/// Accepts connections until `shutdown` turns true, then waits for in-flight requests; with
/// the default [`Limits`].
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    timeouts: Timeouts,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with(listener, handler, timeouts, Limits::default(), shutdown).await
}

/// [`serve`] with the given connection limits.
pub async fn serve_with(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    timeouts: Timeouts,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(addr = %local, "listening");
    let occupancy = Arc::new(std::sync::Mutex::new(Occupancy::default()));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning, never exit.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match Slot::admit(&occupancy, peer.ip(), &limits) {
                    Ok(slot) => slot,
                    Err(reason) => {
                        // Closed at once: the socket costs a file descriptor only this long.
                        debug!(%peer, reason, "connection refused: at the connection cap");
                        crate::metrics::global()
                            .http_connections_refused
                            .with_label_values(&[reason])
                            .inc();
                        drop(stream);
                        continue;
                    }
                };
                let handler = handler.clone();
                let shutdown = shutdown.clone();
                tasks.spawn(
                    connection(stream, peer, handler, timeouts, limits, slot, shutdown)
                        .instrument(info_span!("conn", %peer)),
                );
            }
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<dyn Handler>,
    timeouts: Timeouts,
    limits: Limits,
    slot: Slot,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let reserve = slot.admission == Admission::Reserve;
    let mut first = true;
    loop {
        // A connection that never sends a byte holds a descriptor only briefly.
        let idle = if first {
            limits.first_byte.min(timeouts.idle)
        } else {
            timeouts.idle
        };
        first = false;
        let req = tokio::select! {
            r = codec::read_request(&mut stream, &mut buf, idle, timeouts.head) => r,
            _ = shutdown.changed() => return,
        };
        let mut req = match req {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(e) => {
                debug!(error = %e, "bad request");
                let status = match e {
                    ReadError::TooLarge => 431,
                    ReadError::Timeout => 408,
                    _ => 400,
                };
                let _ =
                    write_response(&mut stream, Response::empty(status), false, false, timeouts)
                        .await;
                close_after_response(&mut stream).await;
                return;
            }
        };
        req.remote = Some(peer);
        if reserve && !handler.reserved(&req) {
            let busy = Response::empty(503).header("Retry-After", "1");
            let _ = write_response(&mut stream, busy, req.is_head(), false, timeouts).await;
            let _ = stream.shutdown().await;
            return;
        }
        // Request bodies are never read, so the connection cannot be reused after one; a
        // reserve slot is given back after each response.
        let keep_alive = req.keep_alive && !req.has_body && !*shutdown.borrow() && !reserve;
        let label = handler.label(&req);
        let metrics = crate::metrics::global();
        let inflight = metrics.http_requests_inflight.with_label_values(&[label]);
        inflight.inc();
        let started = std::time::Instant::now();
        let span = info_span!("request", method = %req.method, path = %req.path, %peer);
        let response = handler.handle(&req).instrument(span.clone()).await;
        let status = response.status;
        let size = if req.is_head() {
            0
        } else {
            response.body.len()
        };
        // A close-delimited body ends the connection, and must not hold up shutdown.
        let unbounded = response.body.is_unbounded();
        let keep_alive = keep_alive && !unbounded;
        let fd = stream.as_raw_fd();
        let result = tokio::select! {
            r = write_response(&mut stream, response, req.is_head(), keep_alive, timeouts)
                .instrument(span.clone()) => r,
            _ = shutdown.changed(), if unbounded => Ok(()),
            e = too_slow(fd, limits) => Err(e),
        };
        inflight.dec();
        let code = status.to_string();
        let method = crate::metrics::method_label(&req.method);
        let elapsed = started.elapsed();
        metrics
            .http_request_duration
            .with_label_values(&[label, method, &code])
            .observe(elapsed.as_secs_f64());
        metrics
            .http_response_size
            .with_label_values(&[label, method, &code])
            .observe(size as f64);
        if handler.log_served(label) {
            span.in_scope(|| {
                debug!(
                    status,
                    bytes = size,
                    latency_ms = elapsed.as_millis() as u64,
                    "request served"
                )
            });
        }
        if let Err(e) = result {
            span.in_scope(|| debug!(error = %e, "writing response failed"));
            return;
        }
        if !keep_alive {
            close_after_response(&mut stream).await;
            return;
        }
    }
}

/// Ends a connection whose client may still be sending (an unread body, a rejected head):
/// closing with unread bytes makes the kernel answer with a reset that can destroy the response
/// before the client reads it (RFC 9112 §9.6), so stop writing, then discard a bounded amount.
async fn close_after_response(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut sink = [0u8; 8192];
    let mut left: usize = 256 * 1024;
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Completes once the client has read less than `limits.min_rate` over a whole window while
/// bytes were waiting for it in the send queue (a slow reader, not a slow source); never
/// completes with the check disabled.
///
/// `fd` is the connection's socket, borrowed for the duration of the write it races with.
async fn too_slow(fd: std::os::fd::RawFd, limits: Limits) -> std::io::Error {
    if limits.min_rate == 0 || limits.rate_window.is_zero() {
        return std::future::pending().await;
    }
    // SAFETY: the caller keeps the stream that owns `fd` alive while this future runs.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let need = (limits.min_rate as f64 * limits.rate_window.as_secs_f64()) as u64;
    let mut acked = acked_bytes(&socket);
    loop {
        tokio::time::sleep(limits.rate_window).await;
        let now = acked_bytes(&socket);
        let queued = send_queue(fd);
        if queued > 0 && now.saturating_sub(acked) < need {
            crate::metrics::global()
                .http_connections_refused
                .with_label_values(&["slow_reader"])
                .inc();
            return std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client reads below the minimum transfer rate",
            );
        }
        acked = now;
    }
}

fn acked_bytes(socket: &impl std::os::fd::AsFd) -> u64 {
    crate::telemetry::tcp_info(socket)
        .map(|i| i.bytes_acked)
        .unwrap_or(0)
}

/// Bytes in the socket's send queue (sent but unacknowledged, or not sent yet).
fn send_queue(fd: std::os::fd::RawFd) -> u64 {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    if rc == 0 { queued.max(0) as u64 } else { 0 }
}
