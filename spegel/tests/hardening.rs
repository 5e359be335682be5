//! Hostile and non-conforming clients against the in-process registry server over real TCP
//! (issue 12): bounded metric cardinality, RFC 9110 conformance, connection limits, bounded
//! stream buffering.

use std::{sync::Arc, time::Duration};

use spegel::{
    auth::BasicAuth,
    http::{Limits, Timeouts},
    oci::{Digest, Filters},
    registry::Registry,
    store::MemoryStore,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

mod support;

use support::{Server, read_response, send};

struct Fixture {
    store: Arc<MemoryStore>,
    layer: Digest,
    layer_data: Vec<u8>,
}

fn fixture() -> Fixture {
    let store = MemoryStore::new();
    let layer_data: Vec<u8> = (0..20u8).collect();
    let layer = store.add_blob(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        layer_data.clone(),
    );
    Fixture {
        store: Arc::new(store),
        layer,
        layer_data,
    }
}

fn registry(f: &Fixture) -> Registry {
    Registry {
        store: f.store.clone(),
        filters: Filters::new(&[], &[]).unwrap(),
        mirror: None,
        auth: None,
        ready: Arc::new(|| true),
        activity: Default::default(),
        searching: Default::default(),
    }
}

/// Number of sample lines (not comments) in the Prometheus exposition.
fn series() -> usize {
    String::from_utf8(spegel::metrics::global().encode())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// Defect 3: label values come from bounded sets whatever methods and `?ns=` values arrive.
#[tokio::test]
async fn metric_series_stay_bounded_under_random_methods_and_namespaces() {
    let f = fixture();
    let s = Server::start(registry(&f)).await;
    // Warm up every label combination a well-behaved client produces.
    for method in ["GET", "HEAD"] {
        s.request(method, "/v2/a/manifests/v1?ns=docker.io", &[])
            .await;
    }
    let before = series();
    const CONNECTIONS: usize = 20;
    const PER_CONNECTION: usize = 150;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for c in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(s.addr).await.unwrap();
        let mut raw = String::new();
        let mut methods = Vec::new();
        for _ in 0..PER_CONNECTION {
            // Half unusual methods, half GETs of manifests in random registries.
            let (method, target) = if next() % 2 == 0 {
                (format!("M{:x}", next()), "/v2/".to_string())
            } else {
                (
                    "GET".to_string(),
                    format!("/v2/a/manifests/v1?ns=r{:x}.example", next()),
                )
            };
            raw.push_str(&format!("{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n"));
            methods.push(method);
        }
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        for m in &methods {
            let r = read_response(&mut stream, &mut buf, false).await;
            assert!((200..500).contains(&r.status), "{m}: {}", r.status);
        }
        let _ = c;
    }
    let after = series();
    let requests = CONNECTIONS * PER_CONNECTION;
    // At most: one "other" method per handler/code (two histograms with ~25 lines each) and
    // MAX_REQUESTED_REGISTRY_LABELS + 1 registry values; far below one per request.
    // (16: spegel::metrics::MAX_REQUESTED_REGISTRY_LABELS)
    let bound = 2 * 30 * 3 + 16 + 1;
    assert!(
        after - before <= bound,
        "{requests} requests added {} series (bound {bound})",
        after - before
    );
    let text = String::from_utf8(spegel::metrics::global().encode()).unwrap();
    assert!(text.contains(r#"method="other""#), "{text}");
    assert!(text.contains(r#"registry="other""#), "{text}");
    s.stop().await;
}

/// Defect 7: RFC 9110 conformance of the registry's answers.
#[tokio::test]
async fn rfc9110_conformance() {
    let f = fixture();
    let mut reg = registry(&f);
    reg.auth = Some(BasicAuth {
        username: "hello".into(),
        password: "world".into(),
    });
    let s = Server::start(reg).await;
    let auth = [("Authorization", "Basic aGVsbG86d29ybGQ=")];

    // §11.6.1: a 401 carries a challenge.
    for method in ["GET", "HEAD"] {
        let r = s.request(method, "/v2/", &[]).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Basic realm="spegel""#)
        );
    }

    let path = format!("/v2/library/app/blobs/{}?ns=docker.io", f.layer);
    // §14.2: a Range that is not one valid byte range is ignored.
    for ignored in [
        "bytes=x",
        "bytes=5-2",
        "bytes=1-2,4-5",
        "items=0-1",
        "bytes=",
        "bytes=--1",
    ] {
        let r = s
            .request("GET", &path, &[auth[0], ("Range", ignored)])
            .await;
        assert_eq!(r.status, 200, "{ignored}");
        assert_eq!(r.body, f.layer_data, "{ignored}");
        assert_eq!(r.header("content-range"), None, "{ignored}");
    }
    // A valid range beyond the end of the content covers all of it (206, the whole blob).
    for whole in [
        "bytes=0-18446744073709551615",
        "bytes=0-99999999999999999999999",
    ] {
        let r = s.request("GET", &path, &[auth[0], ("Range", whole)]).await;
        assert_eq!(r.status, 206, "{whole}");
        assert_eq!(r.header("content-range"), Some("bytes 0-19/20"), "{whole}");
        assert_eq!(r.body, f.layer_data, "{whole}");
    }
    // An unsatisfiable one: 416 with the size.
    let r = s
        .request(
            "GET",
            &path,
            &[auth[0], ("Range", "bytes=18446744073709551615-")],
        )
        .await;
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */20"))
    );

    // §15.5.6: 405 names the allowed methods on the registry's routes.
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"] {
        for target in [
            "/v2/",
            path.as_str(),
            "/v2/a/manifests/v1?ns=docker.io",
            "/readyz",
        ] {
            let r = s.request(method, target, &[auth[0]]).await;
            assert_eq!(r.status, 405, "{method} {target}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {target}");
        }
        assert_eq!(s.request(method, "/elsewhere", &[]).await.status, 404);
    }
    s.stop().await;
}

fn limits(max_connections: usize, max_per_ip: usize, reserve: usize) -> Limits {
    Limits {
        max_connections,
        max_per_ip,
        reserve,
        first_byte: Duration::from_secs(60),
        min_rate: 0,
        rate_window: Duration::from_secs(30),
    }
}

fn patient() -> Timeouts {
    Timeouts {
        idle: Duration::from_secs(60),
        head: Duration::from_secs(60),
        write_stall: Duration::from_secs(120),
    }
}

/// A keep-alive connection that got a 200 for `target`, so the server has admitted it.
async fn admitted(addr: std::net::SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    send(&mut stream, "GET", target, &[]).await;
    let r = read_response(&mut stream, &mut Vec::new(), false).await;
    assert_eq!(r.status, 200, "{target}");
    stream
}

/// Whether the server closes `stream` without answering `target` (at most 20 s).
async fn closed_unanswered(mut stream: TcpStream, target: &str) -> bool {
    let _ = stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await {
        Ok(Ok(_)) | Ok(Err(_)) => buf.is_empty(),
        Err(_) => false,
    }
}

fn refused(reason: &str) -> u64 {
    spegel::metrics::global()
        .http_connections_refused
        .with_label_values(&[reason])
        .get()
}

/// Defect 6: at the total cap, new connections only reach the reserved routes, past the reserve
/// they are closed; the probes answer throughout.
#[tokio::test]
async fn connection_cap_keeps_a_reserve_for_probes() {
    let f = fixture();
    let s = Server::start_with_limits(registry(&f), patient(), limits(4, 100, 2)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(admitted(s.addr, "/v2/").await);
    }
    // Full: a registry request on a new connection gets 503 and a retry hint.
    let r = s.request("GET", "/v2/", &[]).await;
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    // The probes still answer, on reserve connections given back after one response.
    for probe in ["/readyz", "/livez", "/readyz"] {
        let r = s.request("GET", probe, &[]).await;
        assert_eq!(r.status, 200, "{probe}");
        assert_eq!(r.header("connection"), Some("close"), "{probe}");
    }
    // Two idle connections take the reserve; the next one is closed unanswered.
    let reserve: Vec<TcpStream> = vec![
        TcpStream::connect(s.addr).await.unwrap(),
        TcpStream::connect(s.addr).await.unwrap(),
    ];
    let before = refused("total");
    let extra = TcpStream::connect(s.addr).await.unwrap();
    assert!(closed_unanswered(extra, "/readyz").await);
    assert!(refused("total") > before);
    // A freed slot is usable again (bounded retries while the server notices the close).
    drop(reserve);
    let mut answered = false;
    for _ in 0..50 {
        let stream = TcpStream::connect(s.addr).await.unwrap();
        let mut stream = stream;
        send(&mut stream, "GET", "/livez", &[]).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        if String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200") {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "a freed reserve slot must serve /livez");
    // The held connections are still served.
    for stream in &mut held {
        send(stream, "GET", "/v2/", &[]).await;
        assert_eq!(
            read_response(stream, &mut Vec::new(), false).await.status,
            200
        );
    }
    s.stop().await;
}

/// Defect 6: one address cannot take every connection.
#[tokio::test]
async fn per_ip_cap_leaves_room_for_other_addresses() {
    let f = fixture();
    let s = Server::start_with_limits(registry(&f), patient(), limits(100, 3, 0)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(admitted(s.addr, "/v2/").await);
    }
    let before = refused("per_ip");
    let extra = TcpStream::connect(s.addr).await.unwrap();
    assert!(closed_unanswered(extra, "/v2/").await);
    assert!(refused("per_ip") > before);
    // Another loopback address is served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(s.addr).await.unwrap();
    send(&mut other, "GET", "/v2/", &[]).await;
    assert_eq!(
        read_response(&mut other, &mut Vec::new(), false)
            .await
            .status,
        200
    );
    s.stop().await;
}

/// Defect 6: a connection that never sends a byte is closed after the first-byte deadline,
/// long before the keep-alive idle timeout (60 s here).
#[tokio::test]
async fn silent_connection_is_closed_after_the_first_byte_deadline() {
    let f = fixture();
    let mut l = limits(100, 100, 0);
    l.first_byte = Duration::from_secs(1);
    let s = Server::start_with_limits(registry(&f), patient(), l).await;
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a silent connection must be closed");
    assert!(buf.is_empty());
    // A connection that sent a request keeps the idle timeout between requests.
    let mut busy = admitted(s.addr, "/v2/").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    send(&mut busy, "GET", "/v2/", &[]).await;
    assert_eq!(
        read_response(&mut busy, &mut Vec::new(), false)
            .await
            .status,
        200
    );
    s.stop().await;
}

/// Defect 6: a client that stops reading a large blob is cut by the minimum-rate check (the
/// write-stall timeout is 120 s here), having received only part of the body.
#[tokio::test]
async fn slow_reader_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::with_files(dir.path().to_path_buf());
    let size = 64usize << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let digest = store.add_blob("application/octet-stream", data);
    let f = Fixture {
        store: Arc::new(store),
        layer: digest.clone(),
        layer_data: Vec::new(),
    };
    let mut l = limits(100, 100, 0);
    l.min_rate = 1 << 20;
    l.rate_window = Duration::from_secs(1);
    let s = Server::start_with_limits(registry(&f), patient(), l).await;
    let before = refused("slow_reader");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    let mut stream = socket.connect(s.addr).await.unwrap();
    send(
        &mut stream,
        "GET",
        &format!("/v2/a/blobs/{digest}?ns=x.io"),
        &[],
    )
    .await;
    // Read nothing until the server had the time to give up (bounded polling of a counter).
    let mut cut = false;
    for _ in 0..300 {
        if refused("slow_reader") > before {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut, "the stalled reader must be cut");
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut received)).await;
    assert!(
        received.len() < size,
        "got {} of {size} bytes",
        received.len()
    );
    s.stop().await;
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Reads up to the end of a response head, leaving the body unread.
async fn read_head(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte))
            .await
            .expect("head timeout")
            .unwrap();
        assert_eq!(n, 1, "closed before the head ended");
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, buf)
}

