//! Peer forwarding against in-process fake peers on 127.0.0.1 and a fake router.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use spegel::{
    auth::BasicAuth,
    http::{self, Body, Handler, Request, Response, Timeouts},
    mirror::{Mirror, MirrorConfig, MirrorRequest, PeerMirror, PeerSelector, TelemetrySelector},
    oci::{ByteRange, DistributionPath, Filters, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST},
    registry::Registry,
    routing::in_progress_key,
    store::MemoryStore,
    telemetry::{NetTelemetry, StaticTelemetry},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

mod support;

use support::{FakeRouter, body_of, forward, peer};

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const AUTH: &str = "Basic dXNlcjpwYXNz";

// ---------------------------------------------------------------------------------------------
// Content

struct Fixture {
    store: Arc<MemoryStore>,
    layer: String,
    layer_data: Bytes,
    index: String,
    index_data: Vec<u8>,
}

fn layer_bytes() -> Bytes {
    // Large enough to arrive in several reads; pseudo-random so offsets matter.
    support::pseudo_random(0x1234_5678, 300_000)
}

fn fixture() -> Fixture {
    let store = MemoryStore::new();
    let layer_data = layer_bytes();
    let layer = store.add_blob(LAYER_TYPE, layer_data.clone());
    let config = store.add_blob(
        OCI_CONFIG,
        br#"{"architecture":"amd64","os":"linux"}"#.to_vec(),
    );
    let manifest_json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{config}","size":1}},"layers":[{{"mediaType":"{LAYER_TYPE}","digest":"{layer}","size":1}}]}}"#
    );
    let manifest = store.add_blob(OCI_MANIFEST, manifest_json.into_bytes());
    let index_json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest}","size":1}}]}}"#
    );
    let index = store.add_blob(OCI_INDEX, index_json.clone().into_bytes());
    store.add_image("docker.io/library/app:v1", index.clone());
    Fixture {
        store: Arc::new(store),
        layer: layer.to_string(),
        layer_data,
        index: index.to_string(),
        index_data: index_json.into_bytes(),
    }
}

fn blob_request(digest: &str, head: bool, range: Option<&str>) -> MirrorRequest {
    MirrorRequest {
        path: DistributionPath::parse(
            &format!("/v2/library/app/blobs/{digest}"),
            Some("ns=docker.io"),
        )
        .unwrap(),
        head,
        range: range.map(|r| r.parse::<ByteRange>().unwrap()),
    }
}

fn manifest_request(reference: &str, head: bool) -> MirrorRequest {
    MirrorRequest {
        path: DistributionPath::parse(
            &format!("/v2/library/app/manifests/{reference}"),
            Some("ns=docker.io"),
        )
        .unwrap(),
        head,
        range: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Fake peers

/// A request as a fake peer saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn count(log: &Log) -> usize {
    log.lock().unwrap().len()
}

struct Recording {
    inner: Registry,
    log: Log,
}

#[async_trait::async_trait]
impl Handler for Recording {
    async fn handle(&self, req: &Request) -> Response {
        let target = match &req.query {
            Some(q) => format!("{}?{q}", req.path),
            None => req.path.clone(),
        };
        self.log.lock().unwrap().push(Seen {
            method: req.method.clone(),
            target,
            headers: req.headers.clone(),
        });
        self.inner.handle(req).await
    }

    fn label(&self, req: &Request) -> &'static str {
        self.inner.label(req)
    }

    fn log_served(&self, label: &'static str) -> bool {
        self.inner.log_served(label)
    }
}

/// A real registry server (optionally with a mirror of its own).
struct Server {
    addr: SocketAddr,
    log: Log,
    _shutdown: watch::Sender<bool>,
}

