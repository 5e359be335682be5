//! `bench pull`: the original's cluster benchmark (§9) on the netns testbed. Every node pulls a
//! fresh image at once ("create") and then a second image in rolling batches ("update"), under
//! three setups: no mirror, spegel on every node, and one central pull-through cache. The
//! upstream's link is shaped with `tc` so it is the bottleneck, as a registry behind a WAN is.

pub mod report;

use std::{
    fmt,
    io::IsTerminal,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Barrier,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    cluster::Cluster,
    containerd::Containerd,
    images::{BlobKind, ImageSpec, PushedImage, layer_size},
    netns::{exec_ok, tx_bytes},
    process::{Process, command_in, require, wait_for},
    serve::cpu_seconds,
    stats,
};

/// Address of the central pull-through cache's namespace.
pub const CACHE_IP: &str = "10.99.0.253";

/// How nodes reach the upstream registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// No mirror: every node pulls from the upstream.
    Baseline,
    /// spegel on every node, configured as containerd's mirror.
    Spegel,
    /// One `docker-registry` in proxy mode, configured as every node's mirror.
    CentralCache,
}

impl Setup {
    /// Every setup, in report order.
    pub const ALL: [Setup; 3] = [Setup::Baseline, Setup::Spegel, Setup::CentralCache];

    /// The name used in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Setup::Baseline => "baseline",
            Setup::Spegel => "spegel",
            Setup::CentralCache => "central-cache",
        }
    }
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Setup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Setup::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("unknown setup {s:?} (baseline, spegel, central-cache)"))
    }
}

/// The original's two scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every node pulls a new image (v1) at the same moment.
    Create,
    /// Rolling update to v2: nodes pull in batches (maxUnavailable), batch after batch.
    Update,
}

impl Scenario {
    /// Both, in report order.
    pub const ALL: [Scenario; 2] = [Scenario::Create, Scenario::Update];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Create => "create",
            Scenario::Update => "update",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An image size as given on the command line, e.g. `100MB`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Size {
    /// The text given, e.g. `100MB`.
    pub label: String,
    /// Bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).
    pub bytes: u64,
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("size {s:?} must start with a number"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1_000,
            "mb" | "m" => 1_000_000,
            "gb" | "g" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            u => {
                return Err(format!(
                    "unknown unit {u:?} in {s:?} (B, KB, MB, GB, KiB, MiB, GiB)"
                ));
            }
        };
        let bytes = (value * mult as f64).round() as u64;
        if bytes == 0 {
            return Err(format!("size {s:?} is zero"));
        }
        Ok(Size {
            label: t.to_string(),
            bytes,
        })
    }
}

/// What to run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Number of nodes.
    pub nodes: usize,
    /// Total image sizes (before `scale`).
    pub sizes: Vec<Size>,
    /// Layer counts; every size is run with every count.
    pub layer_counts: Vec<usize>,
    /// Divisor applied to every size, for small machines.
    pub scale: u64,
    /// `tc` rate of the upstream's link (e.g. `200mbit`); `None` leaves it unshaped.
    pub rate: Option<String>,
    /// Repetitions of every case (each with its own images).
    pub repetitions: usize,
    /// Setups to compare.
    pub setups: Vec<Setup>,
    /// Share of nodes per update batch, percent (the DaemonSet's maxUnavailable).
    pub update_batch_percent: u32,
    /// Pause between update batches (a rolled pod becoming ready before the next batch).
    #[serde(with = "secs")]
    pub batch_gap: Duration,
    /// Timeout of one node's pull.
    #[serde(with = "secs")]
    pub pull_timeout: Duration,
    /// Working directory for the testbed (registry data, containerd roots).
    pub work: PathBuf,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One image shape: a size split into a number of equal layers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Case {
    /// `<size>-<layers>`, as the original names its images (e.g. `100MB-4`).
    pub label: String,
    /// Layer blob sizes in bytes, after scaling and the generator's rounding.
    pub layers: Vec<u64>,
}

impl Case {
    /// Sum of the layer sizes.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().sum()
    }
}

