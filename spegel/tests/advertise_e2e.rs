//! End to end on the testbed: advertisement and blob serving across the lifecycle of the node's
//! containerd (content appearing after the daemon started, images present before it started,
//! containerd restarting under it). Every wait is bounded.

use std::{path::PathBuf, time::Duration};

use bench::{
    cluster::{Cluster, METRICS_PORT, REGISTRY_PORT},
    images::{ImageSpec, PushedImage},
    process::wait_for,
};

/// Generous bound for "within seconds": far above what a working daemon needs, far below
/// "never" (which is what the bugs gave).
const RESOLVE_WITHIN: Duration = Duration::from_secs(30);

/// `$SPEGEL_BIN` (e.g. an older build, to see these tests fail on it), else this build.
fn cluster(n: usize, dir: &std::path::Path) -> anyhow::Result<Cluster> {
    let bin = std::env::var_os("SPEGEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_spegel")));
    Ok(Cluster::start(n, dir)?.with_binary(bin))
}

/// Sum of the samples of `name` (a metric name with an optional label prefix) on `node`'s
/// metrics port, asked from inside `node`.
fn metric(cluster: &Cluster, node: usize, name: &str) -> anyhow::Result<f64> {
    let addr: std::net::SocketAddr =
        format!("{}:{METRICS_PORT}", cluster.network().node_ip(node)).parse()?;
    let name = name.to_string();
    let r = bench::images::in_netns(&cluster.network().node(node), move || {
        bench::http::get(addr, "/metrics", &[])
    })?;
    Ok(String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with(&name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn image(repo: &str, seed: u64) -> ImageSpec {
    ImageSpec {
        repo: repo.into(),
        tag: "v1".into(),
        layers: vec![256 << 10, 64 << 10],
        seed,
        platforms: vec![],
    }
}

/// `ns=` query value naming the upstream registry.
fn ns(cluster: &Cluster) -> String {
    cluster.upstream_host().replace(':', "%3A")
}

/// Whether node `k`'s registry serves `repo:tag` as `digest` (from a peer when it lacks it).
fn resolves_tag(cluster: &Cluster, k: usize, repo: &str, tag: &str, digest: &str) -> bool {
    let addr = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(k));
    let target = format!("/v2/{repo}/manifests/{tag}?ns={}", ns(cluster));
    cluster
        .get_from(k, &addr, &target, &[])
        .is_ok_and(|r| r.status == 200 && r.sha256 == digest)
}

/// Waits until node `k` resolves the tag and every digest of `image` (bounded).
fn wait_resolves_all(cluster: &Cluster, k: usize, image: &PushedImage) -> anyhow::Result<()> {
    wait_for(
        &format!("node {k} to resolve {}", image.reference),
        RESOLVE_WITHIN,
        || resolves_tag(cluster, k, &image.repo, &image.tag, &image.digest),
    )?;
    let addr = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(k));
    for blob in &image.blobs {
        let kind = if blob.digest == image.digest {
            "manifests"
        } else {
            "blobs"
        };
        let target = format!(
            "/v2/{}/{kind}/{}?ns={}",
            image.repo,
            blob.digest,
            ns(cluster)
        );
        wait_for(
            &format!("node {k} to resolve {}", blob.digest),
            RESOLVE_WITHIN,
            || {
                cluster
                    .get_from(k, &addr, &target, &[])
                    .is_ok_and(|r| r.status == 200 && r.sha256 == blob.digest)
            },
        )?;
    }
    Ok(())
}

fn start_daemons(cluster: &mut Cluster, n: usize) -> anyhow::Result<()> {
    for k in 1..=n {
        cluster.start_daemon(k)?;
    }
    for k in 1..=n {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    Ok(())
}

#[test]
fn blobs_go_out_with_sendfile_once_containerd_has_content() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = cluster(2, dir.path())?;
    let pushed = cluster.push(&image("e2e/fresh-node", 31))?;
    // A fresh node: containerd has written nothing yet when the daemon starts.
    let blobs_dir = cluster.node(1).content_path().join("blobs");
    assert!(
        !blobs_dir.exists(),
        "{} exists already",
        blobs_dir.display()
    );
    start_daemons(&mut cluster, 2)?;
    let log = std::fs::read_to_string(cluster.daemon_log(1))?;
    assert!(log.contains("content directory not usable"), "{log}");

    cluster.node(1).pull(&pushed.reference, false)?;
    assert!(blobs_dir.is_dir());
    // Node 2 pulls it from node 1 alone.
    wait_resolves_all(&cluster, 2, &pushed)?;
    cluster.upstream().pause();
    cluster.node(2).pull(&pushed.reference, false)?;
    for blob in &pushed.blobs {
        assert_eq!(cluster.node(2).blob_size(&blob.digest), Some(blob.size));
    }

    // Everything node 1 read came from its content directory, none through the content API.
    let files = metric(
        &cluster,
        1,
        "spegel_store_content_opens_total{path=\"file\"}",
    )?;
    let streams = metric(
        &cluster,
        1,
        "spegel_store_content_opens_total{path=\"stream\"}",
    )?;
    assert!(
        files >= pushed.blobs.len() as f64,
        "{files} file opens for {} blobs",
        pushed.blobs.len()
    );
    assert_eq!(streams, 0.0);
    let log = std::fs::read_to_string(cluster.daemon_log(1))?;
    assert!(
        log.contains("content directory appeared, serving blobs from it"),
        "{log}"
    );
    Ok(())
}

#[test]
fn images_present_before_the_daemon_are_advertised_without_an_event() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = cluster(2, dir.path())?;
    let pushed = cluster.push(&image("e2e/present", 32))?;
    // Pulled straight from upstream before any daemon runs (no mirror configured yet).
    cluster.node(1).pull(&pushed.reference, false)?;
    start_daemons(&mut cluster, 2)?;
    // Nothing happens on node 1 from here on: no image event reaches its daemon.
    wait_resolves_all(&cluster, 2, &pushed)?;
    let tags = metric(&cluster, 1, "spegel_advertised_image_tags")?;
    assert!(tags >= 1.0, "{tags}");
    Ok(())
}

#[test]
fn a_tag_created_right_after_a_containerd_restart_is_advertised() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = cluster(2, dir.path())?;
    let pushed = cluster.push(&image("e2e/restart", 33))?;
    start_daemons(&mut cluster, 2)?;
    cluster.node(1).pull(&pushed.reference, false)?;
    wait_resolves_all(&cluster, 2, &pushed)?;

    for round in 1..=2 {
        // containerd down for a while (the daemon's retries back off meanwhile), then up again
        // with the same root and socket; a new tag at once, before the daemon resubscribes.
        cluster.node_mut(1).stop();
        std::thread::sleep(Duration::from_secs(3));
        cluster.node_mut(1).restart()?;
        let repo = format!("e2e/retag{round}");
        let target = format!("{}/{repo}:v2", cluster.upstream_host());
        cluster
            .node(1)
            .ctr(&["images", "tag", &pushed.reference, &target])?;
        // No further event on node 1.
        wait_for(
            &format!("node 2 to resolve {target}"),
            RESOLVE_WITHIN,
            || resolves_tag(&cluster, 2, &repo, "v2", &pushed.digest),
        )?;
    }
    let log = std::fs::read_to_string(cluster.daemon_log(1))?;
    assert!(
        log.contains("resubscribing") || log.contains("retrying"),
        "{log}"
    );
    Ok(())
}
