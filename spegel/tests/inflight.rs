//! Blobs shared while they are still downloading, on the multi-node testbed: a shaped upstream
//! (so a layer takes seconds), node 1 starts pulling, nodes 2 and 3 start a second later and
//! get the layer from node 1's in-progress ingest; then the same with node 1's containerd
//! stopped mid-way, where nodes 2 and 3 must still complete.

use std::{
    io::Read,
    path::PathBuf,
    process::Output,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bench::{
    cluster::{Cluster, METRICS_PORT, REGISTRY_PORT},
    images::{BlobKind, ImageSpec, PushedImage},
};
use sha2::Digest as _;

const MIB: u64 = 1 << 20;
/// What the upstream sends per second at most: a layer takes seconds to download.
const UPSTREAM_RATE: &str = "50mbit";
/// The single layer's size: about 5.4 s at [`UPSTREAM_RATE`].
const LAYER: u64 = 32 * MIB;

fn total(cluster: &Cluster, name: &str) -> f64 {
    // `+ 0.0`: an empty f64 sum is -0.0.
    (1..=cluster.len())
        .map(|k| cluster.metric(k, k, name))
        .sum::<f64>()
        + 0.0
}

/// Node `k`'s peer ID, from its admin API.
fn peer_id(cluster: &Cluster, k: usize) -> String {
    let addr: std::net::SocketAddr = format!("{}:{METRICS_PORT}", cluster.network().node_ip(k))
        .parse()
        .unwrap();
    let r = bench::images::in_netns(&cluster.network().node(k), move || {
        bench::http::get(addr, "/debug/web/metadata", &[])
    })
    .expect("metadata");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("metadata JSON");
    v["libp2p"]["id"].as_str().expect("peer ID").to_string()
}

/// A GET of blob `digest` of `repo` from node `k`'s registry as its containerd would send it
/// (not marked as from a peer), in a thread: status and `sha256:` of the body.
fn spawn_blob_get(
    cluster: &Cluster,
    k: usize,
    repo: &str,
    digest: &str,
) -> JoinHandle<anyhow::Result<(u16, String)>> {
    let ns = cluster.network().node(k);
    let addr: std::net::SocketAddr = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(k))
        .parse()
        .unwrap();
    let target = format!(
        "/v2/{repo}/blobs/{digest}?ns={}",
        cluster.upstream_host().replace(':', "%3A")
    );
    std::thread::spawn(move || {
        bench::images::in_netns(&ns, move || {
            bench::http::request(addr, "GET", &target, &[], false).map(|r| (r.status, r.sha256))
        })
    })
}

fn upstream_tx(cluster: &Cluster) -> u64 {
    bench::netns::tx_bytes(&cluster.network().upstream()).expect("upstream tx counter")
}

/// `ctr images pull` on node `k` in a thread (the caller joins it).
fn spawn_pull(cluster: &Cluster, k: usize, reference: &str) -> JoinHandle<std::io::Result<Output>> {
    let ns = cluster.network().node(k);
    let node = cluster.node(k);
    let (sock, ctr, certs) = (node.socket(), node.ctr_bin(), node.certs_d());
    let reference = reference.to_string();
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
            .arg(&reference)
            .output()
    })
}

fn joined(k: usize, pull: JoinHandle<std::io::Result<Output>>) -> Output {
    let out = pull
        .join()
        .expect("puller thread")
        .expect("ctr did not run");
    eprintln!(
        "node {k} pull: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Every blob of `image` is on node `k` with its size and its digest.
fn assert_has_all(cluster: &Cluster, k: usize, image: &PushedImage) {
    for blob in &image.blobs {
        let path = cluster.node(k).blob_path(&blob.digest);
        let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!("node {k} lacks {} of {}: {e}", blob.digest, image.reference)
        });
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        assert_eq!(size, blob.size, "node {k}: size of {}", blob.digest);
        assert_eq!(
            format!("sha256:{}", hex::encode(hasher.finalize())),
            blob.digest,
            "node {k}: content of {}",
            blob.digest
        );
    }
}