impl Config {
    /// Every size × layer count, sizes outermost.
    pub fn cases(&self) -> Vec<Case> {
        let scale = self.scale.max(1);
        let mut out = Vec::new();
        for size in &self.sizes {
            for &count in &self.layer_counts {
                let count = count.max(1);
                let per = (size.bytes / scale / count as u64).max(1);
                out.push(Case {
                    label: format!("{}-{count}", size.label),
                    layers: vec![layer_size(per); count],
                });
            }
        }
        out
    }

    /// Node numbers of each update batch: `ceil(percent × nodes)` nodes per batch, in order.
    pub fn update_batches(&self) -> Vec<Vec<usize>> {
        let per = (self.nodes * self.update_batch_percent.clamp(1, 100) as usize)
            .div_ceil(100)
            .max(1);
        (1..=self.nodes)
            .collect::<Vec<_>>()
            .chunks(per)
            .map(<[usize]>::to_vec)
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.nodes == 0 || self.nodes > 200 {
            bail!("between 1 and 200 nodes, not {}", self.nodes);
        }
        if self.sizes.is_empty() || self.layer_counts.is_empty() || self.setups.is_empty() {
            bail!("at least one size, one layer count and one setup are needed");
        }
        if self.repetitions == 0 {
            bail!("at least one repetition is needed");
        }
        Ok(())
    }
}

/// One node's pull in a scenario.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodePull {
    /// Node number (1-based).
    pub node: usize,
    /// Update batch (0 for create).
    pub batch: usize,
    /// When the pull started, seconds after the scenario started.
    pub start_s: f64,
    /// Wall time of `ctr images pull` (fetch and unpack), seconds.
    pub seconds: f64,
    /// Whether the pull succeeded.
    pub ok: bool,
    /// Digest containerd recorded for the image name afterwards.
    pub digest: Option<String>,
    /// The digest is the pushed one and every blob is in the content store at its size.
    pub digest_ok: bool,
    /// Why the pull or the check failed.
    pub error: Option<String>,
}

/// CPU and memory of one mirror process (a spegel daemon or the central cache).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessUsage {
    /// `spegel` or `central-cache`.
    pub role: String,
    /// Node it runs on (none for the cache).
    pub node: Option<usize>,
    /// Process ID.
    pub pid: u32,
    /// CPU seconds (user + system) spent during the scenario.
    pub cpu_seconds: f64,
    /// Peak resident memory since the process started (`VmHWM`), KiB.
    pub vm_hwm_kib: u64,
}

/// One scenario under one setup: every raw figure.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScenarioRun {
    /// Setup.
    pub setup: Setup,
    /// Scenario.
    pub scenario: Scenario,
    /// Case label.
    pub case: String,
    /// Repetition (0-based).
    pub rep: usize,
    /// Image reference pulled.
    pub reference: String,
    /// Digest the tag points at.
    pub digest: String,
    /// Bytes of all the image's blobs.
    pub image_bytes: u64,
    /// Every node's pull.
    pub pulls: Vec<NodePull>,
    /// From the first pull's start to the last pull's end (gaps between batches included).
    pub cluster_seconds: f64,
    /// Bytes the upstream namespace sent (its `eth0` tx counter, so TCP/IP overhead included).
    pub upstream_tx_bytes: u64,
    /// Bytes the central cache's namespace sent (0 without a cache).
    pub cache_tx_bytes: u64,
    /// Bytes all node namespaces sent together (peer serving, plus requests).
    pub nodes_tx_bytes: u64,
    /// Mirror processes' CPU and memory.
    pub processes: Vec<ProcessUsage>,
}

/// The machine the run happened on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Environment {
    /// CPUs available.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// containerd's version line.
    pub containerd: String,
    /// spegel binary used.
    pub spegel_bin: String,
    /// Unix time the run started.
    pub started_unix: u64,
    /// Wall time of the whole run, seconds.
    pub total_seconds: f64,
}

