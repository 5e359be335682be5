//! Kademlia routing over libp2p: the Swarm is owned by one event loop task; [`P2pRouter`] is
//! a cloneable handle that sends it commands and awaits oneshot replies.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, identify,
    kad::{
        self, GetProvidersOk, Mode, QueryId, QueryResult, RecordKey, store::MemoryStore,
        store::MemoryStoreConfig,
    },
    multiaddr::Protocol,
    noise,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{
    Bootstrapper, Peer, Router, RouterView, RoutingError, load_or_create_identity, multihash_key,
};

/// Kademlia protocol shared by every spegel node (a private DHT, never the IPFS one).
pub const KAD_PROTOCOL: &str = "/spegel/kad/1.0.0";
/// Notices between spegel nodes: withdrawn keys and graceful leave.
pub const NOTICE_PROTOCOL: &str = "/spegel/notice/1.0.0";
/// Most provide queries run at once; the rest queue, so 50,000 keys don't start 50,000 queries.
const MAX_PROVIDE_QUERIES: usize = 64;
/// Provide queries run at once after a start or a failure: the window grows by one per
/// completed provide and halves on a timed-out one, so an overloaded cluster is not pushed into
/// a storm of retries (each timed-out provide used to be retried at the same rate).
const INITIAL_PROVIDE_WINDOW: usize = 8;
/// Keys per notice (provide, withdraw): bounds one message on the wire.
const NOTICE_CHUNK: usize = 1000;
/// Kademlia's replication factor: a provide query stores the record on this many closest
/// nodes, so a cluster of at most this many nodes holds every record on every node.
const REPLICATION: usize = 20;
/// How long a lookup waits for a provider it had to dial before giving up on it.
const DIAL_WAIT: Duration = Duration::from_secs(3);
/// Longest wait before a provide query that failed (timed out) is run again.
const PROVIDE_RETRY: Duration = Duration::from_secs(5);

/// Router settings.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// Listen address, Go style (`:5001`, `10.0.0.1:5001`).
    pub router_addr: String,
    /// This node's registry port, told to peers so they can reach it.
    pub registry_port: u16,
    /// Where the identity is persisted; empty for an ephemeral one.
    pub data_dir: String,
    /// Lifetime of provider records; they are re-provided at half of it.
    pub advertise_ttl: Duration,
    /// Where first peers come from; `None` for a lone node.
    pub bootstrap: Option<Bootstrapper>,
    /// How long a connection without streams stays open ([`IDLE_CONNECTION_TIMEOUT`] in the
    /// daemon: a connected peer is handed out by lookups without a dial).
    pub idle_connection_timeout: Duration,
}

/// The daemon's idle connection timeout: connections to peers stay up.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A notice sent to peers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Notice {
    /// The sender stopped providing these DHT keys.
    Withdraw(Vec<Vec<u8>>),
    /// The sender is shutting down.
    Leave,
    /// The sender provides these DHT keys (small clusters replicate every record to every
    /// node this way); `last` ends a full sync of everything the sender provides.
    Provide {
        /// DHT keys.
        keys: Vec<Vec<u8>>,
        /// This chunk completes a full sync.
        last: bool,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Ack;

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    notice: request_response::json::Behaviour<Notice, Ack>,
}

enum Command {
    Advertise(Vec<String>, oneshot::Sender<()>),
    Withdraw(Vec<String>, oneshot::Sender<()>),
    Lookup {
        key: String,
        count: usize,
        reply: oneshot::Sender<mpsc::Receiver<Peer>>,
    },
    Dial(Vec<Multiaddr>),
    Shutdown(oneshot::Sender<()>),
}

/// Cloneable handle to the libp2p router.
#[derive(Clone)]
pub struct P2pRouter {
    commands: mpsc::Sender<Command>,
    ready: Arc<AtomicBool>,
    peer_id: PeerId,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    listen: Vec<Multiaddr>,
    /// Connected peers and their IPs, kept up to date one peer per event (rebuilding the whole
    /// list, with every peer ID in base58, on each connection event cost O(peers) per event).
    peers: BTreeMap<PeerId, Vec<IpAddr>>,
    stats: RouterStats,
}

/// Counters of one router's work, for benchmarks and the debug UI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RouterStats {
    /// Kademlia requests this node answered (each DHT message is answered once).
    pub kad_requests: u64,
    /// Notices (withdraw, leave, provide) this node received.
    pub notices: u64,
    /// Lookups answered from the local record store without a DHT query.
    pub local_answers: u64,
    /// Lookups that ran a DHT query.
    pub dht_queries: u64,
    /// Advertised keys whose provide query has not yet completed once (queued, running or
    /// waiting for a retry).
    pub unprovided: u64,
}

