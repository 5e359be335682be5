//! Coordination of simultaneous misses of one blob, without a central component.
//!
//! On a blob miss the mirror advertises a short-lived [`intent_key`] ("this node is about to
//! fetch it") and, alongside the normal lookup, keeps looking up the intents of other nodes.
//! When the normal lookup ends without a source, the nodes that missed together elect one
//! fetcher by rendezvous hash of (digest, peer ID): a node that saw an intent ranked above its
//! own waits, bounded, until one of those nodes (or any provider the lookups find) answers a
//! HEAD for the blob, then forwards from it; everyone else answers the 404 that sends containerd
//! upstream at once. The top-ranked node of every view never waits, so waits cannot form a
//! cycle, and a node that sees no other intent (a lone puller) answers as before.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, warn};

use super::{
    Shared,
    client::FetchSpec,
    lookup,
    race::{Pool, Winner, race},
};
use crate::{
    metrics,
    routing::{Peer, Router, in_progress_key, intent_key},
};

/// How long an intent stays advertised unless this node found a source earlier: longer than
/// any wait it can cause, short enough that a failed fetch stops attracting waits soon.
pub const INTENT_TTL: Duration = Duration::from_secs(30);
/// Interval of a waiting node's readiness probes and provider lookups.
const POLL: Duration = Duration::from_millis(20);
/// Longest a round of readiness probes may take (an unreachable peer must not use up the wait).
const PROBE_ROUND: Duration = Duration::from_millis(100);
/// Intents asked of the router per lookup: every node that missed at once, in a cluster's
/// lookup horizon.
const INTENT_LOOKUP_PEERS: usize = 20;
/// Pause between repeated intent lookups while the normal lookup still runs.
const INTENT_RELOOKUP: Duration = Duration::from_millis(10);
/// Most intent lookups per miss: a long race must not keep querying the DHT.
const MAX_INTENT_LOOKUPS: usize = 16;

/// How a wait ended (the `outcome` label of `spegel_mirror_waits_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A provider became ready and the request was forwarded from it.
    Forwarded,
    /// No provider became ready within the bound: 404, containerd goes upstream.
    Timeout,
    /// A provider answered ready but the forward from it failed: 404.
    Failed,
}

impl WaitOutcome {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitOutcome::Forwarded => "forwarded",
            WaitOutcome::Timeout => "timeout",
            WaitOutcome::Failed => "failed",
        }
    }
}