/// A pushed image as the report records it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// Case label.
    pub case: String,
    /// Repetition.
    pub rep: usize,
    /// `v1` (create) or `v2` (update).
    pub tag: String,
    /// Reference.
    pub reference: String,
    /// Digest of the manifest.
    pub digest: String,
    /// Bytes of all blobs.
    pub bytes: u64,
    /// Layer sizes.
    pub layers: Vec<u64>,
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The configuration, as run.
    pub config: serde_json::Value,
    /// Where it ran.
    pub environment: Environment,
    /// Images used.
    pub images: Vec<ImageRecord>,
    /// Every scenario run.
    pub runs: Vec<ScenarioRun>,
    /// Figures per setup, scenario and case.
    pub summary: Vec<report::Summary>,
}

/// A status line on stderr: rewritten in place on a terminal, one line per phase otherwise.
pub struct Progress {
    started: Instant,
    tty: bool,
    last: String,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A progress display starting now.
    pub fn new() -> Progress {
        Progress {
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }

    fn prefix(&self) -> String {
        let s = self.started.elapsed().as_secs();
        format!("[{:02}:{:02}]", s / 60, s % 60)
    }

    /// Shows a transient status (only on a terminal, or when it changes phase).
    pub fn status(&mut self, phase: &str, detail: &str) {
        if self.tty {
            eprint!("\r\x1b[K{} {phase} {detail}", self.prefix());
        } else if phase != self.last {
            eprintln!("{} {phase}", self.prefix());
        }
        self.last = phase.to_string();
    }

    /// Prints a line that stays.
    pub fn line(&mut self, text: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("{} {text}", self.prefix());
        self.last.clear();
    }
}

/// The mirror of one setup, kept running for the setup's scenarios.
enum Mirror {
    None,
    Spegel(Vec<(usize, u32)>),
    Cache { process: Process, ns: String },
}

impl Mirror {
    fn pids(&self) -> Vec<(String, Option<usize>, u32)> {
        match self {
            Mirror::None => Vec::new(),
            Mirror::Spegel(p) => p
                .iter()
                .map(|&(k, pid)| ("spegel".to_string(), Some(k), pid))
                .collect(),
            Mirror::Cache { process, .. } => process
                .pid()
                .map(|pid| ("central-cache".to_string(), None, real_pid(pid)))
                .into_iter()
                .collect(),
        }
    }
}

/// The process doing the work behind `pid`: `ip netns exec` normally execs in place, but when
/// it forks (batch mode, other iproute2 versions) the command is its child.
pub fn real_pid(pid: u32) -> u32 {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "ip" {
        return pid;
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .find_map(|c| c.parse().ok())
        .unwrap_or(pid)
}

/// Peak resident set (`VmHWM`) of `pid` in KiB; 0 when unreadable.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| crate::process::status_field(&s, "VmHWM:"))
        .unwrap_or(0)
}

fn start_cache(cluster: &mut Cluster, dir: &Path, upstream: &str) -> anyhow::Result<Mirror> {
    require("/usr/bin/docker-registry", "docker-registry")?;
    let ns = cluster.add_host("cache", CACHE_IP)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("data"))?;
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {CACHE_IP}:5000\nproxy:\n  remoteurl: http://{upstream}\n",
        dir.join("data").display()
    );
    std::fs::write(dir.join("config.yml"), config)?;
    let mut cmd = command_in(Some(&ns), "/usr/bin/docker-registry");
    cmd.arg("serve").arg(dir.join("config.yml"));
    let mut process = Process::spawn("central-cache", cmd, &dir.join("registry.log"))?;
    let url = format!("http://{CACHE_IP}:5000/v2/");
    if let Err(e) = wait_for("central cache to listen", Duration::from_secs(20), || {
        exec_ok(&ns, "busybox", &["wget", "-q", "-O", "/dev/null", &url])
    }) {
        let tail = process.log_tail();
        process.stop();
        bail!("{e}\ncache log:\n{tail}");
    }
    // The same shape of hosts.toml spegel writes: a mirror for every registry, upstream last.
    for k in 1..=cluster.len() {
        let d = cluster.node(k).certs_d().join("_default");
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("hosts.toml"),
            format!("[host.'http://{CACHE_IP}:5000']\ncapabilities = ['pull', 'resolve']\n"),
        )?;
    }
    Ok(Mirror::Cache { process, ns })
}

