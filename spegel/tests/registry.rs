//! In-process tests of the registry HTTP server against in-memory stores, over real TCP.

use std::{sync::Arc, time::Duration};

use spegel::{
    auth::BasicAuth,
    oci::{DOCKER_MANIFEST, Digest, Filters, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST},
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
    index: Digest,
    manifest: Digest,
    config: Digest,
    layer: Digest,
    layer_data: Vec<u8>,
}

fn fixture(store: MemoryStore) -> Fixture {
    let layer_data: Vec<u8> = (0..20u8).collect();
    let layer = store.add_blob(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        layer_data.clone(),
    );
    let config = store.add_blob(
        OCI_CONFIG,
        br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#.to_vec(),
    );
    let manifest_json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{config}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":20}}]}}"#
    );
    let manifest = store.add_blob(OCI_MANIFEST, manifest_json.into_bytes());
    let index_json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest}","size":1}}]}}"#
    );
    let index = store.add_blob(OCI_INDEX, index_json.into_bytes());
    store.add_image("docker.io/library/app:v1", index.clone());
    store.add_image("docker.io/library/app:latest", index.clone());
    Fixture {
        store: Arc::new(store),
        index,
        manifest,
        config,
        layer,
        layer_data,
    }
}

fn registry(f: &Fixture) -> Registry {
    Registry {
        store: f.store.clone(),
        filters: Filters::new(&[], &[":latest$".to_string()]).unwrap(),
        mirror: None,
        auth: None,
        ready: Arc::new(|| false),
        activity: Default::default(),
        searching: Default::default(),
    }
}

fn sha256(data: &[u8]) -> String {
    Digest::sha256_of(data).to_string()
}

#[tokio::test]
async fn probes_and_routes() {
    let f = fixture(MemoryStore::new());
    let s = Server::start(registry(&f)).await;
    for method in ["GET", "HEAD"] {
        let r = s.request(method, "/v2/", &[]).await;
        assert_eq!((r.status, r.header("content-length")), (200, Some("0")));
        assert_eq!(s.request(method, "/readyz", &[]).await.status, 500);
        assert_eq!(s.request(method, "/livez", &[]).await.status, 200);
        assert_eq!(s.request(method, "/nope", &[]).await.status, 404);
    }
    assert_eq!(s.request("GET", "/v2", &[]).await.status, 301);
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = s.request(method, "/v2/", &[]).await;
        assert_eq!(
            (r.status, r.header("allow")),
            (405, Some("GET, HEAD")),
            "{method}"
        );
        assert_eq!(
            s.request(method, "/nope", &[]).await.status,
            404,
            "{method}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let f = fixture(MemoryStore::new());
    let s = Server::start(registry(&f)).await;
    let r = s
        .request("GET", "/v2/library/app/manifests/v1?ns=docker.io", &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(f.index.to_string().as_str())
    );
    assert_eq!(r.header("oci-namespace"), Some("docker.io"));
    assert_eq!(sha256(&r.body), f.index.to_string());
    assert_eq!(
        r.header("content-length").unwrap(),
        r.body.len().to_string()
    );

    let h = s
        .request("HEAD", "/v2/library/app/manifests/v1?ns=docker.io", &[])
        .await;
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert_eq!(h.header("content-length"), r.header("content-length"));
    assert_eq!(h.header("content-type"), r.header("content-type"));

    let r = s
        .request(
            "GET",
            &format!("/v2/library/app/manifests/{}?ns=docker.io", f.manifest),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some(OCI_MANIFEST))
    );
    assert_eq!(sha256(&r.body), f.manifest.to_string());

    // A config is not a manifest.
    let r = s
        .request(
            "GET",
            &format!("/v2/library/app/manifests/{}?ns=docker.io", f.config),
            &[("X-Spegel-Mirrored", "true")],
        )
        .await;
    assert_eq!(r.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert_eq!(
        body["errors"][0]["message"],
        format!("could not get manifest {}", f.config)
    );

    // Tag without ns is unparsable.
    let r = s.request("GET", "/v2/library/app/manifests/v1", &[]).await;
    assert_eq!(
        (
            r.status,
            r.header("content-length"),
            r.header("content-type")
        ),
        (404, Some("0"), None)
    );
    s.stop().await;
}

async fn blob_checks(f: &Fixture, s: &Server) {
    let path = format!("/v2/library/app/blobs/{}?ns=docker.io", f.layer);
    let r = s.request("GET", &path, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, f.layer_data);
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.layer.v1.tar+gzip")
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(f.layer.to_string().as_str())
    );
    assert_eq!(r.header("oci-namespace"), Some("docker.io"));

    let r = s.request("GET", &path, &[("Range", "bytes=1-3")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &f.layer_data[1..=3]);
    assert_eq!(r.header("content-range"), Some("bytes 1-3/20"));
    assert_eq!(r.header("content-length"), Some("3"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));

    let r = s.request("GET", &path, &[("Range", "bytes=-5")]).await;
    assert_eq!((r.status, r.body.as_slice()), (206, &f.layer_data[15..]));
    let r = s.request("GET", &path, &[("Range", "bytes=18-")]).await;
    assert_eq!((r.status, r.body.as_slice()), (206, &f.layer_data[18..]));
    let r = s.request("GET", &path, &[("Range", "bytes=10-1000")]).await;
    assert_eq!(
        (r.status, r.header("content-range")),
        (206, Some("bytes 10-19/20"))
    );
    assert_eq!(r.body, &f.layer_data[10..]);

    let r = s.request("GET", &path, &[("Range", "bytes=20-")]).await;
    assert_eq!(r.status, 416);
    assert!(r.body.is_empty());
    // Not one valid byte range: ignored (RFC 9110 §14.2).
    for ignored in ["bytes=1-2,4-5", "bytes=x", "items=0-1"] {
        let r = s.request("GET", &path, &[("Range", ignored)]).await;
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, f.layer_data.as_slice()),
            "{ignored}"
        );
    }
    let r = s.request("GET", &path, &[("Range", "bytes=20-")]).await;
    assert_eq!(r.header("content-range"), Some("bytes */20"));

    let h = s.request("HEAD", &path, &[("Range", "bytes=1-3")]).await;
    assert_eq!(
        (h.status, h.header("content-length"), h.body.len()),
        (206, Some("3"), 0)
    );

    // Manifests are refused on the blobs endpoint.
    let r = s
        .request(
            "GET",
            &format!("/v2/library/app/blobs/{}?ns=docker.io", f.manifest),
            &[("X-Spegel-Mirrored", "true")],
        )
        .await;
    assert_eq!(r.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
}

