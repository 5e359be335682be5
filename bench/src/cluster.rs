//! A multi-node testbed: upstream registry and per-node containerd in network namespaces, and
//! the spegel daemon started on each node the way the Helm chart does it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{
    containerd::{Containerd, Version},
    daemon::{Daemon, spegel_bin},
    delay::LinkSpec,
    http,
    images::{self, ImageSpec, PushOptions, PushedImage, in_netns},
    netns::{Network, UPSTREAM_IP, exec_ok},
    process::{Process, wait_for},
    registry::Upstream,
};

/// Registry port of every daemon (the chart's default).
pub const REGISTRY_PORT: u16 = 5000;
/// Router port of every daemon.
pub const ROUTER_PORT: u16 = 5001;
/// Metrics port of every daemon.
pub const METRICS_PORT: u16 = 9090;

/// Nodes, upstream and daemons. Fields drop in order: daemons, then containerds, then the
/// registry, then the namespaces.
pub struct Cluster {
    daemons: Vec<Option<Daemon>>,
    nodes: Vec<Containerd>,
    upstream: Upstream,
    net: Network,
    dir: PathBuf,
    bin: PathBuf,
}

impl Cluster {
    /// Brings up `n` nodes under `dir` (created), running the containerd version chosen by
    /// [`crate::containerd::VERSION_ENV`].
    pub fn start(n: usize, dir: &Path) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, dir, &[])
    }

    /// [`Cluster::start`] with some nodes' links delayed and/or rate-limited.
    pub fn start_with(n: usize, dir: &Path, links: &[LinkSpec]) -> anyhow::Result<Cluster> {
        Cluster::start_version_with(n, dir, Version::from_env()?, links)
    }

    /// [`Cluster::start`] with an explicit containerd version.
    pub fn start_version(n: usize, dir: &Path, version: Version) -> anyhow::Result<Cluster> {
        Cluster::start_version_with(n, dir, version, &[])
    }

    /// [`Cluster::start_version`] with some nodes' links delayed and/or rate-limited.
    pub fn start_version_with(
        n: usize,
        dir: &Path,
        version: Version,
        links: &[LinkSpec],
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        let net = Network::create_with(n, links)?;
        let upstream_addr: SocketAddr = format!("{UPSTREAM_IP}:5000").parse()?;
        let upstream =
            Upstream::start(&dir.join("upstream"), upstream_addr, Some(&net.upstream()))?;
        let mut nodes = Vec::with_capacity(n);
        for k in 1..=n {
            nodes.push(Containerd::start_version(
                &dir.join(format!("node{k}")),
                Some(&net.node(k)),
                version,
            )?);
        }
        Ok(Cluster {
            daemons: (0..n).map(|_| None).collect(),
            nodes,
            upstream,
            net,
            dir: dir.to_path_buf(),
            bin: spegel_bin(),
        })
    }

    /// Uses `bin` as the spegel binary instead of the default.
    pub fn with_binary(mut self, bin: PathBuf) -> Self {
        self.bin = bin;
        self
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// containerd of node `k` (1-based).
    pub fn node(&self, k: usize) -> &Containerd {
        &self.nodes[k - 1]
    }

    /// containerd of node `k` (1-based), to stop or restart it.
    pub fn node_mut(&mut self, k: usize) -> &mut Containerd {
        &mut self.nodes[k - 1]
    }

    /// The containerd release line every node runs.
    pub fn containerd_version(&self) -> Option<Version> {
        self.nodes.first().map(Containerd::version)
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// Changes the round-trip time added on node `k`'s link (see [`Network::delay_node`];
    /// a node started without a delayed link briefly loses its address when it gets one).
    pub fn delay_node(&mut self, k: usize, delay: Duration) -> anyhow::Result<()> {
        self.net.delay_node(k, delay)
    }

    /// Adds a host namespace (e.g. a central cache) at `addr` on the cluster's bridge.
    pub fn add_host(&mut self, name: &str, addr: &str) -> anyhow::Result<String> {
        self.net.add_host(name, addr)
    }

    /// The upstream registry.
    pub fn upstream(&mut self) -> &mut Upstream {
        &mut self.upstream
    }

    /// `host:port` of the upstream registry, as image references name it.
    pub fn upstream_host(&self) -> String {
        self.upstream.host()
    }

    /// Generates and pushes an image to the upstream (from inside its namespace).
    pub fn push(&self, spec: &ImageSpec) -> anyhow::Result<PushedImage> {
        self.push_with(spec, &PushOptions::default())
    }

    /// [`Cluster::push`] with options (e.g. layers shared by the platforms of an index).
    pub fn push_with(
        &self,
        spec: &ImageSpec,
        options: &PushOptions,
    ) -> anyhow::Result<PushedImage> {
        let addr = self.upstream.addr();
        let spec = spec.clone();
        let options = options.clone();
        in_netns(&self.net.upstream(), move || {
            images::push_with(addr, &spec, &options)
        })
    }

    /// Starts any long-running `program args…` with extra `env` inside node `k`'s namespace,
    /// logging to `<dir>/node<k>/<name>.log`. The caller owns the guard; drop it (which stops
    /// exactly that PID) before the cluster, whose drop deletes the namespaces.
    pub fn spawn_in_node(
        &self,
        k: usize,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Process> {
        if k == 0 || k > self.nodes.len() {
            bail!("node {k} does not exist (1..={})", self.nodes.len());
        }
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".into());
        let log = self.dir.join(format!("node{k}/{name}.log"));
        Process::spawn_program(Some(&self.net.node(k)), program, args, env, &log)
    }

    /// Limits the upstream registry's sending rate (what nodes download from it) with a token
    /// bucket filter, e.g. `200mbit`.
    pub fn shape_upstream(&self, rate: &str) -> anyhow::Result<()> {
        self.net.shape_upstream(rate)
    }

    /// The directory holding every node's and the upstream's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's arguments for node `k`, as the chart passes them.
    pub fn registry_args(&self, k: usize) -> Vec<String> {
        let node = &self.nodes[k - 1];
        let mut args = vec![
            "registry".to_string(),
            "--log-level=DEBUG".into(),
            format!("--registry-addr=:{REGISTRY_PORT}"),
            format!("--router-addr=:{ROUTER_PORT}"),
            format!("--metrics-addr=:{METRICS_PORT}"),
            format!("--containerd-sock={}", node.socket().display()),
            "--containerd-namespace=k8s.io".into(),
            format!(
                "--containerd-content-path={}",
                node.content_path().display()
            ),
            format!(
                "--data-dir={}",
                self.dir.join(format!("node{k}/spegel")).display()
            ),
            "--mirror-resolve-timeout=200ms".into(),
        ];
        // Every other node bootstraps from node 1 (its address only; the peer ID is learnt).
        if k != 1 {
            args.push("--bootstrap-kind=dns".into());
            args.push(format!("--dns-bootstrap-domain={}", self.net.node_ip(1)));
        }
        args
    }

    /// Runs `spegel <args>` to completion inside node `k`'s namespace (e.g. `configuration`).
    pub fn run_in_node(&self, k: usize, args: &[String]) -> anyhow::Result<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.net.node(k)])
            .arg(&self.bin)
            .args(args)
            .output()
            .with_context(|| format!("running spegel {args:?}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("spegel {args:?} failed: {text}");
        }
        Ok(text)
    }

    /// Starts the long-running `spegel <args>` on node `k` and waits for its `/livez`.
    pub fn spawn_daemon(&mut self, k: usize, args: &[String]) -> anyhow::Result<()> {
        let ns = self.net.node(k);
        let log = self.dir.join(format!("node{k}/spegel.log"));
        let daemon = Daemon::start(&self.bin, args, &[], Some(&ns), &log, None)?;
        self.daemons[k - 1] = Some(daemon);
        wait_for(
            &format!("spegel on node {k}"),
            Duration::from_secs(30),
            || self.probe(k, "/livez"),
        )
    }

    /// Runs `spegel configuration` then starts `spegel registry` with `args` on node `k`.
    pub fn start_daemon_with(&mut self, k: usize, args: &[String]) -> anyhow::Result<()> {
        let target = format!("http://{}:{REGISTRY_PORT}", self.net.node_ip(k));
        let certs = self.nodes[k - 1].certs_d().to_string_lossy().into_owned();
        let config = [
            "configuration",
            "--containerd-registry-config-path",
            &certs,
            "--mirror-targets",
            &target,
        ];
        self.run_in_node(k, &config.map(String::from))?;
        self.spawn_daemon(k, args)
    }

    /// Starts the daemon on node `k` with the chart's arguments.
    pub fn start_daemon(&mut self, k: usize) -> anyhow::Result<()> {
        let args = self.registry_args(k);
        self.start_daemon_with(k, &args)
    }

    /// Stops the daemon on node `k` (SIGTERM) and returns its exit status.
    pub fn stop_daemon(&mut self, k: usize) -> Option<std::process::ExitStatus> {
        self.daemons[k - 1]
            .take()
            .and_then(|mut d| d.process.stop())
    }

    /// Kills the daemon on node `k` at once (SIGKILL), as a crash would.
    pub fn kill_daemon(&mut self, k: usize) {
        if let Some(d) = self.daemons[k - 1].take() {
            d.process.signal(nix::sys::signal::Signal::SIGKILL);
            drop(d);
        }
    }

    /// The daemon on node `k`, if running.
    pub fn daemon(&mut self, k: usize) -> Option<&mut Daemon> {
        self.daemons[k - 1].as_mut()
    }

    /// Log file of node `k`'s daemon.
    pub fn daemon_log(&self, k: usize) -> PathBuf {
        self.dir.join(format!("node{k}/spegel.log"))
    }

    /// An HTTP GET from inside node `k`'s namespace to `addr` (e.g. a daemon's port).
    pub fn get_from(
        &self,
        k: usize,
        addr: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<http::Response> {
        let addr: SocketAddr = addr.parse()?;
        let target = target.to_string();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        in_netns(&self.net.node(k), move || {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            http::request(addr, "GET", &target, &h, false)
        })
    }

    /// Whether node `k`'s daemon answers 200 on `path` (asked from inside its namespace).
    pub fn probe(&self, k: usize, path: &str) -> bool {
        let url = format!("http://127.0.0.1:{REGISTRY_PORT}{path}");
        exec_ok(
            &self.net.node(k),
            "busybox",
            &["wget", "-q", "-O", "/dev/null", &url],
        )
    }

    /// The text of node `node`'s `/metrics`, asked from inside node `from`'s namespace; empty
    /// when it cannot be fetched.
    pub fn metrics_text(&self, from: usize, node: usize) -> String {
        let Ok(addr) = format!("{}:{METRICS_PORT}", self.net.node_ip(node)).parse::<SocketAddr>()
        else {
            return String::new();
        };
        in_netns(&self.net.node(from), move || {
            http::get(addr, "/metrics", &[])
        })
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_default()
    }

    /// Sum of the samples of every series on node `node` whose line starts with `prefix`
    /// (a metric name, labels optional), asked from node `from`; 0 when none or unreachable.
    pub fn metric(&self, from: usize, node: usize, prefix: &str) -> f64 {
        self.metrics_text(from, node)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// PIDs of the running daemons, node 1 first; an error names a node without one.
    pub fn daemon_pids(&mut self) -> anyhow::Result<Vec<u32>> {
        (1..=self.nodes.len())
            .map(|k| {
                self.daemon(k)
                    .and_then(|d| d.process.pid())
                    .with_context(|| format!("node {k} has no daemon"))
            })
            .collect()
    }

    /// Waits until node `k`'s daemon reports ready.
    pub fn wait_ready(&self, k: usize, timeout: Duration) -> anyhow::Result<()> {
        wait_for(&format!("node {k} ready"), timeout, || {
            self.probe(k, "/readyz")
        })
    }
}
