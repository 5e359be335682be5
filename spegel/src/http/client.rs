//! The one outgoing HTTP/1.1 client: hyper over a keep-alive pool, with connect and
//! whole-exchange timeouts. The mirror (peers' registries), HTTP bootstrap (`/id`) and
//! `cleanup-wait` (probes) all send through it.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{self, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::telemetry::{TrackingConnector, UserspaceTelemetry};

/// Read buffer of one peer connection at most. hyper's default (about 400 KiB, grown as it
/// reads ahead of a slow client) held about 1.5 MiB per forwarded blob under a 150-stream burst
/// (`tests/load.rs`: 217 MiB peak for 140 forwards); 64 KiB keeps it near 0.35 MiB per stream.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// Connection settings of a [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections per host; 0 opens a fresh connection per request.
    pub pool_max_idle_per_host: usize,
    /// TCP keepalive interval, if any.
    pub tcp_keepalive: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(30),
            // Shorter than the server's 90 s idle timeout, so a pooled connection is dropped
            // here before the peer closes it under a request in flight.
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 100,
            tcp_keepalive: Some(Duration::from_secs(30)),
        }
    }
}

/// Why a request got no (complete) response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No TCP connection could be made.
    #[error("connect: {0}")]
    Connect(legacy::Error),
    /// The request or response exchange failed.
    #[error("request failed: {0}")]
    Request(legacy::Error),
    /// Reading the response body failed or it exceeded the limit.
    #[error("reading body: {0}")]
    Body(String),
    /// The exchange did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The request could not be built (e.g. an invalid URI).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// Whether the failure happened while connecting.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_))
    }
}

/// A pooled HTTP/1.1 client; cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct Client {
    inner: legacy::Client<TrackingConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client")
    }
}

impl Client {
    /// A client with these connection settings.
    pub fn new(config: ClientConfig) -> Self {
        Self::with_telemetry(config, None)
    }

    /// A client whose connections are measured into `telemetry` (connect time, failures and
    /// `TCP_INFO` samples per peer address), when given.
    pub fn with_telemetry(
        config: ClientConfig,
        telemetry: Option<Arc<UserspaceTelemetry>>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_keepalive(config.tcp_keepalive);
        let inner = legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .http1_max_buf_size(MAX_READ_BUFFER)
            .build(TrackingConnector::new(connector, telemetry));
        Client { inner }
    }

    /// Sends `request` and returns the response head with its body still to be read.
    pub async fn send(
        &self,
        request: ::http::Request<Empty<Bytes>>,
    ) -> Result<::http::Response<Incoming>, ClientError> {
        self.inner.request(request).await.map_err(|e| {
            if e.is_connect() {
                ClientError::Connect(e)
            } else {
                ClientError::Request(e)
            }
        })
    }

    /// `method uri`, with the whole exchange (connect, head, body of at most `max_body` bytes)
    /// bounded by `timeout`.
    pub async fn fetch(
        &self,
        method: ::http::Method,
        uri: &str,
        timeout: Duration,
        max_body: usize,
    ) -> Result<(::http::StatusCode, Bytes), ClientError> {
        let request = ::http::Request::builder()
            .method(method)
            .uri(uri)
            .header(::http::header::USER_AGENT, "spegel")
            .body(Empty::new())
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let exchange = async {
            let response = self.send(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| ClientError::Body(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::watch;

    use super::*;
    use crate::http::{Body, Handler, Request, Response, Timeouts, serve};

    struct Echo;

    #[async_trait::async_trait]
    impl Handler for Echo {
        async fn handle(&self, req: &Request) -> Response {
            Response::empty(if req.path == "/ok" { 200 } else { 404 })
                .body(Body::Bytes(Bytes::from(req.path.clone())))
        }
    }

    #[tokio::test]
    async fn fetches_bodies_within_limits() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::new(Echo), Timeouts::default(), rx));
        let client = Client::new(ClientConfig::default());
        let t = Duration::from_secs(10);
        let (status, body) = client
            .fetch(::http::Method::GET, &format!("http://{addr}/ok"), t, 100)
            .await
            .unwrap();
        assert_eq!((status.as_u16(), &body[..]), (200, &b"/ok"[..]));
        let (status, _) = client
            .fetch(::http::Method::GET, &format!("http://{addr}/no"), t, 100)
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 404);
        let err = client
            .fetch(::http::Method::GET, &format!("http://{addr}/ok"), t, 2)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Body(_)), "{err}");
        let err = client
            .fetch(::http::Method::GET, "not a uri", t, 2)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = Client::new(ClientConfig::default())
            .fetch(
                ::http::Method::GET,
                &format!("http://{addr}/"),
                Duration::from_secs(10),
                10,
            )
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err}");
    }
}