#[tokio::test]
async fn blobs_from_memory() {
    let f = fixture(MemoryStore::new());
    let s = Server::start(registry(&f)).await;
    blob_checks(&f, &s).await;
    s.stop().await;
}

#[tokio::test]
async fn blobs_by_sendfile() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(MemoryStore::with_files(dir.path().to_path_buf()));
    let s = Server::start(registry(&f)).await;
    blob_checks(&f, &s).await;
    s.stop().await;
}

#[tokio::test]
async fn large_blob_by_sendfile_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::with_files(dir.path().to_path_buf());
    let data: Vec<u8> = (0..(24u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = store.add_blob("application/octet-stream", data.clone());
    let f = Fixture {
        store: Arc::new(store),
        index: digest.clone(),
        manifest: digest.clone(),
        config: digest.clone(),
        layer: digest.clone(),
        layer_data: data.clone(),
    };
    let s = Server::start(registry(&f)).await;
    let path = format!("/v2/a/blobs/{digest}?ns=x.io");
    let r = s.request("GET", &path, &[]).await;
    assert_eq!(r.body.len(), data.len());
    assert_eq!(sha256(&r.body), digest.to_string());
    let start = 7_777_777usize;
    let r = s
        .request("GET", &path, &[("Range", &format!("bytes={start}-"))])
        .await;
    assert_eq!(r.status, 206);
    assert!(r.body == data[start..]);
    s.stop().await;
}

#[tokio::test]
async fn misses_filters_and_errors() {
    let f = fixture(MemoryStore::new());
    let s = Server::start(registry(&f)).await;
    let missing = Digest::sha256_of(b"missing");
    let r = s
        .request(
            "GET",
            &format!("/v2/library/app/blobs/{missing}?ns=docker.io"),
            &[],
        )
        .await;
    assert_eq!(r.status, 404);
    let expected = format!(
        r#"{{"errors":[{{"code":"BLOB_UNKNOWN","detail":{{"attempts":0}},"message":"could not find peer for {missing}"}}]}}"#
    );
    assert_eq!(String::from_utf8(r.body.clone()).unwrap(), expected);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let h = s
        .request(
            "HEAD",
            &format!("/v2/library/app/blobs/{missing}?ns=docker.io"),
            &[],
        )
        .await;
    assert_eq!(
        (h.status, h.header("content-length")),
        (404, Some(expected.len().to_string().as_str()))
    );
    assert!(h.body.is_empty());

    let r = s
        .request("GET", "/v2/library/app/manifests/nope?ns=docker.io", &[])
        .await;
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert_eq!(
        body["errors"][0]["message"],
        "could not find peer for docker.io/library/app:nope"
    );

    // From a peer: never forwarded, local 404 instead.
    let r = s
        .request(
            "GET",
            &format!("/v2/library/app/blobs/{missing}?ns=docker.io"),
            &[("X-Spegel-Mirrored", "true")],
        )
        .await;
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        body["errors"][0]["message"],
        format!("could not get blob {missing}")
    );

    // Filtered tag: empty 404 even though the image is present.
    let r = s
        .request("GET", "/v2/library/app/manifests/latest?ns=docker.io", &[])
        .await;
    assert_eq!(
        (r.status, r.header("content-length"), r.body.len()),
        (404, Some("0"), 0)
    );
    s.stop().await;
}

