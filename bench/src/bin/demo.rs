//! `cargo xtask demo`: a 3-node cluster in network namespaces. Node 1 pulls an image from the
//! upstream registry, the upstream is stopped, and the other nodes pull the same image from
//! their peers through the mirror.

use std::time::Duration;

use anyhow::Context;
use bench::{
    cluster::{Cluster, METRICS_PORT},
    images::ImageSpec,
};
use clap::Parser;

#[derive(Parser)]
#[command(name = "demo", about = "spegel demo cluster")]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Layer sizes of the demo image in MiB.
    #[arg(long, value_delimiter = ',', default_value = "32,8,1")]
    layers_mib: Vec<u64>,
}

/// Registry requests answered with 200/206 by node `k`'s daemon so far.
fn served_requests(cluster: &Cluster, k: usize) -> f64 {
    let addr = format!("{}:{METRICS_PORT}", cluster.network().node_ip(k));
    let addr: std::net::SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => return 0.0,
    };
    let body = bench::images::in_netns(&cluster.network().node(k), move || {
        bench::http::get(addr, "/metrics", &[])
    })
    .map(|r| String::from_utf8_lossy(&r.body).into_owned())
    .unwrap_or_default();
    body.lines()
        .filter(|l| {
            l.starts_with("http_request_duration_seconds_count") && l.contains(r#"handler="/v2/*""#)
        })
        .filter(|l| l.contains(r#"code="200""#) || l.contains(r#"code="206""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nodes = args.nodes.max(2);
    let dir = tempfile::tempdir()?;
    eprintln!(
        "starting {nodes} nodes (containerd each) and an upstream registry in network namespaces"
    );
    let mut cluster = Cluster::start(nodes, dir.path())?;
    let image = cluster.push(&ImageSpec {
        repo: "demo/app".into(),
        tag: "v1".into(),
        layers: args.layers_mib.iter().map(|m| m << 20).collect(),
        seed: 2026,
        platforms: vec![],
    })?;
    eprintln!(
        "pushed {} ({} MiB)",
        image.reference,
        image.total_size() >> 20
    );
    for k in 1..=nodes {
        cluster.start_daemon(k)?;
    }
    for k in 1..=nodes {
        if let Err(e) = cluster.wait_ready(k, Duration::from_secs(60)) {
            eprintln!("warning: {e}");
        }
    }
    let mut rows = Vec::new();
    let t = cluster
        .node(1)
        .pull(&image.reference, false)
        .context("pull on node 1")?;
    rows.push((1, "upstream".to_string(), t.duration));

    // Wait until node 2 can see node 1's advertisement before taking the upstream away.
    let probe = format!(
        "/v2/{}/manifests/{}?ns={}",
        image.repo,
        image.tag,
        cluster.upstream_host().replace(':', "%3A")
    );
    let addr2 = format!("{}:5000", cluster.network().node_ip(2));
    bench::process::wait_for(
        "node 2 to find the image on a peer",
        Duration::from_secs(30),
        || {
            cluster
                .get_from(2, &addr2, &probe, &[])
                .is_ok_and(|r| r.status == 200)
        },
    )?;
    eprintln!("stopping the upstream registry");
    cluster.upstream().pause();

    for k in 2..=nodes {
        let before: Vec<f64> = (1..=nodes).map(|j| served_requests(&cluster, j)).collect();
        let pull = cluster
            .node(k)
            .pull(&image.reference, false)
            .with_context(|| format!("pull on node {k}"))?;
        let after: Vec<f64> = (1..=nodes).map(|j| served_requests(&cluster, j)).collect();
        let peers: Vec<String> = (1..=nodes)
            .filter(|&j| j != k && after[j - 1] > before[j - 1])
            .map(|j| format!("node {j}"))
            .collect();
        let by = if peers.is_empty() {
            "peer".to_string()
        } else {
            format!("peer ({})", peers.join(", "))
        };
        rows.push((k, by, pull.duration));
    }

    println!("\n| node | image | served by | pull time |\n|---|---|---|---|");
    for (k, by, d) in &rows {
        println!(
            "| {k} | {} | {by} | {:.0} ms |",
            image.reference,
            d.as_secs_f64() * 1000.0
        );
    }
    println!("\nupstream was stopped after node 1's pull: every later pull came from peers.");
    for k in 1..=nodes {
        let status = cluster.stop_daemon(k);
        eprintln!("node {k}: daemon exited with {status:?}");
    }
    Ok(())
}
