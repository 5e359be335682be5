//! `cargo xtask demo`: a 3-node cluster in network namespaces. Node 1 pulls an image from the
//! upstream registry (whose link is shaped, like a registry across the internet), the upstream
//! is stopped, and the other nodes pull the same image from their peers through the mirror.
//! With `--keep` the cluster stays up and node 2's UI is forwarded to loopback.

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
    /// Sending rate of the upstream registry's link (`tc tbf` rate), so pulls from peers are
    /// visibly faster than from upstream; `none` leaves it unshaped.
    #[arg(long, default_value = "100mbit")]
    upstream_rate: String,
    /// Keep the cluster up after the pulls, with node 2's UI on 127.0.0.1, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Loopback port of the UI forward (0 picks a free port).
    #[arg(long, default_value_t = 9090)]
    ui_port: u16,
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
    if args.upstream_rate != "none" {
        cluster.shape_upstream(&args.upstream_rate)?;
        eprintln!("upstream link shaped to {}", args.upstream_rate);
    }
    for k in 1..=nodes {
        let mut daemon_args = cluster.registry_args(k);
        daemon_args.push("--visualize-enabled".into());
        cluster.start_daemon_with(k, &daemon_args)?;
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
    if args.keep {
        keep(&cluster, args.ui_port)?;
    }
    for k in 1..=nodes {
        let status = cluster.stop_daemon(k);
        eprintln!("node {k}: daemon exited with {status:?}");
    }
    Ok(())
}

/// Forwards node 2's metrics port to loopback, prints the UI's URLs and waits for Ctrl-C.
fn keep(cluster: &Cluster, port: u16) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    // Blocked before the forward's threads start (they inherit the mask), so SIGINT/SIGTERM
    // reach only the sigwait below and the cluster is torn down by its drops.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    // Connections are made from inside node 2's namespace, to its own loopback.
    let target: std::net::SocketAddr = format!("127.0.0.1:{METRICS_PORT}").parse()?;
    let forward = bench::forward::PortForward::start(&cluster.network().node(2), target, port)
        .or_else(|_| bench::forward::PortForward::start(&cluster.network().node(2), target, 0))?;
    let addr = forward.local_addr();
    println!("\nthe cluster stays up; node 2's UI (like `kubectl port-forward` to :9090):");
    println!("  http://{addr}/visualize");
    println!("  http://{addr}/debug/web/");
    println!("pull again on a node to watch it live, e.g.:");
    println!(
        "  ip netns exec {} ctr -a {} -n k8s.io images pull --plain-http --hosts-dir {} <image>",
        cluster.network().node(2),
        cluster.node(2).socket().display(),
        cluster.node(2).certs_d().display()
    );
    println!("press Ctrl-C to stop");
    let signal = signals.wait()?;
    eprintln!("got {signal:?}, stopping the cluster");
    drop(forward);
    Ok(())
}
