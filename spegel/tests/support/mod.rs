//! Shared by the in-process server tests: a registry server on loopback TCP and a raw HTTP/1.1
//! client that reads responses off keep-alive connections.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use spegel::{
    http::{self, Body, Limits, Response, Timeouts},
    mirror::{Mirror, MirrorRequest, PeerMirror},
    registry::Registry,
    routing::{Peer, Router, RoutingError},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
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

#[derive(Default)]
/// A router that hands out fixed providers per key.
pub struct FakeRouter {
    pub providers: Mutex<HashMap<String, Vec<Peer>>>,
    /// Keep lookups running (never close the channel) instead of finishing at once.
    pub keep_open: bool,
    pub held: Mutex<Vec<mpsc::Sender<Peer>>>,
    pub lookups: Mutex<Vec<(String, usize)>>,
    /// Deliver providers only after this long (a DHT whose peers are far away).
    pub delay: Option<Duration>,
    /// Keys advertised through this router, in order.
    pub advertised: Mutex<Vec<String>>,
}

impl FakeRouter {
    /// A router answering `entries` (key, providers).
    pub fn new(entries: &[(&str, Vec<Peer>)]) -> Arc<Self> {
        let r = FakeRouter::default();
        for (key, peers) in entries {
            r.providers
                .lock()
                .unwrap()
                .insert(key.to_string(), peers.clone());
        }
        Arc::new(r)
    }

    /// Sets the providers of `key`.
    pub fn set(&self, key: &str, peers: Vec<Peer>) {
        self.providers
            .lock()
            .unwrap()
            .insert(key.to_string(), peers);
    }
}

#[async_trait::async_trait]
impl Router for FakeRouter {
    fn ready(&self) -> bool {
        true
    }
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError> {
        self.advertised.lock().unwrap().extend(keys);
        Ok(())
    }
    async fn withdraw(&self, _keys: Vec<String>) -> Result<(), RoutingError> {
        Ok(())
    }
    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RoutingError> {
        self.lookups.lock().unwrap().push((key.to_string(), count));
        let peers = self
            .providers
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(64);
        if let Some(delay) = self.delay {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for p in peers.into_iter().take(count) {
                    let _ = tx.send(p).await;
                }
            });
            return Ok(rx);
        }
        for p in peers.into_iter().take(count) {
            tx.try_send(p).unwrap();
        }
        if self.keep_open {
            self.held.lock().unwrap().push(tx);
        }
        Ok(rx)
    }
}

/// A provider at `addr`, named after its port.
pub fn peer(addr: SocketAddr) -> Peer {
    Peer {
        id: format!("peer-{}", addr.port()),
        addrs: vec![addr],
    }
}

/// Forwards `req`, bounded.
pub async fn forward(m: &PeerMirror, req: MirrorRequest) -> Response {
    tokio::time::timeout(Duration::from_secs(30), m.forward(req))
        .await
        .expect("forward did not finish")
}

/// Reads the whole body the registry would write.
pub async fn body_of(resp: Response) -> std::io::Result<Vec<u8>> {
    match resp.body {
        Body::Empty => Ok(Vec::new()),
        Body::Bytes(b) => Ok(b.to_vec()),
        Body::File { .. } | Body::Growing { .. } => panic!("mirror never serves files"),
        Body::Unbounded(_) => panic!("mirror bodies always have a length"),
        Body::Stream { mut stream, len } => {
            let mut out = Vec::new();
            let read = async {
                while let Some(chunk) = stream.next().await {
                    out.extend_from_slice(&chunk?);
                    if out.len() as u64 >= len {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::time::timeout(Duration::from_secs(30), read)
                .await
                .expect("body did not finish")?;
            assert_eq!(out.len() as u64, len, "stream delivered a different length");
            Ok(out)
        }
    }
}

/// `len` xorshift bytes from `seed`: pseudo-random, so a wrong offset shows in the content.
pub fn pseudo_random(seed: u32, len: usize) -> bytes::Bytes {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}
