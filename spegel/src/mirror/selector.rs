//! Peer preference: which provider of a key to try next.
//!
//! Every forwarding decision about peer order goes through [`PeerSelector`], so a different
//! policy (e.g. one fed by kernel latency telemetry) replaces a single object.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::routing::Peer;

/// What one fetch from a peer showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived after this long.
    Success(Duration),
    /// Connection error, unusable response, or a body that broke mid-stream.
    Failure,
}

/// Decides the order in which providers are tried; the one seam for peer preference.
/// Every selector also reports what it knows per peer ([`SelectorStats`]) for the admin pages.
pub trait PeerSelector: SelectorStats + Send + Sync + 'static {
    /// Sorts the candidate providers of `key`, best first.
    fn order(&self, key: &str, peers: &mut [Peer]);
    /// A fetch of `key` from `peer` starts; it is in flight until [`PeerSelector::finish`].
    fn begin(&self, key: &str, peer: &Peer);
    /// A fetch announced by [`PeerSelector::begin`] ended (body done, failed or abandoned).
    fn finish(&self, key: &str, peer: &Peer);
    /// Records what a fetch from `peer` showed.
    fn observe(&self, peer: &Peer, outcome: Outcome);
    /// Sorts like [`PeerSelector::order`] for a request expected to move `bytes` of body
    /// (`None`: a blob of unknown size), for selectors that weigh transfer time.
    fn order_for(&self, key: &str, bytes: Option<u64>, peers: &mut [Peer]) {
        let _ = bytes;
        self.order(key, peers);
    }
    /// A body read from `peer` delivered `bytes` over `elapsed`.
    fn observe_transfer(&self, peer: &Peer, bytes: u64, elapsed: Duration) {
        let _ = (peer, bytes, elapsed);
    }
    /// Whether a body of `key` now arriving from `current` at `rate` bytes/s, with `remaining`
    /// bytes still to come, should move to one of `others` (via a range request from the
    /// exact byte reached). Only selectors that weigh throughput ever say yes.
    fn switch_away(
        &self,
        key: &str,
        current: &Peer,
        rate: f64,
        remaining: u64,
        others: &[Peer],
    ) -> bool {
        let _ = (key, current, rate, remaining, others);
        false
    }
    /// Recent transfer throughput from address `ip` in bytes per second, if measured.
    fn throughput(&self, ip: IpAddr) -> Option<f64> {
        let _ = ip;
        None
    }
}

/// Weight of one recent failure, expressed as extra latency.
const FAILURE_COST_MS: f64 = 1_000.0;
/// Failures count half as much after this long.
const FAILURE_HALF_LIFE: Duration = Duration::from_secs(30);
/// Weight of the newest latency sample in the moving average.
const EWMA_ALPHA: f64 = 0.3;
/// Peers remembered; the least recently seen is forgotten beyond this.
const MAX_PEERS: usize = 4096;

/// Default policy: least in-flight fetches of the same key first (so concurrent pulls of one
/// blob spread over its providers), then fewest recent failures and lowest observed latency.
///
/// Peers never measured count as fastest, so new providers get tried and measured.
#[derive(Default)]
pub struct LatencySelector {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    peers: HashMap<String, PeerStats>,
    inflight: HashMap<(String, String), usize>,
}

struct PeerStats {
    latency_ms: Option<f64>,
    penalty: f64,
    updated: Instant,
}

impl PeerStats {
    fn decayed_penalty(&self, now: Instant) -> f64 {
        let halves =
            now.duration_since(self.updated).as_secs_f64() / FAILURE_HALF_LIFE.as_secs_f64();
        self.penalty * 0.5f64.powf(halves)
    }

    fn score(&self, now: Instant) -> f64 {
        self.latency_ms.unwrap_or(0.0) + self.decayed_penalty(now) * FAILURE_COST_MS
    }
}

/// What the selector knows about one peer, for the UI.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerSnapshot {
    /// Peer ID.
    pub peer: String,
    /// Moving average of the time to response headers, if measured.
    pub latency_ms: Option<f64>,
    /// Recent failures, decayed (each counts [`FAILURE_COST_MS`] in the score).
    pub failures: f64,
    /// Fetches from the peer in flight now, over all keys.
    pub inflight: usize,
    /// The ordering score (lower is preferred).
    pub score: f64,
}

