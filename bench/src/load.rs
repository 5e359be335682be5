//! Load on the testbed: hundreds of concurrent blob GETs, at once, against the three ways a
//! daemon serves a blob: from containerd's content directory (sendfile), forwarded from a peer,
//! and through containerd's content API. Some clients read slowly. Every body is checked
//! against its digest, and each daemon's resident memory, open files and threads are sampled
//! from `/proc` while the load runs.
//!
//! Node 1 holds the image and serves from its content directory; node 2 holds nothing and
//! forwards to the holders; node 3 holds the image but is given no usable content directory,
//! so it streams through the content API. The clients run in a namespace of their own.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    cluster::{Cluster, REGISTRY_PORT},
    images::{BlobKind, ImageSpec, in_netns},
    process::wait_for,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Concurrent clients of the local, the forwarding and the content-API node.
    pub clients: [usize; 3],
    /// Layer size in MiB.
    pub size_mib: u64,
    /// Every `slow_every`-th client reads slowly (64 KiB, then a 20 ms pause); 0: none.
    pub slow_every: usize,
    /// Working directory (testbed files).
    pub work: PathBuf,
    /// The daemon binary.
    pub bin: PathBuf,
}

/// Process figures from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcSample {
    /// Resident set, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set since start, KiB (`VmHWM`).
    pub hwm_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// Reads `pid`'s resident memory, peak, open files and threads.
pub fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| crate::process::status_field(&status, name);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64;
    Ok(ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds,
        threads: field("Threads:"),
    })
}

/// One daemon under load.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeReport {
    /// How it serves: `local`, `forwarded` or `content-api`.
    pub role: String,
    /// Clients that asked it.
    pub clients: usize,
    /// Bodies that arrived whole and matched the digest.
    pub exact: usize,
    /// 503 answers (the content-API stream cap) that the client retried.
    pub busy_retries: usize,
    /// 404s: the daemon found no peer that answered in time and sent the client upstream (the
    /// mirror's fallback, never a broken pull; only a forwarding daemon may answer it).
    pub fell_back: usize,
    /// Before the load.
    pub before: ProcSample,
    /// Largest values seen during the load (`hwm_kib` is the kernel's own peak).
    pub peak: ProcSample,
    /// After the load, once the clients are gone.
    pub after: ProcSample,
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Concurrent clients.
    pub clients: usize,
    /// Layer size, bytes.
    pub size: u64,
    /// Wall time of the load, seconds.
    pub seconds: f64,
    /// One entry per daemon: local, forwarded, content-api.
    pub nodes: Vec<NodeReport>,
    /// Requests that failed, with why (empty when all were byte-exact).
    pub failures: Vec<String>,
}

impl Report {
    /// A Markdown table of the figures.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "{} concurrent GETs of a {} MiB layer, {:.1} s, {} failed\n\n\
             | daemon | clients | byte-exact | sent upstream (404) | 503 retried | RSS before | peak RSS | RSS after | fds before | peak fds | fds after | peak threads |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.clients,
            self.size >> 20,
            self.seconds,
            self.failures.len()
        );
        for n in &self.nodes {
            out += &format!(
                "| {} | {} | {} | {} | {} | {} MiB | {} MiB | {} MiB | {} | {} | {} | {} |\n",
                n.role,
                n.clients,
                n.exact,
                n.fell_back,
                n.busy_retries,
                n.before.rss_kib >> 10,
                n.peak.hwm_kib.max(n.peak.rss_kib) >> 10,
                n.after.rss_kib >> 10,
                n.before.fds,
                n.peak.fds,
                n.after.fds,
                n.peak.threads
            );
        }
        out
    }
}

/// How one client's request ended.
enum Fetched {
    Exact { busy_retries: usize },
    FellBack,
    Failed(String),
}

