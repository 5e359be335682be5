//! A peer that serves a blob not matching its digest, against in-process fake peers on
//! 127.0.0.1 and a fake router: the forward that got the bad copy fails once, the peers that
//! supplied it are not asked for that digest again (whole or ranged), and they are told.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use spegel::{
    http::{self, Timeouts},
    metrics,
    mirror::{MirrorConfig, MirrorRequest, PeerMirror},
    oci::{ByteRange, Digest, DistributionPath, Filters},
    registry::Registry,
    routing::Peer,
    store::{MISMATCH_REPORT_PATH, MemoryStore},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

mod support;

use support::{FakeRouter, body_of, forward, peer};

fn layer() -> Bytes {
    support::pseudo_random(0x9e37_79b9, 200_000)
}

/// `data` with one byte flipped near the start (same size).
fn flipped(data: &Bytes) -> Bytes {
    let mut v = data.to_vec();
    v[10] ^= 0x01;
    v.into()
}

fn blob_request(digest: &Digest, range: Option<&str>) -> MirrorRequest {
    MirrorRequest {
        path: DistributionPath::parse(
            &format!("/v2/library/app/blobs/{digest}"),
            Some("ns=docker.io"),
        )
        .unwrap(),
        head: false,
        range: range.map(|r| r.parse::<ByteRange>().unwrap()),
    }
}

type Log = Arc<Mutex<Vec<(String, String)>>>;

/// How a raw peer answers a GET.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Serves what is asked.
    Full,
    /// Sends half of a whole-blob body and closes (ranges are served).
    Truncate,
    /// Answers 503 to a whole-blob GET (ranges are served).
    RangesOnly,
}

/// A raw peer serving `data` as blob `digest` (whatever `data` hashes to). Logs
/// `(method, target)` of every request.
async fn raw_peer(data: Bytes, digest: Digest, mode: Mode) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(connection(
                stream,
                data.clone(),
                digest.clone(),
                mode,
                l.clone(),
            ));
        }
    });
    (addr, log)
}

async fn connection(mut stream: TcpStream, data: Bytes, digest: Digest, mode: Mode, log: Log) {
    let mut buf = Vec::new();
    let (method, target, range) = loop {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = req.parse(&buf) {
            let range = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("range"))
                .map(|h| {
                    String::from_utf8_lossy(h.value)
                        .parse::<ByteRange>()
                        .unwrap()
                });
            break (
                req.method.unwrap().to_string(),
                req.path.unwrap().to_string(),
                range,
            );
        }
    };
    log.lock().unwrap().push((method.clone(), target));
    if method == "POST" {
        let _ = stream
            .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    }
    if mode == Mode::RangesOnly && range.is_none() {
        let _ = stream
            .write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    }
    let size = data.len() as u64;
    let (mut head, start, len) = match range.map(|r| r.resolve(size).unwrap()) {
        Some(cr) => (
            format!("HTTP/1.1 206 Partial Content\r\nContent-Range: {cr}\r\n"),
            cr.start as usize,
            cr.len() as usize,
        ),
        None => ("HTTP/1.1 200 OK\r\n".to_string(), 0, data.len()),
    };
    head.push_str(&format!(
        "Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nDocker-Content-Digest: {digest}\r\nConnection: close\r\n\r\n"
    ));
    let body = data.slice(start..start + len);
    let cut = if mode == Mode::Truncate && range.is_none() {
        len / 2
    } else {
        len
    };
    if stream.write_all(head.as_bytes()).await.is_ok() {
        let _ = stream.write_all(&body[..cut]).await;
    }
    let _ = stream.flush().await;
}

/// A real registry server over `store`.
async fn registry_server(store: Arc<MemoryStore>) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    let handler = Registry {
        store,
        filters: Filters::new(&[], &[]).unwrap(),
        mirror: None,
        auth: None,
        ready: Arc::new(|| true),
        activity: Default::default(),
        searching: Default::default(),
    };
    let timeouts = Timeouts {
        idle: Duration::from_secs(5),
        head: Duration::from_secs(2),
        write_stall: Duration::from_secs(5),
    };
    tokio::spawn(http::serve(listener, Arc::new(handler), timeouts, rx));
    (addr, shutdown)
}

fn mirror(router: Arc<FakeRouter>) -> PeerMirror {
    let m = PeerMirror::new(
        router,
        MirrorConfig {
            resolve_timeout: Duration::from_secs(20),
            race_timeout_floor: Duration::from_secs(20),
            ..MirrorConfig::default()
        },
    )
    .unwrap();
    // Slow history pushes the hedge delay to its maximum: one peer per race on a loaded machine.
    m.hedger().observe(Duration::from_secs(1));
    m
}

