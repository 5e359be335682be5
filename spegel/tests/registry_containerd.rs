//! End to end against real components: containerd (own root, state and socket), the real
//! `docker-registry` as upstream, images pulled with `ctr`, and the `spegel` binary serving them.

use std::{net::SocketAddr, path::Path};

use bench::{
    containerd::Containerd,
    daemon::Daemon,
    http,
    images::{self, BlobKind, ImageSpec, PushedImage},
    process::free_port,
    registry::Upstream,
};

const MIB: u64 = 1 << 20;

struct Env {
    _dir: tempfile::TempDir,
    containerd: Containerd,
    _upstream: Upstream,
    images: Vec<PushedImage>,
    large_layer: (u64, u64),
}

fn setup() -> anyhow::Result<Env> {
    let dir = tempfile::tempdir()?;
    let containerd = Containerd::start(&dir.path().join("ctd"), None)?;
    let upstream = Upstream::start_local(&dir.path().join("registry"))?;
    let specs = [
        ImageSpec {
            repo: "test/multi".into(),
            tag: "v1".into(),
            layers: vec![64 << 10, 300 << 10, MIB],
            seed: 1,
            platforms: vec![],
        },
        ImageSpec {
            repo: "test/index".into(),
            tag: "v1".into(),
            layers: vec![128 << 10, 256 << 10],
            seed: 2,
            platforms: vec!["amd64".into(), "arm64".into()],
        },
        ImageSpec {
            repo: "test/large".into(),
            tag: "v1".into(),
            layers: vec![128 * MIB],
            seed: 3,
            platforms: vec![],
        },
    ];
    let mut pushed = Vec::new();
    for spec in &specs {
        let image = images::push(upstream.addr(), spec)?;
        containerd.pull(&image.reference, true)?;
        pushed.push(image);
    }
    // Seed of the 128 MiB layer as the pusher derives it (platform 0, layer 0).
    let large_seed = 3u64.wrapping_mul(1_000_003);
    Ok(Env {
        _dir: dir,
        containerd,
        _upstream: upstream,
        images: pushed,
        large_layer: (large_seed, 128 * MIB),
    })
}

/// A daemon on loopback, with its registry and metrics addresses.
fn start_daemon(
    env: &Env,
    content_path: &Path,
    log: &Path,
) -> anyhow::Result<(Daemon, SocketAddr, SocketAddr)> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let args: Vec<String> = [
        "registry",
        "--log-level=DEBUG",
        &format!("--registry-addr=127.0.0.1:{port}"),
        &format!("--metrics-addr={metrics}"),
        &format!("--router-addr=127.0.0.1:{}", free_port()?),
        &format!("--containerd-sock={}", env.containerd.socket().display()),
        &format!("--containerd-content-path={}", content_path.display()),
        "--containerd-namespace=k8s.io",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_spegel")),
        &args,
        &[],
        None,
        log,
        Some(addr),
    )?;
    Ok((daemon, addr, metrics))
}

