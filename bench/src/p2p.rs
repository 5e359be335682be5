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
    /// Node 2's lookups during the hit HEADs, from `spegel_resolve_duration_seconds`: how many
    /// found their first provider within each bucket bound, as (bound in ms, count), cumulative.
    #[serde(default)]
    pub hit_resolve_buckets: Vec<(f64, u64)>,
    /// HEAD of a blob nobody has, asked of node 2's mirror (lookup until "no provider").
    pub miss_head_ms: Vec<f64>,
    /// Pulls of images no peer has, mirror configured.
    pub miss_pull_with_mirror_ms: Vec<f64>,
    /// Pulls of images no peer has, no mirror configured.
    pub miss_pull_without_mirror_ms: Vec<f64>,
    /// Pulls of images no peer has, with a mirror that answers every request 404 at once
    /// (containerd's own cost of trying a mirror and falling back: the floor of any mirror).
    #[serde(default)]
    pub miss_pull_instant_404_ms: Vec<f64>,
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
    let resolves_before = resolve_buckets(&cluster.metrics_text(2, 2));
    let hit_head_ms = head_times(&node2, &target, 200)?;
    let hit_resolve_buckets = bucket_delta(
        &resolve_buckets(&cluster.metrics_text(2, 2)),
        &resolves_before,
    );
    let local_head_ms = head_times(&node1, &target, 200)?;
    let missing = format!("/v2/p2p/none/blobs/sha256:{}?ns={ns}", "0".repeat(64));
    let miss_head_ms = head_times(&node2, &missing, 404)?;

    // Miss penalty: fresh images nobody has, pulled by node 3 with and without the mirror.
    eprintln!("measuring the miss penalty");
    let hosts = cluster.node(3).certs_d().join("_default/hosts.toml");
    let spegel_hosts = std::fs::read_to_string(&hosts).context("reading node 3's hosts.toml")?;
    let node3_ip = cluster.network().node_ip(3);
    let mirror_host = format!("'http://{node3_ip}:{REGISTRY_PORT}'");
    anyhow::ensure!(
        spegel_hosts.contains(&mirror_host),
        "node 3's hosts.toml has no {mirror_host}"
    );
    let not_found = NotFoundServer::start(&cluster.network().node(3), &node3_ip, NOT_FOUND_PORT)?;
    let instant_404_hosts = spegel_hosts.replace(
        &mirror_host,
        &format!("'http://{node3_ip}:{NOT_FOUND_PORT}'"),
    );
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut instant_404 = Vec::new();
    for i in 0..runs {
        for (j, setup) in ["spegel", "none", "instant-404"].into_iter().enumerate() {
            // Content of its own for every pull: with one seed per run, the blobs the first
            // setup fetched were already in containerd's store for the others, which then
            // fetched nothing but the tag.
            let spec = ImageSpec {
                repo: format!("p2p/miss-{i}-{setup}"),
                tag: "v1".into(),
                layers: vec![256 << 10, 256 << 10],
                seed: 100 + (3 * i + j) as u64,
                platforms: vec![],
            };
            let image = cluster.push(&spec)?;
            match setup {
                "spegel" => std::fs::write(&hosts, &spegel_hosts)?,
                "instant-404" => std::fs::write(&hosts, &instant_404_hosts)?,
                _ => std::fs::remove_file(&hosts)?,
            }
            let d = ms(cluster.node(3).pull(&image.reference, false)?.duration);
            match setup {
                "spegel" => with.push(d),
                "instant-404" => instant_404.push(d),
                _ => without.push(d),
            }
        }
    }
    std::fs::write(&hosts, &spegel_hosts)?;
    // Every control pull asks the mirror for the tag, the manifest and each blob; fewer means
    // containerd had the content already and the pulls measured no download.
    let asked = not_found.requests();
    anyhow::ensure!(
        asked >= 4 * runs as u64,
        "containerd asked the 404 mirror {asked} times in {runs} pulls: the control pulls \
         fetched (almost) nothing"
    );
    drop(not_found);

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
        hit_resolve_buckets,
        local_head_ms,
        miss_head_ms,
        miss_pull_with_mirror_ms: with,
        miss_pull_without_mirror_ms: without,
        miss_pull_instant_404_ms: instant_404,
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
            "pull, image no peer has, mirror answering 404 at once (control)",
            &r.miss_pull_instant_404_ms,
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
    if let Some(&(_, total)) = r.hit_resolve_buckets.last() {
        let within = |ms: f64| {
            r.hit_resolve_buckets
                .iter()
                .find(|(le, _)| (*le - ms).abs() < 1e-9)
                .map_or(0, |(_, n)| *n)
        };
        let p99_bound = r
            .hit_resolve_buckets
            .iter()
            .find(|(_, n)| *n as f64 >= 0.99 * total as f64)
            .map_or(f64::INFINITY, |(le, _)| *le);
        out.push_str(&format!(
            "\nHit lookups (node 2, `spegel_resolve_duration_seconds`): {total}; within 1 ms: {}, within 2 ms: {}; p99 at most {p99_bound} ms.\n",
            within(1.0),
            within(2.0),
        ));
    }
    let penalty = p(&r.miss_pull_with_mirror_ms, 50.0) - p(&r.miss_pull_without_mirror_ms, 50.0);
    let floor = p(&r.miss_pull_instant_404_ms, 50.0) - p(&r.miss_pull_without_mirror_ms, 50.0);
    let lookup = p(&r.hit_head_ms, 50.0) - p(&r.local_head_ms, 50.0);
    out.push_str(&format!(
        "\nMiss penalty (median pull with mirror − without): {penalty:.1} ms, of which containerd's own fallback (mirror answering 404 at once − without): {floor:.1} ms, spegel's share: {:.1} ms. Hit overhead over local (lookup + peer round trip): {lookup:.2} ms at p50. Large ({} MiB) pull, peer vs registry: {:.2}×.\n",
        penalty - floor,
        r.large_mib,
        p(&r.large_from_peer_ms, 50.0) / p(&r.large_from_registry_ms, 50.0).max(1e-9)
    ));
    out
}