/// Defect 4: blobs streamed through containerd's content API (a real containerd) are capped in
/// number (503 + Retry-After past the cap) and each buffers at most one piece, so memory stays
/// bounded while clients hold their streams without reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_api_streams_are_bounded() {
    use bench::{
        containerd::Containerd,
        images::{self, BlobKind, ImageSpec},
        registry::Upstream,
    };
    use spegel::store::{
        ContainerdStore, ContainerdStoreConfig, MAX_CONTENT_STREAMS, STREAM_PIECE,
    };
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(&dir.path().join("ctd"), None).unwrap();
    let upstream = Upstream::start_local(&dir.path().join("registry")).unwrap();
    let size = 32u64 << 20;
    let image = images::push(
        upstream.addr(),
        &ImageSpec {
            repo: "test/big".into(),
            tag: "v1".into(),
            layers: vec![size],
            seed: 7,
            platforms: vec![],
        },
    )
    .unwrap();
    containerd.pull(&image.reference, true).unwrap();
    let layer = image.of_kind(BlobKind::Layer).next().unwrap();
    let store = Arc::new(
        ContainerdStore::connect(ContainerdStoreConfig {
            socket: containerd.socket().display().to_string(),
            namespace: "k8s.io".into(),
            // No usable directory: every body goes through the content API.
            content_path: "/nonexistent/content".into(),
        })
        .await
        .unwrap(),
    );
    let reg = Registry {
        store: store.clone(),
        filters: Filters::new(&[], &[]).unwrap(),
        mirror: None,
        auth: None,
        ready: Arc::new(|| true),
        activity: Default::default(),
        searching: Default::default(),
    };
    let s = Server::start_with_limits(reg, patient(), limits(1000, 1000, 0)).await;
    let host = image
        .reference
        .split('/')
        .next()
        .unwrap()
        .replace(':', "%3A");
    let target = format!("/v2/test/big/blobs/{}?ns={host}", layer.digest);

    let rss_before = rss_bytes();
    const EXTRA: usize = 8;
    let (mut ok, mut busy) = (Vec::new(), 0usize);
    for _ in 0..MAX_CONTENT_STREAMS + EXTRA {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 << 10).unwrap();
        let mut stream = socket.connect(s.addr).await.unwrap();
        send(&mut stream, "GET", &target, &[]).await;
        let (status, head) = read_head(&mut stream).await;
        match status {
            200 => ok.push(stream),
            503 => {
                assert!(String::from_utf8_lossy(&head).contains("Retry-After: 1"));
                busy += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok.len(), busy), (MAX_CONTENT_STREAMS, EXTRA));
    assert_eq!(store.open_streams(), MAX_CONTENT_STREAMS);
    let grown = rss_bytes().saturating_sub(rss_before);
    // A piece and its gRPC message per stream, plus generous slack for the runtime.
    let bound = MAX_CONTENT_STREAMS as u64 * 3 * STREAM_PIECE + (48 << 20);
    eprintln!(
        "{MAX_CONTENT_STREAMS} held streams of {size} bytes: RSS grew by {} KiB (bound {} KiB)",
        grown >> 10,
        bound >> 10
    );
    assert!(grown < bound, "RSS grew by {grown} bytes (bound {bound})");

    // Every held stream completes byte-exact once read.
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in ok {
        tasks.spawn(async move {
            let mut body = vec![0u8; size as usize];
            tokio::time::timeout(Duration::from_secs(120), stream.read_exact(&mut body))
                .await
                .expect("body timeout")
                .unwrap();
            drop(stream);
            body
        });
    }
    while let Some(body) = tasks.join_next().await {
        let body = body.unwrap();
        assert_eq!(body.len() as u64, size);
        assert_eq!(Digest::sha256_of(&body).to_string(), layer.digest);
    }
    // Permits come back once the connections are done (bounded wait for the server tasks).
    for _ in 0..100 {
        if store.open_streams() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.open_streams(), 0);
    let r = s
        .request("GET", &target, &[("Range", "bytes=1000-2000")])
        .await;
    assert_eq!((r.status, r.body.len()), (206, 1001));
    s.stop().await;
}
