//! `bench p2p`: on the 3-node testbed, the latency of a mirror hit, the miss penalty (a pull of
//! an image no peer has, with the mirror configured against without it), and a large pull from
//! a peer against one from the registry.

use std::{path::Path, time::Duration, time::Instant};

use anyhow::Context;

use crate::{
    cluster::{Cluster, REGISTRY_PORT},
    images::{BlobKind, ImageSpec},
    stats,
};

/// Every figure of one run, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// HEAD of a blob only node 1 has, asked of node 2's mirror (lookup + peer HEAD).
    pub hit_head_ms: Vec<f64>,
    /// The same HEAD asked of node 1 directly (local, no lookup).
    pub local_head_ms: Vec<f64>,
    /// HEAD of a blob nobody has, asked of node 2's mirror (lookup until "no provider").
    pub miss_head_ms: Vec<f64>,
    /// Pulls of images no peer has, mirror configured.
    pub miss_pull_with_mirror_ms: Vec<f64>,
    /// Pulls of images no peer has, no mirror configured.
    pub miss_pull_without_mirror_ms: Vec<f64>,
    /// Large image pulled from the registry.
    pub large_from_registry_ms: Vec<f64>,
    /// Large image pulled from a peer (registry stopped).
    pub large_from_peer_ms: Vec<f64>,
    /// Size of the large image in MiB.
    pub large_mib: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the benchmark with `runs` repetitions of each measurement.
pub fn run(work: &Path, runs: usize, large_mib: u64) -> anyhow::Result<Report> {
    let mut cluster = Cluster::start(3, work)?;
    for k in 1..=3 {
        cluster.start_daemon(k)?;
    }
    for k in 1..=3 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    let ns = cluster.upstream_host().replace(':', "%3A");

    // Hit and miss latency of single requests.
    eprintln!("measuring hit and miss request latency");
    let small = cluster.push(&ImageSpec {
        repo: "p2p/small".into(),
        tag: "v1".into(),
        layers: vec![1 << 20],
        seed: 1,
        platforms: vec![],
    })?;
    cluster.node(1).pull(&small.reference, false)?;
    let layer = small
        .of_kind(BlobKind::Layer)
        .next()
        .context("layer")?
        .digest
        .clone();
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", small.repo);
    let node1 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(1));
    let node2 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(2));
    crate::process::wait_for("advertisement", Duration::from_secs(30), || {
        cluster
            .get_from(2, &node2, &target, &[])
            .is_ok_and(|r| r.status == 200)
    })?;
    let head_times = |addr: &str, target: &str, expect: u16| -> anyhow::Result<Vec<f64>> {
        let addr: std::net::SocketAddr = addr.parse()?;
        let target = target.to_string();
        let n = runs * 20;
        crate::images::in_netns(&cluster.network().node(2), move || {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let r = crate::http::request(addr, "HEAD", &target, &[], false)?;
                out.push(ms(t.elapsed()));
                anyhow::ensure!(
                    r.status == expect,
                    "HEAD {target}: {} (expected {expect})",
                    r.status
                );
            }
            Ok(out)
        })
    };
    let hit_head_ms = head_times(&node2, &target, 200)?;
    let local_head_ms = head_times(&node1, &target, 200)?;
    let missing = format!("/v2/p2p/none/blobs/sha256:{}?ns={ns}", "0".repeat(64));
    let miss_head_ms = head_times(&node2, &missing, 404)?;

    // Miss penalty: fresh images nobody has, pulled by node 3 with and without the mirror.
    eprintln!("measuring the miss penalty");
    let hosts = cluster.node(3).certs_d().join("_default/hosts.toml");
    let parked = cluster.node(3).certs_d().join("hosts.toml.parked");
    let mut with = Vec::new();
    let mut without = Vec::new();
    for i in 0..runs {
        for mirror in [true, false] {
            let spec = ImageSpec {
                repo: format!("p2p/miss-{i}-{mirror}"),
                tag: "v1".into(),
                layers: vec![256 << 10, 256 << 10],
                seed: 100 + i as u64,
                platforms: vec![],
            };
            let image = cluster.push(&spec)?;
            if mirror {
                if parked.exists() {
                    std::fs::rename(&parked, &hosts)?;
                }
            } else {
                std::fs::rename(&hosts, &parked)?;
            }
            let d = cluster.node(3).pull(&image.reference, false)?.duration;
            (if mirror { &mut with } else { &mut without }).push(ms(d));
        }
    }
    if parked.exists() {
        std::fs::rename(&parked, &hosts)?;
    }

    // Large image: from the registry (node 1) and from a peer (node 2, registry stopped).
    eprintln!("measuring {large_mib} MiB pulls from the registry and from a peer");
    let mut from_registry = Vec::new();
    let mut from_peer = Vec::new();
    for i in 0..runs.min(3) {
        cluster.upstream().resume()?;
        let image = cluster.push(&ImageSpec {
            repo: format!("p2p/large-{i}"),
            tag: "v1".into(),
            layers: vec![large_mib << 20],
            seed: 500 + i as u64,
            platforms: vec![],
        })?;
        from_registry.push(ms(cluster.node(1).pull(&image.reference, false)?.duration));
        let probe = format!("/v2/{}/manifests/v1?ns={ns}", image.repo);
        crate::process::wait_for("advertisement", Duration::from_secs(30), || {
            cluster
                .get_from(2, &node2, &probe, &[])
                .is_ok_and(|r| r.status == 200)
        })?;
        cluster.upstream().pause();
        from_peer.push(ms(cluster.node(2).pull(&image.reference, false)?.duration));
    }
    for k in 1..=3 {
        cluster.stop_daemon(k);
    }
    Ok(Report {
        hit_head_ms,
        local_head_ms,
        miss_head_ms,
        miss_pull_with_mirror_ms: with,
        miss_pull_without_mirror_ms: without,
        large_from_registry_ms: from_registry,
        large_from_peer_ms: from_peer,
        large_mib,
    })
}