/// The rank of `peer` among the nodes that missed `digest` together: the highest fetches.
pub fn score(digest: &str, peer: &str) -> u64 {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(digest.as_bytes());
    hasher.update([0]);
    hasher.update(peer.as_bytes());
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// Whether `a` ranks above `b` for `digest` (ties, which need equal hashes, by peer ID).
fn outranks(digest: &str, a: &str, b: &str) -> bool {
    (score(digest, a), a) > (score(digest, b), b)
}

/// The peers among `seen` that rank above `local` for `digest`, best first.
pub fn outranking(digest: &str, local: &str, seen: &[Peer]) -> Vec<Peer> {
    let mut above: Vec<Peer> = Vec::new();
    for peer in seen {
        if peer.id != local
            && outranks(digest, &peer.id, local)
            && !above.iter().any(|p| p.id == peer.id)
        {
            above.push(peer.clone());
        }
    }
    above.sort_by(|a, b| (score(digest, &b.id), &b.id).cmp(&(score(digest, &a.id), &a.id)));
    above
}

/// This node's intents: which digests it advertises and until when.
pub struct Intents {
    /// This node's peer ID; `None` disables intents (and so waits).
    local: Option<String>,
    ttl: Duration,
    active: Arc<Mutex<HashMap<String, Held>>>,
}

/// One advertised intent; its task withdraws it once settled or expired.
struct Held {
    expires: Instant,
    settled: bool,
    wake: Arc<Notify>,
}

impl Intents {
    /// Intents of node `local` (disabled when `None`).
    pub fn new(local: Option<String>) -> Self {
        Self::with_ttl(local, INTENT_TTL)
    }

    fn with_ttl(local: Option<String>, ttl: Duration) -> Self {
        Intents {
            local,
            ttl,
            active: Default::default(),
        }
    }

    /// [`Intents::watch`] and [`Intents::announce`] at once.
    #[cfg(test)]
    fn begin(&self, router: &Arc<dyn Router>, digest: &str) -> Option<Election> {
        let election = self.watch(router, digest)?;
        self.announce(router, digest);
        Some(election)
    }

    /// Looks up other nodes' intents for `digest` until the returned election is decided or
    /// dropped, without announcing this node's own: started before the lookup of the blob, so
    /// its first answer is in by the time a miss is known.
    pub fn watch(&self, router: &Arc<dyn Router>, digest: &str) -> Option<Election> {
        let local = self.local.clone()?;
        let seen: Arc<Mutex<Vec<Peer>>> = Default::default();
        let task = tokio::spawn(watch(router.clone(), intent_key(digest), seen.clone()));
        Some(Election {
            digest: digest.to_string(),
            local,
            seen,
            task,
        })
    }

    /// Announces this node's miss of `digest` (or renews the announcement) for the intent TTL.
    pub fn announce(&self, router: &Arc<dyn Router>, digest: &str) {
        if self.local.is_none() {
            return;
        }
        let key = intent_key(digest);
        let expires = Instant::now() + self.ttl;
        let fresh = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            match active.get_mut(digest) {
                Some(held) => {
                    held.expires = expires;
                    held.settled = false;
                    None
                }
                None => {
                    let wake = Arc::new(Notify::new());
                    active.insert(
                        digest.to_string(),
                        Held {
                            expires,
                            settled: false,
                            wake: wake.clone(),
                        },
                    );
                    Some(wake)
                }
            }
        };
        // Its own task, never aborted: advertised and withdrawn in this order, whatever the
        // request does meanwhile.
        if let Some(wake) = fresh {
            tokio::spawn(hold(
                router.clone(),
                key,
                digest.to_string(),
                self.active.clone(),
                wake,
            ));
        }
    }

    /// Withdraws the intent for `digest` early: this node found a source for it.
    pub fn settle(&self, digest: &str) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = active.get_mut(digest) {
            held.settled = true;
            held.wake.notify_one();
        }
    }

    /// Whether an intent for `digest` is advertised now and not settled.
    #[cfg(test)]
    fn is_active(&self, digest: &str) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .is_some_and(|h| !h.settled)
    }
}

