//! Hedged racing of one request over the providers a lookup streams in.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    Shared,
    client::{FetchError, FetchSpec, Fetched},
    selector::{Outcome, PeerSelector},
};
use crate::{
    oci::{ByteRange, Kind},
    routing::Peer,
};

/// Timer-triggered extra fetches per race; failures trigger further fetches on their own.
const MAX_HEDGES: usize = 3;

/// Marks one fetch of a key from a peer as in flight for the selector until dropped.
pub struct InFlight {
    selector: Arc<dyn PeerSelector>,
    key: Arc<str>,
    peer: Peer,
}

impl InFlight {
    fn new(selector: Arc<dyn PeerSelector>, key: Arc<str>, peer: Peer) -> Self {
        selector.begin(&key, &peer);
        InFlight {
            selector,
            key,
            peer,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.selector.finish(&self.key, &self.peer);
    }
}

struct Known {
    peer: Peer,
    /// Failed a fetch for this request: never asked again by it.
    failed: bool,
    /// Times its body broke mid-stream for this request: asked again only as a last resort.
    broken: u32,
}

/// The providers of one key as the lookup discovers them, with per-request health.
pub struct Pool {
    key: Arc<str>,
    lookup: Option<mpsc::Receiver<Peer>>,
    started: Instant,
    /// Whether `spegel_resolve_duration_seconds` has been observed for this lookup.
    resolved: bool,
    known: Vec<Known>,
    /// Providers known to have sent a copy of this key that did not match its digest.
    excluded: HashSet<String>,
}

impl Pool {
    /// Wraps a running lookup for `key`.
    pub fn new(key: Arc<str>, lookup: mpsc::Receiver<Peer>) -> Self {
        Pool {
            key,
            lookup: Some(lookup),
            started: Instant::now(),
            resolved: false,
            known: Vec::new(),
            excluded: HashSet::new(),
        }
    }

    /// Times the resolve (`spegel_resolve_duration_seconds`) from `started`, when the lookup
    /// was asked of the router, instead of from this pool's creation.
    pub fn since(mut self, started: Instant) -> Self {
        self.started = started;
        self
    }

    /// Never asks the providers in `peers` (by id), whatever the lookup delivers.
    pub fn excluding(mut self, peers: HashSet<String>) -> Self {
        self.excluded = peers;
        self
    }

    /// Whether the lookup has finished (no more providers will arrive).
    fn lookup_done(&self) -> bool {
        self.lookup.is_none()
    }

    fn add(&mut self, peer: Peer) {
        // Once per lookup: the time until the first provider was known.
        if !self.resolved {
            self.resolved = true;
            crate::metrics::global()
                .resolve_duration
                .with_label_values(&["libp2p"])
                .observe(self.started.elapsed().as_secs_f64());
        }
        if self.known.iter().any(|k| k.peer.id == peer.id) {
            return;
        }
        if self.excluded.contains(&peer.id) {
            debug!(peer = %peer.id, "skipping a provider that sent a corrupt copy of this key");
            crate::metrics::global().mirror_bad_peer_skips.inc();
            return;
        }
        debug!(peer = %peer.id, "provider found");
        self.known.push(Known {
            peer,
            failed: false,
            broken: 0,
        });
    }

    /// Takes every provider already delivered, so the selector chooses among all of them
    /// rather than whichever arrived first.
    fn drain_ready(&mut self) {
        while let Some(rx) = &mut self.lookup {
            match rx.try_recv() {
                Ok(peer) => self.add(peer),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.lookup = None,
            }
        }
    }

    /// Excludes `peer` from every later race of this request.
    pub fn mark_failed(&mut self, peer: &Peer) {
        if let Some(k) = self.known.iter_mut().find(|k| k.peer.id == peer.id) {
            k.failed = true;
        }
    }

    /// The key whose providers these are.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Providers known so far (the lookup's ready ones included) that did not fail or break
    /// in this request, other than `current`.
    pub fn alternatives(&mut self, current: &Peer) -> Vec<Peer> {
        self.drain_ready();
        self.known
            .iter()
            .filter(|k| !k.failed && k.broken == 0 && k.peer.id != current.id)
            .map(|k| k.peer.clone())
            .collect()
    }

    /// Records that `peer`'s body broke, so resumes prefer other providers.
    pub fn mark_broken(&mut self, peer: &Peer) {
        if let Some(k) = self.known.iter_mut().find(|k| k.peer.id == peer.id) {
            k.broken += 1;
        }
    }

