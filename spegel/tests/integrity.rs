//! A corrupted copy on the multi-node testbed (real containerd per node, the real registry
//! upstream, network namespaces): one flipped byte in a layer file on node 1. Node 2's pull
//! through its mirror may fail once; the next attempt gets the right bytes (upstream), node 1
//! is not asked for that digest again, and node 1 itself finds the corruption, stops serving
//! and advertising that blob, and counts it.

use std::{
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
    time::Duration,
};

use bench::{
    cluster::{Cluster, REGISTRY_PORT},
    images::{BlobKind, ImageSpec},
};
use sha2::Digest as _;

const MIB: u64 = 1 << 20;

/// Flips one byte in the middle of `path`, keeping its size and modification time (bit rot:
/// nothing in the file's metadata shows the change).
fn flip_byte(path: &std::path::Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta.modified()?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let at = meta.len() / 2;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut byte)?;
    byte[0] ^= 0x20;
    file.seek(SeekFrom::Start(at))?;
    file.write_all(&byte)?;
    file.sync_all()?;
    file.set_modified(mtime)?;
    assert_eq!(std::fs::metadata(path)?.len(), meta.len());
    Ok(())
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

#[test]
fn a_corrupted_peer_costs_at_most_one_failed_pull_and_withdraws_its_copy() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster =
        Cluster::start(2, dir.path())?.with_binary(PathBuf::from(env!("CARGO_BIN_EXE_spegel")));
    let image = cluster.push(&ImageSpec {
        repo: "integrity/app".into(),
        tag: "v1".into(),
        layers: vec![4 * MIB],
        seed: 21,
        platforms: vec![],
    })?;
    let layer = image
        .of_kind(BlobKind::Layer)
        .next()
        .expect("one layer")
        .clone();
    for k in 1..=2 {
        cluster.start_daemon(k)?;
    }
    for k in 1..=2 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    let ns = cluster.upstream_host().replace(':', "%3A");
    let node1 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(1));
    let node2 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(2));
    let layer_target = format!("/v2/{}/blobs/{}?ns={ns}", image.repo, layer.digest);

    // Node 1 pulls from upstream (nobody has anything) and advertises the image.
    cluster.node(1).pull(&image.reference, false)?;
    let head_via = |k: usize, addr: &str, headers: &[(&str, &str)]| {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let target = layer_target.clone();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        bench::images::in_netns(&cluster.network().node(k), move || {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            bench::http::request(addr, "HEAD", &target, &h, false)
        })
        .map(|r| r.status)
        .unwrap_or(0)
    };
    // HEAD only: node 1 must not have served (and so verified) the layer before the flip.
    bench::process::wait_for(
        "advertisement of the layer",
        Duration::from_secs(30),
        || head_via(2, &node2, &[]) == 200,
    )?;
    let advertised_before = cluster.metric(1, 1, "spegel_advertised_content_digests");
    flip_byte(&cluster.node(1).blob_path(&layer.digest))?;

    let served_bytes = || {
        cluster.metric(
            2,
            1,
            "http_response_size_bytes_sum{code=\"200\",handler=\"/v2/*\",method=\"GET\"",
        )
    };
    let mismatches = || {
        cluster.metric(
            2,
            2,
            "spegel_mirror_digest_checks_total{outcome=\"mismatch\"",
        )
    };
    // The first pull gets node 1's copy, whose last bytes are held back and cut: it may fail.
    let mut attempts = 0;
    let mut first_error = None;
    let mut after_first = None;
    while attempts < 2 {
        attempts += 1;
        let result = cluster.node(2).pull(&image.reference, false);
        if attempts == 1 {
            after_first = Some(served_bytes());
        }
        match result {
            Ok(_) => break,
            Err(e) if attempts == 1 => {
                eprintln!("first pull failed as it may: {e:#}");
                first_error = Some(e);
            }
            Err(e) => return Err(e.context("the second pull failed too")),
        }
    }
    eprintln!("pulls: {attempts}, first failed: {}", first_error.is_some());
    let path2 = cluster.node(2).blob_path(&layer.digest);
    assert_eq!(
        sha256_file(&path2)?,
        layer.digest,
        "node 2 holds wrong bytes"
    );
    assert_eq!(
        mismatches(),
        1.0,
        "node 2 saw node 1's corrupt copy exactly once"
    );
    assert_eq!(cluster.metric(2, 2, "spegel_mirror_bad_peers_total"), 1.0);
    if attempts == 2 {
        // Node 1 served no layer body again (only small manifests, if anything): node 2 skipped
        // it as bad, or node 1 had already withdrawn its copy (both are counted here).
        eprintln!(
            "node 2 skipped a bad provider {} times; node 1 found its copy corrupt {} times",
            cluster.metric(2, 2, "spegel_mirror_bad_peer_skips_total"),
            cluster.metric(2, 1, "spegel_store_corrupt_blobs_total"),
        );
        let after = served_bytes();
        let first = after_first.unwrap_or(after);
        assert!(
            after - first < layer.size as f64,
            "node 1 served {} more bytes after its copy was found bad",
            after - first
        );
    }

    // Node 2's containerd had written all but the last bytes of the bad copy into its ingest,
    // which it would resume (and fail to commit) on every retry: node 2 aborted it.
    let log2 = std::fs::read_to_string(cluster.daemon_log(2))?;
    assert!(
        log2.contains("aborted a write that received bytes not matching"),
        "node 2 did not abort the poisoned ingest"
    );

    // Node 1 verifies its copy (node 2's report, or its own check of what it served), counts it
    // once, stops serving it and withdraws its advertisement.
    bench::process::wait_for(
        "node 1 finding its corrupt copy",
        Duration::from_secs(60),
        || cluster.metric(1, 1, "spegel_store_corrupt_blobs_total") >= 1.0,
    )?;
    assert_eq!(
        cluster.metric(1, 1, "spegel_store_corrupt_blobs_total"),
        1.0
    );
    assert!(cluster.metric(1, 1, "spegel_store_verifications_total") >= 1.0);
    let get_from_peer =
        cluster.get_from(2, &node1, &layer_target, &[("X-Spegel-Mirrored", "true")])?;
    assert_eq!(
        get_from_peer.status, 404,
        "node 1 still serves its corrupt copy"
    );
    assert_eq!(
        head_via(2, &node1, &[("X-Spegel-Mirrored", "true")]),
        404,
        "node 1 still describes its corrupt copy"
    );
    bench::process::wait_for(
        "withdrawal of the corrupt blob",
        Duration::from_secs(30),
        || cluster.metric(1, 1, "spegel_advertised_content_digests") == advertised_before - 1.0,
    )?;
    // The intact rest of the image is still served.
    let manifest = format!("/v2/{}/manifests/{}?ns={ns}", image.repo, image.digest);
    let r = cluster.get_from(2, &node1, &manifest, &[("X-Spegel-Mirrored", "true")])?;
    assert_eq!(r.status, 200);
    Ok(())
}