async fn registry_server(
    store: Arc<MemoryStore>,
    mirror: Option<Arc<dyn Mirror>>,
    auth: Option<BasicAuth>,
) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    let log: Log = Arc::default();
    let handler = Recording {
        inner: Registry {
            store,
            filters: Filters::new(&[], &[]).unwrap(),
            mirror,
            auth,
            ready: Arc::new(|| true),
            activity: Default::default(),
            searching: Default::default(),
        },
        log: log.clone(),
    };
    let timeouts = Timeouts {
        idle: Duration::from_secs(5),
        head: Duration::from_secs(2),
        write_stall: Duration::from_secs(5),
    };
    tokio::spawn(http::serve(listener, Arc::new(handler), timeouts, rx));
    Server {
        addr,
        log,
        _shutdown: shutdown,
    }
}

#[derive(Clone)]
enum Behaviour {
    /// Answer with this status and no body.
    Status(u16),
    /// Read the request and never answer.
    Silent,
    /// Send the head and half the body, then close.
    Truncate,
    /// Like `Truncate` for the first request, then serve normally.
    TruncateFirst,
    /// Send the head and half the body, then the rest once the gate opens.
    Gated(watch::Receiver<bool>),
    /// Send the body in 64 KiB pieces with this pause between them (a throttled link).
    Paced(Duration),
}

struct RawPeer {
    addr: SocketAddr,
    log: Log,
}

/// A hand-written peer that misbehaves on purpose; serves `data` as blob `digest`.
async fn raw_peer(behaviour: Behaviour, data: Bytes, digest: String) -> RawPeer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let served = Arc::new(AtomicUsize::new(0));
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(raw_connection(
                stream,
                behaviour.clone(),
                data.clone(),
                digest.clone(),
                l.clone(),
                served.clone(),
            ));
        }
    });
    RawPeer { addr, log }
}

async fn raw_connection(
    mut stream: TcpStream,
    behaviour: Behaviour,
    data: Bytes,
    digest: String,
    log: Log,
    served: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let seen = loop {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = req.parse(&buf) {
            break Seen {
                method: req.method.unwrap().to_string(),
                target: req.path.unwrap().to_string(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
        }
    };
    let range = seen
        .header("range")
        .map(|r| r.parse::<ByteRange>().unwrap());
    log.lock().unwrap().push(seen);
    let nth = served.fetch_add(1, Ordering::SeqCst);
    let truncate = match &behaviour {
        Behaviour::Status(code) => {
            let _ = stream
                .write_all(
                    format!(
                        "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            return;
        }
        Behaviour::Silent => {
            // Hold the connection open without answering until the client gives up.
            let _ = stream.read(&mut [0u8; 1]).await;
            return;
        }
        Behaviour::Truncate => true,
        Behaviour::TruncateFirst => nth == 0,
        Behaviour::Gated(_) | Behaviour::Paced(_) => false,
    };
    let size = data.len() as u64;
    let mut head = String::new();
    let (start, len) = match range.map(|r| r.resolve(size).unwrap()) {
        Some(cr) => {
            head.push_str(&format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: {cr}\r\n"
            ));
            (cr.start as usize, cr.len() as usize)
        }
        None => {
            head.push_str("HTTP/1.1 200 OK\r\n");
            (0, data.len())
        }
    };
    head.push_str(&format!(
        "Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nDocker-Content-Digest: {digest}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
    ));
    let body = data.slice(start..start + len);
    if let Behaviour::Paced(pause) = behaviour {
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in body.chunks(64 << 10) {
            if stream.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
        return;
    }
    let half = len / 2;
    if stream.write_all(head.as_bytes()).await.is_err()
        || stream.write_all(&body[..half]).await.is_err()
    {
        return;
    }
    if truncate {
        let _ = stream.flush().await;
        return;
    }
    if let Behaviour::Gated(mut gate) = behaviour {
        let _ = gate.wait_for(|open| *open).await;
    }
    let _ = stream.write_all(&body[half..]).await;
}

/// An address nothing listens on.
async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn mirror(router: Arc<FakeRouter>, tune: impl FnOnce(&mut MirrorConfig)) -> PeerMirror {
    // Generous timeouts keep outcomes independent of machine load; tests of the timeouts
    // themselves set them back.
    let mut config = MirrorConfig {
        basic_auth_header: Some(AUTH.to_string()),
        resolve_timeout: Duration::from_secs(20),
        race_timeout_floor: Duration::from_secs(20),
        ..MirrorConfig::default()
    };
    tune(&mut config);
    PeerMirror::new(router, config).unwrap()
}

fn error_body(resp: &Response) -> String {
    match &resp.body {
        Body::Bytes(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("expected an error body, got {other:?}"),
    }
}

fn expected_error(code: &str, attempts: usize, message: &str, id: &str) -> String {
    format!(
        r#"{{"errors":[{{"code":"{code}","detail":{{"attempts":{attempts}}},"message":"{message} {id}"}}]}}"#
    )
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn first_good_peer_wins_with_headers_and_auth() {
    let f = fixture();
    let auth = Some(BasicAuth {
        username: "user".into(),
        password: "pass".into(),
    });
    let b = registry_server(f.store.clone(), None, auth.clone()).await;
    let c = registry_server(f.store.clone(), None, auth).await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(b.addr), peer(c.addr)])]);
    let m = mirror(router.clone(), |_| {});
    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.get_header("content-type"), Some(LAYER_TYPE));
    assert_eq!(resp.get_header("accept-ranges"), Some("bytes"));
    assert_eq!(
        resp.get_header("docker-content-digest"),
        Some(f.layer.as_str())
    );
    assert_eq!(
        resp.get_header("content-length"),
        Some(f.layer_data.len().to_string().as_str())
    );
    // Issue 8 item 6: mirrored responses carry OCI-Namespace like local ones (Spegel #1101).
    assert_eq!(resp.get_header("oci-namespace"), Some("docker.io"));
    assert_eq!(body_of(resp).await.unwrap(), f.layer_data);

    assert_eq!(router.lookups.lock().unwrap()[0], (f.layer.clone(), 3));
    let log = b.log.lock().unwrap();
    assert_eq!(log.len(), 1);
    let seen = &log[0];
    assert_eq!(seen.method, "GET");
    assert_eq!(
        seen.target,
        format!("/v2/library/app/blobs/{}?ns=docker.io", f.layer)
    );
    assert_eq!(seen.header("x-spegel-mirrored"), Some("true"));
    assert_eq!(seen.header("user-agent"), Some("spegel"));
    assert_eq!(seen.header("authorization"), Some(AUTH));
    assert_eq!(seen.header("range"), None);
    let accepts: Vec<&str> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "accept")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(accepts, spegel::oci::MANIFEST_MEDIA_TYPES);
}