/// Markdown summary of a report.
pub fn table(r: &Report) -> String {
    let p = |v: &[f64], q: f64| stats::percentile(v, q);
    let mut out = String::from("| measure | p50 (ms) | p99 (ms) | n |\n|---|---|---|---|\n");
    for (name, v) in [
        ("HEAD blob, local content (no lookup)", &r.local_head_ms),
        ("HEAD blob via mirror, hit (lookup + peer)", &r.hit_head_ms),
        (
            "HEAD blob via mirror, miss (lookup says none)",
            &r.miss_head_ms,
        ),
        (
            "pull, image no peer has, mirror configured",
            &r.miss_pull_with_mirror_ms,
        ),
        (
            "pull, image no peer has, no mirror",
            &r.miss_pull_without_mirror_ms,
        ),
        (
            "pull large image from the registry",
            &r.large_from_registry_ms,
        ),
        (
            "pull large image from a peer (registry down)",
            &r.large_from_peer_ms,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {:.2} | {:.2} | {} |\n",
            p(v, 50.0),
            p(v, 99.0),
            v.len()
        ));
    }
    let penalty = p(&r.miss_pull_with_mirror_ms, 50.0) - p(&r.miss_pull_without_mirror_ms, 50.0);
    let lookup = p(&r.hit_head_ms, 50.0) - p(&r.local_head_ms, 50.0);
    out.push_str(&format!(
        "\nMiss penalty (median pull with mirror − without): {penalty:.1} ms. Hit overhead over local (lookup + peer round trip): {lookup:.2} ms at p50. Large ({} MiB) pull, peer vs registry: {:.2}×.\n",
        r.large_mib,
        p(&r.large_from_peer_ms, 50.0) / p(&r.large_from_registry_ms, 50.0).max(1e-9)
    ));
    out
}
