//! `bench peers`: peer choice on links that differ. Node 1 sends through a `tc tbf` throttle,
//! node 2 is a delayed link away, the other providers are plain veths; the last node pulls one
//! large single-layer image again and again (removed in between), under each
//! `--peer-selection` policy in the same run. Bytes per provider come from the providers'
//! `eth0` counters.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    cluster::Cluster,
    containerd::Containerd,
    delay::LinkSpec,
    images::{BlobKind, ImageSpec, PushedImage},
    netns::tx_bytes,
    process::wait_for,
    stats,
};

/// The policies compared, in report order.
pub const SELECTIONS: [&str; 3] = ["telemetry", "latency", "least-used"];

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Nodes (at least 5): providers 1..n-1, the puller n.
    pub nodes: usize,
    /// Layer size in MiB.
    pub size_mib: u64,
    /// Pulls per policy per run (the puller's daemon restarts fresh before each policy).
    pub pulls: usize,
    /// Rounds over every policy.
    pub runs: usize,
    /// Sending rate of the throttled provider (node 1), e.g. `50mbit`.
    pub rate: String,
    /// Round-trip time added on node 2's link.
    pub delay: Duration,
    /// Extra daemon arguments for every node (e.g. `--ebpf=off`).
    pub extra: Vec<String>,
    /// Working directory.
    pub work: PathBuf,
}

/// One pull.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// `--peer-selection` of the puller.
    pub selection: String,
    /// Round.
    pub run: usize,
    /// Pull within the round.
    pub pull: usize,
    /// Wall time of `ctr images pull`, seconds.
    pub seconds: f64,
    /// Bytes each provider sent during the pull (node 1 first).
    pub bytes: Vec<u64>,
}

/// Medians for one policy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// `--peer-selection`.
    pub selection: String,
    /// Median pull time, seconds.
    pub median_pull_s: f64,
    /// 90th percentile pull time, seconds.
    pub p90_pull_s: f64,
    /// Mean MiB per pull from each provider (node 1 first).
    pub mib_per_pull: Vec<f64>,
    /// Percent of all provider bytes from the throttled node 1.
    pub throttled_pct: f64,
    /// Percent of all provider bytes from the distant node 2.
    pub distant_pct: f64,
}

/// Everything measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Nodes.
    pub nodes: usize,
    /// Layer size, MiB.
    pub size_mib: u64,
    /// Throttled rate of node 1.
    pub rate: String,
    /// Added RTT of node 2, ms.
    pub delay_ms: u64,
    /// Extra daemon arguments.
    pub extra: Vec<String>,
    /// Every pull.
    pub samples: Vec<Sample>,
    /// Per policy.
    pub summaries: Vec<Summary>,
}

/// Removes `image`, its snapshots and blobs from `node`, so the next pull fetches every byte
/// again (an unpacked snapshot alone lets containerd skip fetching its layer).
pub fn forget_image(node: &Containerd, image: &PushedImage) -> anyhow::Result<()> {
    node.remove_image(&image.reference)?;
    let snapshots = node.ctr(&["snapshots", "ls"]).unwrap_or_default();
    let mut keys: Vec<&str> = snapshots
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // Children before parents.
    keys.reverse();
    for key in keys {
        let _ = node.ctr(&["snapshots", "rm", key]);
    }
    for blob in &image.blobs {
        let _ = node.remove_content(&blob.digest);
    }
    wait_for(
        "the image's blobs are gone",
        Duration::from_secs(10),
        || {
            image
                .blobs
                .iter()
                .all(|b| node.blob_size(&b.digest).is_none())
        },
    )
}

/// The text of node `k`'s `/metrics` (asked from inside its namespace), empty on error.
pub fn metrics_text(cluster: &Cluster, k: usize) -> String {
    cluster.metrics_text(k, k)
}

/// Sum of the samples of every series whose line starts with `prefix`.
pub fn metric(cluster: &Cluster, k: usize, prefix: &str) -> f64 {
    cluster.metric(k, k, prefix)
}