#[tokio::test]
async fn only_a_blob_with_no_provider_known_at_once_announces_an_intent() {
    let f = fixture();
    let b = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(b.addr)])]);
    let m = mirror(router.clone(), |c| c.local_peer_id = Some("me".into()));
    // A hit: the provider was in the lookup's channel when the router handed it over.
    let resp = forward(&m, blob_request(&f.layer, true, None)).await;
    assert_eq!(resp.status, 200);
    // A miss: announced, so nodes missing it at the same moment can elect one fetcher.
    let missing = format!("sha256:{}", "1".repeat(64));
    let resp = forward(&m, blob_request(&missing, true, None)).await;
    assert_eq!(resp.status, 404);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while router.advertised.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        *router.advertised.lock().unwrap(),
        vec![spegel::routing::intent_key(&missing)]
    );
}

#[tokio::test]
async fn failing_peers_are_skipped() {
    let f = fixture();
    let e500 = raw_peer(
        Behaviour::Status(500),
        f.layer_data.clone(),
        f.layer.clone(),
    )
    .await;
    let refused = refused_addr().await;
    let empty = registry_server(Arc::new(MemoryStore::new()), None, None).await;
    let good = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[(
        f.layer.as_str(),
        vec![
            peer(e500.addr),
            peer(refused),
            peer(empty.addr),
            peer(good.addr),
        ],
    )]);
    let m = mirror(router, |c| c.resolve_retries = 4);
    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(body_of(resp).await.unwrap(), f.layer_data);
    assert_eq!(count(&e500.log), 1);
    assert_eq!(count(&empty.log), 1);
    assert_eq!(count(&good.log), 1);
}

