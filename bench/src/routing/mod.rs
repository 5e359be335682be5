//! `bench routing`: hundreds of routers (the real [`P2pRouter`]) on loopback TCP, each on its
//! own 127.77.x.y address, bootstrapped DNS-style from three live peers, each advertising a
//! realistic key set. Measures convergence, lookup success and latency, memory, withdraw on
//! leave and crash, churn, and the per-node cost (CPU, DHT messages).
//!
//! The routers run in this process or spread over worker processes ([`host`], [`worker`]):
//! one process cannot hold the sockets of 300 routers. Also used, in-process, by the CI scale
//! test (`spegel/tests/routing_scale.rs`) with a smaller cluster.

pub mod host;
pub mod worker;

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context;
use rand::{Rng, seq::IndexedRandom};
use spegel::routing::{P2pRouter, Router};

use crate::stats;
use host::{Host, LookupJob, StartSpec};

/// Keys per image: tag, index, manifest, config and six layers.
pub const KEYS_PER_IMAGE: usize = 10;
/// Seed peers a joining node gets, like DNS bootstrap (§3.6).
const SEEDS: usize = 3;
/// Registry port every simulated node claims (the cluster-wide default).
const REGISTRY_PORT: u16 = 5000;

/// Simulation settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimConfig {
    /// Routers in the cluster.
    pub nodes: usize,
    /// Images per node (each [`KEYS_PER_IMAGE`] keys); a sixth of them are unique to the node,
    /// the rest come from a shared pool.
    pub images_per_node: usize,
    /// Images in the shared pool.
    pub pool_images: usize,
    /// Provider record TTL (re-provided at half of it).
    pub ttl: Duration,
    /// Lookups of other nodes' keys per node in the hit measurement.
    pub lookups_per_node: usize,
    /// Hits and misses (each) looked up one at a time; 0 skips that measurement.
    pub solo_lookups: usize,
    /// Length of the steady-state window (CPU, messages), zero to skip.
    pub window: Duration,
    /// Length of the churn phase, zero to skip.
    pub churn: Duration,
    /// Share of nodes replaced per minute during churn.
    pub churn_per_minute: f64,
    /// Upper bound on the convergence wait.
    pub converge_limit: Duration,
    /// Idle connection timeout of every router. One process may hold only so many sockets
    /// (both ends of every connection are here): 300 routers that keep every connection, as
    /// the daemon does, do not fit in 20,000 descriptors.
    pub idle_timeout: Duration,
    /// Worker processes hosting the routers (node `n` in worker `n % workers`); 0 runs every
    /// router in this process. Workers are this executable, which must be `bench`.
    pub workers: usize,
}