#[tokio::test]
async fn traversal_and_malformed_requests_never_leak_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), b"top secret").unwrap();
    let f = fixture(MemoryStore::with_files(dir.path().join("content")));
    let s = Server::start(registry(&f)).await;
    let hex = f.layer.hex().to_string();
    for target in [
        "/v2/library/app/blobs/sha256:../../secret?ns=docker.io".to_string(),
        "/v2/library/app/blobs/sha256%3a..%2f..%2fsecret?ns=docker.io".to_string(),
        format!(
            "/v2/library/app/blobs/sha256:{}/../../../secret?ns=docker.io",
            hex
        ),
        format!("/v2/../../blobs/sha256:{hex}?ns=docker.io"),
        format!("/v2/library/app/blobs/SHA256:{hex}?ns=docker.io"),
        format!(
            "/v2/library/app/blobs/sha256:{}?ns=docker.io",
            hex.to_uppercase()
        ),
        format!("/v2/library/app/blobs/sha256:{hex}?ns=../../"),
        format!("/v2/{}/blobs/sha256:{hex}?ns=docker.io", "a/".repeat(3000)),
    ] {
        let r = s.request("GET", &target, &[]).await;
        assert!((400..500).contains(&r.status), "{target} gave {}", r.status);
        assert!(
            !String::from_utf8_lossy(&r.body).contains("secret"),
            "{target}"
        );
    }
    // Garbage, oversized heads and bodies on GET get a 4xx and a closed connection; the server lives on.
    for raw in [
        b"\x00\x01\x02 garbage\r\n\r\n".to_vec(),
        format!("GET /v2/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(),
        b"GET /v2/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
    ] {
        let mut stream = TcpStream::connect(s.addr).await.unwrap();
        let _ = stream.write_all(&raw).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await.expect("connection must close");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 200"), "{text}");
    }
    // A client that connects and sends half a head is timed out, not waited on forever.
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(b"GET /v2/ HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("must time out")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"));
    assert_eq!(s.request("GET", "/v2/", &[]).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn keep_alive_and_pipelining() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(MemoryStore::with_files(dir.path().to_path_buf()));
    let s = Server::start(registry(&f)).await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = Vec::new();
    let blob = format!("/v2/library/app/blobs/{}?ns=docker.io", f.layer);
    for _ in 0..3 {
        send(&mut stream, "GET", &blob, &[]).await;
        assert_eq!(
            read_response(&mut stream, &mut buf, false).await.body,
            f.layer_data
        );
        send(&mut stream, "HEAD", &blob, &[]).await;
        assert_eq!(read_response(&mut stream, &mut buf, true).await.status, 200);
    }
    // Three pipelined requests in one write.
    let mut raw = String::new();
    for _ in 0..3 {
        raw.push_str(&format!(
            "GET {blob} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n"
        ));
    }
    stream.write_all(raw.as_bytes()).await.unwrap();
    for _ in 0..3 {
        let r = read_response(&mut stream, &mut buf, false).await;
        assert_eq!((r.status, r.body.as_slice()), (206, &f.layer_data[..2]));
    }
    s.stop().await;
}

