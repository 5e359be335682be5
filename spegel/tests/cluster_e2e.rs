//! End to end on the multi-node testbed: real containerd per node, the real registry upstream,
//! network namespaces, and the daemon configured the way the chart does it.

use std::{path::PathBuf, time::Duration};

use bench::{
    cluster::{Cluster, REGISTRY_PORT},
    images::{BlobKind, ImageSpec, PushedImage},
};

const MIB: u64 = 1 << 20;

fn assert_has_all(cluster: &Cluster, k: usize, image: &PushedImage) {
    for blob in &image.blobs {
        let meta = std::fs::metadata(cluster.node(k).blob_path(&blob.digest)).unwrap_or_else(|e| {
            panic!("node {k} lacks {} of {}: {e}", blob.digest, image.reference)
        });
        assert_eq!(meta.len(), blob.size);
    }
}

#[test]
fn three_nodes_pull_through_peers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster =
        Cluster::start(3, dir.path())?.with_binary(PathBuf::from(env!("CARGO_BIN_EXE_spegel")));
    let images = [
        cluster.push(&ImageSpec {
            repo: "e2e/multi".into(),
            tag: "v1".into(),
            layers: vec![MIB, 2 * MIB, 512 << 10],
            seed: 11,
            platforms: vec![],
        })?,
        cluster.push(&ImageSpec {
            repo: "e2e/index".into(),
            tag: "v1".into(),
            layers: vec![MIB],
            seed: 12,
            platforms: vec!["amd64".into(), "arm64".into()],
        })?,
        cluster.push(&ImageSpec {
            repo: "e2e/large".into(),
            tag: "v1".into(),
            layers: vec![128 * MIB],
            seed: 13,
            platforms: vec![],
        })?,
    ];
    for k in 1..=3 {
        cluster.start_daemon(k)?;
    }
    for k in 1..=3 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    let version = cluster.node(1).server_version().to_string();
    eprintln!("containerd server version: {version}");
    let ns = cluster.upstream_host().replace(':', "%3A");
    let node2 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(2));

    // Advertisement is exact. A blob removed through the content API is withdrawn, the rest
    // of its image stays. An image deleted on its only holder is withdrawn: its layer stays on
    // disk (containerd keeps it under the image-ID name), so a 200 after the delete would be a
    // stale advertisement, not a missing file.
    let gone = cluster.push(&ImageSpec {
        repo: "e2e/gone".into(),
        tag: "v1".into(),
        layers: vec![300_000, 200_000],
        seed: 15,
        platforms: vec![],
    })?;
    cluster.node(1).pull(&gone.reference, false)?;
    let layers: Vec<String> = gone
        .of_kind(BlobKind::Layer)
        .map(|b| b.digest.clone())
        .collect();
    assert_eq!(layers.len(), 2);
    let probe_status = |digest: &str| {
        let target = format!("/v2/{}/blobs/{digest}?ns={ns}", gone.repo);
        cluster
            .get_from(2, &node2, &target, &[])
            .map(|r| r.status)
            .unwrap_or(0)
    };
    for layer in &layers {
        bench::process::wait_for(
            &format!("advertisement of {layer} (containerd {version})"),
            Duration::from_secs(30),
            || probe_status(layer) == 200,
        )?;
    }
    // Node 1 no longer has the file either way, so its own count shows the withdrawal.
    let advertised = |k| cluster.metric(k, k, "spegel_advertised_content_digests");
    let before = advertised(1);
    assert!(
        before >= 3.0,
        "containerd {version}: {before} digests advertised"
    );
    cluster.node(1).remove_content(&layers[0])?;
    bench::process::wait_for(
        &format!(
            "withdrawal of deleted content {} (containerd {version})",
            layers[0]
        ),
        Duration::from_secs(30),
        || advertised(1) == before - 1.0 && probe_status(&layers[0]) == 404,
    )?;
    assert_eq!(
        probe_status(&layers[1]),
        200,
        "containerd {version}: deleting one blob withdrew another"
    );
    cluster.node(1).remove_image(&gone.reference)?;
    bench::process::wait_for(
        &format!(
            "withdrawal of {} after the image delete (containerd {version})",
            layers[1]
        ),
        Duration::from_secs(30),
        || probe_status(&layers[1]) == 404,
    )?;
    assert!(
        cluster.node(1).blob_size(&layers[1]).is_some(),
        "containerd {version} removed the layer with the name, so the withdrawal check proves nothing"
    );

    // Node 1: nobody has anything, the mirror answers 404 and containerd falls back upstream.
    for image in &images {
        cluster.node(1).pull(&image.reference, true)?;
        assert_has_all(&cluster, 1, image);
    }
    // Node 2 can find every image on a peer before upstream goes away.
    for image in &images {
        let probe = format!("/v2/{}/manifests/{}?ns={ns}", image.repo, image.tag);
        bench::process::wait_for("advertisement", Duration::from_secs(30), || {
            cluster
                .get_from(2, &node2, &probe, &[])
                .is_ok_and(|r| r.status == 200 && r.sha256 == image.digest)
        })?;
    }
    cluster.upstream().pause();

    // Node 2 pulls everything from peers (upstream is down).
    let hits_before = cluster.metric(2, 2, "spegel_mirror_requests_total{cache=\"hit\"");
    for image in &images {
        cluster.node(2).pull(&image.reference, true)?;
        assert_has_all(&cluster, 2, image);
    }
    assert!(cluster.metric(2, 2, "spegel_mirror_requests_total{cache=\"hit\"") > hits_before);

    // Node 3 pulls the large image while its serving peer is killed mid-transfer. Both peers
    // are slowed so the transfer takes seconds; whichever is serving is killed.
    cluster
        .network()
        .shape(&cluster.network().node(1), "300mbit")?;
    cluster
        .network()
        .shape(&cluster.network().node(2), "300mbit")?;
    let large = images[2].reference.clone();
    let puller = {
        let ns = cluster.network().node(3);
        let sock = cluster.node(3).socket();
        let ctr = cluster.node(3).ctr_bin();
        let certs = cluster.node(3).certs_d();
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(ctr)
                .arg("-a")
                .arg(sock)
                .args([
                    "-n",
                    "k8s.io",
                    "images",
                    "pull",
                    "--plain-http",
                    "--hosts-dir",
                ])
                .arg(certs)
                .arg(&large)
                .output()
        })
    };
    let mut killed = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while killed.is_none() && !puller.is_finished() && std::time::Instant::now() < deadline {
        for peer in [1, 2] {
            if cluster.metric(3, peer, "http_requests_inflight{handler=\"/v2/*\"}") > 0.0 {
                std::thread::sleep(Duration::from_millis(300));
                cluster.kill_daemon(peer);
                killed = Some(peer);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = puller.join().expect("puller thread")?;
    assert!(
        out.status.success(),
        "pull with a peer killed mid-transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(killed.is_some(), "no serving peer was seen mid-transfer");
    assert_has_all(&cluster, 3, &images[2]);
    // The survivor serves the rest.
    for image in &images[..2] {
        cluster.node(3).pull(&image.reference, true)?;
        assert_has_all(&cluster, 3, image);
    }

    // Local daemon down: containerd falls back to upstream.
    cluster.upstream().resume()?;
    let fresh = cluster.push(&ImageSpec {
        repo: "e2e/fresh".into(),
        tag: "v1".into(),
        layers: vec![MIB],
        seed: 14,
        platforms: vec![],
    })?;
    let survivor = if killed == Some(1) { 2 } else { 1 };
    let status = cluster.stop_daemon(3).expect("node 3 daemon was running");
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    cluster.node(3).pull(&fresh.reference, false)?;
    assert_has_all(&cluster, 3, &fresh);
    let status = cluster.stop_daemon(survivor).expect("survivor running");
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    Ok(())
}