fn start_mirror(
    setup: Setup,
    cluster: &mut Cluster,
    dir: &Path,
    progress: &mut Progress,
) -> anyhow::Result<Mirror> {
    match setup {
        Setup::Baseline => {
            for k in 1..=cluster.len() {
                let hosts = cluster.node(k).certs_d().join("_default/hosts.toml");
                if hosts.exists() {
                    bail!("node {k} has a mirror configured in the baseline setup");
                }
            }
            Ok(Mirror::None)
        }
        Setup::Spegel => {
            let mut pids = Vec::new();
            for k in 1..=cluster.len() {
                progress.status("starting spegel", &format!("node {k}/{}", cluster.len()));
                cluster.start_daemon(k)?;
            }
            for k in 1..=cluster.len() {
                cluster.wait_ready(k, Duration::from_secs(60))?;
                let pid = cluster
                    .daemon(k)
                    .and_then(|d| d.process.pid())
                    .context("daemon without a PID")?;
                pids.push((k, real_pid(pid)));
            }
            Ok(Mirror::Spegel(pids))
        }
        Setup::CentralCache => {
            let upstream = cluster.upstream_host();
            start_cache(cluster, &dir.join("cache"), &upstream)
        }
    }
}

/// Pulls `reference` on `node` with a timeout (`ctr images pull`: fetch, unpack, image record).
fn pull(node: &Containerd, reference: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let certs = node.certs_d().to_string_lossy().into_owned();
    let timeout = format!("{}s", timeout.as_secs().max(1));
    let started = Instant::now();
    node.ctr(&[
        "--timeout",
        &timeout,
        "images",
        "pull",
        "--plain-http",
        "--hosts-dir",
        &certs,
        reference,
    ])?;
    Ok(started.elapsed())
}

/// The digest containerd recorded for `reference`, and whether all blobs are there.
fn verify(node: &Containerd, image: &PushedImage) -> anyhow::Result<(String, bool)> {
    let listing = node.ctr(&["images", "ls"])?;
    let digest = listing
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let name = cols.next()?;
            let _kind = cols.next()?;
            (name == image.reference).then(|| cols.next().map(str::to_string))?
        })
        .next()
        .with_context(|| format!("{} is not in containerd's image list", image.reference))?;
    let blobs_ok = image
        .blobs
        .iter()
        .all(|b| std::fs::metadata(node.blob_path(&b.digest)).is_ok_and(|m| m.len() == b.size));
    Ok((digest.clone(), blobs_ok && digest == image.digest))
}

struct Counters {
    upstream: u64,
    cache: u64,
    nodes: u64,
    cpu: Vec<f64>,
}

fn counters(cluster: &Cluster, mirror: &Mirror) -> anyhow::Result<Counters> {
    let net = cluster.network();
    let mut nodes = 0;
    for k in 1..=cluster.len() {
        nodes += tx_bytes(&net.node(k))?;
    }
    Ok(Counters {
        upstream: tx_bytes(&net.upstream())?,
        cache: match mirror {
            Mirror::Cache { ns, .. } => tx_bytes(ns)?,
            _ => 0,
        },
        nodes,
        cpu: mirror
            .pids()
            .iter()
            .map(|(_, _, pid)| cpu_seconds(&[*pid]))
            .collect(),
    })
}

struct Phase<'a> {
    progress: &'a mut Progress,
    label: String,
}