#[tokio::test]
async fn all_peers_failing_gives_exact_404() {
    let f = fixture();
    let e500 = raw_peer(
        Behaviour::Status(500),
        f.layer_data.clone(),
        f.layer.clone(),
    )
    .await;
    let refused = refused_addr().await;
    let empty = registry_server(Arc::new(MemoryStore::new()), None, None).await;
    let peers = vec![peer(e500.addr), peer(refused), peer(empty.addr)];
    let tag_key = "docker.io/library/app:v1";
    let router = FakeRouter::new(&[(f.layer.as_str(), peers.clone()), (tag_key, peers)]);
    let m = mirror(router, |_| {});

    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.get_header("content-type"), Some("application/json"));
    let body = error_body(&resp);
    assert_eq!(
        body,
        expected_error(
            "BLOB_UNKNOWN",
            3,
            "all request retries exhausted for",
            &f.layer
        )
    );
    assert_eq!(body.len(), 178);

    let resp = forward(&m, manifest_request("v1", false)).await;
    assert_eq!(resp.status, 404);
    assert_eq!(
        error_body(&resp),
        expected_error(
            "MANIFEST_UNKNOWN",
            3,
            "all request retries exhausted for",
            tag_key
        )
    );

    // HEAD: same status and headers, no body.
    let resp = forward(&m, blob_request(&f.layer, true, None)).await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.get_header("content-length"), Some("178"));
    assert!(matches!(resp.body, Body::Empty));
}

#[tokio::test]
async fn no_provider_answers_when_the_lookup_ends() {
    let f = fixture();
    // The idle timeout is far beyond the test's own limits: only the lookup ending can end it.
    let router = Arc::new(FakeRouter {
        keep_open: true,
        ..FakeRouter::default()
    });
    let m = mirror(router.clone(), |c| {
        c.resolve_timeout = Duration::from_secs(3600)
    });
    let task = {
        let m = m.clone();
        let req = blob_request(&f.layer, false, None);
        tokio::spawn(async move { m.forward(req).await })
    };
    // While the lookup runs, the forward keeps waiting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !task.is_finished(),
        "forward ended while the lookup was running"
    );
    // A blob is looked up under its own key and the key of nodes still downloading it.
    let keys: Vec<String> = router
        .lookups
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(keys, vec![f.layer.clone(), in_progress_key(&f.layer)]);
    router.held.lock().unwrap().clear();
    let resp = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("forward did not end when the lookup ended")
        .unwrap();
    assert_eq!(resp.status, 404);
    let body = error_body(&resp);
    assert_eq!(
        body,
        expected_error("BLOB_UNKNOWN", 0, "could not find peer for", &f.layer)
    );
    assert_eq!(body.len(), 168);

    // A lookup that finishes at once with nothing answers at once.
    let router = FakeRouter::new(&[]);
    let m = mirror(router, |c| c.resolve_timeout = Duration::from_secs(3600));
    let resp = forward(&m, manifest_request("v1", true)).await;
    assert_eq!(resp.status, 404);
    assert!(matches!(resp.body, Body::Empty));
    let expected = expected_error(
        "MANIFEST_UNKNOWN",
        0,
        "could not find peer for",
        "docker.io/library/app:v1",
    );
    assert_eq!(
        resp.get_header("content-length"),
        Some(expected.len().to_string().as_str())
    );
}

#[tokio::test]
async fn idle_lookup_times_out() {
    let f = fixture();
    let router = Arc::new(FakeRouter {
        keep_open: true,
        ..FakeRouter::default()
    });
    let m = mirror(router, |c| c.resolve_timeout = Duration::from_millis(20));
    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 404);
    assert_eq!(
        error_body(&resp),
        expected_error(
            "BLOB_UNKNOWN",
            0,
            "waited too long for new peer with no inflight fetches for",
            &f.layer
        )
    );
}

#[tokio::test]
async fn silent_peer_is_hedged() {
    let f = fixture();
    let silent = raw_peer(Behaviour::Silent, f.layer_data.clone(), f.layer.clone()).await;
    let good = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(silent.addr), peer(good.addr)])]);
    let m = mirror(router, |_| {});
    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(body_of(resp).await.unwrap(), f.layer_data);
    assert_eq!(count(&silent.log), 1);
    assert_eq!(count(&good.log), 1);
}