impl LatencySelector {
    /// Every remembered peer's figures, best score first.
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        let state = self.lock();
        let now = Instant::now();
        let mut out: Vec<PeerSnapshot> = state
            .peers
            .iter()
            .map(|(id, s)| PeerSnapshot {
                peer: id.clone(),
                latency_ms: s.latency_ms,
                failures: s.decayed_penalty(now),
                inflight: 0,
                score: s.score(now),
            })
            .collect();
        for ((_, peer), n) in &state.inflight {
            match out.iter_mut().find(|p| &p.peer == peer) {
                Some(p) => p.inflight += n,
                None => out.push(PeerSnapshot {
                    peer: peer.clone(),
                    latency_ms: None,
                    failures: 0.0,
                    inflight: *n,
                    score: 0.0,
                }),
            }
        }
        out.sort_by(|a, b| a.score.total_cmp(&b.score).then(a.peer.cmp(&b.peer)));
        out
    }

    /// A selector with no history.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetches of `key` from `peer` currently in flight.
    #[cfg(test)]
    pub fn inflight(&self, key: &str, peer: &Peer) -> usize {
        self.lock()
            .inflight
            .get(&(key.to_string(), peer.id.clone()))
            .copied()
            .unwrap_or(0)
    }
}

/// What a selector knows of one peer, for the admin pages.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerStat {
    /// Peer ID.
    pub id: String,
    /// Moving average of response-header latency, once measured.
    pub latency_ms: Option<f64>,
    /// Recent failures, decayed (1.0 = one failure just now).
    pub penalty: f64,
    /// Fetches from this peer in flight, over all keys.
    pub inflight: usize,
    /// Kernel or socket round-trip time to the peer, when telemetry knows it.
    pub rtt_ms: Option<f64>,
    /// Recent blob transfer throughput from the peer, once measured.
    pub throughput_bytes_per_second: Option<f64>,
}

/// Read-only view of a selector's per-peer statistics.
pub trait SelectorStats: Send + Sync + 'static {
    /// One entry per known peer, sorted by ID.
    fn peer_stats(&self) -> Vec<PeerStat>;
    /// The peer among `peers` a blob fetch would try first now, without changing any state.
    fn preferred(&self, peers: &[Peer]) -> Option<String>;
}

impl SelectorStats for LatencySelector {
    fn peer_stats(&self) -> Vec<PeerStat> {
        let state = self.lock();
        let now = Instant::now();
        let mut inflight: HashMap<&str, usize> = HashMap::new();
        for ((_, peer), n) in &state.inflight {
            *inflight.entry(peer.as_str()).or_default() += n;
        }
        let mut ids: Vec<&String> = state.peers.keys().collect();
        ids.extend(
            state
                .inflight
                .keys()
                .map(|(_, p)| p)
                .filter(|p| !state.peers.contains_key(*p)),
        );
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let stats = state.peers.get(id);
                PeerStat {
                    id: id.clone(),
                    latency_ms: stats.and_then(|s| s.latency_ms),
                    penalty: stats.map_or(0.0, |s| s.decayed_penalty(now)),
                    inflight: inflight.get(id.as_str()).copied().unwrap_or(0),
                    rtt_ms: None,
                    throughput_bytes_per_second: None,
                }
            })
            .collect()
    }

    fn preferred(&self, peers: &[Peer]) -> Option<String> {
        let mut peers = peers.to_vec();
        self.order("", &mut peers);
        peers.into_iter().next().map(|p| p.id)
    }
}

impl PeerSelector for LatencySelector {
    fn order(&self, key: &str, peers: &mut [Peer]) {
        let state = self.lock();
        let now = Instant::now();
        // Sort keys are computed once: a float score is not a total order, so compare via
        // `total_cmp` on precomputed values rather than recomputing under the sort.
        let mut keyed: Vec<(usize, f64, Peer)> = peers
            .iter()
            .map(|p| {
                let inflight = state
                    .inflight
                    .get(&(key.to_string(), p.id.clone()))
                    .copied()
                    .unwrap_or(0);
                let score = state.peers.get(&p.id).map_or(0.0, |s| s.score(now));
                (inflight, score, p.clone())
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        for (slot, (_, _, peer)) in peers.iter_mut().zip(keyed) {
            *slot = peer;
        }
    }

    fn begin(&self, key: &str, peer: &Peer) {
        *self
            .lock()
            .inflight
            .entry((key.to_string(), peer.id.clone()))
            .or_insert(0) += 1;
    }

    fn finish(&self, key: &str, peer: &Peer) {
        let mut state = self.lock();
        let k = (key.to_string(), peer.id.clone());
        if let Some(n) = state.inflight.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.inflight.remove(&k);
            }
        }
    }

    fn observe(&self, peer: &Peer, outcome: Outcome) {
        let mut state = self.lock();
        let now = Instant::now();
        if !state.peers.contains_key(&peer.id)
            && state.peers.len() >= MAX_PEERS
            && let Some(oldest) = state
                .peers
                .iter()
                .min_by_key(|(_, s)| s.updated)
                .map(|(id, _)| id.clone())
        {
            state.peers.remove(&oldest);
        }
        let stats = state.peers.entry(peer.id.clone()).or_insert(PeerStats {
            latency_ms: None,
            penalty: 0.0,
            updated: now,
        });
        let penalty = stats.decayed_penalty(now);
        stats.updated = now;
        match outcome {
            Outcome::Success(latency) => {
                let ms = latency.as_secs_f64() * 1_000.0;
                stats.latency_ms = Some(match stats.latency_ms {
                    Some(old) => old + EWMA_ALPHA * (ms - old),
                    None => ms,
                });
                // A success is evidence the peer recovered: forgive faster than decay alone.
                stats.penalty = penalty / 2.0;
            }
            Outcome::Failure => stats.penalty = penalty + 1.0,
        }
    }
}