/// Runs one scenario: `batches` of nodes, each batch pulling concurrently, batch after batch.
fn run_scenario(
    cluster: &Cluster,
    image: &PushedImage,
    batches: &[Vec<usize>],
    gap: Duration,
    timeout: Duration,
    phase: &mut Phase<'_>,
) -> (Vec<NodePull>, f64) {
    let started = Instant::now();
    let total: usize = batches.iter().map(Vec::len).sum();
    let done = Arc::new(AtomicUsize::new(0));
    let mut pulls = Vec::new();
    for (bi, batch) in batches.iter().enumerate() {
        if bi > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let barrier = Arc::new(Barrier::new(batch.len()));
        let results: Vec<NodePull> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&k| {
                    let barrier = barrier.clone();
                    let done = done.clone();
                    s.spawn(move || {
                        let node = cluster.node(k);
                        barrier.wait();
                        let start_s = started.elapsed().as_secs_f64();
                        let result = pull(node, &image.reference, timeout);
                        let seconds = started.elapsed().as_secs_f64() - start_s;
                        let mut p = NodePull {
                            node: k,
                            batch: bi,
                            start_s,
                            seconds,
                            ok: false,
                            digest: None,
                            digest_ok: false,
                            error: None,
                        };
                        match result.and_then(|d| {
                            p.seconds = d.as_secs_f64();
                            verify(node, image)
                        }) {
                            Ok((digest, ok)) => {
                                p.ok = true;
                                p.digest = Some(digest);
                                p.digest_ok = ok;
                                if !ok {
                                    p.error =
                                        Some("digest or blobs differ from the pushed image".into());
                                }
                            }
                            Err(e) => p.error = Some(format!("{e:#}")),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        p
                    })
                })
                .collect();
            // Bounded by the pulls' own timeout (ctr --timeout) plus the check after each.
            let deadline = Instant::now() + timeout + Duration::from_secs(60);
            while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
                let detail = if batches.len() > 1 {
                    format!(
                        "batch {}/{} · {}/{total} nodes pulled",
                        bi + 1,
                        batches.len(),
                        done.load(Ordering::Relaxed)
                    )
                } else {
                    format!("{}/{total} nodes pulled", done.load(Ordering::Relaxed))
                };
                phase.progress.status(&phase.label, &detail);
                std::thread::sleep(Duration::from_millis(200));
            }
            handles
                .into_iter()
                .zip(batch)
                .map(|(h, &k)| {
                    h.join().unwrap_or_else(|_| NodePull {
                        node: k,
                        batch: bi,
                        start_s: 0.0,
                        seconds: 0.0,
                        ok: false,
                        digest: None,
                        digest_ok: false,
                        error: Some("puller thread panicked".into()),
                    })
                })
                .collect()
        });
        pulls.extend(results);
    }
    let end = pulls
        .iter()
        .map(|p| p.start_s + p.seconds)
        .fold(0.0, f64::max);
    (pulls, end)
}

struct PushedCase {
    case: Case,
    rep: usize,
    v1: PushedImage,
    v2: PushedImage,
}

fn push_all(
    cluster: &Cluster,
    cases: &[Case],
    reps: usize,
    progress: &mut Progress,
) -> anyhow::Result<Vec<PushedCase>> {
    let mut out = Vec::new();
    let total = cases.len() * reps;
    for rep in 0..reps {
        for (ci, case) in cases.iter().enumerate() {
            progress.status(
                "generating and pushing images",
                &format!("{}/{total} ({} ×2)", out.len() + 1, case.label),
            );
            let repo = format!("bench/{}-r{rep}", case.label.to_ascii_lowercase());
            let push = |version: u64| {
                cluster.push(&ImageSpec {
                    repo: repo.clone(),
                    tag: format!("v{version}"),
                    layers: case.layers.clone(),
                    // Distinct per case, repetition and version, so nothing is shared.
                    seed: 10_000 + (ci as u64) * 100 + (rep as u64) * 10 + version,
                    platforms: vec![],
                })
            };
            let v1 = push(1)?;
            let v2 = push(2)?;
            out.push(PushedCase {
                case: case.clone(),
                rep,
                v1,
                v2,
            });
        }
    }
    Ok(out)
}

fn environment(started_unix: u64) -> Environment {
    let containerd = std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Environment {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        containerd,
        spegel_bin: crate::daemon::spegel_bin().display().to_string(),
        started_unix,
        total_seconds: 0.0,
    }
}