#[tokio::test]
async fn basic_auth_guards_v2() {
    let f = fixture(MemoryStore::new());
    let mut reg = registry(&f);
    reg.auth = Some(BasicAuth {
        username: "hello".into(),
        password: "world".into(),
    });
    let s = Server::start(reg).await;
    let r = s.request("GET", "/v2/", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid credentials"}]}"#
    );
    assert_eq!(
        s.request(
            "GET",
            "/v2/",
            &[("Authorization", "Basic aGVsbG86d29ybGQ=")]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        s.request(
            "GET",
            "/v2/",
            &[("Authorization", "Basic aGVsbG86d29ybGR=")]
        )
        .await
        .status,
        401
    );
    assert_eq!(s.request("GET", "/livez", &[]).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn docker_manifest_media_type_is_kept() {
    let store = MemoryStore::new();
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{}},"layers":[]}}"#
    );
    let d = store.add_blob("", m.into_bytes());
    store.add_image("127.0.0.1:5000/x:1", d.clone());
    let f = Fixture {
        store: Arc::new(store),
        index: d.clone(),
        manifest: d.clone(),
        config: d.clone(),
        layer: d.clone(),
        layer_data: vec![],
    };
    let s = Server::start(registry(&f)).await;
    let r = s
        .request("GET", "/v2/x/manifests/1?ns=127.0.0.1%3A5000", &[])
        .await;
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some(DOCKER_MANIFEST))
    );
    s.stop().await;
}

/// Writes `raw` on a fresh connection and returns the status of every response the server
/// sends before it closes the connection.
async fn statuses_until_close(s: &Server, raw: &[u8]) -> Vec<u16> {
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf))
        .await
        .expect("the server must close the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.match_indices("HTTP/1.1 ")
        .map(|(i, _)| text[i + 9..i + 12].parse().unwrap())
        .collect()
}

/// RFC 9112 framing: a request whose body length is ambiguous gets 400 and a closed
/// connection, and a body the server does not read is never parsed as the next request.
#[tokio::test]
async fn request_framing_follows_rfc9112() {
    let f = fixture(MemoryStore::new());
    let s = Server::start(registry(&f)).await;
    let smuggled = "GET /v2/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let len = smuggled.len();
    // §6.3: differing Content-Length values (the second one framed the smuggled request).
    for headers in [
        format!("Content-Length: 0\r\nContent-Length: {len}\r\n"),
        format!("Content-Length: 0, {len}\r\n"),
        "Content-Length: abc\r\n".to_string(),
        // §6.1: chunked must be the final coding, and never comes with Content-Length.
        "Transfer-Encoding: gzip\r\n".to_string(),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {len}\r\n"),
        // §5.2: obsolete line folding.
        "X-Folded: a\r\n b\r\n".to_string(),
    ] {
        let raw = format!("GET /v2/ HTTP/1.1\r\nHost: x\r\n{headers}\r\n{smuggled}");
        assert_eq!(
            statuses_until_close(&s, raw.as_bytes()).await,
            [400],
            "{headers:?}"
        );
    }
    // Bodies the server does not read (on GET, chunked, HTTP/1.0 with Transfer-Encoding):
    // one response, then the connection closes instead of reading the body as a request.
    for raw in [
        format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{smuggled}"),
        format!(
            "GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}"
        ),
    ] {
        assert_eq!(
            statuses_until_close(&s, raw.as_bytes()).await,
            [200],
            "{raw:?}"
        );
    }
    // Equal values are one length (§6.3), and a zero-length body keeps the connection.
    let raw = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 0\r\nContent-Length: 0\r\n\r\n{smuggled}"
    );
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        read_response(&mut stream, &mut buf, false).await.status,
        200
    );
    assert_eq!(
        read_response(&mut stream, &mut buf, false).await.status,
        404
    );
    s.stop().await;
}