/// GETs `target` from `addr` and checks the body against `digest`; a 503 is retried after a
/// pause, at most 60 times.
async fn fetch(addr: std::net::SocketAddr, target: &str, digest: &str, slow: bool) -> Fetched {
    let mut busy_retries = 0;
    for _ in 0..60 {
        match fetch_once(addr, target, digest, slow).await {
            Ok(Attempt::Exact) => return Fetched::Exact { busy_retries },
            Ok(Attempt::NotFound) => return Fetched::FellBack,
            Ok(Attempt::Busy) => {
                busy_retries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Fetched::Failed(format!("{addr}{target}: {e:#}")),
        }
    }
    Fetched::Failed(format!("{addr}{target}: still 503 after 60 tries"))
}

/// How one attempt ended, when it did not fail.
enum Attempt {
    /// A whole body with the right digest.
    Exact,
    /// 503: retry later.
    Busy,
    /// 404: the client would go upstream.
    NotFound,
}

/// One attempt: an error for anything but a 503, a 404 or a whole body with the right digest.
async fn fetch_once(
    addr: std::net::SocketAddr,
    target: &str,
    digest: &str,
    slow: bool,
) -> anyhow::Result<Attempt> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    let (status, length, rest) = loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("closed before the response head ended");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(pos) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..pos]).to_ascii_lowercase();
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: Option<u64> = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok());
            break (status, length, head[pos + 4..].to_vec());
        }
        if head.len() > 64 << 10 {
            bail!("response head over 64 KiB");
        }
    };
    match status {
        503 => return Ok(Attempt::Busy),
        404 => return Ok(Attempt::NotFound),
        _ => {}
    }
    if status != 200 {
        bail!("status {status}");
    }
    let length = length.context("no Content-Length")?;
    let mut hasher = sha2::Sha256::new();
    hasher.update(&rest);
    let mut got = rest.len() as u64;
    while got < length {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("body ended at {got} of {length} bytes");
        }
        hasher.update(&buf[..n]);
        got += n as u64;
        if slow {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if got != length {
        bail!("{got} bytes for a Content-Length of {length}");
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != digest {
        bail!("body hashes to {actual}");
    }
    Ok(Attempt::Exact)
}

/// Runs the load once and reports; the testbed is removed afterwards.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    if cfg.clients.iter().sum::<usize>() == 0 {
        bail!("no clients");
    }
    let mut cluster = Cluster::start(3, &cfg.work)?.with_binary(cfg.bin.clone());
    let image = cluster.push(&ImageSpec {
        repo: "load/layer".into(),
        tag: "v1".into(),
        layers: vec![cfg.size_mib << 20],
        seed: 4242,
        platforms: vec![],
    })?;
    let layer = image
        .of_kind(BlobKind::Layer)
        .next()
        .context("pushed image has no layer")?
        .clone();
    cluster.node(1).pull(&image.reference, false)?;
    cluster.node(3).pull(&image.reference, false)?;
    // Clients open hundreds of connections from one address: the per-address cap is raised so
    // that it is the serving paths that are under test, not the cap.
    let limits = [
        "--max-connections-per-ip=2048".to_string(),
        "--max-connections=4096".to_string(),
    ];
    for k in 1..=2 {
        let mut args = cluster.registry_args(k);
        args.extend(limits.iter().cloned());
        cluster.start_daemon_with(k, &args)?;
    }
    let mut args: Vec<String> = cluster
        .registry_args(3)
        .into_iter()
        .map(|a| {
            if a.starts_with("--containerd-content-path=") {
                "--containerd-content-path=/nonexistent/content".to_string()
            } else {
                a
            }
        })
        .collect();
    args.extend(limits.iter().cloned());
    cluster.start_daemon_with(3, &args)?;
    for k in 1..=3 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    let ns = cluster.upstream_host().replace(':', "%3A");
    let target = format!("/v2/{}/blobs/{}?ns={ns}", image.repo, layer.digest);
    let addrs: Vec<std::net::SocketAddr> = (1..=3)
        .map(|k| format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(k)).parse())
        .collect::<Result<_, _>>()?;
    // Node 2 forwards only once it has learnt a provider.
    let node2 = addrs[1].to_string();
    wait_for(
        "node 2 forwarding the layer",
        Duration::from_secs(60),
        || {
            cluster
                .get_from(2, &node2, &target, &[])
                .is_ok_and(|r| r.status == 200 && r.sha256 == layer.digest)
        },
    )?;
    let pids = cluster.daemon_pids()?;
    let before: Vec<ProcSample> = pids
        .iter()
        .map(|p| proc_sample(*p))
        .collect::<anyhow::Result<_>>()?;

    let client_ns = cluster.add_host("load", "10.99.0.200")?;
    let counts = cfg.clients;

    // Samples every daemon every 50 ms until the clients are done (at most 10 minutes).
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let pids = pids.clone();
        std::thread::spawn(move || {
            let mut peak = vec![ProcSample::default(); pids.len()];
            let until = Instant::now() + Duration::from_secs(600);
            while !done.load(Ordering::Relaxed) && Instant::now() < until {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    if let Ok(s) = proc_sample(*pid) {
                        p.rss_kib = p.rss_kib.max(s.rss_kib);
                        p.hwm_kib = p.hwm_kib.max(s.hwm_kib);
                        p.fds = p.fds.max(s.fds);
                        p.threads = p.threads.max(s.threads);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let started = Instant::now();
    let slow_every = cfg.slow_every;
    let digest = layer.digest.clone();
    let results = in_netns(&client_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut tasks = Vec::new();
            let mut i = 0usize;
            for (node, (&count, &addr)) in counts.iter().zip(addrs.iter()).enumerate() {
                for _ in 0..count {
                    let slow = slow_every > 0 && i.is_multiple_of(slow_every);
                    i += 1;
                    let (target, digest) = (target.clone(), digest.clone());
                    tasks.push(tokio::spawn(async move {
                        let out = tokio::time::timeout(
                            Duration::from_secs(300),
                            fetch(addr, &target, &digest, slow),
                        )
                        .await
                        .unwrap_or_else(|_| Fetched::Failed(format!("{addr}: over 300 s")));
                        (node, out)
                    }));
                }
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await?);
            }
            anyhow::Ok(out)
        })
    });
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let peak = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler thread panicked"))?;
    let results = results?;
    // Connections close as the clients finish; give the daemons a moment to drop them.
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<ProcSample> = pids
        .iter()
        .map(|p| proc_sample(*p))
        .collect::<anyhow::Result<_>>()?;

    let roles = ["local", "forwarded", "content-api"];
    let mut nodes: Vec<NodeReport> = (0..3)
        .map(|k| NodeReport {
            role: roles[k].into(),
            clients: counts[k],
            exact: 0,
            busy_retries: 0,
            fell_back: 0,
            before: before[k],
            peak: peak[k],
            after: after[k],
        })
        .collect();
    let mut failures = Vec::new();
    for (node, out) in results {
        match out {
            Fetched::Exact { busy_retries } => {
                nodes[node].exact += 1;
                nodes[node].busy_retries += busy_retries;
            }
            Fetched::FellBack => nodes[node].fell_back += 1,
            Fetched::Failed(why) => failures.push(why),
        }
    }
    for k in 1..=3 {
        cluster.stop_daemon(k);
    }
    Ok(Report {
        clients: cfg.clients.iter().sum(),
        size: layer.size,
        seconds,
        nodes,
        failures,
    })
}