#[tokio::test]
async fn provider_found_after_a_hedge_is_used_at_once() {
    let f = fixture();
    let silent = raw_peer(Behaviour::Silent, f.layer_data.clone(), f.layer.clone()).await;
    let good = registry_server(f.store.clone(), None, None).await;
    let router = Arc::new(FakeRouter {
        keep_open: true,
        ..FakeRouter::default()
    });
    router
        .providers
        .lock()
        .unwrap()
        .insert(f.layer.clone(), vec![peer(silent.addr)]);
    let m = mirror(router.clone(), |_| {});
    let task = {
        let m = m.clone();
        let req = blob_request(&f.layer, false, None);
        tokio::spawn(async move { m.forward(req).await })
    };
    for _ in 0..200 {
        if count(&silent.log) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(&silent.log), 1);
    // Past the first hedge delay, with no other provider known yet.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let tx = router.held.lock().unwrap()[0].clone();
    tx.send(peer(good.addr)).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the late provider was not used")
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(body_of(resp).await.unwrap(), f.layer_data);
    assert_eq!(count(&good.log), 1);
}

#[tokio::test]
async fn silent_peers_hit_the_race_timeout() {
    let f = fixture();
    let a = raw_peer(Behaviour::Silent, f.layer_data.clone(), f.layer.clone()).await;
    let b = raw_peer(Behaviour::Silent, f.layer_data.clone(), f.layer.clone()).await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(a.addr), peer(b.addr)])]);
    let m = mirror(router, |c| {
        c.race_timeout_floor = Duration::from_millis(100)
    });
    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 404);
    let body = error_body(&resp);
    assert_eq!(
        body,
        expected_error(
            "BLOB_UNKNOWN",
            2,
            "waited too long for inflight dials to complete for",
            &f.layer
        )
    );
    assert_eq!(body.len(), 195);
}

#[tokio::test]
async fn broken_body_resumes_on_another_peer() {
    let f = fixture();
    let size = f.layer_data.len();
    for range in [None, Some((1000usize, 250_000usize))] {
        let broken = raw_peer(Behaviour::Truncate, f.layer_data.clone(), f.layer.clone()).await;
        let good = registry_server(f.store.clone(), None, None).await;
        let router =
            FakeRouter::new(&[(f.layer.as_str(), vec![peer(broken.addr), peer(good.addr)])]);
        let m = mirror(router, |_| {});
        // Slow history pushes the hedge delay to its maximum, so the broken peer wins the first
        // race even on a loaded machine.
        m.hedger().observe(Duration::from_secs(1));
        let header = range.map(|(s, e)| format!("bytes={s}-{e}"));
        let resp = forward(&m, blob_request(&f.layer, false, header.as_deref())).await;
        let (start, end) = range.unwrap_or((0, size - 1));
        match range {
            Some(_) => {
                assert_eq!(resp.status, 206);
                assert_eq!(
                    resp.get_header("content-range"),
                    Some(format!("bytes {start}-{end}/{size}").as_str())
                );
            }
            None => assert_eq!(resp.status, 200),
        }
        let body = body_of(resp).await.unwrap();
        assert!(body == f.layer_data[start..=end], "resumed body differs");
        assert_eq!(count(&broken.log), 1);
        // Under load the good peer may also have been asked by a hedge of the first race (and
        // lost); the resume is its last request.
        let log = good.log.lock().unwrap();
        let half = (end - start).div_ceil(2);
        assert_eq!(
            log.last().and_then(|s| s.header("range")),
            Some(format!("bytes={}-{end}", start + half).as_str())
        );
    }
}

