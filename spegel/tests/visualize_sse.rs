//! `/visualize` event streams under load, on a real listener: 50 connected clients, half of
//! which never read, do not hold up blob serving, and every queue stays bounded.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use spegel::{
    activity::Activity,
    admin::ui::{AdminUi, MAX_SSE_CLIENTS, ProviderLookup, UiConfig, UiSources},
    advertise::AdvertisedHandle,
    http::{self, Handler, Timeouts},
    mirror::LatencySelector,
    oci::Filters,
    registry::Registry,
    routing::{Peer, RouterView, RoutingError},
    store::{MemoryStore, Store},
};
use tokio::sync::watch;

const CAPACITY: usize = 100;
const CLIENTS: usize = 50;
const BLOB_REQUESTS: usize = 400;

struct Node;

impl RouterView for Node {
    fn local_peer_id(&self) -> String {
        "12D3KooWtest".into()
    }
    fn listen_addrs(&self) -> Vec<String> {
        vec!["/ip4/127.0.0.1/tcp/5001".into()]
    }
    fn peers(&self) -> Vec<(String, Vec<String>)> {
        vec![("12D3KooWpeer".into(), vec!["127.0.0.2".into()])]
    }
}

/// A DHT that knows no provider.
struct NoProviders;

#[async_trait::async_trait]
impl ProviderLookup for NoProviders {
    async fn providers(
        &self,
        _key: &str,
        _count: usize,
    ) -> Result<tokio::sync::mpsc::Receiver<Peer>, RoutingError> {
        Ok(tokio::sync::mpsc::channel(1).1)
    }
}

struct Both {
    ui: Arc<AdminUi>,
    registry: Registry,
}

#[async_trait::async_trait]
impl Handler for Both {
    async fn handle(&self, req: &http::Request) -> http::Response {
        match self.ui.handle(req).await {
            Some(r) => r,
            None => self.registry.handle(req).await,
        }
    }
}

fn open_stream(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /visualize/events HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    s
}

fn status_of(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fifty_event_streams_some_never_reading_do_not_block_blob_serving() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let blob: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let digest = store.add_blob("application/vnd.oci.image.layer.v1.tar", blob.clone());
    let store: Arc<dyn Store> = store;
    let activity = Activity::enabled(CAPACITY);
    let ui = Arc::new(AdminUi::new(
        UiConfig {
            debug_web: true,
            visualize: true,
            registry: "127.0.0.1:1".parse().unwrap(),
            authorization: None,
        },
        UiSources {
            node: Arc::new(Node),
            images: Arc::new(AdvertisedHandle::default()),
            selector: Arc::new(LatencySelector::new()),
            lookup: Arc::new(NoProviders),
            activity: activity.clone(),
        },
    ));
    let handler = Arc::new(Both {
        ui: ui.clone(),
        registry: Registry {
            store,
            filters: Filters::new(&[], &[]).unwrap(),
            mirror: None,
            auth: None,
            ready: Arc::new(|| true),
            activity: activity.clone(),
            searching: Default::default(),
        },
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    let server = runtime.spawn(http::serve(
        listener,
        handler,
        Timeouts {
            idle: Duration::from_secs(10),
            head: Duration::from_secs(5),
            write_stall: Duration::from_secs(2),
        },
        rx,
    ));

    // Half the clients read everything; the other half never read a byte.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..CLIENTS / 2).map(|_| AtomicU64::new(0)).collect());
    let mut idle = Vec::new();
    for i in 0..CLIENTS {
        let mut s = open_stream(addr);
        if i % 2 == 0 {
            let stop = stop.clone();
            let received = received.clone();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            readers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut text = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => text.extend_from_slice(&buf[..n]),
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                    let count = text
                        .windows(15)
                        .filter(|w| w == b"event: request\n")
                        .count() as u64;
                    received[i / 2].store(count, Ordering::Relaxed);
                }
                text
            }));
        } else {
            idle.push(s);
        }
    }
    wait_for("all streams to open", || ui.sse_clients() == CLIENTS);
    assert_eq!(activity.subscribers(), CLIENTS);

    // The limit holds: slots up to MAX_SSE_CLIENTS, then 503.
    let mut extra: Vec<TcpStream> = (CLIENTS..MAX_SSE_CLIENTS)
        .map(|_| open_stream(addr))
        .collect();
    wait_for("the extra streams", || ui.sse_clients() == MAX_SSE_CLIENTS);
    let mut refused = open_stream(addr);
    assert_eq!(status_of(&mut refused), "HTTP/1.1 503");
    for s in &mut extra {
        assert_eq!(status_of(s), "HTTP/1.1 200");
    }
    drop(extra);
    drop(refused);

    // Blob serving with every stream open: each request completes with the exact bytes.
    let target = format!("/v2/test/app/blobs/{digest}?ns=example.com");
    let want = spegel::oci::Digest::sha256_of(&blob).to_string();
    for _ in 0..BLOB_REQUESTS {
        let r = bench::http::get(addr, &target, &[]).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.len, blob.len() as u64);
        assert_eq!(r.sha256, want);
    }
    // Bounded: the ring holds its capacity, however many events there were.
    assert_eq!(activity.len(), CAPACITY);
    assert!(
        activity
            .recent()
            .iter()
            .all(|e| e.bytes == blob.len() as u64 || e.bytes == 0)
    );
    // The reading clients saw the events live (or were told they lagged).
    wait_for("readers to receive events", || {
        received.iter().all(|c| c.load(Ordering::Relaxed) > 0)
    });

    // Clients that go away cost nothing: every slot and subscription is released.
    stop.store(true, Ordering::Relaxed);
    drop(idle);
    for r in readers {
        let text = r.join().unwrap();
        assert!(text.starts_with(b"HTTP/1.1 200 OK\r\n"));
        let head = String::from_utf8_lossy(&text[..text.len().min(512)]).into_owned();
        assert!(head.contains("Content-Type: text/event-stream"), "{head}");
        assert!(head.contains("Connection: close"), "{head}");
        assert!(!head.contains("Content-Length"), "{head}");
    }
    wait_for("released slots", || ui.sse_clients() == 0);
    assert_eq!(activity.subscribers(), 0);

    // Shutdown is not held up by streams (none left here, but the server must stop).
    let _ = shutdown.send(true);
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    });
}

#[test]
fn shutdown_ends_open_event_streams() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let activity = Activity::enabled(10);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let ui = Arc::new(AdminUi::new(
        UiConfig {
            debug_web: false,
            visualize: true,
            registry: "127.0.0.1:1".parse().unwrap(),
            authorization: None,
        },
        UiSources {
            node: Arc::new(Node),
            images: Arc::new(AdvertisedHandle::default()),
            selector: Arc::new(LatencySelector::new()),
            lookup: Arc::new(NoProviders),
            activity: activity.clone(),
        },
    ));
    let handler = Arc::new(Both {
        ui: ui.clone(),
        registry: Registry {
            store,
            filters: Filters::new(&[], &[]).unwrap(),
            mirror: None,
            auth: None,
            ready: Arc::new(|| true),
            activity,
            searching: Default::default(),
        },
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    let server = runtime.spawn(http::serve(listener, handler, Timeouts::default(), rx));
    let mut s = open_stream(addr);
    assert_eq!(status_of(&mut s), "HTTP/1.1 200");
    wait_for("stream", || ui.sse_clients() == 1);
    let _ = shutdown.send(true);
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("shutdown must not wait for an open event stream")
            .unwrap()
            .unwrap();
    });
    // The stream ended with the connection.
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(ui.sse_clients(), 0);
}
