//! Peer preference: which provider of a key to try next.
//!
//! Every forwarding decision about peer order goes through [`PeerSelector`], so a different
//! policy (e.g. one fed by kernel latency telemetry) replaces a single object.

use std::{
    collections::HashMap,
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
pub trait PeerSelector: Send + Sync + 'static {
    /// Sorts the candidate providers of `key`, best first.
    fn order(&self, key: &str, peers: &mut [Peer]);
    /// A fetch of `key` from `peer` starts; it is in flight until [`PeerSelector::finish`].
    fn begin(&self, key: &str, peer: &Peer);
    /// A fetch announced by [`PeerSelector::begin`] ended (body done, failed or abandoned).
    fn finish(&self, key: &str, peer: &Peer);
    /// Records what a fetch from `peer` showed.
    fn observe(&self, peer: &Peer, outcome: Outcome);
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
    pub fn inflight(&self, key: &str, peer: &Peer) -> usize {
        self.lock()
            .inflight
            .get(&(key.to_string(), peer.id.clone()))
            .copied()
            .unwrap_or(0)
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
        s.finish("k", &a);
        assert_eq!(s.inflight("k", &a), 0);
        s.order("k", &mut peers);
        assert_eq!(ids(&peers), ["a", "b"]);
    }
}