#[tokio::test]
async fn broken_body_resumes_on_the_same_peer() {
    let f = fixture();
    let flaky = raw_peer(
        Behaviour::TruncateFirst,
        f.layer_data.clone(),
        f.layer.clone(),
    )
    .await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(flaky.addr)])]);
    let m = mirror(router, |_| {});
    let resp = forward(&m, blob_request(&f.layer, false, Some("bytes=-100001"))).await;
    assert_eq!(resp.status, 206);
    let size = f.layer_data.len();
    let body = body_of(resp).await.unwrap();
    assert!(
        body == f.layer_data[size - 100_001..],
        "resumed body differs"
    );
    let log = flaky.log.lock().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].header("range"), Some("bytes=-100001"));
    assert_eq!(
        log[1].header("range"),
        Some(format!("bytes={}-{}", size - 100_001 + 50_000, size - 1).as_str())
    );
}

#[tokio::test]
async fn resumes_are_bounded() {
    let f = fixture();
    let broken = raw_peer(Behaviour::Truncate, f.layer_data.clone(), f.layer.clone()).await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(broken.addr)])]);
    let m = mirror(router, |c| c.max_resumes = 2);
    let resp = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 200);
    assert!(
        body_of(resp).await.is_err(),
        "a body that keeps breaking must error"
    );
    assert_eq!(count(&broken.log), 3);

    // Manifests are never resumed.
    let broken = raw_peer(
        Behaviour::Truncate,
        f.index_data.clone().into(),
        f.index.clone(),
    )
    .await;
    let router = FakeRouter::new(&[(f.index.as_str(), vec![peer(broken.addr)])]);
    let m = mirror(router, |_| {});
    let resp = forward(&m, manifest_request(&f.index, false)).await;
    assert_eq!(resp.status, 200);
    assert!(body_of(resp).await.is_err());
    assert_eq!(count(&broken.log), 1);
}

#[tokio::test]
async fn ranges_are_forwarded() {
    let f = fixture();
    let size = f.layer_data.len();
    let b = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(b.addr)])]);
    let m = mirror(router, |_| {});
    for (range, start, end) in [
        ("bytes=1-3", 1, 3),
        ("bytes=-4", size - 4, size - 1),
        ("bytes=299990-", 299_990, size - 1),
        ("bytes=5-999999999", 5, size - 1),
    ] {
        let resp = forward(&m, blob_request(&f.layer, false, Some(range))).await;
        assert_eq!(resp.status, 206, "{range}");
        assert_eq!(
            resp.get_header("content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(resp.get_header("accept-ranges"), Some("bytes"));
        assert_eq!(
            resp.get_header("content-range"),
            Some(format!("bytes {start}-{end}/{size}").as_str())
        );
        assert_eq!(
            resp.get_header("content-length"),
            Some((end - start + 1).to_string().as_str())
        );
        assert!(
            body_of(resp).await.unwrap() == f.layer_data[start..=end],
            "{range}"
        );
        assert_eq!(
            b.log.lock().unwrap().last().unwrap().header("range"),
            Some(range)
        );
    }
    let resp = forward(&m, blob_request(&f.layer, false, Some("bytes=300000-"))).await;
    assert_eq!(resp.status, 416);
    assert_eq!(
        resp.get_header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );
}

#[tokio::test]
async fn head_requests_forward_headers_only() {
    let f = fixture();
    let b = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[
        (f.layer.as_str(), vec![peer(b.addr)]),
        ("docker.io/library/app:v1", vec![peer(b.addr)]),
    ]);
    let m = mirror(router, |_| {});
    let resp = forward(&m, blob_request(&f.layer, true, None)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.get_header("content-length"),
        Some(f.layer_data.len().to_string().as_str())
    );
    assert_eq!(
        resp.get_header("docker-content-digest"),
        Some(f.layer.as_str())
    );
    assert!(matches!(resp.body, Body::Empty));

    let resp = forward(&m, blob_request(&f.layer, true, Some("bytes=10-19"))).await;
    assert_eq!(resp.status, 206);
    assert_eq!(resp.get_header("content-length"), Some("10"));
    assert!(matches!(resp.body, Body::Empty));

    let resp = forward(&m, manifest_request("v1", true)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.get_header("content-type"), Some(OCI_INDEX));
    assert_eq!(
        resp.get_header("content-length"),
        Some(f.index_data.len().to_string().as_str())
    );
    assert!(matches!(resp.body, Body::Empty));
    let log = b.log.lock().unwrap();
    assert!(log.iter().all(|s| s.method == "HEAD"), "{log:?}");
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let f = fixture();
    let b = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[
        ("docker.io/library/app:v1", vec![peer(b.addr)]),
        (f.index.as_str(), vec![peer(b.addr)]),
    ]);
    let m = mirror(router.clone(), |_| {});
    for reference in ["v1", f.index.as_str()] {
        let resp = forward(&m, manifest_request(reference, false)).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.get_header("content-type"), Some(OCI_INDEX));
        assert_eq!(
            resp.get_header("docker-content-digest"),
            Some(f.index.as_str())
        );
        assert_eq!(resp.get_header("accept-ranges"), None);
        assert_eq!(body_of(resp).await.unwrap(), f.index_data);
    }
    let lookups = router.lookups.lock().unwrap();
    assert_eq!(lookups[0].0, "docker.io/library/app:v1");
    assert_eq!(lookups[1].0, f.index);
    let log = b.log.lock().unwrap();
    assert_eq!(log[0].target, "/v2/library/app/manifests/v1?ns=docker.io");
}

