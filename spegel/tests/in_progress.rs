//! Serving a blob containerd is still writing: the real registry server and the containerd
//! store's content directory, with an ingest written by hand the way containerd's local content
//! store writes it (`ingest/<sha256 of ref>/{ref,total,data}`, committed by renaming `data`
//! into `blobs/`). No containerd runs: its API is unreachable, so every request is a miss and
//! only the ingest can answer.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use spegel::{
    http::{self, Response, Timeouts},
    metrics,
    mirror::{Mirror, MirrorRequest},
    oci::{Digest, Filters},
    registry::Registry,
    store::{ContainerdStore, ContainerdStoreConfig},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

/// An ingest as containerd's local content store lays it out.
struct Ingest {
    root: PathBuf,
    dir: PathBuf,
    data: std::fs::File,
    digest: Digest,
}

impl Ingest {
    fn start(root: &Path, content: &[u8], total: Option<usize>) -> Ingest {
        let digest = Digest::sha256_of(content);
        let reference = format!("layer-{digest}");
        let dir = root
            .join("ingest")
            .join(Digest::sha256_of(reference.as_bytes()).hex());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ref"), &reference).unwrap();
        if let Some(t) = total {
            std::fs::write(dir.join("total"), t.to_string()).unwrap();
        }
        let data = std::fs::File::create(dir.join("data")).unwrap();
        Ingest {
            root: root.to_path_buf(),
            dir,
            data,
            digest,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.data.write_all(bytes).unwrap();
    }

    fn commit(&self) {
        std::fs::rename(
            self.dir.join("data"),
            self.root.join("blobs/sha256").join(self.digest.hex()),
        )
        .unwrap();
        std::fs::remove_dir_all(&self.dir).unwrap();
    }

    fn abort(&self) {
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

struct Server {
    addr: std::net::SocketAddr,
    root: PathBuf,
    shutdown: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(stall: Duration) -> Server {
        Server::start_with(stall, None).await
    }

    async fn start_with(stall: Duration, mirror: Option<Arc<dyn Mirror>>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("content");
        std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        let store = ContainerdStore::connect(ContainerdStoreConfig {
            socket: dir.path().join("absent.sock").display().to_string(),
            namespace: "k8s.io".into(),
            content_path: root.display().to_string(),
        })
        .await
        .unwrap()
        .with_ingest_stall(stall);
        let registry = Registry {
            store: Arc::new(store),
            filters: Filters::new(&[], &[]).unwrap(),
            mirror,
            auth: None,
            ready: Arc::new(|| true),
            activity: Default::default(),
            searching: Default::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, rx) = watch::channel(false);
        let timeouts = Timeouts {
            idle: Duration::from_secs(5),
            head: Duration::from_secs(2),
            write_stall: Duration::from_secs(5),
        };
        tokio::spawn(http::serve(listener, Arc::new(registry), timeouts, rx));
        Server {
            addr,
            root,
            shutdown,
            _dir: dir,
        }
    }

    /// Sends a blob GET (as a peer unless `local`) and returns the status, Content-Length and
    /// every body byte received before the server closed or the promised length arrived.
    async fn get(
        &self,
        digest: &Digest,
        range: Option<&str>,
        local: bool,
    ) -> (u16, usize, Vec<u8>) {
        self.get_then(digest, range, local, || {}).await
    }

    /// [`Server::get`], running `on_head` once the response head arrived (so a writer can be
    /// started only once the body is being served).
    async fn get_then(
        &self,
        digest: &Digest,
        range: Option<&str>,
        local: bool,
        on_head: impl FnOnce(),
    ) -> (u16, usize, Vec<u8>) {
        let mut on_head = Some(on_head);
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!(
            "GET /v2/library/app/blobs/{digest}?ns=docker.io HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        );
        if !local {
            req.push_str("X-Spegel-Mirrored: true\r\n");
        }
        if let Some(r) = range {
            req.push_str(&format!("Range: {r}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut chunk = vec![0u8; 1 << 16];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .expect("response timed out")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n")
                && let Some(f) = on_head.take()
            {
                f();
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = resp.parse(&buf).unwrap() else {
            panic!("no complete head in {} bytes", buf.len());
        };
        let clen = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap_or(0);
        (resp.code.unwrap(), clen, buf[len..].to_vec())
    }

    fn stop(self) {
        let _ = self.shutdown.send(true);
    }
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Appends `bytes` in `pieces` writes, pausing between them so the body catches up.
fn append_slowly(ingest: &mut Ingest, bytes: &[u8], pieces: usize) {
    for piece in bytes.chunks(bytes.len().div_ceil(pieces)) {
        std::thread::sleep(Duration::from_millis(15));
        ingest.write(piece);
    }
}

#[tokio::test]
async fn whole_blob_streams_as_written_and_finishes_after_commit() {
    let s = Server::start(Duration::from_secs(10)).await;
    let data = content(3 << 20);
    let mut ingest = Ingest::start(&s.root, &data, Some(data.len()));
    ingest.write(&data[..100_000]);
    let digest = ingest.digest.clone();
    let before = metrics::global().in_progress_served_bytes.get();
    let tail = data[100_000..].to_vec();
    let mut writer = None;
    let (status, clen, body) = s
        .get_then(&digest, None, false, || {
            writer = Some(std::thread::spawn(move || {
                append_slowly(&mut ingest, &tail, 20);
                ingest.commit();
            }))
        })
        .await;
    writer.expect("response head received").join().unwrap();
    assert_eq!((status, clen), (200, data.len()));
    assert_eq!(body.len(), data.len());
    assert!(body == data, "body differs from the content");
    assert_eq!(
        metrics::global().in_progress_served_bytes.get() - before,
        data.len() as u64
    );
    s.stop();
}

#[tokio::test]
async fn ranges_inside_and_beyond_what_is_written() {
    let s = Server::start(Duration::from_secs(10)).await;
    let data = content(1 << 20);
    let mut ingest = Ingest::start(&s.root, &data, Some(data.len()));
    ingest.write(&data[..1000]);
    let digest = ingest.digest.clone();
    // Inside what is written: answered at once.
    let (status, clen, body) = s.get(&digest, Some("bytes=10-99"), false).await;
    assert_eq!((status, clen), (206, 90));
    assert_eq!(body, &data[10..100]);
    // Beyond what is written: waits for the writer.
    let tail = data[1000..].to_vec();
    let mut writer = None;
    let from = data.len() - 5000;
    let (status, clen, body) = s
        .get_then(&digest, Some(&format!("bytes={from}-")), false, || {
            writer = Some(std::thread::spawn(move || {
                append_slowly(&mut ingest, &tail, 10);
                ingest
            }))
        })
        .await;
    assert_eq!((status, clen), (206, 5000));
    assert_eq!(body, &data[from..]);
    let ingest = writer.expect("response head received").join().unwrap();
    // Past the end: 416 from the declared size.
    let (status, _, _) = s
        .get(&digest, Some(&format!("bytes={}-", data.len())), false)
        .await;
    assert_eq!(status, 416);
    ingest.commit();
    s.stop();
}

#[tokio::test]
async fn abandoned_and_replaced_ingests_cut_the_body() {
    let s = Server::start(Duration::from_secs(10)).await;
    let data = content(1 << 20);
    for replace in [false, true] {
        let mut ingest = Ingest::start(&s.root, &data, Some(data.len()));
        ingest.write(&data[..300_000]);
        let digest = ingest.digest.clone();
        let root = s.root.clone();
        let d = data.clone();
        let mut writer = None;
        let start_writer = || {
            writer = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                ingest.write(&d[300_000..400_000]);
                std::thread::sleep(Duration::from_millis(50));
                ingest.abort();
                if replace {
                    // The same ref written again from scratch: a new directory and file.
                    let mut again = Ingest::start(&root, &d, Some(d.len()));
                    again.write(&d[..500_000]);
                    Some(again)
                } else {
                    None
                }
            }));
        };
        let (status, clen, body) = s.get_then(&digest, None, false, start_writer).await;
        let again = writer.expect("response head received").join().unwrap();
        assert_eq!((status, clen), (200, data.len()), "replace={replace}");
        assert_eq!(
            body.len(),
            400_000,
            "replace={replace}: cut where the writer stopped"
        );
        assert_eq!(body, &data[..400_000], "replace={replace}");
        if let Some(again) = again {
            again.abort();
        }
    }
    s.stop();
}

#[tokio::test]
async fn stalled_unsized_and_local_requests() {
    let s = Server::start(Duration::from_millis(200)).await;
    let data = content(10_000);
    let mut ingest = Ingest::start(&s.root, &data, Some(data.len()));
    ingest.write(&data[..4000]);
    // Stalled: the body is cut after the bound.
    let (status, clen, body) = s.get(&ingest.digest, None, false).await;
    assert_eq!((status, clen, body.len()), (200, data.len(), 4000));
    // The node's own containerd is never served its own ingest.
    let (status, _, _) = s.get(&ingest.digest, None, true).await;
    assert_eq!(status, 404);
    ingest.abort();
    // Without a declared total the size is unknown: not served in progress.
    let other = content(5000);
    let mut unsized_ingest = Ingest::start(&s.root, &other, None);
    unsized_ingest.write(&other[..100]);
    let (status, _, _) = s.get(&unsized_ingest.digest, None, false).await;
    assert_eq!(status, 404);
    s.stop();
}

/// A mirror still looking for a provider: it says when a forward starts and answers 404 once
/// released.
struct SearchingMirror {
    entered: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Mirror for SearchingMirror {
    async fn forward(&self, _request: MirrorRequest) -> Response {
        let _ = self.entered.send(());
        let mut release = self.release.clone();
        let _ = release.wait_for(|r| *r).await;
        Response::empty(404)
    }
}

/// Two nodes missing a blob at once both have an (empty) ingest and both look for a provider:
/// neither may serve its ingest to the other while searching, or each would wait on the other.
#[tokio::test]
async fn a_node_still_searching_does_not_serve_its_ingest() {
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let mirror = SearchingMirror {
        entered: entered_tx,
        release: release_rx,
    };
    let s = Server::start_with(Duration::from_secs(10), Some(Arc::new(mirror))).await;
    let body = content(1000);
    let mut ingest = Ingest::start(&s.root, &body, Some(body.len()));
    let searching = || {
        metrics::global()
            .in_progress_requests
            .with_label_values(&["searching"])
            .get()
    };
    let before = searching();
    let (local, peer) = tokio::join!(s.get(&ingest.digest, None, true), async {
        entered.recv().await.unwrap();
        let refused = s.get(&ingest.digest, None, false).await;
        release.send(true).unwrap();
        refused
    });
    assert_eq!(local.0, 404);
    assert_eq!(
        peer.0, 404,
        "served an ingest while still searching for its blob"
    );
    // At least: a test running alongside may refuse one too (the counter is process-wide).
    assert!(searching() > before);
    // The search is over (this node goes upstream now): the ingest is served as it grows.
    ingest.write(&body);
    let (status, len, got) = s.get(&ingest.digest, None, false).await;
    assert_eq!((status, len), (200, body.len()));
    assert_eq!(got, body);
    s.stop();
}

/// A mirror that found a provider: it answers at once, and its body arrives once released.
struct ForwardingMirror {
    entered: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
    body: Vec<u8>,
}

#[async_trait::async_trait]
impl Mirror for ForwardingMirror {
    async fn forward(&self, _request: MirrorRequest) -> Response {
        let _ = self.entered.send(());
        let mut release = self.release.clone();
        let body = bytes::Bytes::from(self.body.clone());
        let len = body.len() as u64;
        let stream = futures::StreamExt::boxed(futures::stream::once(async move {
            let _ = release.wait_for(|r| *r).await;
            Ok(body)
        }));
        Response::empty(200).body(http::Body::Stream { stream, len })
    }
}

/// An ingest fed by a body forwarded from a peer is not served in progress until that body
/// ends: the asker could be the very peer feeding it (a cycle that stalls both).
#[tokio::test]
async fn a_node_receiving_a_blob_from_a_peer_does_not_serve_its_ingest() {
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let body = content(1000);
    let mirror = ForwardingMirror {
        entered: entered_tx,
        release: release_rx,
        body: body.clone(),
    };
    let s = Server::start_with(Duration::from_secs(10), Some(Arc::new(mirror))).await;
    let mut ingest = Ingest::start(&s.root, &body, Some(body.len()));
    ingest.write(&body[..500]);
    let (local, peer) = tokio::join!(s.get(&ingest.digest, None, true), async {
        entered.recv().await.unwrap();
        let refused = s.get(&ingest.digest, None, false).await;
        release.send(true).unwrap();
        refused
    });
    assert_eq!((local.0, local.2.len()), (200, body.len()));
    assert_eq!(peer.0, 404, "served an ingest fed by a peer's body");
    // The forwarded body is over: the ingest is served again.
    ingest.write(&body[500..]);
    let (status, len, got) = s.get(&ingest.digest, None, false).await;
    assert_eq!((status, len), (200, body.len()));
    assert_eq!(got, body);
    s.stop();
}