fn layer_of(image: &PushedImage) -> String {
    let layers: Vec<&str> = image
        .of_kind(BlobKind::Layer)
        .map(|b| b.digest.as_str())
        .collect();
    assert_eq!(layers.len(), 1);
    layers[0].to_string()
}

/// Waits until node `k` has started writing `digest` (its daemon advertises it in progress).
fn wait_ingest(cluster: &Cluster, k: usize, at_least: u64) {
    let started = Instant::now();
    bench::process::wait_for(&format!("node {k} ingest"), Duration::from_secs(30), || {
        ingest_written(cluster, k) >= at_least
    })
    .unwrap();
    eprintln!(
        "node {k} has {} bytes in progress after {:?}",
        ingest_written(cluster, k),
        started.elapsed()
    );
}

/// Bytes in node `k`'s largest ingest.
fn ingest_written(cluster: &Cluster, k: usize) -> u64 {
    let Ok(dirs) = std::fs::read_dir(cluster.node(k).content_path().join("ingest")) else {
        return 0;
    };
    dirs.flatten()
        .filter_map(|d| std::fs::metadata(d.path().join("data")).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

#[test]
fn peers_share_a_layer_while_it_downloads() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;

    let mut cluster =
        Cluster::start(3, dir.path())?.with_binary(PathBuf::from(env!("CARGO_BIN_EXE_spegel")));
    let spec = |seed| ImageSpec {
        repo: format!("inflight/s{seed}"),
        tag: "v1".into(),
        layers: vec![LAYER],
        seed,
        platforms: vec![],
    };
    let shared = cluster.push(&spec(31))?;
    let abandoned = cluster.push(&spec(32))?;
    let together = cluster.push(&spec(33))?;
    let elected = cluster.push(&spec(34))?;
    for k in 1..=3 {
        cluster.start_daemon(k)?;
    }
    for k in 1..=3 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    cluster.shape_upstream(UPSTREAM_RATE)?;

    // Node 1 pulls; a second later nodes 2 and 3 do.
    let layer = layer_of(&shared);
    let tx_before = upstream_tx(&cluster);
    let served_before = total(&cluster, "spegel_in_progress_served_bytes_total");
    let first = spawn_pull(&cluster, 1, &shared.reference);
    std::thread::sleep(Duration::from_secs(1));
    let later = [2, 3].map(|k| (k, spawn_pull(&cluster, k, &shared.reference)));
    assert!(
        cluster.node(1).blob_size(&layer).is_none(),
        "node 1 finished the layer within a second: the upstream is not shaped"
    );
    assert!(joined(1, first).status.success());
    for (k, pull) in later {
        assert!(joined(k, pull).status.success(), "node {k} pull failed");
    }
    for k in 1..=3 {
        assert_has_all(&cluster, k, &shared);
    }
    let copies = (upstream_tx(&cluster) - tx_before) as f64 / LAYER as f64;
    let served = total(&cluster, "spegel_in_progress_served_bytes_total") - served_before;
    eprintln!(
        "shared: upstream sent {copies:.2} copies of the layer; {:.2} copies served in progress; \
         advertisements {}, digest checks ok {}",
        served / LAYER as f64,
        total(&cluster, "spegel_in_progress_advertisements_total"),
        total(
            &cluster,
            "spegel_mirror_digest_checks_total{outcome=\"ok\"}"
        ),
    );
    // About one copy came from upstream (3 without sharing); the two later nodes' copies went
    // out of ingests still being written.
    assert!(copies < 1.5, "upstream sent {copies:.2} copies");
    assert!(
        served >= (2 * LAYER) as f64 * 0.9,
        "only {served} bytes were served in progress"
    );
    assert!(
        total(
            &cluster,
            "spegel_mirror_digest_checks_total{outcome=\"ok\"}"
        ) >= 2.0
    );
    assert_eq!(
        total(
            &cluster,
            "spegel_mirror_digest_checks_total{outcome=\"mismatch\"}"
        ),
        0.0
    );

    // All three at once: each creates its ingest before asking its mirror, so each sees the
    // others in progress while still searching itself. None may wait on another's empty
    // ingest (they would all stall until the bound and be withdrawn as stalled). Each
    // announces an intent; the nodes that see an intent ranked above theirs wait (bounded)
    // for that node's download instead of going upstream.
    let stalled = |c: &Cluster| {
        total(
            c,
            "spegel_in_progress_withdrawals_total{reason=\"stalled\"}",
        )
    };
    let waits = |c: &Cluster, outcome: &str| {
        total(
            c,
            &format!("spegel_mirror_waits_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let outcomes = ["forwarded", "timeout", "failed"];
    let stalled_before = stalled(&cluster);
    let waits_before = outcomes.map(|o| waits(&cluster, o));
    let waited_before = total(&cluster, "spegel_mirror_wait_duration_seconds_sum");
    let intents_before: Vec<f64> = (1..=3)
        .map(|k| cluster.metric(k, k, "spegel_mirror_intent_advertisements_total"))
        .collect();
    let tx_before = upstream_tx(&cluster);
    let pulls = [1, 2, 3].map(|k| (k, spawn_pull(&cluster, k, &together.reference)));
    for (k, pull) in pulls {
        assert!(joined(k, pull).status.success(), "node {k} pull failed");
    }
    for k in 1..=3 {
        assert_has_all(&cluster, k, &together);
    }
    let copies = (upstream_tx(&cluster) - tx_before) as f64 / LAYER as f64;
    let waited = outcomes.map(|o| waits(&cluster, o));
    let waited: Vec<f64> = waited
        .iter()
        .zip(waits_before)
        .map(|(a, b)| a - b)
        .collect();
    eprintln!(
        "together: upstream sent {copies:.2} copies of the layer; refused while searching {}; \
         waits forwarded {} timeout {} failed {} ({:.0} ms in all)",
        total(
            &cluster,
            "spegel_in_progress_requests_total{outcome=\"searching\"}"
        ),
        waited[0],
        waited[1],
        waited[2],
        (total(&cluster, "spegel_mirror_wait_duration_seconds_sum") - waited_before) * 1000.0,
    );
    if stalled(&cluster) != stalled_before {
        for k in 1..=3 {
            let log = std::fs::read_to_string(cluster.daemon_log(k)).unwrap_or_default();
            for line in log.lines().filter(|l| {
                [
                    together.repo.as_str(),
                    "in progress",
                    "wait",
                    "intent",
                    "stall",
                ]
                .iter()
                .any(|w| l.contains(w))
            }) {
                eprintln!("node {k}: {line}");
            }
        }
    }
    assert_eq!(stalled(&cluster), stalled_before, "an ingest stalled");
    assert!(copies < 3.05, "upstream sent {copies:.2} copies");
    // Every node missed the layer (and the config) and announced it.
    for k in 1..=3 {
        let intents = cluster.metric(k, k, "spegel_mirror_intent_advertisements_total");
        assert!(
            intents > intents_before[k - 1],
            "node {k} advertised no intent"
        );
    }
    // The top-ranked of every view never waits: of three nodes at most two waited per blob
    // (two blobs: the config and the layer), whatever the timing.
    assert!(waited.iter().sum::<f64>() <= 4.0, "waits {waited:?}");

    // The same with node 1's containerd stopped mid-way: its ingest stops growing, its daemon
    // withdraws it, and nodes 2 and 3 finish from each other or upstream.
    let tx_before = upstream_tx(&cluster);
    let first = spawn_pull(&cluster, 1, &abandoned.reference);
    wait_ingest(&cluster, 1, 1);
    std::thread::sleep(Duration::from_secs(1));
    let later = [2, 3].map(|k| (k, spawn_pull(&cluster, k, &abandoned.reference)));
    wait_ingest(&cluster, 2, 2 * MIB);
    let at_stop = ingest_written(&cluster, 1);
    cluster.node_mut(1).stop();
    eprintln!(
        "stopped node 1's containerd with {:.0}% of the layer written",
        at_stop as f64 * 100.0 / LAYER as f64
    );
    assert!(at_stop < LAYER, "node 1 had the whole layer already");
    let _ = joined(1, first);
    for (k, pull) in later {
        assert!(
            joined(k, pull).status.success(),
            "node {k} pull failed after node 1's containerd stopped"
        );
    }
    for k in 2..=3 {
        assert_has_all(&cluster, k, &abandoned);
    }
    let copies = (upstream_tx(&cluster) - tx_before) as f64 / LAYER as f64;
    eprintln!(
        "abandoned: upstream sent {copies:.2} copies of the layer; in-progress requests \
         unavailable {}; test took {:?}",
        total(
            &cluster,
            "spegel_in_progress_requests_total{outcome=\"unavailable\"}"
        ),
        started.elapsed()
    );
    for k in 1..=3 {
        let log = std::fs::read_to_string(cluster.daemon_log(k)).unwrap_or_default();
        for line in log.lines().filter(|l| {
            ["in progress", "copying of blob", "resuming body", "digest"]
                .iter()
                .any(|w| l.contains(w))
        }) {
            eprintln!("node {k}: {line}");
        }
    }
    // Node 1's ingest stopped growing (its directory stays) and is withdrawn for it.
    bench::process::wait_for(
        "node 1's stalled ingest withdrawn",
        Duration::from_secs(30),
        || {
            cluster.metric(
                1,
                1,
                "spegel_in_progress_withdrawals_total{reason=\"stalled\"}",
            ) >= 1.0
        },
    )?;
    // Node 1's partial copy plus at most one more each for nodes 2 and 3.
    assert!(copies < 3.0, "upstream sent {copies:.2} copies");

    // A miss waits for the node that outranks it and fetches the blob. Of nodes 2 and 3, the
    // lower-ranked one (for this layer) gets a long wait bound, so nothing here depends on
    // timing: the higher-ranked node misses the layer first (its intent stays up), the lower
    // one misses it next and waits, and only then does the higher one's containerd pull it.
    let layer = layer_of(&elected);
    let ids = [2, 3].map(|k| (k, peer_id(&cluster, k)));
    let rank = |id: &str| (spegel::mirror::intent_score(&layer, id), id.to_string());
    let (high, low) = if rank(&ids[0].1) > rank(&ids[1].1) {
        (ids[0].0, ids[1].0)
    } else {
        (ids[1].0, ids[0].0)
    };
    cluster.stop_daemon(low);
    let mut args = cluster.registry_args(low);
    args.push("--mirror-intent-wait=30s".into());
    cluster.start_daemon_with(low, &args)?;
    cluster.wait_ready(low, Duration::from_secs(60))?;
    let forwarded_before =
        cluster.metric(low, low, "spegel_mirror_waits_total{outcome=\"forwarded\"}");
    let (status, _) = spawn_blob_get(&cluster, high, &elected.repo, &layer)
        .join()
        .expect("getter thread")?;
    assert_eq!(status, 404, "node {high} had the layer before any pull");
    // The intent's provider record reaches the other node within milliseconds.
    std::thread::sleep(Duration::from_secs(1));
    let tx_before = upstream_tx(&cluster);
    let waiting = spawn_blob_get(&cluster, low, &elected.repo, &layer);
    bench::process::wait_for(
        &format!("node {low} waiting for node {high}"),
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(cluster.daemon_log(low))
                .is_ok_and(|l| l.contains("another node fetches this blob: waiting for it"))
        },
    )?;
    let pull = spawn_pull(&cluster, high, &elected.reference);
    assert!(
        joined(high, pull).status.success(),
        "node {high} pull failed"
    );
    let (status, digest) = waiting.join().expect("getter thread")?;
    assert_eq!(status, 200, "node {low}'s wait ended without the layer");
    assert_eq!(digest, layer, "node {low} forwarded other bytes");
    assert_has_all(&cluster, high, &elected);
    assert_eq!(
        cluster.metric(low, low, "spegel_mirror_waits_total{outcome=\"forwarded\"}"),
        forwarded_before + 1.0
    );
    let copies = (upstream_tx(&cluster) - tx_before) as f64 / LAYER as f64;
    eprintln!("elected: upstream sent {copies:.2} copies of the layer for two nodes");
    // Node `high`'s pull went upstream once; the waiting node's copy came from its ingest.
    assert!(copies < 1.5, "upstream sent {copies:.2} copies");
    Ok(())
}
