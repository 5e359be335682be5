//! Hostile and non-conforming clients against the in-process registry server over real TCP
//! (issue 12): bounded metric cardinality, RFC 9110 conformance, connection limits, bounded
//! stream buffering.

use std::{sync::Arc, time::Duration};

use spegel::{
    auth::BasicAuth,
    http::{self, Timeouts},
    oci::{Digest, Filters},
    registry::Registry,
    store::MemoryStore,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A parsed HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from a keep-alive connection; `head` says the request was HEAD.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Resp {
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

struct Server {
    addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn timeouts() -> Timeouts {
    Timeouts {
        idle: Duration::from_secs(5),
        head: Duration::from_secs(2),
        write_stall: Duration::from_secs(5),
    }
}

impl Server {
    async fn start(registry: Registry) -> Server {
        Server::start_with(registry, timeouts()).await
    }

    async fn start_with(registry: Registry, timeouts: Timeouts) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(http::serve(listener, Arc::new(registry), timeouts, rx));
        Server {
            addr,
            shutdown,
            task,
        }
    }

    async fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Resp {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        send(&mut stream, method, target, headers).await;
        read_response(&mut stream, &mut Vec::new(), method == "HEAD").await
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn send(stream: &mut TcpStream, method: &str, target: &str, headers: &[(&str, &str)]) {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
}

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
