//! The OCI registry HTTP server: pull-only, HTTP/1.1 keep-alive, blob bodies by `sendfile(2)`.
//!
//! Each connection is one task that owns its `TcpStream`: request heads are parsed with
//! `httparse`, responses are written directly, and file bodies go from the page cache to the
//! socket with `sendfile(2)` under `TCP_CORK`, so no blob byte passes through userspace.

mod filter;
mod handler;
pub mod http;
mod sendfile;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument, debug, info, info_span, warn};

pub use filter::{FilterError, Filters};
pub use handler::{MIRRORED_HEADER, Registry, handler_label, not_found_anywhere, oci_error};
pub use sendfile::sendfile_all;

use http::{Body, ReadError, Response};

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

/// Turns a request into a response; implemented by the registry and the metrics endpoint.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    async fn handle(&self, req: &http::Request) -> Response;
}

#[async_trait::async_trait]
impl Handler for Registry {
    async fn handle(&self, req: &http::Request) -> Response {
        Registry::handle(self, req).await
    }
}

/// Accepts connections until `shutdown` turns true, then waits for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<dyn Handler>,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(addr = %local, "listening");
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
                let registry = registry.clone();
                let shutdown = shutdown.clone();
                tasks.spawn(
                    connection(stream, peer, registry, timeouts, shutdown)
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
    registry: Arc<dyn Handler>,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let req = tokio::select! {
            r = http::read_request(&mut stream, &mut buf, timeouts.idle, timeouts.head) => r,
            _ = shutdown.changed() => return,
        };
        let req = match req {
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
        // Request bodies are never read, so the connection cannot be reused after one.
        let keep_alive = req.keep_alive && !req.has_body && !*shutdown.borrow();
        let label = handler_label(&req.path);
        let metrics = crate::metrics::global();
        let inflight = metrics.http_requests_inflight.with_label_values(&[label]);
        inflight.inc();
        let started = std::time::Instant::now();
        let span = info_span!("request", method = %req.method, path = %req.path, %peer);
        let response = registry.handle(&req).instrument(span.clone()).await;
        let status = response.status;
        let size = if req.is_head() {
            0
        } else {
            response.body.len()
        };
        let result = write_response(&mut stream, response, req.is_head(), keep_alive, timeouts)
            .instrument(span.clone())
            .await;
        inflight.dec();
        let code = status.to_string();
        let elapsed = started.elapsed();
        metrics
            .http_request_duration
            .with_label_values(&[label, &req.method, &code])
            .observe(elapsed.as_secs_f64());
        metrics
            .http_response_size
            .with_label_values(&[label, &req.method, &code])
            .observe(size as f64);
        if label == "/v2/*" {
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

async fn write_response(
    stream: &mut TcpStream,
    response: Response,
    head_only: bool,
    keep_alive: bool,
    timeouts: Timeouts,
) -> std::io::Result<()> {
    let head = response.head_bytes(keep_alive);
    let stall = timeouts.write_stall;
    if head_only {
        return timed(stall, stream.write_all(&head)).await;
    }
    match response.body {
        Body::Empty => timed(stall, stream.write_all(&head)).await,
        Body::Bytes(bytes) => {
            let mut out = Vec::with_capacity(head.len() + bytes.len());
            out.extend_from_slice(&head);
            out.extend_from_slice(&bytes);
            timed(stall, stream.write_all(&out)).await
        }
        Body::File { file, offset, len } => {
            // Cork so the head and the first body bytes share packets; uncork flushes the tail.
            let corked = sendfile::set_cork(stream, true).is_ok();
            let result = async {
                timed(stall, stream.write_all(&head)).await?;
                sendfile_all(stream, &file, offset, len, stall).await
            }
            .await;
            if corked {
                let _ = sendfile::set_cork(stream, false);
            }
            result
        }
        Body::Stream {
            stream: mut body,
            len,
        } => {
            timed(stall, stream.write_all(&head)).await?;
            let mut sent = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                let take = chunk.len().min((len - sent) as usize);
                timed(stall, stream.write_all(&chunk[..take])).await?;
                sent += take as u64;
                if sent == len {
                    break;
                }
            }
            if sent < len {
                // The promised length cannot be met: closing tells the client the body is short.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "body stream ended early",
                ));
            }
            Ok(())
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

/// Bounds a socket write so a client that stops reading cannot pin the task forever.
async fn timed<F: std::future::Future<Output = std::io::Result<()>>>(
    stall: Duration,
    fut: F,
) -> std::io::Result<()> {
    tokio::time::timeout(stall, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading"))?
}
