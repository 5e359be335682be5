//! The single-host testbed: process guards, the real registry and a real containerd on
//! loopback, generated images pushed and pulled with `ctr`.

use std::{collections::HashSet, path::Path, time::Duration};

use bench::{
    containerd::{Containerd, PullOptions},
    images::{self, BlobKind, ImageSpec, PushOptions, PushedImage},
    process::{Process, require, wait_for},
    registry::Upstream,
};
use sha2::{Digest as _, Sha256};

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn sh(script: &str, log: &Path) -> anyhow::Result<Process> {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", script]);
    Process::spawn("sh", cmd, log)
}

#[test]
fn process_guard_stops_its_pid_and_captures_output() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    // Output lands in the log.
    let mut p = sh(
        "echo to-stdout; echo to-stderr >&2",
        &dir.path().join("echo.log"),
    )?;
    wait_for("echo to exit", Duration::from_secs(10), || !p.is_running())?;
    let log = std::fs::read_to_string(p.log())?;
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log}"
    );

    // Drop stops the process.
    let p = sh("exec sleep 1000", &dir.path().join("sleep.log"))?;
    let pid = p.pid().expect("started");
    assert!(alive(pid));
    drop(p);
    assert!(!alive(pid), "pid {pid} survived its guard");

    // A process that ignores SIGTERM is killed after the grace period.
    let mut p = sh(
        "trap '' TERM; echo ignoring; exec sleep 1000",
        &dir.path().join("stubborn.log"),
    )?;
    // SIGTERM before the trap is set would end it early.
    wait_for("the trap", Duration::from_secs(10), || {
        std::fs::read_to_string(p.log()).is_ok_and(|l| l.contains("ignoring"))
    })?;
    let pid = p.pid().expect("started");
    let status = p.stop_with(Duration::from_millis(300)).expect("status");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert!(!alive(pid));
    assert!(!p.is_running());

    // A missing program is reported with its package.
    let err = require("/nonexistent/bin/tool", "some-package").unwrap_err();
    assert!(err.to_string().contains("some-package"), "{err}");
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(std::fs::read(path)?))
    ))
}