    /// The best provider not yet asked in this race, for a request moving `bytes` of body.
    fn best(
        &self,
        selector: &dyn PeerSelector,
        bytes: Option<u64>,
        asked: &HashSet<String>,
    ) -> Option<Peer> {
        let usable = |k: &&Known| !k.failed && !asked.contains(&k.peer.id);
        let least_broken = self.known.iter().filter(usable).map(|k| k.broken).min()?;
        let mut candidates: Vec<Peer> = self
            .known
            .iter()
            .filter(usable)
            .filter(|k| k.broken == least_broken)
            .map(|k| k.peer.clone())
            .collect();
        selector.order_for(&self.key, bytes, &mut candidates);
        candidates.into_iter().next()
    }
}

async fn next_provider(lookup: &mut Option<mpsc::Receiver<Peer>>) -> Option<Peer> {
    match lookup {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a race produced no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaceError {
    /// The lookup finished without providers and nothing was attempted.
    NoPeer,
    /// The lookup finished and every provider failed.
    Exhausted {
        /// Fetches started.
        attempts: usize,
    },
    /// The lookup produced no provider for the idle timeout while nothing was in flight.
    Idle {
        /// Fetches started.
        attempts: usize,
    },
    /// In-flight fetches produced no response headers before the race timeout.
    Timeout {
        /// Fetches started.
        attempts: usize,
    },
    /// A provider reported the requested range lies outside content of this size.
    Unsatisfiable {
        /// Total content size.
        size: u64,
    },
}

/// Body bytes a fetch of `spec` is expected to move; `None` for a blob of unknown size.
fn expected_bytes(spec: &FetchSpec) -> Option<u64> {
    match (spec.head, spec.path.kind, spec.range) {
        (true, _, _) => Some(0),
        // Manifests are small: their cost is the round trips.
        (false, Kind::Manifest, _) => Some(0),
        (false, Kind::Blob, Some(ByteRange::FromTo(start, end))) => {
            Some(end.saturating_sub(start).saturating_add(1))
        }
        (false, Kind::Blob, Some(ByteRange::Suffix(n))) => Some(n),
        (false, Kind::Blob, _) => None,
    }
}

/// The first successful fetch of a race.
pub struct Winner {
    /// The provider that answered.
    pub peer: Peer,
    /// Its response head and body.
    pub fetched: Fetched,
    /// Keeps the fetch counted as in flight while its body is read.
    pub guard: InFlight,
    /// Fetches this race started (more than one: hedged or retried).
    pub attempts: usize,
}

type FetchFuture =
    Pin<Box<dyn Future<Output = (Peer, InFlight, Duration, Result<Fetched, FetchError>)> + Send>>;

/// Races `spec` over the pool's providers: best first, hedged after the hedge delay, the next
/// provider right after a failure; the first success wins and the others are cancelled.
pub async fn race(shared: &Shared, pool: &mut Pool, spec: &FetchSpec) -> Result<Winner, RaceError> {
    let mut inflight: FuturesUnordered<FetchFuture> = FuturesUnordered::new();
    let mut asked: HashSet<String> = HashSet::new();
    let mut attempts = 0usize;
    // Fetch starts wanted beyond "one whenever nothing is in flight".
    let mut wanted = 0usize;
    let mut hedges_left = MAX_HEDGES;
    let mut next_hedge: Option<tokio::time::Instant> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    let bytes = expected_bytes(spec);
    let resolve_timeout = shared
        .timeouts
        .resolve_timeout(shared.config.resolve_timeout);
    loop {
        while wanted > 0 || inflight.is_empty() {
            let Some(peer) = pool.best(shared.selector.as_ref(), bytes, &asked) else {
                break;
            };
            wanted = wanted.saturating_sub(1);
            asked.insert(peer.id.clone());
            attempts += 1;
            let now = tokio::time::Instant::now();
            deadline.get_or_insert_with(|| {
                let floor = shared.timeouts.race_floor(shared.config.race_timeout_floor);
                now + shared.hedger.race_timeout(floor)
            });
            next_hedge = (hedges_left > 0)
                .then(|| now + shared.timeouts.hedge_delay(shared.hedger.hedge_delay()));
            inflight.push(start_fetch(shared, pool.key.clone(), peer, spec.clone()));
        }
        if inflight.is_empty() && pool.lookup_done() {
            return Err(if attempts == 0 {
                RaceError::NoPeer
            } else {
                RaceError::Exhausted { attempts }
            });
        }
        let busy = !inflight.is_empty();
        tokio::select! {
            biased;
            Some((peer, guard, latency, result)) = inflight.next(), if busy => match result {
                Ok(fetched) => {
                    shared.selector.observe(&peer, Outcome::Success(latency));
                    shared.hedger.observe(latency);
                    debug!(peer = %peer.id, latency_ms = latency.as_millis() as u64, attempts, "peer answered");
                    return Ok(Winner { peer, fetched, guard, attempts });
                }
                Err(FetchError::Unsatisfiable { size }) => return Err(RaceError::Unsatisfiable { size }),
                Err(e) => {
                    warn!(peer = %peer.id, error = %e, "request to peer failed");
                    shared.selector.observe(&peer, Outcome::Failure);
                    pool.mark_failed(&peer);
                    wanted += 1;
                }
            },
            found = next_provider(&mut pool.lookup) => match found {
                Some(peer) => {
                    pool.add(peer);
                    pool.drain_ready();
                }
                None => pool.lookup = None,
            },
            _ = sleep_until_opt(next_hedge), if busy => {
                next_hedge = None;
                hedges_left = hedges_left.saturating_sub(1);
                wanted += 1;
            }
            _ = sleep_until_opt(deadline), if busy => return Err(RaceError::Timeout { attempts }),
            _ = tokio::time::sleep(resolve_timeout), if !busy => {
                return Err(RaceError::Idle { attempts });
            }
        }
    }
}

fn start_fetch(shared: &Shared, key: Arc<str>, peer: Peer, spec: FetchSpec) -> FetchFuture {
    let guard = InFlight::new(shared.selector.clone(), key, peer.clone());
    let client = shared.client.clone();
    let span = info_span!("peer_fetch", peer = %peer.id);
    Box::pin(
        async move {
            let started = Instant::now();
            let result = client.fetch(&peer, &spec).await;
            (peer, guard, started.elapsed(), result)
        }
        .instrument(span),
    )
}