impl RouterStats {
    /// Adds `other`'s counters to these (sums over routers).
    pub fn add(&mut self, other: &RouterStats) {
        self.kad_requests += other.kad_requests;
        self.notices += other.notices;
        self.local_answers += other.local_answers;
        self.dht_queries += other.dht_queries;
        self.unprovided += other.unprovided;
    }

    /// DHT messages this router received: Kademlia requests and notices.
    pub fn messages(&self) -> u64 {
        self.kad_requests + self.notices
    }
}

fn listen_addrs(router_addr: &str) -> Result<Vec<Multiaddr>, RoutingError> {
    let bad = || RoutingError::Setup(format!("invalid router address {router_addr:?}"));
    let (host, port) =
        crate::net::split_host_port(router_addr).map_err(|e| RoutingError::Setup(e.to_string()))?;
    if host.is_empty() {
        return Ok(vec![
            Multiaddr::from(IpAddr::from([0u8, 0, 0, 0])).with(Protocol::Tcp(port)),
            Multiaddr::from(IpAddr::from([0u16; 8])).with(Protocol::Tcp(port)),
        ]);
    }
    let ip: IpAddr = host.parse().map_err(|_| bad())?;
    Ok(vec![Multiaddr::from(ip).with(Protocol::Tcp(port))])
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Whether a peer's address `ip` can be dialled from another host: not unspecified, not
/// loopback (unless the whole cluster is on loopback), and not IPv6 link-local, which needs the
/// zone of an interface that a peer's listen address does not carry (every fetch tried it first
/// and failed).
fn dialable(ip: IpAddr, loopback_only: bool) -> bool {
    let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
    !ip.is_unspecified() && !link_local && (loopback_only || !ip.is_loopback())
}

fn registry_port_of(agent_version: &str) -> Option<u16> {
    agent_version
        .split_whitespace()
        .find_map(|t| t.strip_prefix("registry-port=")?.parse().ok())
}

impl P2pRouter {
    /// Starts listening and the event loop (plus the bootstrap loop when configured).
    pub async fn start(
        config: P2pConfig,
    ) -> Result<(P2pRouter, tokio::task::JoinHandle<()>), RoutingError> {
        let keypair = load_or_create_identity(&config.data_dir)?;
        let peer_id = keypair.public().to_peer_id();
        let agent = format!(
            "spegel/{} registry-port={}",
            env!("CARGO_PKG_VERSION"),
            config.registry_port
        );
        let ttl = config.advertise_ttl.max(Duration::from_secs(1));
        let setup = |e: String| RoutingError::Setup(e);
        let mut swarm = SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup(e.to_string()))?
            .with_behaviour(|key| {
                let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                kad_config
                    .set_query_timeout(Duration::from_secs(5))
                    .set_provider_record_ttl(Some(ttl))
                    // Re-provides go through our own queue instead (`due_provides`): Kademlia's
                    // job starts every key at once, skips them when 100 queries run, and never
                    // retries one that timed out, so under load records expired unrefreshed.
                    .set_provider_publication_interval(None)
                    .set_record_ttl(Some(ttl))
                    .set_parallelism(NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN));
                let store = MemoryStore::with_config(
                    key.public().to_peer_id(),
                    MemoryStoreConfig {
                        max_records: 1024,
                        max_value_bytes: 65 * 1024,
                        max_providers_per_key: 64,
                        max_provided_keys: 1_000_000,
                    },
                );
                let mut kad =
                    kad::Behaviour::with_config(key.public().to_peer_id(), store, kad_config);
                kad.set_mode(Some(Mode::Server));
                let identify = identify::Behaviour::new(
                    identify::Config::new("/spegel/1.0.0".into(), key.public())
                        .with_agent_version(agent.clone()),
                );
                let notice = request_response::json::Behaviour::new(
                    [(StreamProtocol::new(NOTICE_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(2)),
                );
                Ok(Behaviour {
                    kad,
                    identify,
                    notice,
                })
            })
            .map_err(|e| setup(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
            .build();
        let addrs = listen_addrs(&config.router_addr)?;
        let mut listening = 0;
        for addr in &addrs {
            match swarm.listen_on(addr.clone()) {
                Ok(_) => listening += 1,
                Err(e) => warn!(%addr, error = %e, "cannot listen"),
            }
        }
        if listening == 0 {
            return Err(setup(format!("cannot listen on {}", config.router_addr)));
        }
        let loopback_only = addrs
            .iter()
            .all(|a| ip_of(a).is_some_and(|ip| ip.is_loopback()));
        let (tx, rx) = mpsc::channel(1024);
        let ready = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let router = P2pRouter {
            commands: tx.clone(),
            ready: ready.clone(),
            peer_id,
            shared: shared.clone(),
        };
        let event_loop = EventLoop {
            swarm,
            commands: rx,
            lookups: HashMap::new(),
            queries: HashMap::new(),
            next_lookup: 0,
            ttl,
            peers: HashMap::new(),
            departed: HashSet::new(),
            provide_queue: VecDeque::new(),
            queued: HashSet::new(),
            advertised: HashSet::new(),
            refresh: VecDeque::new(),
            retry: VecDeque::new(),
            provides: HashSet::new(),
            provide_window: INITIAL_PROVIDE_WINDOW,
            unprovided: HashSet::new(),
            stats_unprovided: 0,
            ready,
            shared,
            registry_port: config.registry_port,
            loopback_only,
            leaving: None,
            bootstrapped: false,
        };
        let handle = tokio::spawn(event_loop.run());
        if let Some(bootstrapper) = config.bootstrap {
            let router = router.clone();
            tokio::spawn(async move { router.bootstrap_loop(bootstrapper).await });
        } else {
            info!(
                "no bootstrap configured: running as a lone node (serving local content, not ready)"
            );
        }
        info!(peer_id = %peer_id, "router started");
        Ok((router, handle))
    }

    /// This node's peer ID.
    pub fn local_peer_id(&self) -> String {
        self.peer_id.to_string()
    }

    /// Addresses this node listens on (for `/id` and the debug UI).
    pub fn listen_addrs(&self) -> Vec<String> {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.listen.iter().map(|a| a.to_string()).collect()
    }

    /// Connected peers and their addresses.
    pub fn peers(&self) -> Vec<(String, Vec<String>)> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peers
            .iter()
            .map(|(id, ips)| (id.to_string(), ips.iter().map(IpAddr::to_string).collect()))
            .collect()
    }

    /// Work counters since start.
    pub fn stats(&self) -> RouterStats {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// Tells peers this node is leaving (so they stop routing to it at once), then stops.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
        }
    }

    async fn bootstrap_loop(self, bootstrapper: Bootstrapper) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.commands.is_closed() {
                return;
            }
            if self.ready() {
                backoff = Duration::from_millis(50);
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            match bootstrapper.addrs().await {
                Ok(addrs) if !addrs.is_empty() => {
                    debug!(?addrs, "bootstrapping");
                    if self.commands.send(Command::Dial(addrs)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => debug!("bootstrap found no peers"),
                Err(e) => warn!(error = %e, "failed to run bootstrap"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RoutingError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| RoutingError::Stopped)?;
        rx.await.map_err(|_| RoutingError::Stopped)
    }
}

impl RouterView for P2pRouter {
    fn local_peer_id(&self) -> String {
        P2pRouter::local_peer_id(self)
    }
    fn listen_addrs(&self) -> Vec<String> {
        P2pRouter::listen_addrs(self)
    }
    fn peers(&self) -> Vec<(String, Vec<String>)> {
        P2pRouter::peers(self)
    }
}

#[async_trait]
impl Router for P2pRouter {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.call(|tx| Command::Advertise(keys, tx)).await
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RoutingError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.call(|tx| Command::Withdraw(keys, tx)).await
    }

    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RoutingError> {
        let key = key.to_string();
        self.call(|reply| Command::Lookup {
            key,
            count: count.max(1),
            reply,
        })
        .await
    }
}

struct Lookup {
    tx: mpsc::Sender<Peer>,
    remaining: usize,
    seen: HashSet<PeerId>,
    /// The DHT query still running for this lookup.
    query: Option<QueryId>,
    /// Providers being dialed (or identified) before they are handed out, since when.
    pending: HashMap<PeerId, Instant>,
}

#[derive(Default)]
struct PeerInfo {
    ips: BTreeSet<IpAddr>,
    registry_port: Option<u16>,
    /// Addresses from identify, kept for provider records received by notice.
    addrs: Vec<Multiaddr>,
    /// Identify ran on the current connection.
    identified: bool,
    /// A full provide sync from this peer arrived on the current connection.
    synced: bool,
    /// We sent this peer a full sync on the current connection (so we push it every new
    /// advertisement).
    sent_sync: bool,
}

struct Leaving {
    reply: oneshot::Sender<()>,
    pending: HashSet<request_response::OutboundRequestId>,
    deadline: tokio::time::Instant,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    lookups: HashMap<u64, Lookup>,
    queries: HashMap<QueryId, u64>,
    next_lookup: u64,
    ttl: Duration,
    peers: HashMap<PeerId, PeerInfo>,
    departed: HashSet<PeerId>,
    /// Keys waiting for a provide query (at most [`MAX_PROVIDE_QUERIES`] run at once).
    provide_queue: VecDeque<RecordKey>,
    /// The keys in `provide_queue`, so a key is queued once.
    queued: HashSet<RecordKey>,
    /// Every key this node advertises now.
    advertised: HashSet<RecordKey>,
    /// Re-provide at half the TTL after each successful provide, oldest first.
    refresh: VecDeque<(Instant, RecordKey)>,
    /// Provides that failed, run again after [`EventLoop::retry_delay`], oldest first.
    retry: VecDeque<(Instant, RecordKey)>,
    provides: HashSet<QueryId>,
    /// Provide queries allowed at once (see [`INITIAL_PROVIDE_WINDOW`]).
    provide_window: usize,
    /// Advertised keys without a completed provide yet.
    unprovided: HashSet<RecordKey>,
    /// `unprovided.len()` as last published in the stats.
    stats_unprovided: u64,
    ready: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    registry_port: u16,
    loopback_only: bool,
    leaving: Option<Leaving>,
    /// A Kademlia bootstrap (self-lookup) finished: a small cluster's nodes are all known.
    bootstrapped: bool,
}

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let leave_deadline = self.leaving.as_ref().map(|l| l.deadline);
            tokio::select! {
                _ = tick.tick() => {
                    self.expire_pending();
                    self.due_provides();
                }
                command = self.commands.recv(), if self.leaving.is_none() => match command {
                    Some(c) => self.command(c),
                    // Every handle is gone: nothing can use the router any more.
                    None => return,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = tokio::time::sleep_until(leave_deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if leave_deadline.is_some() => {
                    self.finish_leave();
                    return;
                }
            }
            if self.leaving.as_ref().is_some_and(|l| l.pending.is_empty()) {
                self.finish_leave();
                return;
            }
            self.pump_provides();
            self.update_ready();
            let unprovided = self.unprovided.len() as u64;
            if self.stats_unprovided != unprovided {
                self.stats_unprovided = unprovided;
                self.stat(|s| s.unprovided = unprovided);
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Advertise(keys, reply) => {
                let record_keys: Vec<RecordKey> = keys
                    .iter()
                    .map(|k| RecordKey::new(&multihash_key(k)))
                    .collect();
                {
                    // Peers we sent a full sync answer lookups from their store: every later
                    // advertisement must reach them directly, whatever the cluster size now.
                    let peers: Vec<PeerId> = self
                        .peers
                        .iter()
                        .filter(|(p, i)| i.sent_sync && self.swarm.is_connected(p))
                        .map(|(p, _)| *p)
                        .collect();
                    for chunk in record_keys.chunks(NOTICE_CHUNK) {
                        let notice = Notice::Provide {
                            keys: chunk.iter().map(|k| k.to_vec()).collect(),
                            last: false,
                        };
                        for peer in &peers {
                            self.swarm
                                .behaviour_mut()
                                .notice
                                .send_request(peer, notice.clone());
                        }
                    }
                }
                for key in record_keys {
                    if self.advertised.insert(key.clone()) {
                        self.unprovided.insert(key.clone());
                    }
                    self.enqueue(key);
                }
                let _ = reply.send(());
            }
            Command::Withdraw(keys, reply) => {
                let record_keys: Vec<RecordKey> = keys
                    .iter()
                    .map(|k| RecordKey::new(&multihash_key(k)))
                    .collect();
                let withdrawn: HashSet<&RecordKey> = record_keys.iter().collect();
                self.provide_queue.retain(|k| !withdrawn.contains(k));
                for key in &record_keys {
                    self.queued.remove(key);
                    self.advertised.remove(key);
                    self.unprovided.remove(key);
                    self.swarm.behaviour_mut().kad.stop_providing(key);
                }
                // Peers that stored our records drop them now rather than at expiry.
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for chunk in record_keys.chunks(NOTICE_CHUNK) {
                    let notice = Notice::Withdraw(chunk.iter().map(|k| k.to_vec()).collect());
                    for peer in &peers {
                        self.swarm
                            .behaviour_mut()
                            .notice
                            .send_request(peer, notice.clone());
                    }
                }
                let _ = reply.send(());
            }
            Command::Lookup { key, count, reply } => {
                let record_key = RecordKey::new(&multihash_key(&key));
                let (tx, rx) = mpsc::channel(count.max(1));
                let id = self.next_lookup;
                self.next_lookup += 1;
                self.lookups.insert(
                    id,
                    Lookup {
                        tx,
                        remaining: count.max(1),
                        seen: HashSet::new(),
                        query: None,
                        pending: HashMap::new(),
                    },
                );
                let now = std::time::Instant::now();
                let local: Vec<PeerId> = kad::store::RecordStore::providers(
                    self.swarm.behaviour_mut().kad.store_mut(),
                    &record_key,
                )
                .into_iter()
                .filter(|r| !r.is_expired(now))
                .map(|r| r.provider)
                .collect();
                let authoritative = self.authoritative();
                self.offer(id, local, true);
                // Counted even when the local providers already ended the lookup.
                if authoritative {
                    self.stat(|s| s.local_answers += 1);
                } else if self.lookups.contains_key(&id) {
                    {
                        let query = self.swarm.behaviour_mut().kad.get_providers(record_key);
                        self.queries.insert(query, id);
                        if let Some(l) = self.lookups.get_mut(&id) {
                            l.query = Some(query);
                        }
                        self.stat(|s| s.dht_queries += 1);
                    }
                }
                self.maybe_close(id);
                // Only now: providers known and connected are in the channel when the caller
                // gets it, so it can tell a hit known at once from one still being looked up.
                let _ = reply.send(rx);
            }
            Command::Dial(addrs) => {
                let own: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                for addr in addrs {
                    if own.contains(&addr) {
                        continue;
                    }
                    // A fresh source port: reusing our listen port can self-connect when peers
                    // share the port on one host (a dial to ourselves through another address).
                    let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id()
                        .address(addr.clone())
                        .allocate_new_port()
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%addr, error = %e, "bootstrap dial failed");
                    }
                }
            }
            Command::Shutdown(reply) => {
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                let pending = peers
                    .iter()
                    .map(|p| {
                        self.swarm
                            .behaviour_mut()
                            .notice
                            .send_request(p, Notice::Leave)
                    })
                    .collect();
                info!(peers = peers.len(), "leaving the cluster");
                self.leaving = Some(Leaving {
                    reply,
                    pending,
                    deadline: tokio::time::Instant::now() + Duration::from_secs(2),
                });
            }
        }
    }

    fn finish_leave(&mut self) {
        if let Some(leaving) = self.leaving.take() {
            let _ = leaving.reply.send(());
        }
        self.ready.store(false, Ordering::Relaxed);
    }

    fn pump_provides(&mut self) {
        // A provide query with an empty routing table stores the record only here and is not
        // retried before the next republish (half the TTL): keys advertised before bootstrap
        // wait in the queue instead.
        if self.provide_queue.is_empty() || self.table_size() == 0 {
            return;
        }
        while self.provides.len() < self.provide_window {
            let Some(key) = self.provide_queue.pop_front() else {
                break;
            };
            self.queued.remove(&key);
            match self.swarm.behaviour_mut().kad.start_providing(key) {
                Ok(id) => {
                    self.provides.insert(id);
                }
                Err(e) => warn!(error = %e, "cannot provide key"),
            }
        }
    }

    fn update_ready(&mut self) {
        let connected = self.swarm.connected_peers().next().is_some();
        let ready = self.table_size() > 0 && connected;
        let was_ready = self.ready.swap(ready, Ordering::Relaxed);
        if ready && !was_ready {
            self.provide_again();
        }
    }

    /// Queues every key this node provides for a fresh provide query. Keys provided while the
    /// node had no peer (the first node of a cluster advertises before anyone else is up) were
    /// stored only locally: without this, the others could find them only by asking this node,
    /// and only from the next re-provide on were the records where lookups look first.
    fn provide_again(&mut self) {
        let keys: Vec<RecordKey> = self
            .advertised
            .iter()
            .filter(|k| !self.queued.contains(*k))
            .cloned()
            .collect();
        if !keys.is_empty() {
            debug!(
                keys = keys.len(),
                "connected to the cluster: providing every key again"
            );
        }
        for key in keys {
            self.enqueue(key);
        }
    }

    fn share_listen(&mut self) {
        let listen: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).listen = listen;
    }

    /// Updates `peer`'s entry in the shared snapshot (removed once it is disconnected).
    fn share_peer(&mut self, peer: PeerId) {
        let ips = self.swarm.is_connected(&peer).then(|| {
            self.peers
                .get(&peer)
                .map(|i| i.ips.iter().copied().collect::<Vec<_>>())
                .unwrap_or_default()
        });
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        match ips {
            Some(ips) => {
                shared.peers.insert(peer, ips);
            }
            None => {
                shared.peers.remove(&peer);
            }
        }
    }

    fn remember(&mut self, peer: PeerId, addr: &Multiaddr) {
        if let Some(ip) = ip_of(addr)
            && dialable(ip, self.loopback_only)
        {
            self.peers.entry(peer).or_default().ips.insert(ip);
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let usable =
                    ip_of(&address).is_some_and(|ip| self.loopback_only || !ip.is_loopback());
                if usable {
                    info!(%address, "router listening");
                    self.swarm.add_external_address(address);
                }
                self.share_listen();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.remember(peer_id, endpoint.get_remote_address());
                self.departed.remove(&peer_id);
                self.share_peer(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if let Some(info) = self.peers.get_mut(&peer_id) {
                    info.identified = false;
                    info.synced = false;
                    info.sent_sync = false;
                }
                self.settle_pending(peer_id, false);
                self.share_peer(peer_id);
            }
            SwarmEvent::NewExternalAddrOfPeer { peer_id, address } => {
                self.remember(peer_id, &address)
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, error = %error, "dial failed");
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    self.settle_pending(peer, false);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let port = registry_port_of(&info.agent_version);
                let mut addrs = vec![];
                for addr in info.listen_addrs {
                    let Some(ip) = ip_of(&addr) else { continue };
                    if !dialable(ip, self.loopback_only) {
                        continue;
                    }
                    self.remember(peer_id, &addr);
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                    addrs.push(addr);
                }
                let entry = self.peers.entry(peer_id).or_default();
                entry.registry_port = port;
                entry.addrs = addrs;
                let first = !std::mem::replace(&mut entry.identified, true);
                if first && self.swarm.is_connected(&peer_id) && self.small_cluster() {
                    self.sync_to(peer_id);
                }
                self.settle_pending(peer_id, true);
                self.share_peer(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => {
                match result {
                    QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })) => {
                        if let Some(&lookup) = self.queries.get(&id) {
                            self.offer(lookup, providers, true);
                        }
                    }
                    QueryResult::GetProviders(Err(e)) => {
                        debug!(error = %e, "provider lookup ended with an error")
                    }
                    QueryResult::Bootstrap(_) if step.last => self.bootstrapped = true,
                    QueryResult::StartProviding(result) => {
                        self.provides.remove(&id);
                        let now = Instant::now();
                        match result {
                            Ok(ok) => {
                                self.provide_window =
                                    (self.provide_window + 1).min(MAX_PROVIDE_QUERIES);
                                self.unprovided.remove(&ok.key);
                                self.refresh.push_back((now + self.ttl / 2, ok.key));
                            }
                            Err(e) => {
                                self.provide_window = (self.provide_window / 2).max(1);
                                // A timed-out provide stored the record nowhere: run it again.
                                debug!(error = %e, "provide query incomplete, retrying");
                                let key = e.key().clone();
                                self.retry.push_back((now + self.retry_delay(), key));
                            }
                        }
                    }
                    _ => {}
                }
                if step.last {
                    // Dropping the sender closes the lookup's channel ("no more providers")
                    // once no provider is still being dialed.
                    if let Some(lookup) = self.queries.remove(&id) {
                        if let Some(l) = self.lookups.get_mut(&lookup) {
                            l.query = None;
                        }
                        self.maybe_close(lookup);
                    }
                    self.provides.remove(&id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest { .. })) => {
                self.stat(|s| s.kad_requests += 1);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Notice(request_response::Event::Message {
                peer,
                message,
                ..
            })) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.stat(|s| s.notices += 1);
                    match request {
                        Notice::Leave => {
                            info!(%peer, "peer left the cluster");
                            self.departed.insert(peer);
                            if let Some(info) = self.peers.get_mut(&peer) {
                                info.synced = false;
                            }
                            self.swarm.behaviour_mut().kad.remove_peer(&peer);
                            self.settle_pending(peer, false);
                        }
                        Notice::Provide { keys, last } => {
                            let addresses = self
                                .peers
                                .get(&peer)
                                .map(|i| i.addrs.clone())
                                .unwrap_or_default();
                            let expires = Some(std::time::Instant::now() + self.ttl);
                            let store = self.swarm.behaviour_mut().kad.store_mut();
                            for key in keys {
                                let record = kad::ProviderRecord {
                                    key: RecordKey::from(key),
                                    provider: peer,
                                    expires,
                                    addresses: addresses.clone(),
                                };
                                if let Err(e) = kad::store::RecordStore::add_provider(store, record)
                                {
                                    debug!(%peer, error = %e, "provider record not stored");
                                }
                            }
                            if last && let Some(info) = self.peers.get_mut(&peer) {
                                info.synced = true;
                            }
                        }
                        Notice::Withdraw(keys) => {
                            let store = self.swarm.behaviour_mut().kad.store_mut();
                            for key in keys {
                                kad::store::RecordStore::remove_provider(
                                    store,
                                    &RecordKey::from(key),
                                    &peer,
                                );
                            }
                        }
                    }
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .notice
                        .send_response(channel, Ack);
                }
                request_response::Message::Response { request_id, .. } => {
                    if let Some(l) = self.leaving.as_mut() {
                        l.pending.remove(&request_id);
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Notice(
                request_response::Event::OutboundFailure { request_id, .. },
            )) => {
                if let Some(l) = self.leaving.as_mut() {
                    l.pending.remove(&request_id);
                }
            }
            _ => {}
        }
    }

    fn stat(&self, f: impl FnOnce(&mut RouterStats)) {
        f(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()).stats);
    }

    /// Peers in the Kademlia routing table.
    fn table_size(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum()
    }

    /// At most [`REPLICATION`] nodes: every provide query reaches every node.
    fn small_cluster(&mut self) -> bool {
        self.table_size() < REPLICATION && self.swarm.connected_peers().count() < REPLICATION
    }

    /// The local record store holds every live provider record of the cluster: the cluster is
    /// small and every connected peer has sent us a full sync (after which its advertisements
    /// arrive by notice at once). Peers that never sync (other implementations) keep this
    /// false, so lookups then use the DHT. A peer that disconnected keeps its records here
    /// until they expire; lookups dial it before handing it out.
    fn authoritative(&mut self) -> bool {
        // Before the first bootstrap query ends, a joining node may know only its seeds.
        if !self.bootstrapped || !self.small_cluster() {
            return false;
        }
        let peers = &self.peers;
        self.swarm
            .connected_peers()
            .all(|p| peers.get(p).is_some_and(|i| i.synced))
    }

    /// Sends `peer` everything this node provides, ending with `last`.
    fn sync_to(&mut self, peer: PeerId) {
        let keys: Vec<Vec<u8>> = self.advertised.iter().map(|k| k.to_vec()).collect();
        let chunks: Vec<Vec<Vec<u8>>> = if keys.is_empty() {
            vec![vec![]]
        } else {
            keys.chunks(NOTICE_CHUNK).map(|c| c.to_vec()).collect()
        };
        let n = chunks.len();
        self.peers.entry(peer).or_default().sent_sync = true;
        for (i, keys) in chunks.into_iter().enumerate() {
            self.swarm.behaviour_mut().notice.send_request(
                &peer,
                Notice::Provide {
                    keys,
                    last: i + 1 == n,
                },
            );
        }
    }

    /// Considers `providers` for lookup `id`: live, identified ones are handed out at once; the
    /// others are dialed first when `dial` (a provider we cannot reach is never handed out).
    fn offer(&mut self, id: u64, providers: impl IntoIterator<Item = PeerId>, dial: bool) {
        let local = *self.swarm.local_peer_id();
        for provider in providers {
            let Some(lookup) = self.lookups.get_mut(&id) else {
                return;
            };
            if provider == local
                || self.departed.contains(&provider)
                || !lookup.seen.insert(provider)
            {
                continue;
            }
            let connected = self.swarm.is_connected(&provider);
            let identified = self.peers.get(&provider).is_some_and(|i| i.identified);
            if connected && identified {
                self.deliver(id, provider);
            } else if dial {
                lookup.pending.insert(provider, Instant::now());
                if !connected {
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(provider)
                        .condition(
                            libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing,
                        )
                        .build();
                    if let Err(e) = self.swarm.dial(opts)
                        && !matches!(e, libp2p::swarm::DialError::DialPeerConditionFalse(_))
                    {
                        debug!(%provider, error = %e, "cannot dial provider");
                        lookup.pending.remove(&provider);
                    }
                }
            }
        }
    }

    /// Hands `provider` to lookup `id`, ending the lookup when it has enough.
    fn deliver(&mut self, id: u64, provider: PeerId) {
        let mut ips: BTreeSet<IpAddr> = self
            .peers
            .get(&provider)
            .map(|p| p.ips.clone())
            .unwrap_or_default();
        if ips.is_empty() {
            // Fall back to what the routing table knows of the provider.
            for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                for entry in bucket.iter() {
                    if *entry.node.key.preimage() == provider {
                        ips.extend(
                            entry
                                .node
                                .value
                                .iter()
                                .filter_map(ip_of)
                                .filter(|ip| dialable(*ip, self.loopback_only)),
                        );
                    }
                }
            }
        }
        if ips.is_empty() {
            debug!(%provider, "provider without a known address");
            return;
        }
        let port = self
            .peers
            .get(&provider)
            .and_then(|p| p.registry_port)
            .unwrap_or(self.registry_port);
        let peer = Peer {
            id: provider.to_string(),
            addrs: ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
        };
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        let full = lookup.tx.try_send(peer).is_err() || {
            lookup.remaining -= 1;
            lookup.remaining == 0
        };
        if full {
            self.end_lookup(id);
        }
    }

    /// Ends lookup `id` now (closing its channel) and stops its query.
    fn end_lookup(&mut self, id: u64) {
        if let Some(lookup) = self.lookups.remove(&id)
            && let Some(query) = lookup.query
        {
            self.queries.remove(&query);
            if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&query) {
                q.finish();
            }
        }
    }

    /// Closes lookup `id` once its query is over and no provider is being dialed.
    fn maybe_close(&mut self, id: u64) {
        if self
            .lookups
            .get(&id)
            .is_some_and(|l| l.query.is_none() && l.pending.is_empty())
        {
            self.lookups.remove(&id);
        }
    }

    /// `peer` became usable (identified) or unusable (`ok == false`): settle lookups waiting
    /// for it.
    fn settle_pending(&mut self, peer: PeerId, ok: bool) {
        let waiting: Vec<u64> = self
            .lookups
            .iter_mut()
            .filter_map(|(id, l)| l.pending.remove(&peer).map(|_| *id))
            .collect();
        for id in waiting {
            if ok {
                self.deliver(id, peer);
            }
            self.maybe_close(id);
        }
    }

    /// Queues `key` for a provide query unless it is queued already.
    fn enqueue(&mut self, key: RecordKey) {
        if self.queued.insert(key.clone()) {
            self.provide_queue.push_back(key);
        }
    }

    /// A failed provide runs again well within the record's lifetime.
    fn retry_delay(&self) -> Duration {
        (self.ttl / 8).min(PROVIDE_RETRY)
    }

    /// Queues the re-provides and retries that are due, for keys still advertised.
    fn due_provides(&mut self) {
        let now = Instant::now();
        let mut due = vec![];
        for list in [&mut self.refresh, &mut self.retry] {
            while list.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, key)) = list.pop_front() {
                    due.push(key);
                }
            }
        }
        for key in due {
            if self.advertised.contains(&key) {
                self.enqueue(key);
            }
        }
    }

    fn expire_pending(&mut self) {
        let ids: Vec<u64> = self
            .lookups
            .iter_mut()
            .filter_map(|(id, l)| {
                let before = l.pending.len();
                l.pending.retain(|_, since| since.elapsed() < DIAL_WAIT);
                (l.pending.len() != before).then_some(*id)
            })
            .collect();
        for id in ids {
            self.maybe_close(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_another_host_can_dial_are_kept() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(dialable(ip("10.99.0.3"), false));
        assert!(dialable(ip("2001:db8::1"), false));
        assert!(!dialable(ip("fe80::2ccd:70ff:fee4:d285"), false));
        assert!(!dialable(ip("fe80::1"), true));
        assert!(!dialable(ip("0.0.0.0"), false));
        assert!(!dialable(ip("127.0.0.1"), false));
        assert!(dialable(ip("127.0.0.1"), true));
    }
}