/// The original Spegel's order: least used provider first, round robin, blind to speed.
///
/// For comparisons (`--peer-selection=least-used`); a use is a fetch started.
#[derive(Default)]
pub struct LeastUsedSelector {
    uses: Mutex<HashMap<String, u64>>,
}

impl LeastUsedSelector {
    /// A selector with nothing used yet.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SelectorStats for LeastUsedSelector {
    fn peer_stats(&self) -> Vec<PeerStat> {
        let uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats: Vec<PeerStat> = uses
            .keys()
            .map(|id| PeerStat {
                id: id.clone(),
                latency_ms: None,
                penalty: 0.0,
                inflight: 0,
                rtt_ms: None,
                throughput_bytes_per_second: None,
            })
            .collect();
        stats.sort_by(|a, b| a.id.cmp(&b.id));
        stats
    }

    fn preferred(&self, peers: &[Peer]) -> Option<String> {
        let mut peers = peers.to_vec();
        self.order("", &mut peers);
        peers.into_iter().next().map(|p| p.id)
    }
}

impl PeerSelector for LeastUsedSelector {
    fn order(&self, _key: &str, peers: &mut [Peer]) {
        let uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
        peers.sort_by(|a, b| {
            let ua = uses.get(&a.id).copied().unwrap_or(0);
            let ub = uses.get(&b.id).copied().unwrap_or(0);
            ua.cmp(&ub).then_with(|| a.id.cmp(&b.id))
        });
    }

    fn begin(&self, _key: &str, peer: &Peer) {
        let mut uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
        if !uses.contains_key(&peer.id) && uses.len() >= MAX_PEERS {
            // Forgetting everyone restarts the rotation; bounded memory matters more.
            uses.clear();
        }
        *uses.entry(peer.id.clone()).or_insert(0) += 1;
    }

    fn finish(&self, _key: &str, _peer: &Peer) {}

    fn observe(&self, _peer: &Peer, _outcome: Outcome) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> Peer {
        Peer {
            id: id.to_string(),
            addrs: Vec::new(),
        }
    }

    fn ids(peers: &[Peer]) -> Vec<&str> {
        peers.iter().map(|p| p.id.as_str()).collect()
    }

    #[test]
    fn prefers_fast_and_healthy_peers() {
        let s = LatencySelector::new();
        let mut peers = vec![peer("slow"), peer("fast"), peer("bad"), peer("new")];
        s.observe(&peers[0], Outcome::Success(Duration::from_millis(40)));
        s.observe(&peers[1], Outcome::Success(Duration::from_millis(2)));
        s.observe(&peers[2], Outcome::Success(Duration::from_millis(1)));
        s.observe(&peers[2], Outcome::Failure);
        s.order("k", &mut peers);
        assert_eq!(ids(&peers), ["new", "fast", "slow", "bad"]);
    }

    #[test]
    fn spreads_inflight_fetches_of_one_key() {
        let s = LatencySelector::new();
        let (a, b) = (peer("a"), peer("b"));
        s.observe(&a, Outcome::Success(Duration::from_millis(1)));
        s.observe(&b, Outcome::Success(Duration::from_millis(5)));
        let mut peers = vec![b.clone(), a.clone()];
        s.order("k", &mut peers);
        assert_eq!(ids(&peers), ["a", "b"]);
        s.begin("k", &a);
        s.order("k", &mut peers);
        assert_eq!(ids(&peers), ["b", "a"]);
        // Other keys are not affected by in-flight fetches of "k".
        s.order("other", &mut peers);
        assert_eq!(ids(&peers), ["a", "b"]);
        let stats = s.peer_stats();
        assert_eq!(stats.len(), 2);
        assert_eq!((stats[0].id.as_str(), stats[0].inflight), ("a", 1));
        assert!(stats[0].latency_ms.is_some_and(|l| (l - 1.0).abs() < 1e-6));
        assert_eq!((stats[1].id.as_str(), stats[1].inflight), ("b", 0));
        s.finish("k", &a);
        assert_eq!(s.inflight("k", &a), 0);
        s.order("k", &mut peers);
        assert_eq!(ids(&peers), ["a", "b"]);
    }

    #[test]
    fn least_used_rotates() {
        let s = LeastUsedSelector::new();
        let mut firsts = Vec::new();
        for _ in 0..6 {
            let mut peers = vec![peer("c"), peer("a"), peer("b")];
            s.order_for("k", Some(1 << 20), &mut peers);
            s.begin("k", &peers[0]);
            s.finish("k", &peers[0]);
            firsts.push(peers[0].id.clone());
        }
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
    }
}
