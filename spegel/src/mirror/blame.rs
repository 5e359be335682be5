//! Peers that sent a blob not matching its digest, remembered per digest for a while so the
//! next requests for that digest go elsewhere (another provider, or upstream through the 404)
//! instead of to the same bad copy.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{error, warn};

use super::{Shared, selector::Outcome};
use crate::{metrics, oci::Digest, routing::Peer};

/// How long a peer stays bad for a digest: long enough for containerd's retries and the
/// peer's own re-verification, short enough that a repaired copy is used again.
pub const BAD_PEER_TTL: Duration = Duration::from_secs(600);
/// Most `(digest, peer)` pairs remembered; the oldest go first beyond it.
pub const BAD_PEER_CAPACITY: usize = 4096;

/// A bounded, expiring set of `(digest, peer id)` pairs.
#[derive(Debug)]
pub struct BadPeers {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<(String, String), Instant>>,
}

impl Default for BadPeers {
    fn default() -> Self {
        BadPeers::new(BAD_PEER_TTL, BAD_PEER_CAPACITY)
    }
}

impl BadPeers {
    /// Pairs kept for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        BadPeers {
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers `peer` as bad for `digest`; whether it was not already.
    pub fn mark(&self, digest: &str, peer: &str) -> bool {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = (digest.to_string(), peer.to_string());
        let fresh = entries
            .get(&key)
            .is_none_or(|at| now.duration_since(*at) >= self.ttl);
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            entries.retain(|_, at| now.duration_since(*at) < self.ttl);
            if entries.len() >= self.capacity
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, now);
        fresh
    }

    /// Ids of the peers currently bad for `digest`.
    pub fn bad_for(&self, digest: &str) -> HashSet<String> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, at| now.duration_since(*at) < self.ttl);
        entries
            .keys()
            .filter(|(d, _)| d == digest)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Pairs remembered now (expired ones may still be counted until the next look-up).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The peers whose bytes went into one forwarded body, in the order they contributed.
#[derive(Debug, Clone, Default)]
pub struct Contributors(Arc<Mutex<Vec<Peer>>>);

impl Contributors {
    /// Records that `peer` delivered bytes of the body.
    pub fn add(&self, peer: &Peer) {
        let mut peers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !peers.iter().any(|p| p.id == peer.id) {
            peers.push(peer.clone());
        }
    }

    /// Every peer that delivered bytes.
    pub fn peers(&self) -> Vec<Peer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A whole blob forwarded for `digest` did not hash to it: every peer that supplied bytes of it
/// is bad for that digest (a body resumed across providers cannot tell whose bytes were
/// wrong), is demoted in the selector, and is asked to verify its copy.
pub(super) fn blob_mismatch(shared: &Arc<Shared>, digest: &Digest, peers: Vec<Peer>) {
    let key = digest.to_string();
    if let Some(hook) = &shared.config.on_corrupt_blob {
        hook(digest);
    }
    for peer in peers {
        error!(%digest, peer = %peer.id, "peer served a blob that does not match its digest; not asking it for this digest again");
        if shared.bad_peers.mark(&key, &peer.id) {
            metrics::global().mirror_bad_peers.inc();
        }
        shared.selector.observe(&peer, Outcome::Failure);
        let client = shared.client.clone();
        let digest = digest.clone();
        // Only a hint: the peer hashes its own copy and decides; nothing waits for it.
        tokio::spawn(async move {
            if let Err(e) = client.report_mismatch(&peer, &digest).await {
                warn!(peer = %peer.id, error = %e, "could not report a corrupt blob to its peer");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_per_digest_and_expire() {
        let bad = BadPeers::new(Duration::from_millis(50), 16);
        assert!(bad.mark("sha256:a", "p1"));
        assert!(!bad.mark("sha256:a", "p1"), "already bad");
        bad.mark("sha256:b", "p2");
        assert_eq!(bad.bad_for("sha256:a"), HashSet::from(["p1".to_string()]));
        assert_eq!(bad.bad_for("sha256:b"), HashSet::from(["p2".to_string()]));
        assert!(bad.bad_for("sha256:c").is_empty());
        std::thread::sleep(Duration::from_millis(60));
        assert!(bad.bad_for("sha256:a").is_empty());
        assert!(bad.is_empty());
        assert!(bad.mark("sha256:a", "p1"), "bad again after expiry");
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let bad = BadPeers::new(Duration::from_secs(600), 3);
        for i in 0..10 {
            bad.mark(&format!("sha256:{i}"), "p");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(bad.len(), 3);
        assert!(bad.bad_for("sha256:0").is_empty());
        assert_eq!(bad.bad_for("sha256:9").len(), 1);
    }

    #[test]
    fn contributors_are_recorded_once_in_order() {
        let c = Contributors::default();
        let p = |id: &str| Peer {
            id: id.into(),
            addrs: vec![],
        };
        c.add(&p("a"));
        c.add(&p("b"));
        c.add(&p("a"));
        let ids: Vec<String> = c.peers().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, vec!["a", "b"]);
    }
}