fn check_everything_served(env: &Env, addr: SocketAddr) -> anyhow::Result<()> {
    let host = env.images[0]
        .reference
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let ns = format!("ns={}", host.replace(':', "%3A"));
    for image in &env.images {
        // By tag: the root digest with the right type.
        let by_tag = http::get(
            addr,
            &format!("/v2/{}/manifests/{}?{ns}", image.repo, image.tag),
            &[],
        )?;
        assert_eq!(by_tag.status, 200, "{} by tag", image.reference);
        assert_eq!(by_tag.sha256, image.digest);
        assert_eq!(
            by_tag.header("docker-content-digest"),
            Some(image.digest.as_str())
        );
        assert_eq!(by_tag.header("oci-namespace"), Some(host.as_str()));
        for blob in &image.blobs {
            let kind = if matches!(blob.kind, BlobKind::Index | BlobKind::Manifest) {
                "manifests"
            } else {
                "blobs"
            };
            let target = format!("/v2/{}/{kind}/{}?{ns}", image.repo, blob.digest);
            let r = http::request(addr, "GET", &target, &[], false)?;
            assert_eq!(r.status, 200, "GET {target}");
            assert_eq!(
                r.sha256, blob.digest,
                "body of {target} must hash to its digest"
            );
            assert_eq!(r.len, blob.size);
            assert_eq!(
                r.header("content-length"),
                Some(blob.size.to_string().as_str())
            );
            assert_eq!(
                r.header("docker-content-digest"),
                Some(blob.digest.as_str())
            );
            // Layers carry their declared type once an image walk has seen them, else octet-stream.
            let content_type = r.header("content-type").unwrap_or_default();
            assert!(
                content_type == blob.media_type
                    || (blob.kind == BlobKind::Layer && content_type == "application/octet-stream"),
                "{target}: {content_type}"
            );
            let h = http::request(addr, "HEAD", &target, &[], false)?;
            assert_eq!((h.status, h.len), (200, 0));
            assert_eq!(h.header("content-length"), r.header("content-length"));
            // The background image walk may learn the layer's type between the two requests.
            let head_type = h.header("content-type").unwrap_or_default();
            assert!(
                head_type == content_type
                    || (content_type == "application/octet-stream" && head_type == blob.media_type),
                "{target}: GET {content_type}, HEAD {head_type}"
            );
            // The other endpoint refuses the content.
            let other = if kind == "blobs" {
                "manifests"
            } else {
                "blobs"
            };
            let wrong = http::get(
                addr,
                &format!("/v2/{}/{other}/{}?{ns}", image.repo, blob.digest),
                &[("X-Spegel-Mirrored", "true")],
            )?;
            assert_eq!(wrong.status, 404, "{other} of {}", blob.digest);
        }
    }

    // Ranges of the 128 MiB layer, checked against a regenerated copy.
    let large = &env.images[2];
    let layer = large.of_kind(BlobKind::Layer).next().expect("large layer");
    let mut expected = Vec::with_capacity(layer.size as usize);
    images::write_layer(env.large_layer.0, env.large_layer.1, &mut expected)?;
    assert_eq!(expected.len() as u64, layer.size);
    let target = format!("/v2/{}/blobs/{}?{ns}", large.repo, layer.digest);
    let size = layer.size;
    for (range, start, end) in [
        ("bytes=0-0".to_string(), 0, 0),
        ("bytes=1000-999999".to_string(), 1000, 999_999),
        (format!("bytes={}-", size - 12345), size - 12345, size - 1),
        ("bytes=-4096".to_string(), size - 4096, size - 1),
        (
            format!("bytes={}-{}", 64 * MIB - 1, 64 * MIB + 1),
            64 * MIB - 1,
            64 * MIB + 1,
        ),
    ] {
        let r = http::get(addr, &target, &[("Range", &range)])?;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/{size}").as_str())
        );
        assert!(
            r.body == expected[start as usize..=end as usize],
            "{range} bytes differ"
        );
    }
    let r = http::get(addr, &target, &[("Range", &format!("bytes={size}-"))])?;
    assert_eq!(r.status, 416);

    // Unknown and malformed requests.
    let missing = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let r = http::get(addr, &format!("/v2/test/multi/blobs/{missing}?{ns}"), &[])?;
    assert_eq!(r.status, 404);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        format!(
            r#"{{"errors":[{{"code":"BLOB_UNKNOWN","detail":{{"attempts":0}},"message":"could not find peer for {missing}"}}]}}"#
        )
    );
    let r = http::get(addr, &format!("/v2/test/multi/manifests/nope?{ns}"), &[])?;
    assert_eq!(r.status, 404);
    for bad in [
        "/v2/test/multi/blobs/sha256:abc",
        "/v2/test/multi/blobs/../../../etc/passwd",
        "/v2/TEST/multi/manifests/v1",
    ] {
        let r = http::get(addr, &format!("{bad}?{ns}"), &[])?;
        assert!((400..500).contains(&r.status), "{bad}");
    }
    let r = http::get(addr, "/v2/", &[])?;
    assert_eq!(r.status, 200);
    Ok(())
}