/// Advertises `key`, then withdraws it once its intent is settled or expired.
async fn hold(
    router: Arc<dyn Router>,
    key: String,
    digest: String,
    active: Arc<Mutex<HashMap<String, Held>>>,
    wake: Arc<Notify>,
) {
    match router.advertise(vec![key.clone()]).await {
        Ok(()) => metrics::global().mirror_intent_advertisements.inc(),
        Err(e) => debug!(error = %e, "intent advertisement failed"),
    }
    loop {
        let expires = {
            let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
            match active.get(&digest) {
                Some(h) if !h.settled && h.expires > Instant::now() => h.expires,
                _ => {
                    active.remove(&digest);
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(expires) => {}
            _ = wake.notified() => {}
        }
    }
    if let Err(e) = router.withdraw(vec![key]).await {
        debug!(error = %e, "intent withdrawal failed");
    }
}

/// Keeps collecting the other providers of intent `key`.
async fn watch(router: Arc<dyn Router>, key: String, seen: Arc<Mutex<Vec<Peer>>>) {
    // Repeated: an intent advertised just after one lookup passed its node is caught by the
    // next. The election is decided (and this task aborted) when the normal lookup ends.
    for _ in 0..MAX_INTENT_LOOKUPS {
        let mut rx = match router.lookup(&key, INTENT_LOOKUP_PEERS).await {
            Ok(rx) => rx,
            Err(e) => {
                debug!(error = %e, "intent lookup failed");
                return;
            }
        };
        while let Some(peer) = rx.recv().await {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if !seen.iter().any(|p| p.id == peer.id) {
                seen.push(peer);
            }
        }
        tokio::time::sleep(INTENT_RELOOKUP).await;
    }
}

/// One miss's view of the other nodes that missed the same blob.
pub struct Election {
    digest: String,
    local: String,
    seen: Arc<Mutex<Vec<Peer>>>,
    task: JoinHandle<()>,
}

impl Election {
    /// Ends the intent lookups and returns the nodes seen that rank above this one.
    pub fn decide(&self) -> Vec<Peer> {
        self.task.abort();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        outranking(&self.digest, &self.local, &seen)
    }
}

#[cfg(test)]
impl Election {
    fn seen_count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// After a miss: if another node that missed `spec`'s blob at the same time outranks this one,
/// waits (bounded) until it or another provider can serve, and forwards from it. `None`: no
/// wait, or none that found a source; the caller answers 404 as it would have without it.
pub(super) async fn wait(
    shared: &Shared,
    election: Election,
    key: &Arc<str>,
    spec: &FetchSpec,
) -> Option<(Pool, Winner, Duration)> {
    let above = election.decide();
    drop(election);
    if above.is_empty() || shared.config.intent_wait.is_zero() {
        return None;
    }
    let started = Instant::now();
    let deadline = started + shared.config.intent_wait;
    debug!(leader = %above[0].id, "another node fetches this blob: waiting for it");
    let probe_spec = FetchSpec {
        path: spec.path.clone(),
        head: true,
        range: None,
    };
    let client = &shared.client;
    let ready = wait_ready(&shared.router, key, above, deadline, |peer: Peer| {
        let spec = probe_spec.clone();
        async move { client.fetch(&peer, &spec).await.is_ok() }
    })
    .await;
    let (outcome, found) = match ready {
        None => (WaitOutcome::Timeout, None),
        Some(peer) => match forward_from(shared, key, peer, spec).await {
            Some(found) => (WaitOutcome::Forwarded, Some(found)),
            None => (WaitOutcome::Failed, None),
        },
    };
    let waited = started.elapsed();
    let m = metrics::global();
    m.mirror_waits.with_label_values(&[outcome.as_str()]).inc();
    m.mirror_wait_duration.observe(waited.as_secs_f64());
    debug!(
        outcome = outcome.as_str(),
        waited_ms = waited.as_millis() as u64,
        "wait ended"
    );
    found.map(|(pool, winner)| (pool, winner, waited))
}

/// Races `spec` over `ready` first, then whatever a fresh lookup finds (for resumes).
async fn forward_from(
    shared: &Shared,
    key: &Arc<str>,
    ready: Peer,
    spec: &FetchSpec,
) -> Option<(Pool, Winner)> {
    let count = shared.config.resolve_retries.max(1);
    let (tx, rx) = mpsc::channel(count * 2 + 1);
    // Cannot fail: the channel is new and has room.
    let _ = tx.try_send(ready);
    match lookup::lookup(
        &shared.router,
        key,
        count,
        true,
        shared.config.resolve_timeout / 2,
    )
    .await
    {
        Ok(lookup::Found { rx: mut more, .. }) => {
            tokio::spawn(async move {
                while let Some(peer) = more.recv().await {
                    if tx.send(peer).await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => debug!(error = %e, "lookup for alternatives failed"),
    }
    let mut pool = Pool::new(key.clone(), rx);
    match race(shared, &mut pool, spec).await {
        Ok(winner) => Some((pool, winner)),
        Err(e) => {
            warn!(error = ?e, "a provider was ready but the forward from it failed");
            None
        }
    }
}

/// Probes `candidates` and the providers lookups of `key` find, every [`POLL`], until one is
/// ready (`probe` says yes) or `deadline` passes.
async fn wait_ready<P, F>(
    router: &Arc<dyn Router>,
    key: &str,
    mut candidates: Vec<Peer>,
    deadline: Instant,
    probe: P,
) -> Option<Peer>
where
    P: Fn(Peer) -> F,
    F: Future<Output = bool>,
{
    let keys = [key.to_string(), in_progress_key(key)];
    let mut lookups: Vec<mpsc::Receiver<Peer>> = Vec::new();
    loop {
        for rx in &mut lookups {
            while let Ok(peer) = rx.try_recv() {
                if !candidates.iter().any(|p| p.id == peer.id) {
                    candidates.push(peer);
                }
            }
        }
        lookups.retain(|rx| !rx.is_closed() || !rx.is_empty());
        // One pair of lookups at a time: a wait must not flood the DHT.
        if lookups.is_empty() {
            for k in &keys {
                match tokio::time::timeout_at(deadline, router.lookup(k, INTENT_LOOKUP_PEERS)).await
                {
                    Ok(Ok(rx)) => lookups.push(rx),
                    Ok(Err(e)) => debug!(error = %e, "lookup while waiting failed"),
                    Err(_) => return None,
                }
            }
        }
        let round_end = deadline.min(Instant::now() + PROBE_ROUND);
        let mut probes: FuturesUnordered<_> = candidates
            .iter()
            .cloned()
            .map(|peer| {
                let ready = probe(peer.clone());
                async move { ready.await.then_some(peer) }
            })
            .collect();
        loop {
            match tokio::time::timeout_at(round_end, probes.next()).await {
                Ok(Some(Some(peer))) => return Some(peer),
                Ok(Some(None)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        drop(probes);
        let next = Instant::now() + POLL;
        if next >= deadline {
            return None;
        }
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::routing::RoutingError;

    const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn peer(id: &str) -> Peer {
        Peer {
            id: id.into(),
            addrs: vec![],
        }
    }

    /// Providers per key, editable while a test runs; records advertisements and withdrawals.
    #[derive(Default)]
    struct FakeRouter {
        providers: Mutex<HashMap<String, Vec<Peer>>>,
        advertised: Mutex<Vec<String>>,
        withdrawn: Mutex<Vec<String>>,
        lookups: AtomicUsize,
    }

    impl FakeRouter {
        fn provide(&self, key: &str, id: &str) {
            self.providers
                .lock()
                .unwrap()
                .entry(key.into())
                .or_default()
                .push(peer(id));
        }
    }

    #[async_trait]
    impl Router for FakeRouter {
        fn ready(&self) -> bool {
            true
        }
        async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError> {
            self.advertised.lock().unwrap().extend(keys);
            Ok(())
        }
        async fn withdraw(&self, keys: Vec<String>) -> Result<(), RoutingError> {
            self.withdrawn.lock().unwrap().extend(keys);
            Ok(())
        }
        async fn lookup(
            &self,
            key: &str,
            count: usize,
        ) -> Result<mpsc::Receiver<Peer>, RoutingError> {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            let peers = self
                .providers
                .lock()
                .unwrap()
                .get(key)
                .cloned()
                .unwrap_or_default();
            let (tx, rx) = mpsc::channel(peers.len().max(1));
            for p in peers.into_iter().take(count) {
                let _ = tx.try_send(p);
            }
            Ok(rx)
        }
    }

    /// Peer IDs ordered by rank for [`DIGEST`], best first.
    fn ranked(ids: &[&str]) -> Vec<String> {
        let mut ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        ids.sort_by(|a, b| (score(DIGEST, b), b).cmp(&(score(DIGEST, a), a)));
        ids
    }

    #[test]
    fn exactly_the_top_ranked_node_waits_for_nobody() {
        let ids = ["p1", "p2", "p3", "p4", "p5"];
        let all: Vec<Peer> = ids.iter().map(|id| peer(id)).collect();
        let order = ranked(&ids);
        let waiting: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !outranking(DIGEST, id, &all).is_empty())
            .collect();
        assert_eq!(waiting.len(), ids.len() - 1);
        assert!(!waiting.contains(&order[0].as_str()));
        // Each node waits for exactly the nodes above it, best first.
        for (i, id) in order.iter().enumerate() {
            let above: Vec<String> = outranking(DIGEST, id, &all)
                .into_iter()
                .map(|p| p.id)
                .collect();
            assert_eq!(above, order[..i].to_vec());
        }
    }

    #[test]
    fn a_node_that_sees_only_itself_never_waits() {
        assert!(outranking(DIGEST, "p1", &[]).is_empty());
        assert!(outranking(DIGEST, "p1", &[peer("p1"), peer("p1")]).is_empty());
    }

    #[test]
    fn the_rank_depends_on_the_digest() {
        // With 16 digests, a fixed pair of nodes is not ordered the same way for all of them
        // (the chance that it is, for a fair hash, is 2^-15): the fetching load spreads.
        let wins = (0..16)
            .filter(|i| {
                let d = format!("sha256:{i:064x}");
                outranks(&d, "node-a", "node-b")
            })
            .count();
        assert!(wins > 0 && wins < 16, "node-a won {wins} of 16");
        assert_eq!(score(DIGEST, "x"), score(DIGEST, "x"));
    }

    /// Polls `done` every millisecond for at most 10 s (a bound against hangs, not a timing
    /// assertion).
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("never: {what}");
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_wait_ends_when_an_outranking_node_is_ready() {
        let router: Arc<dyn Router> = Arc::new(FakeRouter::default());
        let probes = Arc::new(AtomicUsize::new(0));
        let p = probes.clone();
        let got = wait_ready(&router, DIGEST, vec![peer("leader")], far(), move |_| {
            // Ready at the third probe (its own search ended in the meantime).
            let n = p.fetch_add(1, Ordering::Relaxed);
            async move { n >= 2 }
        })
        .await;
        assert_eq!(got.map(|p| p.id).as_deref(), Some("leader"));
        assert_eq!(probes.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_wait_gives_up_at_the_bound() {
        let router: Arc<dyn Router> = Arc::new(FakeRouter::default());
        let probes = Arc::new(AtomicUsize::new(0));
        let p = probes.clone();
        let deadline = Instant::now() + Duration::from_millis(100);
        let got = wait_ready(&router, DIGEST, vec![peer("leader")], deadline, move |_| {
            p.fetch_add(1, Ordering::Relaxed);
            async { false }
        })
        .await;
        assert!(got.is_none());
        assert!(probes.load(Ordering::Relaxed) >= 1);
    }

    #[tokio::test]
    async fn a_probe_that_hangs_does_not_hold_the_wait_beyond_the_bound() {
        let router: Arc<dyn Router> = Arc::new(FakeRouter::default());
        let deadline = Instant::now() + Duration::from_millis(150);
        let got = wait_ready(&router, DIGEST, vec![peer("unreachable")], deadline, |_| {
            std::future::pending::<bool>()
        });
        // The wait itself ends (None); the outer bound only guards the test against a hang.
        let got = tokio::time::timeout(Duration::from_secs(10), got).await;
        assert_eq!(got.ok().map(|p| p.is_none()), Some(true));
    }

    #[tokio::test]
    async fn a_provider_that_appears_while_waiting_is_used() {
        let fake = Arc::new(FakeRouter::default());
        let router: Arc<dyn Router> = fake.clone();
        let rounds = Arc::new(AtomicUsize::new(0));
        let (f, r) = (fake.clone(), rounds.clone());
        // The outranking node never becomes ready; a node found in progress (after the third
        // round) does.
        let got = wait_ready(
            &router,
            DIGEST,
            vec![peer("gone")],
            far(),
            move |p: Peer| {
                if p.id == "gone" && r.fetch_add(1, Ordering::Relaxed) == 2 {
                    f.provide(&in_progress_key(DIGEST), "fetcher");
                }
                async move { p.id == "fetcher" }
            },
        )
        .await;
        assert_eq!(got.map(|p| p.id).as_deref(), Some("fetcher"));
        // Lookups are bounded: at most one pair per round.
        let rounds = rounds.load(Ordering::Relaxed);
        assert!(rounds >= 4);
        assert!(fake.lookups.load(Ordering::Relaxed) <= 2 * rounds);
    }

    #[tokio::test]
    async fn an_election_sees_the_intents_ranked_above() {
        let fake = Arc::new(FakeRouter::default());
        let router: Arc<dyn Router> = fake.clone();
        let order = ranked(&["n1", "n2", "n3"]);
        for id in &order {
            fake.provide(&intent_key(DIGEST), id);
        }
        // The lowest-ranked node waits for both others, best first.
        let low = Intents::new(Some(order[2].clone()));
        let election = low.begin(&router, DIGEST).unwrap();
        eventually("intents seen", || election.seen_count() == 3).await;
        let above: Vec<String> = election.decide().into_iter().map(|p| p.id).collect();
        assert_eq!(above, order[..2].to_vec());
        // The top-ranked node sees the same intents and waits for nobody.
        let top = Intents::new(Some(order[0].clone()));
        let election = top.begin(&router, DIGEST).unwrap();
        eventually("intents seen", || election.seen_count() == 3).await;
        assert!(election.decide().is_empty());
        // Without a peer ID there are no intents at all.
        assert!(Intents::new(None).begin(&router, DIGEST).is_none());
    }

    #[tokio::test]
    async fn intent_lookups_per_miss_are_bounded() {
        let fake = Arc::new(FakeRouter::default());
        let router: Arc<dyn Router> = fake.clone();
        let intents = Intents::new(Some("me".into()));
        let election = intents.begin(&router, DIGEST).unwrap();
        eventually("the lookups end", || election.task.is_finished()).await;
        assert_eq!(fake.lookups.load(Ordering::Relaxed), MAX_INTENT_LOOKUPS);
    }

    #[tokio::test]
    async fn an_intent_is_advertised_once_and_withdrawn_at_its_ttl() {
        let fake = Arc::new(FakeRouter::default());
        let router: Arc<dyn Router> = fake.clone();
        let intents = Intents::with_ttl(Some("me".into()), Duration::from_millis(50));
        drop(intents.begin(&router, DIGEST));
        eventually("intent withdrawn", || {
            !fake.withdrawn.lock().unwrap().is_empty()
        })
        .await;
        assert!(!intents.is_active(DIGEST));
        assert_eq!(*fake.advertised.lock().unwrap(), vec![intent_key(DIGEST)]);
        assert_eq!(*fake.withdrawn.lock().unwrap(), vec![intent_key(DIGEST)]);
    }

    #[tokio::test]
    async fn a_second_miss_extends_the_intent_and_settling_withdraws_it() {
        let fake = Arc::new(FakeRouter::default());
        let router: Arc<dyn Router> = fake.clone();
        let intents = Intents::with_ttl(Some("me".into()), Duration::from_secs(3600));
        drop(intents.begin(&router, DIGEST));
        eventually("intent advertised", || {
            !fake.advertised.lock().unwrap().is_empty()
        })
        .await;
        // A second miss while the first intent is up: no second advertisement.
        drop(intents.begin(&router, DIGEST));
        assert!(intents.is_active(DIGEST));
        intents.settle(DIGEST);
        eventually("intent withdrawn", || {
            !fake.withdrawn.lock().unwrap().is_empty()
        })
        .await;
        assert_eq!(fake.advertised.lock().unwrap().len(), 1);
        assert_eq!(*fake.withdrawn.lock().unwrap(), vec![intent_key(DIGEST)]);
        // A miss after the withdrawal advertises anew.
        drop(intents.begin(&router, DIGEST));
        eventually("intent advertised again", || {
            fake.advertised.lock().unwrap().len() == 2
        })
        .await;
    }
}