/// Waits until node `k`'s daemon exports an RTT for each of `nodes`.
pub fn wait_for_rtts(cluster: &Cluster, k: usize, nodes: &[usize]) -> anyhow::Result<()> {
    let series: Vec<String> = nodes
        .iter()
        .map(|&n| {
            format!(
                "spegel_peer_rtt_seconds{{peer=\"{}\"}}",
                cluster.network().node_ip(n)
            )
        })
        .collect();
    wait_for(
        &format!("node {k} knows the RTT of nodes {nodes:?}"),
        Duration::from_secs(60),
        || {
            let text = metrics_text(cluster, k);
            series.iter().all(|s| text.contains(s.as_str()))
        },
    )
    .map_err(|e| {
        // What the daemon did know, and what it logged, to tell a missing probe from a
        // missing peer.
        let text = metrics_text(cluster, k);
        let known: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("spegel_peer_rtt") || l.starts_with("spegel_ebpf"))
            .collect();
        let log = std::fs::read_to_string(cluster.daemon_log(k)).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        e.context(format!(
            "metrics: {known:?}\nlog tail:\n{}",
            tail.join("\n")
        ))
    })
}

/// Pulls `image` on node `puller`, returns the wall time and what each provider sent, then
/// forgets the image again.
pub fn measured_pull(
    cluster: &Cluster,
    puller: usize,
    providers: &[usize],
    image: &PushedImage,
) -> anyhow::Result<(Duration, Vec<u64>)> {
    let ns: Vec<String> = providers
        .iter()
        .map(|&k| cluster.network().node(k))
        .collect();
    let before = ns
        .iter()
        .map(|n| tx_bytes(n))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let t0 = Instant::now();
    cluster.node(puller).pull(&image.reference, false)?;
    let took = t0.elapsed();
    let sent = ns
        .iter()
        .zip(before)
        .map(|(n, b)| Ok(tx_bytes(n)?.saturating_sub(b)))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    forget_image(cluster.node(puller), image)?;
    Ok((took, sent))
}

/// Runs the benchmark.
pub fn run(config: &Config) -> anyhow::Result<Report> {
    if config.nodes < 5 {
        bail!("bench peers needs at least 5 nodes (4 providers and a puller)");
    }
    let n = config.nodes;
    let puller = n;
    let providers: Vec<usize> = (1..n).collect();
    let mut cluster = Cluster::start_with(n, &config.work, &[LinkSpec::delayed(2, config.delay)])?;
    let image = cluster.push(&ImageSpec {
        repo: "bench/peers".into(),
        tag: "v1".into(),
        layers: vec![config.size_mib << 20],
        seed: 9,
        platforms: vec![],
    })?;
    if image.of_kind(BlobKind::Layer).count() != 1 {
        bail!("expected one layer");
    }
    eprintln!("providers pull the image from the upstream");
    for &k in &providers {
        cluster.node(k).pull(&image.reference, false)?;
    }
    let args = |cluster: &Cluster, k: usize, selection: Option<&str>| {
        let mut a = cluster.registry_args(k);
        a.extend(config.extra.iter().cloned());
        if let Some(s) = selection {
            a.push(format!("--peer-selection={s}"));
        }
        a
    };
    for &k in &providers {
        let a = args(&cluster, k, None);
        cluster.start_daemon_with(k, &a)?;
    }
    for &k in &providers {
        cluster.wait_ready(k, Duration::from_secs(60))?;
        wait_for(
            &format!("node {k} advertises the image"),
            Duration::from_secs(30),
            || metric(&cluster, k, "spegel_advertised_content_digests") >= 3.0,
        )?;
    }
    cluster
        .network()
        .shape(&cluster.network().node(1), &config.rate)?;

    let mut samples = Vec::new();
    for run in 0..config.runs {
        for selection in SELECTIONS {
            // A fresh puller per policy: every policy starts without fetch history.
            cluster.stop_daemon(puller);
            let a = args(&cluster, puller, Some(selection));
            cluster.start_daemon_with(puller, &a)?;
            cluster.wait_ready(puller, Duration::from_secs(60))?;
            wait_for_rtts(&cluster, puller, &providers)?;
            for pull in 0..config.pulls {
                let (took, bytes) = measured_pull(&cluster, puller, &providers, &image)
                    .with_context(|| format!("{selection} run {run} pull {pull}"))?;
                let mib: Vec<String> = bytes
                    .iter()
                    .map(|b| format!("{:.0}", *b as f64 / (1u64 << 20) as f64))
                    .collect();
                eprintln!(
                    "run {}/{} {selection:>10} pull {}: {:6.2} s, MiB per provider [{}]",
                    run + 1,
                    config.runs,
                    pull + 1,
                    took.as_secs_f64(),
                    mib.join(", ")
                );
                samples.push(Sample {
                    selection: selection.into(),
                    run,
                    pull,
                    seconds: took.as_secs_f64(),
                    bytes,
                });
            }
        }
    }
    cluster.stop_daemon(puller);
    for &k in &providers {
        cluster.stop_daemon(k);
    }
    let summaries = SELECTIONS
        .iter()
        .map(|selection| summarize(selection, &samples, providers.len()))
        .collect();
    Ok(Report {
        nodes: n,
        size_mib: config.size_mib,
        rate: config.rate.clone(),
        delay_ms: config.delay.as_millis() as u64,
        extra: config.extra.clone(),
        samples,
        summaries,
    })
}