/// `spegel_store_content_rejected_total{reason="symlink"}` as the daemon reports it.
fn symlinks_rejected(metrics: SocketAddr) -> anyhow::Result<f64> {
    let text = String::from_utf8(http::get(metrics, "/metrics", &[])?.body)?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(r#"spegel_store_content_rejected_total{reason="symlink"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

/// A layer file in containerd's real content directory replaced by a link to a file of the same
/// size (or to /etc/passwd) is refused with the 404 that sends containerd upstream, never served
/// through the content API, which would follow the link.
fn symlinked_blob_is_not_served(
    env: &Env,
    addr: SocketAddr,
    metrics: SocketAddr,
) -> anyhow::Result<()> {
    let image = &env.images[0];
    let layer = image.of_kind(BlobKind::Layer).next().expect("a layer");
    let host = image.reference.split('/').next().unwrap_or_default();
    let target = format!(
        "/v2/{}/blobs/{}?ns={}",
        image.repo,
        layer.digest,
        host.replace(':', "%3A")
    );
    let path = env.containerd.blob_path(&layer.digest);
    let aside = path.with_extension("aside");
    let decoy = path.with_extension("decoy");
    std::fs::write(&decoy, vec![b'x'; layer.size as usize])?;
    std::fs::rename(&path, &aside)?;
    let mut outcome = Ok(());
    for link in [decoy.as_path(), Path::new("/etc/passwd")] {
        std::os::unix::fs::symlink(link, &path)?;
        let before = symlinks_rejected(metrics)?;
        let result = http::get(addr, &target, &[("X-Spegel-Mirrored", "true")]);
        std::fs::remove_file(&path)?;
        outcome = result.and_then(|r| {
            anyhow::ensure!(
                r.status == 404,
                "a blob replaced by a link to {} was answered {} ({} bytes)",
                link.display(),
                r.status,
                r.len
            );
            Ok(())
        });
        if outcome.is_ok() {
            let after = symlinks_rejected(metrics)?;
            if after != before + 1.0 {
                outcome = Err(anyhow::anyhow!(
                    "symlink rejections went from {before} to {after}"
                ));
            }
        }
        if outcome.is_err() {
            break;
        }
    }
    // The real file goes back whatever happened, so the next phases see the store intact.
    std::fs::rename(&aside, &path)?;
    std::fs::remove_file(&decoy)?;
    outcome?;
    let r = http::get(addr, &target, &[("X-Spegel-Mirrored", "true")])?;
    assert_eq!((r.status, r.sha256.as_str()), (200, layer.digest.as_str()));
    Ok(())
}

#[test]
fn serves_containerd_content_byte_identical() -> anyhow::Result<()> {
    let env = setup()?;
    // Pulled content is in containerd's content directory.
    for image in &env.images {
        for blob in &image.blobs {
            let meta = std::fs::metadata(env.containerd.blob_path(&blob.digest))?;
            assert_eq!(meta.len(), blob.size);
        }
    }
    let logs = tempfile::tempdir()?;

    // Blob bodies from the content directory (sendfile).
    let (mut daemon, addr, metrics) = start_daemon(
        &env,
        &env.containerd.content_path(),
        &logs.path().join("files.log"),
    )?;
    check_everything_served(&env, addr)?;
    symlinked_blob_is_not_served(&env, addr, metrics)?;
    let status = daemon.process.stop().expect("daemon exit status");
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let log = std::fs::read_to_string(logs.path().join("files.log"))?;
    assert!(
        log.contains("serving blobs from the content directory"),
        "{log}"
    );

    // The same through containerd's content API when the directory is unusable.
    let (mut daemon, addr, _) = start_daemon(
        &env,
        Path::new("/nonexistent/content"),
        &logs.path().join("grpc.log"),
    )?;
    check_everything_served(&env, addr)?;
    assert!(daemon.process.stop().expect("exit status").success());
    let log = std::fs::read_to_string(logs.path().join("grpc.log"))?;
    assert!(log.contains("through the containerd content API"), "{log}");

    // Empty path: asks containerd where its content lives.
    let (mut daemon, addr, _) = start_daemon(&env, Path::new(""), &logs.path().join("auto.log"))?;
    let blob = &env.images[0].blobs[1];
    let host = env.images[0]
        .reference
        .split('/')
        .next()
        .unwrap_or_default()
        .replace(':', "%3A");
    let r = http::request(
        addr,
        "GET",
        &format!("/v2/test/multi/blobs/{}?ns={host}", blob.digest),
        &[],
        false,
    )?;
    assert_eq!((r.status, r.sha256.as_str()), (200, blob.digest.as_str()));
    assert!(daemon.process.stop().expect("exit status").success());
    let log = std::fs::read_to_string(logs.path().join("auto.log"))?;
    assert!(
        log.contains("serving blobs from the content directory"),
        "{log}"
    );
    Ok(())
}
