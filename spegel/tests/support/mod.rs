//! Shared by the in-process server tests: a registry server on loopback TCP and a raw HTTP/1.1
//! client that reads responses off keep-alive connections.
#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use spegel::{
    http::{self, Limits, Timeouts},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from a keep-alive connection; `head` says the request was HEAD.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Resp {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = resp.parse(buf) {
            let status = resp.code.unwrap();
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let clen: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let want = if head { 0 } else { clen };
            buf.drain(..len);
            while buf.len() < want {
                let mut chunk = vec![0u8; 1 << 16];
                let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf.drain(..want).collect();
            return Resp {
                status,
                headers,
                body,
            };
        }
        let mut chunk = vec![0u8; 1 << 16];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("response timeout")
            .unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A registry server on a loopback port.
pub struct Server {
    pub addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Short deadlines, so a test of a misbehaving client ends quickly.
pub fn timeouts() -> Timeouts {
    Timeouts {
        idle: Duration::from_secs(5),
        head: Duration::from_secs(2),
        write_stall: Duration::from_secs(5),
    }
}

impl Server {
    /// Serves `registry` with [`timeouts`] and default limits.
    pub async fn start(registry: Registry) -> Server {
        Server::start_with_limits(registry, timeouts(), Limits::default()).await
    }

    /// Serves `registry` with the given deadlines and connection limits.
    pub async fn start_with_limits(
        registry: Registry,
        timeouts: Timeouts,
        limits: Limits,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(http::serve_with(
            listener,
            Arc::new(registry),
            timeouts,
            limits,
            rx,
        ));
        Server {
            addr,
            shutdown,
            task,
        }
    }

    /// One request on a fresh connection.
    pub async fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Resp {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        send(&mut stream, method, target, headers).await;
        read_response(&mut stream, &mut Vec::new(), method == "HEAD").await
    }

    /// Shuts the server down and waits for it.
    pub async fn stop(self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Writes a request head with `headers`.
pub async fn send(stream: &mut TcpStream, method: &str, target: &str, headers: &[(&str, &str)]) {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
}