fn summarize(selection: &str, samples: &[Sample], providers: usize) -> Summary {
    let mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.selection == selection)
        .collect();
    let times: Vec<f64> = mine.iter().map(|s| s.seconds).collect();
    let mut totals = vec![0u64; providers];
    for s in &mine {
        for (t, b) in totals.iter_mut().zip(&s.bytes) {
            *t += b;
        }
    }
    let all: u64 = totals.iter().sum::<u64>().max(1);
    let pulls = mine.len().max(1) as f64;
    Summary {
        selection: selection.into(),
        median_pull_s: stats::median(&times),
        p90_pull_s: stats::percentile(&times, 90.0),
        mib_per_pull: totals
            .iter()
            .map(|t| *t as f64 / (1u64 << 20) as f64 / pulls)
            .collect(),
        throttled_pct: 100.0 * totals.first().copied().unwrap_or(0) as f64 / all as f64,
        distant_pct: 100.0 * totals.get(1).copied().unwrap_or(0) as f64 / all as f64,
    }
}

/// Markdown table of a report.
pub fn markdown(r: &Report) -> String {
    let providers = r.nodes - 1;
    let mut out = format!(
        "{} nodes: node 1 throttled to {}, node 2 {} ms RTT away, nodes 3–{providers} plain; node {} pulls a {} MiB single-layer image ({} pulls per policy){}\n\n",
        r.nodes,
        r.rate,
        r.delay_ms,
        r.nodes,
        r.size_mib,
        r.samples
            .iter()
            .filter(|s| s.selection == SELECTIONS[0])
            .count(),
        if r.extra.is_empty() {
            String::new()
        } else {
            format!(", daemons with `{}`", r.extra.join(" "))
        }
    );
    out.push_str("| `--peer-selection` | median pull (s) | p90 pull (s) | % bytes from throttled | % bytes from distant | MiB per pull by provider |\n");
    out.push_str("|---|---:|---:|---:|---:|---|\n");
    for s in &r.summaries {
        let per: Vec<String> = s.mib_per_pull.iter().map(|m| format!("{m:.0}")).collect();
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {} |\n",
            s.selection,
            s.median_pull_s,
            s.p90_pull_s,
            s.throttled_pct,
            s.distant_pct,
            per.join(" / ")
        ));
    }
    out
}

/// Writes `peers.json` and `peers.md` into `dir`.
pub fn write(r: &Report, dir: &Path) -> anyhow::Result<[PathBuf; 2]> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("peers.json");
    let md = dir.join("peers.md");
    std::fs::write(&json, serde_json::to_vec_pretty(r)?)?;
    std::fs::write(&md, markdown(r))?;
    Ok([json, md])
}