#[tokio::test]
async fn concurrent_forwards_spread_over_providers() {
    let f = fixture();
    let (open, gate) = watch::channel(false);
    let b = raw_peer(
        Behaviour::Gated(gate.clone()),
        f.layer_data.clone(),
        f.layer.clone(),
    )
    .await;
    let c = raw_peer(
        Behaviour::Gated(gate),
        f.layer_data.clone(),
        f.layer.clone(),
    )
    .await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(b.addr), peer(c.addr)])]);
    let m = mirror(router, |_| {});
    // Every body stays mid-transfer until the gate opens, so all four forwards overlap.
    let mut responses = Vec::new();
    for _ in 0..4 {
        let resp = forward(&m, blob_request(&f.layer, false, None)).await;
        assert_eq!(resp.status, 200);
        responses.push(resp);
    }
    assert!(count(&b.log) >= 2, "b served {}", count(&b.log));
    assert!(count(&c.log) >= 2, "c served {}", count(&c.log));
    open.send(true).unwrap();
    for resp in responses {
        assert_eq!(body_of(resp).await.unwrap(), f.layer_data);
    }

    // One provider: concurrent forwards of one key share it instead of starving (§11.13).
    let (open, gate) = watch::channel(false);
    let only = raw_peer(
        Behaviour::Gated(gate),
        f.layer_data.clone(),
        f.layer.clone(),
    )
    .await;
    let router = FakeRouter::new(&[(f.layer.as_str(), vec![peer(only.addr)])]);
    let m = mirror(router, |_| {});
    let first = forward(&m, blob_request(&f.layer, false, None)).await;
    let second = forward(&m, blob_request(&f.layer, false, None)).await;
    assert_eq!((first.status, second.status), (200, 200));
    open.send(true).unwrap();
    assert_eq!(body_of(first).await.unwrap(), f.layer_data);
    assert_eq!(body_of(second).await.unwrap(), f.layer_data);
    assert_eq!(count(&only.log), 2);
}

/// Sends one request over a fresh connection and reads the response.
async fn http_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = resp.parse(&raw).unwrap() else {
        panic!("incomplete response");
    };
    (resp.code.unwrap(), raw[len..].to_vec())
}

