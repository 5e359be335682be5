//! The connection server every listener of the daemon uses: HTTP/1.1 keep-alive with
//! pipelining, idle/head/write-stall timeouts, and per-request metrics under the label the
//! [`Handler`] names.
//!
//! Each connection is one task that owns its `TcpStream`, so file bodies can be written with
//! `sendfile(2)` (see [`super::writer`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt,
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

    /// Whether requests under `label` are logged once served (at debug level).
    fn log_served(&self, label: &'static str) -> bool {
        let _ = label;
        false
    }
}

/// Accepts connections until `shutdown` turns true, then waits for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
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
                let handler = handler.clone();
                let shutdown = shutdown.clone();
                tasks.spawn(
                    connection(stream, peer, handler, timeouts, shutdown)
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
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let req = tokio::select! {
            r = codec::read_request(&mut stream, &mut buf, timeouts.idle, timeouts.head) => r,
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
                return;
            }
        };
        req.remote = Some(peer);
        // Request bodies are never read, so the connection cannot be reused after one.
        let keep_alive = req.keep_alive && !req.has_body && !*shutdown.borrow();
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
        let result = tokio::select! {
            r = write_response(&mut stream, response, req.is_head(), keep_alive, timeouts)
                .instrument(span.clone()) => r,
            _ = shutdown.changed(), if unbounded => Ok(()),
        };
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
            let _ = stream.shutdown().await;
            return;
        }
    }
}
