//! Where the simulated routers run: all in this process ([`LocalRouters`]), or spread over
//! worker processes ([`super::worker::Worker`]), node `n` in worker `n % workers`. File
//! descriptors are per process, and with every router here both ends of every connection are
//! too: 300 routers do not fit under a 20,000 hard limit, a handful of workers do.
//!
//! Either way the coordinator ([`super::Sim`]) keeps the metadata (IDs, addresses, keys, the
//! dead set); a host only runs routers, addressed by node number.

use std::{collections::HashMap, net::SocketAddrV4, sync::Arc, time::Duration};

use anyhow::Context;
use spegel::routing::{Bootstrapper, P2pConfig, P2pRouter, Router, RouterStats};
use tokio::sync::Semaphore;

use super::{
    Lookup, REGISTRY_PORT, Sim,
    worker::{Command, Reply, Worker},
};

/// One router to start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StartSpec {
    /// Node number (unique over the run, never reused).
    pub node: usize,
    /// Listen address, `ip:port`.
    pub listen: String,
    /// Provider record TTL.
    pub ttl: Duration,
    /// Idle connection timeout.
    pub idle_timeout: Duration,
    /// Multiaddrs (with `/p2p/<id>`) of the peers to bootstrap from; none for the first node.
    pub seeds: Vec<String>,
    /// Keys to advertise at once.
    pub keys: Vec<String>,
}

/// One lookup of a batch: from node number `node`, up to `count` providers of `key`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LookupJob {
    /// Node number the lookup runs on.
    pub node: usize,
    /// Key looked up.
    pub key: String,
    /// Providers wanted.
    pub count: usize,
}

/// Resource use of a host's process(es) and its live routers' summed counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostStats {
    /// Resident memory, KiB (summed over processes).
    pub rss_kib: f64,
    /// CPU seconds, user and system, since process start (summed over processes).
    pub cpu_s: f64,
    /// Live routers.
    pub routers: usize,
    /// The live routers' counters, summed.
    pub counters: RouterStats,
    /// The routers with unprovided keys: (node number, count).
    pub unprovided_by_node: Vec<(usize, u64)>,
}

impl HostStats {
    /// Adds `other`'s figures to these.
    pub fn add(&mut self, other: HostStats) {
        self.rss_kib += other.rss_kib;
        self.cpu_s += other.cpu_s;
        self.routers += other.routers;
        self.counters.add(&other.counters);
        self.unprovided_by_node.extend(other.unprovided_by_node);
    }
}

struct LocalRouter {
    router: P2pRouter,
    task: tokio::task::JoinHandle<()>,
}

/// Routers running in this process, by node number.
#[derive(Default)]
pub struct LocalRouters {
    routers: HashMap<usize, LocalRouter>,
}

impl LocalRouters {
    /// Starts a router and advertises its keys at once, as the daemon does after its first
    /// containerd scan; returns its peer ID and listen multiaddr.
    pub async fn start(&mut self, spec: &StartSpec) -> anyhow::Result<(String, String)> {
        anyhow::ensure!(
            !self.routers.contains_key(&spec.node),
            "node {} already runs",
            spec.node
        );
        let listen: SocketAddrV4 = spec
            .listen
            .parse()
            .with_context(|| format!("listen address {:?}", spec.listen))?;
        let seeds: Vec<libp2p::Multiaddr> = spec
            .seeds
            .iter()
            .map(|s| s.parse().with_context(|| format!("seed {s:?}")))
            .collect::<anyhow::Result<_>>()?;
        let (router, task) = P2pRouter::start(P2pConfig {
            router_addr: listen.to_string(),
            registry_port: REGISTRY_PORT,
            data_dir: String::new(),
            advertise_ttl: spec.ttl,
            bootstrap: (!seeds.is_empty()).then_some(Bootstrapper::Static(seeds)),
            idle_connection_timeout: spec.idle_timeout,
        })
        .await
        .with_context(|| format!("router {}", spec.node))?;
        if let Err(e) = router.advertise(spec.keys.clone()).await {
            task.abort();
            return Err(e).with_context(|| format!("router {} advertise", spec.node));
        }
        let id = router.local_peer_id();
        self.routers.insert(spec.node, LocalRouter { router, task });
        Ok((id, format!("/ip4/{}/tcp/{}", listen.ip(), listen.port())))
    }

    fn get(&self, node: usize) -> anyhow::Result<&P2pRouter> {
        self.routers
            .get(&node)
            .map(|r| &r.router)
            .with_context(|| format!("no router {node} here"))
    }

    /// Advertises more keys on router `node`.
    pub async fn advertise(&self, node: usize, keys: Vec<String>) -> anyhow::Result<()> {
        Ok(self.get(node)?.advertise(keys).await?)
    }

    /// Withdraws keys on router `node`.
    pub async fn withdraw(&self, node: usize, keys: Vec<String>) -> anyhow::Result<()> {
        Ok(self.get(node)?.withdraw(keys).await?)
    }