#[tokio::test]
async fn registry_forwards_to_peer_end_to_end() {
    let f = fixture();
    let b = registry_server(f.store.clone(), None, None).await;
    let router = FakeRouter::new(&[
        (f.layer.as_str(), vec![peer(b.addr)]),
        ("docker.io/library/app:v1", vec![peer(b.addr)]),
    ]);
    let m: Arc<dyn Mirror> = Arc::new(mirror(router, |_| {}));
    let resolved = || {
        spegel::metrics::global()
            .resolve_duration
            .with_label_values(&["libp2p"])
            .get_sample_count()
    };
    let resolved_before = resolved();
    let a = registry_server(Arc::new(MemoryStore::new()), Some(m), None).await;

    let (status, body) = http_get(
        a.addr,
        &format!("/v2/library/app/blobs/{}?ns=docker.io", f.layer),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body == f.layer_data, "blob differs");

    let (status, body) = http_get(a.addr, "/v2/library/app/manifests/v1?ns=docker.io", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, f.index_data);
    assert_eq!(count(&b.log), 2);
    // One provider found per lookup (other tests may add more concurrently).
    assert!(resolved() >= resolved_before + 2);

    // A request from a peer is never forwarded again.
    let (status, _) = http_get(
        a.addr,
        &format!("/v2/library/app/blobs/{}?ns=docker.io", f.layer),
        &[("X-Spegel-Mirrored", "true")],
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(count(&b.log), 2);
}

// ---------------------------------------------------------------------------------------------
// Telemetry-fed selection and adaptive timeouts

/// A blob large enough for throughput samples, with its real digest.
fn big_blob() -> (Bytes, String) {
    use sha2::Digest as _;
    let data: Bytes = (0..(2u32 << 20))
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
    (data, digest)
}

#[tokio::test]
async fn telemetry_selector_leaves_a_throttled_peer_after_one_transfer() {
    let (data, digest) = big_blob();
    // 32 pieces, 20 ms apart: far slower than the unpaced peer on loopback.
    let slow = raw_peer(
        Behaviour::Paced(Duration::from_millis(20)),
        data.clone(),
        digest.clone(),
    )
    .await;
    let fast = raw_peer(
        Behaviour::Gated(watch::channel(true).1),
        data.clone(),
        digest.clone(),
    )
    .await;
    // The throttled peer comes first, and nothing tells them apart before a transfer.
    let router = FakeRouter::new(&[(digest.as_str(), vec![peer(slow.addr), peer(fast.addr)])]);
    let selector = Arc::new(TelemetrySelector::with_seed(None, 1, 0));
    let m = mirror(router, |c| c.selector = selector.clone());
    for _ in 0..5 {
        let resp = forward(&m, blob_request(&digest, false, None)).await;
        assert_eq!(resp.status, 200);
        assert_eq!(body_of(resp).await.unwrap(), data);
    }
    assert_eq!((count(&slow.log), count(&fast.log)), (1, 4));
    assert!(selector.throughput("127.0.0.1".parse().unwrap()).is_some());
}

#[tokio::test]
async fn resolve_timeout_stretches_with_peer_rtt() {
    let f = fixture();
    let server = registry_server(f.store.clone(), None, None).await;
    let far = |delay| {
        let mut r = FakeRouter {
            delay: Some(delay),
            ..FakeRouter::default()
        };
        r.providers
            .get_mut()
            .unwrap()
            .insert(f.layer.clone(), vec![peer(server.addr)]);
        Arc::new(r)
    };
    // Every peer 50 ms away: the DHT's first answer (two round trips) comes after 80 ms.
    let rtt = Duration::from_millis(50);
    let telemetry: Arc<dyn NetTelemetry> = Arc::new(StaticTelemetry::new(vec![(
        server.addr.ip(),
        StaticTelemetry::rtt(rtt),
    )]));
    let configured = |c: &mut MirrorConfig| {
        c.resolve_timeout = Duration::from_millis(20);
        c.race_timeout_floor = Duration::from_millis(100);
    };
    let plain = mirror(far(Duration::from_millis(80)), configured);
    let resp = forward(&plain, blob_request(&f.layer, false, None)).await;
    assert_eq!(
        resp.status, 404,
        "the configured 20 ms ends before the answer"
    );
    let adaptive = mirror(far(Duration::from_millis(80)), |c| {
        configured(c);
        c.telemetry = Some(telemetry.clone());
    });
    let resp = forward(&adaptive, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(body_of(resp).await.unwrap(), f.layer_data);
    // The stretch is bounded by the RTT: a provider much later still misses.
    let late = mirror(far(Duration::from_secs(3)), |c| {
        configured(c);
        c.telemetry = Some(telemetry.clone());
    });
    let resp = forward(&late, blob_request(&f.layer, false, None)).await;
    assert_eq!(resp.status, 404);
}