/// Runs every setup, repetition, case and scenario of `config`.
pub fn run(config: &Config, progress: &mut Progress) -> anyhow::Result<Report> {
    config.validate()?;
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cases = config.cases();
    let n = config.nodes;
    // The cluster directory is reused so the upstream's data (pushed once) survives; node
    // directories are wiped so every setup starts with empty containerd stores.
    let dir = config.work.join("cluster");
    let mut pushed: Option<Vec<PushedCase>> = None;
    let mut runs = Vec::new();
    for (si, &setup) in config.setups.iter().enumerate() {
        let setup_label = format!("setup {}/{} {setup}", si + 1, config.setups.len());
        progress.line(&format!("{setup_label}: starting {n} nodes"));
        for k in 1..=n {
            match std::fs::remove_dir_all(dir.join(format!("node{k}"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        let mut cluster = Cluster::start(n, &dir)?;
        if pushed.is_none() {
            pushed = Some(push_all(&cluster, &cases, config.repetitions, progress)?);
        }
        let images = pushed.as_ref().context("images were pushed")?;
        if let Some(rate) = &config.rate {
            cluster.network().shape_upstream(rate)?;
        }
        let mirror = start_mirror(setup, &mut cluster, &dir, progress)?;
        for (ii, img) in images.iter().enumerate() {
            for scenario in Scenario::ALL {
                let (image, batches) = match scenario {
                    Scenario::Create => (&img.v1, vec![(1..=n).collect()]),
                    Scenario::Update => (&img.v2, config.update_batches()),
                };
                let mut phase = Phase {
                    progress,
                    label: format!(
                        "{setup_label} · image {}/{} {} rep {} · {scenario}",
                        ii + 1,
                        images.len(),
                        img.case.label,
                        img.rep + 1
                    ),
                };
                let before = counters(&cluster, &mirror)?;
                let (pulls, cluster_seconds) = run_scenario(
                    &cluster,
                    image,
                    &batches,
                    config.batch_gap,
                    config.pull_timeout,
                    &mut phase,
                );
                let after = counters(&cluster, &mirror)?;
                let processes = mirror
                    .pids()
                    .into_iter()
                    .enumerate()
                    .map(|(i, (role, node, pid))| ProcessUsage {
                        role,
                        node,
                        pid,
                        cpu_seconds: after.cpu.get(i).copied().unwrap_or(0.0)
                            - before.cpu.get(i).copied().unwrap_or(0.0),
                        vm_hwm_kib: vm_hwm_kib(pid),
                    })
                    .collect();
                let run = ScenarioRun {
                    setup,
                    scenario,
                    case: img.case.label.clone(),
                    rep: img.rep,
                    reference: image.reference.clone(),
                    digest: image.digest.clone(),
                    image_bytes: image.total_size(),
                    pulls,
                    cluster_seconds,
                    upstream_tx_bytes: after.upstream.saturating_sub(before.upstream),
                    cache_tx_bytes: after.cache.saturating_sub(before.cache),
                    nodes_tx_bytes: after.nodes.saturating_sub(before.nodes),
                    processes,
                };
                let durations: Vec<f64> = run
                    .pulls
                    .iter()
                    .filter(|p| p.ok)
                    .map(|p| p.seconds)
                    .collect();
                let failed = run.pulls.iter().filter(|p| !p.digest_ok).count();
                progress.line(&format!(
                    "{setup} {} rep {} {scenario}: p50 {:.2} s, max {:.2} s, cluster {:.2} s, upstream {:.1} MB{}",
                    img.case.label,
                    img.rep + 1,
                    stats::median(&durations),
                    stats::percentile(&durations, 100.0),
                    run.cluster_seconds,
                    run.upstream_tx_bytes as f64 / 1e6,
                    if failed > 0 {
                        format!(", {failed} FAILED")
                    } else {
                        String::new()
                    }
                ));
                runs.push(run);
            }
            // Free the nodes' disks; later images share nothing with these.
            for k in 1..=n {
                let _ = cluster.node(k).ctr(&[
                    "images",
                    "rm",
                    "--sync",
                    &img.v1.reference,
                    &img.v2.reference,
                ]);
            }
        }
        drop(mirror);
        drop(cluster);
    }
    let images = pushed
        .unwrap_or_default()
        .iter()
        .flat_map(|p| {
            [(&p.v1, "v1"), (&p.v2, "v2")].map(|(i, tag)| ImageRecord {
                case: p.case.label.clone(),
                rep: p.rep,
                tag: tag.to_string(),
                reference: i.reference.clone(),
                digest: i.digest.clone(),
                bytes: i.total_size(),
                layers: i.of_kind(BlobKind::Layer).map(|b| b.size).collect(),
            })
        })
        .collect();
    let mut environment = environment(started_unix);
    environment.total_seconds = started.elapsed().as_secs_f64();
    let summary = report::summarise(&runs);
    Ok(Report {
        config: serde_json::to_value(config)?,
        environment,
        images,
        runs,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: usize, percent: u32) -> Config {
        Config {
            nodes,
            sizes: vec!["10MB".parse().unwrap(), "1GB".parse().unwrap()],
            layer_counts: vec![1, 4],
            scale: 1,
            rate: None,
            repetitions: 1,
            setups: Setup::ALL.to_vec(),
            update_batch_percent: percent,
            batch_gap: Duration::ZERO,
            pull_timeout: Duration::from_secs(60),
            work: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        let s = |t: &str| t.parse::<Size>().map(|s| s.bytes);
        assert_eq!(s("10MB"), Ok(10_000_000));
        assert_eq!(s("1GB"), Ok(1_000_000_000));
        assert_eq!(s("512KiB"), Ok(512 << 10));
        assert_eq!(s("1.5mib"), Ok(3 << 19));
        assert_eq!(s("4096"), Ok(4096));
        assert!(s("MB").is_err());
        assert!(s("10XB").is_err());
        assert!(s("0MB").is_err());
        assert_eq!("100MB".parse::<Size>().unwrap().label, "100MB");
    }

    #[test]
    fn setups_round_trip_their_names() {
        for s in Setup::ALL {
            assert_eq!(s.name().parse::<Setup>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert!("mirror".parse::<Setup>().is_err());
    }

    #[test]
    fn cases_split_sizes_into_equal_layers() {
        let mut c = config(5, 20);
        let cases = c.cases();
        let labels: Vec<&str> = cases.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["10MB-1", "10MB-4", "1GB-1", "1GB-4"]);
        assert_eq!(cases[1].layers, vec![layer_size(2_500_000); 4]);
        assert_eq!(cases[0].bytes(), layer_size(10_000_000));
        // Scaling divides the total before splitting; the generator's minimum still holds.
        c.scale = 1_000_000;
        let scaled = c.cases();
        assert_eq!(scaled[2].layers, vec![layer_size(1000)]);
        assert_eq!(scaled[2].layers, vec![crate::images::MIN_LAYER_SIZE]);
    }

    #[test]
    fn update_batches_are_ceil_of_the_percentage() {
        let batches = |n, p| config(n, p).update_batches();
        assert_eq!(
            batches(5, 20),
            vec![vec![1], vec![2], vec![3], vec![4], vec![5]]
        );
        assert_eq!(batches(3, 20), vec![vec![1], vec![2], vec![3]]);
        assert_eq!(
            batches(10, 20),
            vec![vec![1, 2], vec![3, 4], vec![5, 6], vec![7, 8], vec![9, 10]]
        );
        assert_eq!(
            batches(7, 20),
            vec![vec![1, 2], vec![3, 4], vec![5, 6], vec![7]]
        );
        assert_eq!(batches(4, 100), vec![vec![1, 2, 3, 4]]);
        // Every node is in exactly one batch.
        for n in 1..30 {
            let all: Vec<usize> = batches(n, 20).concat();
            assert_eq!(all, (1..=n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn proc_readers_see_this_process() {
        let me = std::process::id();
        assert_eq!(real_pid(me), me);
        assert!(vm_hwm_kib(me) > 0);
        assert_eq!(vm_hwm_kib(u32::MAX), 0);
    }

    #[test]
    fn generated_cases_have_distinct_layers_per_version() {
        // What push_all relies on: different seeds give different layer digests.
        let case = &config(3, 20).cases()[1];
        let digests: std::collections::HashSet<String> = (1..=2u64)
            .flat_map(|v| {
                let seed = 10_000 + 100 + v;
                (0..case.layers.len()).map(move |li| {
                    crate::images::layer_digest(seed.wrapping_mul(1_000_003) + li as u64, 4096).0
                })
            })
            .collect();
        assert_eq!(digests.len(), 2 * case.layers.len());
    }
}