/// The cumulative buckets of `spegel_resolve_duration_seconds` in a metrics text, as (bound in
/// ms, count), ascending; `+Inf` last.
fn resolve_buckets(metrics: &str) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = metrics
        .lines()
        .filter(|l| l.starts_with("spegel_resolve_duration_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1000.0
            };
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `after − before`, bucket by bucket (a bucket missing before counts from zero).
fn bucket_delta(after: &[(f64, u64)], before: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b.total_cmp(&le).is_eq())
                .map_or(0, |(_, n)| *n);
            (le, n.saturating_sub(was))
        })
        .collect()
}

/// Port of the control mirror in node 3's namespace.
const NOT_FOUND_PORT: u16 = 5999;
/// Longest the control mirror runs (the benchmark stops it much earlier).
const NOT_FOUND_LIFETIME: Duration = Duration::from_secs(3600);

/// A mirror that answers every request `404` with an empty body at once, keeping the
/// connection alive: what containerd's fallback costs whatever the mirror does.
struct NotFoundServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl NotFoundServer {
    /// Listens on `ip:port` inside network namespace `netns`.
    fn start(netns: &str, ip: &str, port: u16) -> anyhow::Result<Self> {
        use std::sync::{Arc, atomic::AtomicBool, atomic::AtomicU64};
        let ip: std::net::IpAddr = ip.parse().with_context(|| format!("node address {ip}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        // A socket stays in the namespace it was created in, whichever thread accepts on it.
        let listener = crate::images::in_netns(netns, move || {
            let listener = std::net::TcpListener::bind((ip, port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .context("starting the control mirror")?;
        let (stop2, requests2) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < NOT_FOUND_LIFETIME
            {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (stop, requests) = (stop2.clone(), requests2.clone());
                        std::thread::spawn(move || serve_not_found(conn, &stop, &requests));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(NotFoundServer { stop, requests })
    }

    /// Requests answered so far.
    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for NotFoundServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Answers each request head on `conn` with an empty 404 until the client closes, `stop` is
/// set, or the connection idles for a minute.
fn serve_not_found(
    mut conn: std::net::TcpStream,
    stop: &std::sync::atomic::AtomicBool,
    requests: &std::sync::atomic::AtomicU64,
) {
    use std::io::{Read, Write};
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && buf.len() < 1 << 20 {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Requests without bodies (GET and HEAD): each ends at its blank line.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let answer = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n";
            if conn.write_all(answer).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_buckets_are_read_and_subtracted() {
        let before = "spegel_resolve_duration_seconds_bucket{router=\"libp2p\",le=\"0.001\"} 2\n\
                      spegel_resolve_duration_seconds_bucket{router=\"libp2p\",le=\"+Inf\"} 3\n";
        let after = "# HELP x\n\
                     spegel_resolve_duration_seconds_bucket{router=\"libp2p\",le=\"+Inf\"} 13\n\
                     spegel_resolve_duration_seconds_bucket{router=\"libp2p\",le=\"0.001\"} 11\n\
                     spegel_resolve_duration_seconds_sum{router=\"libp2p\"} 0.5\n";
        let delta = bucket_delta(&resolve_buckets(after), &resolve_buckets(before));
        assert_eq!(delta, vec![(1.0, 9), (f64::INFINITY, 10)]);
    }
}
