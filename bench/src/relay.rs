//! CPU cost of verifying forwarded blobs (`bench relay`). On a 2-node testbed node 1 holds one
//! large layer and node 2 relays it from node 1 through its mirror. A whole-blob GET is hashed
//! on the relay path (sha256 while streaming, last bytes held back until it matches); a GET of
//! `Range: bytes=1-` takes the same path (same peer, same body relay, one byte less) but cannot
//! be verified, so it is not hashed. The relaying daemon's CPU (`utime + stime` of node 2's
//! process around each transfer) for both, alternating, same run, gives the hashing cost per
//! GiB as the difference of the medians. The serving daemon's CPU is reported as a control.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    cluster::{Cluster, REGISTRY_PORT},
    images::{BlobKind, ImageSpec},
    serve::cpu_seconds,
    stats,
};

/// One transfer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Transfer {
    /// Whether the relay hashed it (whole blob) or not (`bytes=1-`).
    pub verified: bool,
    /// Body bytes received.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// CPU seconds of the relaying daemon (node 2).
    pub relay_cpu_seconds: f64,
    /// CPU seconds of the serving daemon (node 1).
    pub server_cpu_seconds: f64,
}

/// Medians of one kind of transfer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Whether these transfers were hashed.
    pub verified: bool,
    /// Median relay CPU seconds per GiB.
    pub relay_cpu_s_per_gib: f64,
    /// Median serving-daemon CPU seconds per GiB.
    pub server_cpu_s_per_gib: f64,
    /// Median throughput, GiB/s.
    pub gib_per_s: f64,
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Layer size, bytes.
    pub size: u64,
    /// Every transfer, in order.
    pub transfers: Vec<Transfer>,
    /// Verified, then unverified.
    pub summaries: Vec<Summary>,
    /// Median verified minus median unverified relay CPU, seconds per GiB.
    pub hashing_cpu_s_per_gib: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

fn summary(transfers: &[Transfer], verified: bool) -> Summary {
    let of: Vec<&Transfer> = transfers
        .iter()
        .filter(|t| t.verified == verified)
        .collect();
    let per_gib = |f: &dyn Fn(&Transfer) -> f64| {
        stats::median(
            &of.iter()
                .map(|t| f(t) / (t.bytes as f64 / GIB))
                .collect::<Vec<_>>(),
        )
    };
    Summary {
        verified,
        relay_cpu_s_per_gib: per_gib(&|t| t.relay_cpu_seconds),
        server_cpu_s_per_gib: per_gib(&|t| t.server_cpu_seconds),
        gib_per_s: stats::median(
            &of.iter()
                .map(|t| t.bytes as f64 / GIB / t.seconds)
                .collect::<Vec<_>>(),
        ),
    }
}

/// Runs `runs` pairs of transfers of one `size_mib` layer relayed by node 2 from node 1.
pub fn run(work: &Path, runs: usize, size_mib: u64) -> anyhow::Result<Report> {
    let mut cluster = Cluster::start(2, work)?;
    let image = cluster.push(&ImageSpec {
        repo: "relay/large".into(),
        tag: "v1".into(),
        layers: vec![size_mib << 20],
        seed: 31,
        platforms: vec![],
    })?;
    let layer = image
        .of_kind(BlobKind::Layer)
        .next()
        .context("layer")?
        .clone();
    for k in 1..=2 {
        cluster.start_daemon(k)?;
    }
    for k in 1..=2 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    cluster.node(1).pull(&image.reference, false)?;
    let ns = cluster.upstream_host().replace(':', "%3A");
    let target = format!("/v2/{}/blobs/{}?ns={ns}", image.repo, layer.digest);
    let node2: SocketAddr = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(2)).parse()?;
    let pid = |k: usize, c: &mut Cluster| {
        c.daemon(k)
            .and_then(|d| d.process.pid())
            .with_context(|| format!("node {k} daemon pid"))
    };
    let (relay_pid, server_pid) = (pid(2, &mut cluster)?, pid(1, &mut cluster)?);
    let head_target = target.clone();
    crate::process::wait_for("advertisement", Duration::from_secs(30), || {
        let t = head_target.clone();
        crate::images::in_netns(&cluster.network().node(2), move || {
            crate::http::request(node2, "HEAD", &t, &[], false)
        })
        .is_ok_and(|r| r.status == 200)
    })?;
    let netns = cluster.network().node(2);
    let mut transfers = Vec::new();
    // One warm-up pair (page cache, connections), then alternating pairs.
    for i in 0..=runs {
        for verified in [true, false] {
            let range = (!verified).then_some("bytes=1-");
            let t = target.clone();
            let cpu0 = (cpu_seconds(&[relay_pid]), cpu_seconds(&[server_pid]));
            let started = Instant::now();
            let bytes =
                crate::images::in_netns(&netns, move || crate::serve::fetch(node2, &t, range))?;
            let seconds = started.elapsed().as_secs_f64();
            let cpu1 = (cpu_seconds(&[relay_pid]), cpu_seconds(&[server_pid]));
            let expected = if verified { layer.size } else { layer.size - 1 };
            anyhow::ensure!(bytes == expected, "got {bytes} bytes, expected {expected}");
            if i == 0 {
                continue;
            }
            eprintln!(
                "run {i} verified={verified}: {:.2} GiB/s, relay cpu {:.3} s",
                bytes as f64 / GIB / seconds,
                cpu1.0 - cpu0.0
            );
            transfers.push(Transfer {
                verified,
                bytes,
                seconds,
                relay_cpu_seconds: cpu1.0 - cpu0.0,
                server_cpu_seconds: cpu1.1 - cpu0.1,
            });
        }
    }
    let summaries = vec![summary(&transfers, true), summary(&transfers, false)];
    let hashing = summaries[0].relay_cpu_s_per_gib - summaries[1].relay_cpu_s_per_gib;
    Ok(Report {
        size: layer.size,
        transfers,
        summaries,
        hashing_cpu_s_per_gib: hashing,
    })
}

/// The report as a Markdown table.
pub fn table(r: &Report) -> String {
    let mut out = String::from(
        "| forwarded GET | relay CPU s per GiB (median) | serving daemon CPU s per GiB (median) | throughput GiB/s (median) |\n|---|---|---|---|\n",
    );
    for s in &r.summaries {
        out.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.2} |\n",
            if s.verified {
                "whole blob, sha256 verified"
            } else {
                "`bytes=1-`, not verified"
            },
            s.relay_cpu_s_per_gib,
            s.server_cpu_s_per_gib,
            s.gib_per_s
        ));
    }
    out.push_str(&format!(
        "\nHashing on the relay path: {:.3} CPU s per GiB (difference of the medians, {} transfers of {} MiB each way).\n",
        r.hashing_cpu_s_per_gib,
        r.transfers.len() / 2,
        r.size >> 20
    ));
    out
}