fn gets(log: &Log) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(m, _)| m == "GET")
        .count()
}

/// Waits (bounded) for the mismatch report for `digest` to reach a peer.
async fn reported(log: &Log, digest: &Digest) -> bool {
    let want = format!("{MISMATCH_REPORT_PATH}{digest}");
    for _ in 0..500 {
        if log
            .lock()
            .unwrap()
            .iter()
            .any(|(m, t)| m == "POST" && *t == want)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_corrupt_peer_costs_one_attempt_and_is_not_asked_again_for_that_digest() {
    let data = layer();
    let digest = Digest::sha256_of(&data);
    let key = digest.to_string();
    let (bad, bad_log) = raw_peer(flipped(&data), digest.clone(), Mode::Full).await;
    let store = Arc::new(MemoryStore::new());
    store.add_blob("application/octet-stream", data.clone());
    let (good, _shutdown) = registry_server(store).await;
    let router = Arc::new(FakeRouter::default());
    let m = mirror(router.clone());
    let marked = metrics::global().mirror_bad_peers.get();

    // The only provider has a corrupt copy: the client's body is cut before it completes.
    router.set(&key, vec![peer(bad)]);
    let resp = forward(&m, blob_request(&digest, None)).await;
    assert_eq!(resp.status, 200);
    let err = body_of(resp).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(gets(&bad_log), 1);
    assert!(metrics::global().mirror_bad_peers.get() > marked);
    assert!(
        reported(&bad_log, &digest).await,
        "the bad peer was not told"
    );

    // Still the only provider: the next request does not ask it but answers the 404 that sends
    // containerd upstream; a range request skips it too.
    let resp = forward(&m, blob_request(&digest, None)).await;
    assert_eq!(resp.status, 404);
    let resp = forward(&m, blob_request(&digest, Some("bytes=100-199"))).await;
    assert_eq!(resp.status, 404);
    assert_eq!(gets(&bad_log), 1, "the bad peer was asked again");

    // With a good provider as well, the next request gets the right bytes from it.
    router.set(&key, vec![peer(bad), peer(good)]);
    let resp = forward(&m, blob_request(&digest, None)).await;
    assert_eq!(resp.status, 200);
    let body = body_of(resp).await.unwrap();
    assert!(body == data, "wrong bytes from the good peer");
    assert_eq!(gets(&bad_log), 1, "the bad peer was asked again");

    // Only that digest: the same peer still serves other content.
    let other = Bytes::from_static(b"another blob entirely");
    let other_digest = Digest::sha256_of(&other);
    let (other_peer, other_log) = raw_peer(other.clone(), other_digest.clone(), Mode::Full).await;
    let shared = Peer {
        id: peer(bad).id,
        addrs: vec![other_peer],
    };
    router.set(&other_digest.to_string(), vec![shared]);
    let resp = forward(&m, blob_request(&other_digest, None)).await;
    assert_eq!(resp.status, 200);
    assert!(body_of(resp).await.unwrap() == other);
    assert_eq!(gets(&other_log), 1);
}

#[tokio::test]
async fn every_peer_that_contributed_to_a_resumed_corrupt_body_is_blamed() {
    let data = layer();
    let digest = Digest::sha256_of(&data);
    let key = digest.to_string();
    // The first half (which holds the flipped byte) from one peer, the rest from another
    // (which serves only ranges, so the first peer's body is the one that breaks).
    let (first, first_log) = raw_peer(flipped(&data), digest.clone(), Mode::Truncate).await;
    let (second, second_log) = raw_peer(data.clone(), digest.clone(), Mode::RangesOnly).await;
    let router = Arc::new(FakeRouter::default());
    router.set(&key, vec![peer(first), peer(second)]);
    let m = mirror(router.clone());
    let resp = forward(&m, blob_request(&digest, None)).await;
    assert_eq!(resp.status, 200);
    let err = body_of(resp).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(gets(&first_log), 1, "the first peer's body broke once");
    assert!(reported(&first_log, &digest).await);
    // Only a peer that delivered bytes is blamed: the second one supplied the rest.
    assert!(reported(&second_log, &digest).await);
    let (first_gets, second_gets) = (gets(&first_log), gets(&second_log));

    let resp = forward(&m, blob_request(&digest, None)).await;
    assert_eq!(resp.status, 404, "both contributors are skipped");
    assert_eq!(gets(&first_log), first_gets);
    assert_eq!(gets(&second_log), second_gets);
}
