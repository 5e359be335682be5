//! An HTTP connector that measures the connections it makes: connect time and failures per
//! peer address, and `TCP_INFO` samples of each connection while it is read and when it closes.

use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::net::TcpStream;

use super::{TcpInfoSample, UserspaceTelemetry, tcp_info};

/// Least time between two `TCP_INFO` samples of one connection while it is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Wraps [`HttpConnector`]; without a telemetry sink it only passes connections through.
#[derive(Clone)]
pub struct TrackingConnector {
    inner: HttpConnector,
    telemetry: Option<Arc<UserspaceTelemetry>>,
}

impl TrackingConnector {
    /// Measures the connections `inner` makes into `telemetry`.
    pub fn new(inner: HttpConnector, telemetry: Option<Arc<UserspaceTelemetry>>) -> Self {
        TrackingConnector { inner, telemetry }
    }
}

fn uri_ip(uri: &Uri) -> Option<IpAddr> {
    let host = uri.host()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = Result<TrackedStream, Box<dyn std::error::Error + Send + Sync>>> + Send,
    >,
>;

impl tower::Service<Uri> for TrackingConnector {
    type Response = TrackedStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ip = uri_ip(&uri);
        let telemetry = self.telemetry.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let started = Instant::now();
            let result = connecting.await;
            let sink = telemetry.as_ref().zip(ip);
            match result {
                Ok(io) => {
                    if let Some((t, ip)) = sink {
                        t.record_connect(ip, Ok(started.elapsed()));
                    }
                    let mut stream = TrackedStream {
                        inner: io,
                        sink: telemetry.zip(ip),
                        last: TcpInfoSample::default(),
                        sampled: started,
                    };
                    stream.sample();
                    Ok(stream)
                }
                Err(e) => {
                    if let Some((t, ip)) = sink {
                        t.record_connect(ip, Err(()));
                    }
                    Err(e.into())
                }
            }
        })
    }
}

/// A peer connection that reports its `TCP_INFO` to the telemetry sink.
pub struct TrackedStream {
    inner: TokioIo<TcpStream>,
    sink: Option<(Arc<UserspaceTelemetry>, IpAddr)>,
    /// What this connection reported last, so the sink adds only deltas.
    last: TcpInfoSample,
    sampled: Instant,
}

impl TrackedStream {
    fn sample(&mut self) {
        let Some((telemetry, ip)) = &self.sink else {
            return;
        };
        self.sampled = Instant::now();
        if let Ok(sample) = tcp_info(self.inner.inner()) {
            telemetry.record_sample(*ip, &sample, &self.last);
            self.last = sample;
        }
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.sample();
    }
}

impl Connection for TrackedStream {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl Read for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() && self.sink.is_some() && self.sampled.elapsed() >= SAMPLE_EVERY {
            self.sample();
        }
        polled
    }
}

impl Write for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize, std::io::Error>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<Result<usize, std::io::Error>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::NetTelemetry;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ip_of_uris() {
        let u: Uri = "http://10.0.0.3:5000/v2/".parse().unwrap();
        assert_eq!(uri_ip(&u), "10.0.0.3".parse().ok());
        let u: Uri = "http://[fd00::1]:5000/v2/".parse().unwrap();
        assert_eq!(uri_ip(&u), "fd00::1".parse().ok());
        let u: Uri = "http://example.org/".parse().unwrap();
        assert_eq!(uri_ip(&u), None);
    }

    #[tokio::test]
    async fn client_connections_are_measured() {
        let body = vec![1u8; 300_000];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = body.len();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = vec![0u8; 4096];
            let _ = s.read(&mut head).await.unwrap();
            let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {served}\r\n\r\n");
            s.write_all(header.as_bytes()).await.unwrap();
            s.write_all(&vec![1u8; served]).await.unwrap();
            let _ = s.read(&mut head).await;
        });
        let telemetry = Arc::new(UserspaceTelemetry::new());
        let connector = TrackingConnector::new(HttpConnector::new(), Some(telemetry.clone()));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build::<_, Empty<Bytes>>(connector);
        let resp = client
            .get(format!("http://{addr}/x").parse().unwrap())
            .await
            .unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), body.len());
        drop(client);
        server.await.unwrap();
        // The connection is dropped (sampled on drop) once the pool lets it go.
        let mut stats = telemetry.peer(addr.ip()).unwrap();
        for _ in 0..50 {
            if stats.bytes_received >= body.len() as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            stats = telemetry.peer(addr.ip()).unwrap();
        }
        assert_eq!(stats.connects, 1);
        assert!(stats.connect_time.is_some());
        assert!(stats.bytes_received >= body.len() as u64, "{stats:?}");
        assert!(stats.bytes_acked > 0, "{stats:?}");
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let connector = TrackingConnector::new(HttpConnector::new(), Some(telemetry.clone()));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, Empty<Bytes>>(connector);
        assert!(
            client
                .get(format!("http://{refused}/x").parse().unwrap())
                .await
                .is_err()
        );
        assert_eq!(telemetry.peer(refused.ip()).unwrap().connect_failures, 1);
    }
}