impl SimConfig {
    /// The benchmark's defaults for `nodes` routers.
    pub fn bench(nodes: usize) -> Self {
        SimConfig {
            nodes,
            images_per_node: 30,
            pool_images: 120,
            // The daemon's default (`--advertise-ttl 10m`): re-provides run at its real rate.
            ttl: Duration::from_secs(600),
            lookups_per_node: 10,
            solo_lookups: 200,
            window: Duration::from_secs(60),
            churn: Duration::from_secs(60),
            churn_per_minute: 0.10,
            converge_limit: Duration::from_secs(300),
            idle_timeout: spegel::routing::IDLE_CONNECTION_TIMEOUT,
            workers: 0,
        }
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SimReport {
    /// Routers.
    pub nodes: usize,
    /// Keys each node advertises.
    pub keys_per_node: usize,
    /// Provider record TTL, seconds (keys are re-provided at half of it).
    #[serde(default)]
    pub ttl_s: f64,
    /// Idle connection timeout, seconds.
    #[serde(default)]
    pub idle_timeout_s: f64,
    /// Worker processes the routers ran in (0: all in the coordinator).
    #[serde(default)]
    pub workers: usize,
    /// Seconds from the first router's start to the last one's.
    pub start_s: f64,
    /// Seconds from the last start until a full sampled round found every key.
    pub converge_s: f64,
    /// Sampled rounds run until convergence.
    pub converge_rounds: usize,
    /// Lookups of keys of live providers, and how many found a right provider.
    pub hit_lookups: usize,
    /// See `hit_lookups`.
    pub hit_found: usize,
    /// Time to the first provider of a hit, ms.
    pub hit_p50_ms: f64,
    /// See `hit_p50_ms`.
    pub hit_p99_ms: f64,
    /// Lookups of keys nobody has.
    pub miss_lookups: usize,
    /// Lookups of missing keys that still returned a provider (must be 0).
    pub miss_false: usize,
    /// Time until a miss's answer closes ("no provider"), ms.
    pub miss_p50_ms: f64,
    /// See `miss_p50_ms`.
    pub miss_p99_ms: f64,
    /// Share of lookups answered from the local store.
    pub local_answer_share: f64,
    /// One lookup at a time (the rest of the cluster idle but for its background work), so
    /// the figure is the lookup's own cost rather than queueing behind the other nodes' event
    /// loops on the shared cores: hits, time to the first provider, ms.
    #[serde(default)]
    pub solo_hit_p50_ms: f64,
    /// See `solo_hit_p50_ms`.
    #[serde(default)]
    pub solo_hit_p99_ms: f64,
    /// See `solo_hit_p50_ms`: misses, time until the answer closes, ms.
    #[serde(default)]
    pub solo_miss_p50_ms: f64,
    /// See `solo_miss_p50_ms`.
    #[serde(default)]
    pub solo_miss_p99_ms: f64,
    /// Lookups one at a time: hits run, and how many found the key's owner (the misses are
    /// counted with the others in `miss_lookups`).
    #[serde(default)]
    pub solo_hits: usize,
    /// See `solo_hits`.
    #[serde(default)]
    pub solo_hit_found: usize,
    /// DHT messages received cluster-wide per solo hit and per solo miss (background work in
    /// the same seconds included): a figure that does not depend on the machine's cores.
    #[serde(default)]
    pub solo_hit_msgs: f64,
    /// See `solo_hit_msgs`.
    #[serde(default)]
    pub solo_miss_msgs: f64,
    /// RSS per router, KiB: in-process the growth over the empty process, with workers their
    /// summed RSS (nothing subtracted).
    pub rss_per_router_kib: f64,
    /// Steady window: CPU ms per node per minute (with workers, theirs alone).
    pub cpu_ms_per_node_min: f64,
    /// Steady window: DHT messages (Kademlia requests and notices) per node per minute.
    pub msgs_per_node_min: f64,
    /// Messages per node to join and advertise every key.
    pub startup_msgs_per_node: f64,
    /// Nodes that left gracefully, lookups of their keys right after, and how many returned a
    /// leaver.
    pub left: usize,
    /// See `left`.
    pub leave_lookups: usize,
    /// See `left`.
    pub leave_stale: usize,
    /// Nodes crashed, and the seconds until no lookup returned one of them.
    pub crashed: usize,
    /// See `crashed`.
    pub crash_clear_s: f64,
    /// Lookups of crashed nodes' keys after `crash_clear_s` that still returned one (must be 0).
    pub crash_stale: usize,
    /// Churn: nodes replaced, lookups of established live providers, found, and lookups that
    /// returned a dead provider.
    pub churn_replaced: usize,
    /// See `churn_replaced`.
    pub churn_lookups: usize,
    /// See `churn_replaced`.
    pub churn_found: usize,
    /// See `churn_replaced`.
    pub churn_stale: usize,
    /// Churn: seconds until a new node's keys were findable, p50 and max.
    pub churn_findable_p50_s: f64,
    /// See `churn_findable_p50_s`.
    pub churn_findable_max_s: f64,
}

/// One simulated node (its router runs in the [`Host`]).
pub struct SimNode {
    /// Node number, unique over the run (its address and worker follow from it).
    pub n: usize,
    id: String,
    addr: String,
    /// Every key it advertises.
    pub keys: Vec<String>,
    /// Keys only this node has.
    pub unique: Vec<String>,
    started: Instant,
}

impl SimNode {
    /// Its peer ID.
    pub fn id(&self) -> String {
        self.id.clone()
    }
}

/// A running simulated cluster.
pub struct Sim {
    /// Settings.
    pub config: SimConfig,
    /// Live nodes.
    pub nodes: Vec<SimNode>,
    /// Peer IDs of nodes that left or crashed.
    pub dead: HashSet<String>,
    host: Host,
    next: usize,
    port: u16,
}

/// The outcome of one lookup.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lookup {
    /// Providers returned (peer IDs).
    pub providers: Vec<String>,
    /// Time to the first provider.
    pub first: Option<Duration>,
    /// Time until the answer closed.
    pub closed: Duration,
}

fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| crate::process::status_field(&s, "VmRSS:") as f64)
        .unwrap_or(0.0)
}

fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raises the open-file limit (every connection has two ends here, and 300 routers hold
/// about 120,000): to the kernel's `nr_open` when allowed (root), else to the hard limit.
pub fn raise_fd_limit() {
    let nr_open: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = lim.rlim_max.max(nr_open);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn image_keys(name: &str) -> Vec<String> {
    use sha2::Digest as _;
    let mut keys = vec![format!("docker.io/sim/{name}:v1")];
    for i in 1..KEYS_PER_IMAGE {
        let digest = sha2::Sha256::digest(format!("{name}/{i}").as_bytes());
        keys.push(format!("sha256:{}", hex::encode(digest)));
    }
    keys
}

impl Sim {
    /// An empty cluster; every node listens on the same router port, on its own address.
    /// With `config.workers` set, starts the worker processes (needs a tokio runtime).
    pub fn new(config: SimConfig) -> anyhow::Result<Self> {
        raise_fd_limit();
        let host = Host::new(config.workers)?;
        Ok(Sim {
            config,
            nodes: vec![],
            dead: HashSet::new(),
            host,
            next: 0,
            port: crate::process::free_port()?,
        })
    }

    /// Keys per node.
    pub fn keys_per_node(&self) -> usize {
        self.config.images_per_node * KEYS_PER_IMAGE
    }

    /// Worker processes hosting the routers (0: this process).
    pub fn workers(&self) -> usize {
        self.host.workers()
    }

    /// Starts one node (bootstrapped from up to three random live nodes) and advertises its
    /// keys at once, as the daemon does after its first containerd scan.
    pub async fn add_node(&mut self) -> anyhow::Result<()> {
        let n = self.next;
        self.next += 1;
        let ip = Ipv4Addr::new(127, 77, (n / 250) as u8, (n % 250 + 1) as u8);
        let seeds: Vec<String> = {
            let mut rng = rand::rng();
            self.nodes
                .choose_multiple(&mut rng, SEEDS)
                .map(|s| format!("{}/p2p/{}", s.addr, s.id))
                .collect()
        };
        let unique_images = (self.config.images_per_node / 6).max(1);
        let mut keys = vec![];
        let mut unique = vec![];
        for i in 0..unique_images {
            unique.extend(image_keys(&format!("node{n}-img{i}")));
        }
        keys.extend(unique.iter().cloned());
        {
            let mut rng = rand::rng();
            let pool: Vec<usize> = (0..self.config.pool_images).collect();
            let shared = self.config.images_per_node.saturating_sub(unique_images);
            for &i in pool.choose_multiple(&mut rng, shared) {
                keys.extend(image_keys(&format!("pool{i}")));
            }
        }
        let (id, addr) = self
            .host
            .start(StartSpec {
                node: n,
                listen: format!("{ip}:{}", self.port),
                ttl: self.config.ttl,
                idle_timeout: self.config.idle_timeout,
                seeds,
                keys: keys.clone(),
            })
            .await
            .with_context(|| format!("router {n}"))?;
        self.nodes.push(SimNode {
            n,
            id,
            addr,
            keys,
            unique,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Advertises more keys on node `i` (they join its key set).
    pub async fn advertise(&mut self, i: usize, keys: Vec<String>) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(i).context("no such node")?;
        self.host.advertise(node.n, keys.clone()).await?;
        node.keys.extend(keys);
        Ok(())
    }

    /// Withdraws keys on node `i` (they leave its key set).
    pub async fn withdraw(&mut self, i: usize, keys: Vec<String>) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(i).context("no such node")?;
        self.host.withdraw(node.n, keys.clone()).await?;
        node.keys.retain(|k| !keys.contains(k));
        Ok(())
    }

    /// Stops node `i` gracefully (leave notice) and forgets it; its peer ID.
    pub async fn leave(&mut self, i: usize) -> anyhow::Result<String> {
        anyhow::ensure!(i < self.nodes.len(), "no node {i}");
        let node = self.nodes.swap_remove(i);
        // Dead from here on even if the host failed: it is no longer a live provider.
        self.dead.insert(node.id.clone());
        self.host.leave(node.n).await?;
        Ok(node.id)
    }

    /// Kills node `i` without a word (its sockets close, as when a process is killed); its
    /// peer ID.
    pub async fn crash(&mut self, i: usize) -> anyhow::Result<String> {
        anyhow::ensure!(i < self.nodes.len(), "no node {i}");
        let node = self.nodes.swap_remove(i);
        self.dead.insert(node.id.clone());
        self.host.crash(node.n).await?;
        Ok(node.id)
    }

    /// Looks `key` up on `router`, collecting every provider (bounded wait).
    pub async fn lookup(router: &P2pRouter, key: &str, count: usize) -> Lookup {
        let start = Instant::now();
        let mut providers = vec![];
        let mut first = None;
        // The whole lookup is bounded, the call into the router's event loop too.
        let _ = tokio::time::timeout(host::LOOKUP_LIMIT, async {
            if let Ok(mut rx) = router.lookup(key, count).await {
                while let Some(p) = rx.recv().await {
                    first.get_or_insert_with(|| start.elapsed());
                    providers.push(p.id);
                }
            }
        })
        .await;
        Lookup {
            providers,
            first,
            closed: start.elapsed(),
        }
    }

    /// Looks `key` up from node `i`.
    pub async fn lookup_from(&self, i: usize, key: &str, count: usize) -> anyhow::Result<Lookup> {
        let mut out = self.lookups(vec![(i, key.to_string(), count)], 1).await?;
        out.pop().map(|(_, _, l)| l).context("no lookup result")
    }

    /// Runs `jobs` lookups (from node index, key, count) with at most `parallel` in flight.
    pub async fn lookups(
        &self,
        jobs: Vec<(usize, String, usize)>,
        parallel: usize,
    ) -> anyhow::Result<Vec<(usize, String, Lookup)>> {
        let host_jobs = jobs
            .iter()
            .map(|(from, key, count)| {
                let node = self
                    .nodes
                    .get(*from)
                    .with_context(|| format!("no node {from}"))?;
                Ok(LookupJob {
                    node: node.n,
                    key: key.clone(),
                    count: *count,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let results = self.host.lookups(host_jobs, parallel).await?;
        anyhow::ensure!(results.len() == jobs.len(), "lookups lost");
        Ok(jobs
            .into_iter()
            .zip(results)
            .map(|((from, key, _), l)| (from, key, l))
            .collect())
    }

    /// For every node, `per_node` lookups of a unique key of a random other node (whose ID
    /// must come back) and one of a shared key (some live holder must come back). Returns
    /// (lookups, successes, lookups returning a dead node, the results).
    pub async fn sample_round(
        &self,
        per_node: usize,
        min_age: Duration,
    ) -> anyhow::Result<(usize, usize, usize, Vec<Lookup>)> {
        let mut jobs = vec![];
        let mut expect: std::collections::HashMap<(usize, String), Vec<String>> =
            Default::default();
        {
            let mut rng = rand::rng();
            let n = self.nodes.len();
            for from in 0..n {
                let targets: Vec<usize> = (0..n)
                    .filter(|&t| t != from && self.nodes[t].started.elapsed() >= min_age)
                    .collect();
                for &t in targets.choose_multiple(&mut rng, per_node) {
                    let node = &self.nodes[t];
                    let key = node.unique[rng.random_range(0..node.unique.len())].clone();
                    expect.insert((from, key.clone()), vec![node.id()]);
                    jobs.push((from, key, 1));
                }
                if let Some(&t) = targets.choose(&mut rng) {
                    let key =
                        self.nodes[t].keys[rng.random_range(0..self.nodes[t].keys.len())].clone();
                    let holders = self
                        .nodes
                        .iter()
                        .enumerate()
                        .filter(|(i, h)| *i != from && h.keys.contains(&key))
                        .map(|(_, h)| h.id())
                        .collect();
                    expect.insert((from, key.clone()), holders);
                    jobs.push((from, key, 1));
                }
            }
        }
        let results = self.lookups(jobs, 16).await?;
        let (mut ok, mut stale) = (0, 0);
        let total = results.len();
        let mut out = vec![];
        for (from, key, l) in results {
            let holders = expect
                .get(&(from, key.clone()))
                .cloned()
                .unwrap_or_default();
            if l.providers.iter().any(|p| holders.contains(p)) {
                ok += 1;
            } else {
                // Rare, and each one needs explaining: say who asked for what.
                eprintln!(
                    "not found: node {} (up {:.1} s) looked up {key} ({} holders), got {:?} in {:?}",
                    self.nodes[from].n,
                    self.nodes[from].started.elapsed().as_secs_f64(),
                    holders.len(),
                    l.providers,
                    l.closed
                );
            }
            if l.providers.iter().any(|p| self.dead.contains(p)) {
                stale += 1;
            }
            out.push(l);
        }
        Ok((total, ok, stale, out))
    }

    /// Resource use of the router processes and the live routers' summed counters.
    pub async fn host_stats(&self) -> anyhow::Result<host::HostStats> {
        self.host.stats().await
    }

    /// Kademlia requests and notices handled by live nodes, summed.
    pub async fn messages(&self) -> anyhow::Result<u64> {
        let s = self.host.stats().await?;
        Ok(s.counters.messages())
    }

    /// Lookups answered locally and by DHT query, summed over live nodes.
    pub async fn answer_counts(&self) -> anyhow::Result<(u64, u64)> {
        let s = self.host.stats().await?;
        Ok((s.counters.local_answers, s.counters.dht_queries))
    }

    /// Waits (bounded) until every live node is ready.
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while !self.host.ready().await? {
            anyhow::ensure!(Instant::now() < deadline, "routers not ready in {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Waits (bounded) until every live node's keys have been provided once.
    pub async fn wait_provided(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let deadline = start + limit;
        let mut report_at = start + Duration::from_secs(10);
        loop {
            let s = self.host.stats().await?;
            if s.counters.unprovided == 0 {
                return Ok(());
            }
            if Instant::now() >= report_at {
                eprintln!(
                    "  {:.0} s: keys not yet provided: {}",
                    start.elapsed().as_secs_f64(),
                    s.counters.unprovided
                );
                report_at += Duration::from_secs(10);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} keys not yet provided after {limit:?} (node, keys): {:?}",
                s.counters.unprovided,
                &s.unprovided_by_node[..s.unprovided_by_node.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Samples rounds until one finds every key (bounded); returns (rounds, seconds).
    pub async fn converge(&self, limit: Duration) -> anyhow::Result<(usize, f64)> {
        let start = Instant::now();
        // Rounds of lookups launched while the first provides still run only compete with them
        // for CPU (at 300 routers on 2 cores the first round did not finish in minutes): the
        // provides are waited for first, by their counters, then every round checks.
        self.wait_provided(limit).await?;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (total, ok, _, _) = self.sample_round(5, Duration::ZERO).await?;
            if ok == total {
                return Ok((rounds, start.elapsed().as_secs_f64()));
            }
            // Where a slow convergence stands: keys still waiting for their first provide.
            let unprovided = self.host.stats().await.map_or_else(
                |e| format!("unknown ({e:#})"),
                |s| s.counters.unprovided.to_string(),
            );
            eprintln!(
                "  round {rounds} ({:.0} s): {ok}/{total} found, keys not yet provided: {unprovided}",
                start.elapsed().as_secs_f64()
            );
            anyhow::ensure!(
                start.elapsed() < limit,
                "not converged in {limit:?}: {ok}/{total}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Indices of `count` random live nodes.
    pub fn pick(&self, count: usize) -> Vec<usize> {
        let mut rng = rand::rng();
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let mut v: Vec<usize> = all.choose_multiple(&mut rng, count).copied().collect();
        // Removal by swap_remove: highest index first keeps the others valid.
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    /// Lookups from `probes` random live nodes of every key in `keys`; how many returned
    /// one of `gone`.
    pub async fn count_stale(
        &self,
        keys: &[String],
        gone: &HashSet<String>,
        probes: usize,
    ) -> anyhow::Result<(usize, usize)> {
        let mut jobs = vec![];
        {
            let mut rng = rand::rng();
            let all: Vec<usize> = (0..self.nodes.len()).collect();
            for key in keys {
                for &from in all.choose_multiple(&mut rng, probes) {
                    jobs.push((from, key.clone(), 3));
                }
            }
        }
        let results = self.lookups(jobs, 16).await?;
        let stale = results
            .iter()
            .filter(|(_, _, l)| l.providers.iter().any(|p| gone.contains(p)))
            .count();
        Ok((results.len(), stale))
    }

    /// Stops every router, and the worker processes (bounded).
    pub async fn shutdown(mut self) {
        self.nodes.clear();
        let host = std::mem::replace(&mut self.host, Host::Local(Default::default()));
        host.shutdown().await;
    }
}

/// Runs the whole simulation.
pub async fn run(config: SimConfig) -> anyhow::Result<SimReport> {
    // The process's own memory before any router; with workers their whole RSS counts.
    let rss0 = if config.workers == 0 { rss_kib() } else { 0.0 };
    let mut sim = Sim::new(config.clone())?;
    let mut report = SimReport {
        nodes: config.nodes,
        keys_per_node: sim.keys_per_node(),
        ttl_s: config.ttl.as_secs_f64(),
        idle_timeout_s: config.idle_timeout.as_secs_f64(),
        workers: sim.workers(),
        ..Default::default()
    };
    let result = measure(&mut sim, &config, &mut report, rss0).await;
    // Workers are killed on drop anyway; a clean stop lets them exit on their own first.
    sim.shutdown().await;
    result.map(|()| report)
}

async fn measure(
    sim: &mut Sim,
    config: &SimConfig,
    report: &mut SimReport,
    rss0: f64,
) -> anyhow::Result<()> {
    if config.workers > 0 {
        eprintln!("{} worker processes", config.workers);
    }
    eprintln!("starting {} routers", config.nodes);
    let t0 = Instant::now();
    for _ in 0..config.nodes {
        sim.add_node().await?;
    }
    report.start_s = t0.elapsed().as_secs_f64();
    sim.wait_ready(Duration::from_secs(120)).await?;
    eprintln!("converging");
    let (rounds, secs) = sim.converge(config.converge_limit).await?;
    report.converge_rounds = rounds;
    report.converge_s = secs;
    // Let the provide queues drain before measuring steady figures.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sim.host_stats().await?;
    report.rss_per_router_kib = (s.rss_kib - rss0) / config.nodes.max(1) as f64;
    report.startup_msgs_per_node = s.counters.messages() as f64 / config.nodes as f64;

    eprintln!("measuring hits and misses");
    let (l0, q0) = sim.answer_counts().await?;
    let mut hits = vec![];
    let mut misses = vec![];
    for _ in 0..config.lookups_per_node.div_ceil(5) {
        let (total, ok, _, results) = sim.sample_round(4, Duration::ZERO).await?;
        report.hit_lookups += total;
        report.hit_found += ok;
        hits.extend(results.iter().filter_map(|l| l.first).map(ms));
    }
    let miss_jobs: Vec<(usize, String, usize)> = (0..sim.nodes.len())
        .flat_map(|i| (0..3).map(move |j| (i, format!("sha256:{:064x}", i * 7919 + j + 1), 3)))
        .collect();
    for (_, _, l) in sim.lookups(miss_jobs, 4).await? {
        report.miss_lookups += 1;
        if !l.providers.is_empty() {
            report.miss_false += 1;
        }
        misses.push(ms(l.closed));
    }
    let (l1, q1) = sim.answer_counts().await?;
    let answered = (l1 - l0 + q1 - q0).max(1) as f64;
    report.local_answer_share = (l1 - l0) as f64 / answered;
    report.hit_p50_ms = stats::percentile(&hits, 50.0);
    report.hit_p99_ms = stats::percentile(&hits, 99.0);
    report.miss_p50_ms = stats::percentile(&misses, 50.0);
    report.miss_p99_ms = stats::percentile(&misses, 99.0);
    solo_lookups(sim, config.solo_lookups, report).await?;

    if !config.window.is_zero() {
        eprintln!("steady window {:?}", config.window);
        let s0 = sim.host_stats().await?;
        let start = Instant::now();
        // A light pull load: every node looks up one key of another node every 10 s.
        while start.elapsed() < config.window {
            sim.sample_round(1, Duration::ZERO).await?;
            tokio::time::sleep(Duration::from_secs(10).saturating_sub(Duration::from_millis(1)))
                .await;
        }
        let minutes = start.elapsed().as_secs_f64() / 60.0;
        let per = config.nodes as f64 * minutes;
        let s1 = sim.host_stats().await?;
        report.cpu_ms_per_node_min = (s1.cpu_s - s0.cpu_s) * 1000.0 / per;
        let msgs = |s: &host::HostStats| s.counters.messages();
        report.msgs_per_node_min = msgs(&s1).saturating_sub(msgs(&s0)) as f64 / per;
    }

    eprintln!("graceful leave");
    let count = (config.nodes / 20).max(2);
    let mut gone = HashSet::new();
    let mut gone_keys = vec![];
    for i in sim.pick(count) {
        gone_keys.extend(sim.nodes[i].unique.iter().take(2).cloned());
        gone.insert(sim.leave(i).await?);
    }
    report.left = gone.len();
    let (n, stale) = sim.count_stale(&gone_keys, &gone, 5).await?;
    report.leave_lookups = n;
    report.leave_stale = stale;

    eprintln!("crash");
    let mut crashed = HashSet::new();
    let mut crashed_keys = vec![];
    for i in sim.pick(count) {
        crashed_keys.extend(sim.nodes[i].unique.iter().take(2).cloned());
        crashed.insert(sim.crash(i).await?);
    }
    report.crashed = crashed.len();
    let start = Instant::now();
    loop {
        let (_, stale) = sim.count_stale(&crashed_keys, &crashed, 3).await?;
        if stale == 0 {
            report.crash_clear_s = start.elapsed().as_secs_f64();
            break;
        }
        anyhow::ensure!(
            start.elapsed() < config.ttl + Duration::from_secs(30),
            "crashed providers still returned after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.crash_stale = sim.count_stale(&crashed_keys, &crashed, 5).await?.1;

    if !config.churn.is_zero() {
        eprintln!("churn {:?}", config.churn);
        let per_minute = (config.nodes as f64 * config.churn_per_minute).max(1.0);
        let gap = Duration::from_secs_f64(60.0 / per_minute);
        let start = Instant::now();
        let mut next_replace = start;
        let mut newcomers: Vec<(String, String, Instant)> = vec![];
        let mut findable = vec![];
        let mut crash_next = true;
        while start.elapsed() < config.churn {
            if Instant::now() >= next_replace {
                let i = sim.pick(1)[0];
                if crash_next {
                    sim.crash(i).await?;
                } else {
                    sim.leave(i).await?;
                }
                crash_next = !crash_next;
                sim.add_node().await?;
                let node = sim.nodes.last().context("new node")?;
                newcomers.push((node.id(), node.unique[0].clone(), Instant::now()));
                report.churn_replaced += 1;
                next_replace += gap;
            }
            // Established providers (up for 10 s or more) must always be found.
            let (total, ok, stale, _) = sim.sample_round(1, Duration::from_secs(10)).await?;
            report.churn_lookups += total;
            report.churn_found += ok;
            report.churn_stale += stale;
            // Newcomers: how long until their keys are findable.
            newcomers.retain(|(id, _, _)| sim.nodes.iter().any(|n| n.id == *id));
            let jobs = newcomers
                .iter()
                .map(|(_, key, _)| (sim.pick(1)[0], key.clone(), 1))
                .collect();
            let results = sim.lookups(jobs, 16).await?;
            let mut still = vec![];
            for ((id, key, since), (_, _, l)) in newcomers.drain(..).zip(results) {
                if l.providers.contains(&id) {
                    findable.push(since.elapsed().as_secs_f64());
                } else {
                    still.push((id, key, since));
                }
            }
            newcomers = still;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        report.churn_findable_p50_s = stats::percentile(&findable, 50.0);
        report.churn_findable_max_s = findable.iter().copied().fold(0.0, f64::max);
    }
    Ok(())
}

/// `count` hits and `count` misses, one lookup in flight at a time, from random nodes.
async fn solo_lookups(sim: &Sim, count: usize, report: &mut SimReport) -> anyhow::Result<()> {
    if count == 0 || sim.nodes.len() < 2 {
        return Ok(());
    }
    eprintln!("measuring {count} hits and {count} misses one at a time");
    let msgs = |s: &host::HostStats| s.counters.messages();
    let (mut hits, mut misses) = (vec![], vec![]);
    let s0 = sim.host_stats().await?;
    for k in 0..count {
        // `pick` returns indices in descending order: alternate which one asks.
        let picked = sim.pick(2);
        let (from, target) = if k % 2 == 0 {
            (picked[0], picked[1])
        } else {
            (picked[1], picked[0])
        };
        let node = &sim.nodes[target];
        let key = node.unique[k % node.unique.len()].clone();
        let l = sim.lookup_from(from, &key, 1).await?;
        report.solo_hits += 1;
        if l.providers.contains(&node.id) {
            report.solo_hit_found += 1;
        }
        hits.extend(l.first.map(ms));
    }
    let s1 = sim.host_stats().await?;
    for k in 0..count {
        let from = sim.pick(1)[0];
        // Keys no node advertises (and no other phase looks up).
        let l = sim
            .lookup_from(from, &format!("sha256:{:064x}", 0xdead_0000 + k), 3)
            .await?;
        report.miss_lookups += 1;
        if !l.providers.is_empty() {
            report.miss_false += 1;
        }
        misses.push(ms(l.closed));
    }
    let s2 = sim.host_stats().await?;
    let n = count as f64;
    report.solo_hit_msgs = msgs(&s1).saturating_sub(msgs(&s0)) as f64 / n;
    report.solo_miss_msgs = msgs(&s2).saturating_sub(msgs(&s1)) as f64 / n;
    report.solo_hit_p50_ms = stats::percentile(&hits, 50.0);
    report.solo_hit_p99_ms = stats::percentile(&hits, 99.0);
    report.solo_miss_p50_ms = stats::percentile(&misses, 50.0);
    report.solo_miss_p99_ms = stats::percentile(&misses, 99.0);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One table row's figure of a run.
type Row = Box<dyn Fn(&SimReport) -> String>;

/// The BENCHMARK.md table of full runs.
pub fn table(reports: &[SimReport]) -> String {
    let mut out = String::new();
    let col =
        |f: &dyn Fn(&SimReport) -> String| reports.iter().map(f).collect::<Vec<_>>().join(" | ");
    let header = col(&|r| format!("{} nodes", r.nodes));
    out.push_str(&format!(
        "| | {header} |\n|---|{}\n",
        "---|".repeat(reports.len())
    ));
    let rows: Vec<(&str, Row)> = vec![
        ("keys per node", Box::new(|r| r.keys_per_node.to_string())),
        (
            "worker processes (0: all routers in one)",
            Box::new(|r| r.workers.to_string()),
        ),
        (
            "idle connections closed after (s)",
            Box::new(|r| format!("{:.0}", r.idle_timeout_s)),
        ),
        (
            "start all routers (s)",
            Box::new(|r| format!("{:.1}", r.start_s)),
        ),
        (
            "every sampled key findable after (s, rounds)",
            Box::new(|r| format!("{:.1} ({})", r.converge_s, r.converge_rounds)),
        ),
        (
            "hit lookups found",
            Box::new(|r| format!("{}/{}", r.hit_found, r.hit_lookups)),
        ),
        (
            "hit: first provider p50 / p99 (ms)",
            Box::new(|r| format!("{:.2} / {:.2}", r.hit_p50_ms, r.hit_p99_ms)),
        ),
        (
            "miss: answer closed p50 / p99 (ms)",
            Box::new(|r| format!("{:.2} / {:.2}", r.miss_p50_ms, r.miss_p99_ms)),
        ),
        (
            "one lookup at a time: hits found",
            Box::new(|r| format!("{}/{}", r.solo_hit_found, r.solo_hits)),
        ),
        (
            "one lookup at a time: hit p50 / p99 (ms)",
            Box::new(|r| format!("{:.2} / {:.2}", r.solo_hit_p50_ms, r.solo_hit_p99_ms)),
        ),
        (
            "one lookup at a time: miss p50 / p99 (ms)",
            Box::new(|r| format!("{:.2} / {:.2}", r.solo_miss_p50_ms, r.solo_miss_p99_ms)),
        ),
        (
            "one lookup at a time: DHT messages per hit / miss",
            Box::new(|r| format!("{:.1} / {:.1}", r.solo_hit_msgs, r.solo_miss_msgs)),
        ),
        (
            "misses returning a provider",
            Box::new(|r| format!("{}/{}", r.miss_false, r.miss_lookups)),
        ),
        (
            "lookups answered locally",
            Box::new(|r| format!("{:.0} %", r.local_answer_share * 100.0)),
        ),
        (
            "RSS per router (KiB)",
            Box::new(|r| format!("{:.0}", r.rss_per_router_kib)),
        ),
        (
            "CPU per node per minute (ms)",
            Box::new(|r| format!("{:.1}", r.cpu_ms_per_node_min)),
        ),
        (
            "DHT messages per node per minute",
            Box::new(|r| format!("{:.0}", r.msgs_per_node_min)),
        ),
        (
            "DHT messages per node to join and advertise",
            Box::new(|r| format!("{:.0}", r.startup_msgs_per_node)),
        ),
        (
            // One full provide round per half TTL; the join's messages make it an upper bound.
            "re-provide, amortised: messages per node per minute (at most)",
            Box::new(|r| {
                let half_ttl_min = (r.ttl_s / 2.0 / 60.0).max(f64::MIN_POSITIVE);
                format!("{:.0}", r.startup_msgs_per_node / half_ttl_min)
            }),
        ),
        (
            "graceful leave: lookups returning a leaver",
            Box::new(|r| format!("{}/{} ({} left)", r.leave_stale, r.leave_lookups, r.left)),
        ),
        (
            "crash: no crashed provider returned after (s)",
            Box::new(|r| format!("{:.1} ({} crashed)", r.crash_clear_s, r.crashed)),
        ),
        (
            "churn: nodes replaced",
            Box::new(|r| r.churn_replaced.to_string()),
        ),
        (
            "churn: established providers found",
            Box::new(|r| format!("{}/{}", r.churn_found, r.churn_lookups)),
        ),
        (
            "churn: lookups returning a dead node",
            Box::new(|r| r.churn_stale.to_string()),
        ),
        (
            "churn: new node's keys findable after p50 / max (s)",
            Box::new(|r| {
                format!(
                    "{:.1} / {:.1}",
                    r.churn_findable_p50_s, r.churn_findable_max_s
                )
            }),
        ),
    ];
    for (name, f) in rows {
        out.push_str(&format!("| {name} | {} |\n", col(&*f)));
    }
    out
}