    /// Stops router `node` gracefully (leave notice, bounded by the router's own deadline).
    pub async fn leave(&mut self, node: usize) -> anyhow::Result<()> {
        let r = self
            .routers
            .remove(&node)
            .with_context(|| format!("no router {node} here"))?;
        r.router.shutdown().await;
        Ok(())
    }

    /// Kills router `node` without a word: its task is aborted, its sockets close.
    pub fn crash(&mut self, node: usize) -> anyhow::Result<()> {
        let r = self
            .routers
            .remove(&node)
            .with_context(|| format!("no router {node} here"))?;
        r.task.abort();
        Ok(())
    }

    /// Runs `jobs` with at most `parallel` in flight; results in job order.
    pub async fn lookups(
        &self,
        jobs: Vec<LookupJob>,
        parallel: usize,
    ) -> anyhow::Result<Vec<Lookup>> {
        // Every node first, so a bad job fails the batch before any lookup runs.
        let routers = jobs
            .iter()
            .map(|j| self.get(j.node).cloned())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let limit = Arc::new(Semaphore::new(parallel.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for (i, (job, router)) in jobs.into_iter().zip(routers).enumerate() {
            let limit = limit.clone();
            set.spawn(async move {
                let _permit = limit.acquire_owned().await;
                (i, Sim::lookup(&router, &job.key, job.count).await)
            });
        }
        let mut out: Vec<Option<Lookup>> = vec![None; set.len()];
        while let Some(r) = set.join_next().await {
            let (i, l) = r.context("lookup task")?;
            out[i] = Some(l);
        }
        out.into_iter()
            .map(|l| l.context("lookup without a result"))
            .collect()
    }

    /// This process's resource use and the live routers' counters.
    pub fn stats(&self) -> HostStats {
        let mut s = HostStats {
            rss_kib: super::rss_kib(),
            cpu_s: super::cpu_seconds(),
            routers: self.routers.len(),
            ..Default::default()
        };
        for (&node, r) in &self.routers {
            let rs = r.router.stats();
            s.counters.add(&rs);
            if rs.unprovided > 0 {
                s.unprovided_by_node.push((node, rs.unprovided));
            }
        }
        s
    }

    /// Whether every live router is ready.
    pub fn ready(&self) -> bool {
        self.routers.values().all(|r| r.router.ready())
    }

    /// Aborts every router.
    pub fn abort_all(&mut self) {
        for (_, r) in self.routers.drain() {
            r.task.abort();
        }
    }
}

impl Drop for LocalRouters {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// Bounds of one worker command, generous for a loaded 2-core machine.
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// The routers of a [`Sim`]: here, or in worker processes.
pub(super) enum Host {
    /// Every router in this process.
    Local(LocalRouters),
    /// Node `n` in worker `n % workers.len()`.
    Workers(Vec<Arc<Worker>>),
}

impl Host {
    /// `workers` processes (none: every router here).
    pub(super) fn new(workers: usize) -> anyhow::Result<Host> {
        if workers == 0 {
            return Ok(Host::Local(LocalRouters::default()));
        }
        let workers = (0..workers)
            .map(|i| Worker::spawn(i).map(Arc::new))
            .collect::<anyhow::Result<_>>()?;
        Ok(Host::Workers(workers))
    }

    /// Worker processes (0 in-process).
    pub(super) fn workers(&self) -> usize {
        match self {
            Host::Local(_) => 0,
            Host::Workers(w) => w.len(),
        }
    }

    fn worker(workers: &[Arc<Worker>], node: usize) -> anyhow::Result<&Arc<Worker>> {
        workers
            .get(node % workers.len().max(1))
            .context("no worker processes")
    }

    /// Starts a router; its peer ID and listen multiaddr.
    pub(super) async fn start(&mut self, spec: StartSpec) -> anyhow::Result<(String, String)> {
        match self {
            Host::Local(r) => r.start(&spec).await,
            Host::Workers(w) => {
                let node = spec.node;
                match Host::worker(w, node)?
                    .call(Command::Start(spec), CALL_LIMIT)
                    .await?
                {
                    Reply::Started { peer_id, addr } => Ok((peer_id, addr)),
                    other => anyhow::bail!("start {node}: unexpected reply {other:?}"),
                }
            }
        }
    }

    /// Advertises more keys on router `node`.
    pub(super) async fn advertise(&self, node: usize, keys: Vec<String>) -> anyhow::Result<()> {
        match self {
            Host::Local(r) => r.advertise(node, keys).await,
            Host::Workers(w) => Host::worker(w, node)?
                .call_done(Command::Advertise { node, keys }, CALL_LIMIT)
                .await
                .with_context(|| format!("advertise on {node}")),
        }
    }

    /// Withdraws keys on router `node`.
    pub(super) async fn withdraw(&self, node: usize, keys: Vec<String>) -> anyhow::Result<()> {
        match self {
            Host::Local(r) => r.withdraw(node, keys).await,
            Host::Workers(w) => Host::worker(w, node)?
                .call_done(Command::Withdraw { node, keys }, CALL_LIMIT)
                .await
                .with_context(|| format!("withdraw on {node}")),
        }
    }

    /// Stops router `node` gracefully.
    pub(super) async fn leave(&mut self, node: usize) -> anyhow::Result<()> {
        match self {
            Host::Local(r) => r.leave(node).await,
            Host::Workers(w) => Host::worker(w, node)?
                .call_done(Command::Leave { node }, CALL_LIMIT)
                .await
                .with_context(|| format!("leave {node}")),
        }
    }

    /// Kills router `node` without a word.
    pub(super) async fn crash(&mut self, node: usize) -> anyhow::Result<()> {
        match self {
            Host::Local(r) => r.crash(node),
            Host::Workers(w) => Host::worker(w, node)?
                .call_done(Command::Crash { node }, CALL_LIMIT)
                .await
                .with_context(|| format!("crash {node}")),
        }
    }

    /// Runs `jobs` (at most `parallel` in flight overall, shared evenly by the workers);
    /// results in job order.
    pub(super) async fn lookups(
        &self,
        jobs: Vec<LookupJob>,
        parallel: usize,
    ) -> anyhow::Result<Vec<Lookup>> {
        let workers = match self {
            Host::Local(r) => return r.lookups(jobs, parallel).await,
            Host::Workers(w) => w,
        };
        let n = workers.len().max(1);
        let total = jobs.len();
        let mut batches: Vec<(Vec<usize>, Vec<LookupJob>)> = vec![(vec![], vec![]); n];
        for (i, job) in jobs.into_iter().enumerate() {
            let b = &mut batches[job.node % n];
            b.0.push(i);
            b.1.push(job);
        }
        let parallel = parallel.max(1).div_ceil(n);
        let mut set = tokio::task::JoinSet::new();
        for (worker, (positions, jobs)) in workers.iter().zip(batches) {
            if jobs.is_empty() {
                continue;
            }
            // Each lookup ends within its own bound (`Sim::lookup`); a batch within the sum
            // of its rounds plus slack.
            let rounds = jobs.len().div_ceil(parallel) as u32;
            let limit = LOOKUP_LIMIT * rounds + CALL_LIMIT;
            let worker = worker.clone();
            set.spawn(async move {
                let count = jobs.len();
                let reply = worker
                    .call(Command::Lookups { jobs, parallel }, limit)
                    .await;
                (positions, count, reply)
            });
        }
        let mut out: Vec<Option<Lookup>> = vec![None; total];
        while let Some(r) = set.join_next().await {
            let (positions, count, reply) = r.context("lookup batch task")?;
            match reply? {
                Reply::Lookups { results } if results.len() == count => {
                    for (p, l) in positions.into_iter().zip(results) {
                        out[p] = Some(l);
                    }
                }
                other => anyhow::bail!("lookups: unexpected reply {other:?}"),
            }
        }
        out.into_iter()
            .map(|l| l.context("lookup without a result"))
            .collect()
    }

    /// Summed resource use and counters of every process hosting routers.
    pub(super) async fn stats(&self) -> anyhow::Result<HostStats> {
        match self {
            Host::Local(r) => Ok(r.stats()),
            Host::Workers(w) => {
                let mut sum = HostStats::default();
                for reply in Host::all(w, Command::Stats).await? {
                    match reply {
                        Reply::Stats(s) => sum.add(s),
                        other => anyhow::bail!("stats: unexpected reply {other:?}"),
                    }
                }
                Ok(sum)
            }
        }
    }

    /// Whether every live router is ready.
    pub(super) async fn ready(&self) -> anyhow::Result<bool> {
        match self {
            Host::Local(r) => Ok(r.ready()),
            Host::Workers(w) => {
                let mut all = true;
                for reply in Host::all(w, Command::Ready).await? {
                    match reply {
                        Reply::Ready { ready } => all &= ready,
                        other => anyhow::bail!("ready: unexpected reply {other:?}"),
                    }
                }
                Ok(all)
            }
        }
    }

    /// The same command to every worker at once; replies in worker order.
    async fn all(workers: &[Arc<Worker>], command: Command) -> anyhow::Result<Vec<Reply>> {
        let mut set = tokio::task::JoinSet::new();
        for (i, w) in workers.iter().enumerate() {
            let (w, command) = (w.clone(), command.clone());
            set.spawn(async move { (i, w.call(command, CALL_LIMIT).await) });
        }
        let mut out: Vec<Option<Reply>> = vec![None; workers.len()];
        while let Some(r) = set.join_next().await {
            let (i, reply) = r.context("worker call task")?;
            out[i] = Some(reply?);
        }
        out.into_iter()
            .map(|r| r.context("worker without a reply"))
            .collect()
    }

    /// Stops every router (and worker process), bounded.
    pub(super) async fn shutdown(self) {
        match self {
            Host::Local(mut r) => r.abort_all(),
            Host::Workers(w) => {
                for worker in w {
                    worker.stop().await;
                }
            }
        }
    }
}

/// Bound of one lookup, in `Sim::lookup`.
pub(super) const LOOKUP_LIMIT: Duration = Duration::from_secs(10);