/// Every blob of `blobs` is in the content store with its size and digest.
fn assert_stored<'a>(
    containerd: &Containerd,
    blobs: impl IntoIterator<Item = &'a images::Blob>,
) -> anyhow::Result<()> {
    for blob in blobs {
        let path = containerd.blob_path(&blob.digest);
        assert_eq!(
            containerd.blob_size(&blob.digest),
            Some(blob.size),
            "{:?} {} at {}",
            blob.kind,
            blob.digest,
            path.display()
        );
        assert_eq!(sha256_file(&path)?, blob.digest);
    }
    Ok(())
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

#[test]
fn images_pushed_to_the_registry_pull_into_containerd() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let containerd = Containerd::start(&dir.path().join("ctd"), None)?;
    let mut upstream = Upstream::start_local(&dir.path().join("registry"))?;
    assert!(containerd.socket().exists() && containerd.ttrpc_socket().exists());
    assert!(containerd.certs_d().is_dir());
    let config = std::fs::read_to_string(containerd.config_file())?;
    assert!(config.contains("disable_apparmor = true"), "{config}");

    // A two-layer single-platform image, layer sizes exact and not multiples of 512.
    let sizes = vec![100_001, 300_000];
    let plain = images::push(
        upstream.addr(),
        &ImageSpec {
            repo: "testbed/plain".into(),
            tag: "v1".into(),
            layers: sizes.clone(),
            seed: 11,
            platforms: vec![],
        },
    )?;
    assert_eq!(
        plain.reference,
        format!("{}/testbed/plain:v1", upstream.host())
    );
    let layer_sizes: Vec<u64> = plain.of_kind(BlobKind::Layer).map(|b| b.size).collect();
    assert_eq!(layer_sizes, sizes);
    assert_eq!(plain.of_kind(BlobKind::Manifest).count(), 1);
    assert_eq!(plain.of_kind(BlobKind::Config).count(), 1);
    assert_eq!(plain.of_kind(BlobKind::Index).count(), 0);
    assert_eq!(plain.blobs[0].digest, plain.digest);
    // Pushing the same spec again gives the same digests.
    let again = images::push(
        upstream.addr(),
        &ImageSpec {
            repo: "testbed/plain".into(),
            tag: "v1".into(),
            layers: sizes.clone(),
            seed: 11,
            platforms: vec![],
        },
    )?;
    let digests = |i: &PushedImage| i.blobs.iter().map(|b| b.digest.clone()).collect::<Vec<_>>();
    assert_eq!(digests(&again), digests(&plain));

    let pull = containerd.pull(&plain.reference, false)?;
    assert!(pull.output.contains("done"), "{}", pull.output);
    assert_stored(&containerd, &plain.blobs)?;
    // The layers regenerate from their seeds.
    for layer in plain.of_kind(BlobKind::Layer) {
        let seed = layer.seed.expect("layers carry their seed");
        assert_eq!(images::layer_digest(seed, layer.size).0, layer.digest);
    }
    assert!(containerd.list_images()?.contains(&plain.reference));

    // An index over two platforms, each with its own layers; all platforms pulled.
    let spec = ImageSpec {
        repo: "testbed/index".into(),
        tag: "v1".into(),
        layers: vec![50_000, 70_000],
        seed: 12,
        platforms: vec!["amd64".into(), "arm64".into()],
    };
    let index = images::push(upstream.addr(), &spec)?;
    assert_eq!(index.blobs[0].kind, BlobKind::Index);
    assert_eq!(index.blobs[0].digest, index.digest);
    assert_eq!(index.of_kind(BlobKind::Manifest).count(), 2);
    assert_eq!(index.of_kind(BlobKind::Config).count(), 2);
    assert_eq!(index.of_kind(BlobKind::Layer).count(), 4);
    containerd.pull_with(
        &index.reference,
        &PullOptions {
            all_platforms: true,
            ..PullOptions::default()
        },
    )?;
    assert_stored(&containerd, &index.blobs)?;

    // The same platforms sharing their layers; only the host's platform pulled.
    let shared = images::push_with(
        upstream.addr(),
        &ImageSpec {
            repo: "testbed/shared".into(),
            seed: 13,
            ..spec.clone()
        },
        &PushOptions {
            shared_layers: true,
        },
    )?;
    assert_eq!(shared.of_kind(BlobKind::Manifest).count(), 2);
    assert_eq!(shared.of_kind(BlobKind::Layer).count(), 2);
    assert!(
        shared
            .of_kind(BlobKind::Layer)
            .all(|b| b.platform.is_none())
    );
    containerd.pull(&shared.reference, false)?;
    let wanted = shared.platform_blobs(host_arch());
    assert_eq!(
        wanted.len(),
        1 + 1 + 1 + 2,
        "index, manifest, config, layers"
    );
    assert_stored(&containerd, wanted.iter().copied())?;
    let wanted: HashSet<&str> = wanted.iter().map(|b| b.digest.as_str()).collect();
    for other in shared
        .blobs
        .iter()
        .filter(|b| !wanted.contains(b.digest.as_str()))
    {
        assert_eq!(
            containerd.blob_size(&other.digest),
            None,
            "{:?} of another platform was fetched",
            other.kind
        );
    }

    // Upstream down: a removed image cannot be pulled again; back up on the same data: it can.
    containerd.remove_image(&plain.reference)?;
    assert!(!containerd.list_images()?.contains(&plain.reference));
    upstream.stop();
    assert!(!upstream.is_running());
    assert!(containerd.pull(&plain.reference, false).is_err());
    upstream.resume()?;
    assert!(upstream.answers());
    containerd.pull(&plain.reference, false)?;
    assert!(containerd.list_images()?.contains(&plain.reference));
    Ok(())
}

#[test]
fn large_layers_stream_to_the_registry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let upstream = Upstream::start_local(&dir.path().join("registry"))?;
    let size = (64 << 20) + 777;
    let image = images::push(
        upstream.addr(),
        &ImageSpec {
            repo: "testbed/large".into(),
            tag: "v1".into(),
            layers: vec![size],
            seed: 5,
            platforms: vec![],
        },
    )?;
    let layer = image.of_kind(BlobKind::Layer).next().expect("one layer");
    assert_eq!(layer.size, size);
    // The registry has the bytes the generator makes (hashed, not kept).
    let r = bench::http::request(
        upstream.addr(),
        "GET",
        &format!("/v2/testbed/large/blobs/{}", layer.digest),
        &[],
        false,
    )?;
    assert_eq!(r.status, 200);
    assert_eq!(r.len, size);
    assert_eq!(r.sha256, layer.digest);
    Ok(())
}
