//! A bounded record of recent registry requests (incoming) and peer fetches (outgoing), for
//! the `/visualize` page.
//!
//! Disabled (the default) it is a `None`: recording is one branch and builds nothing. Enabled,
//! it keeps the last `capacity` events in a ring, per-peer totals in a bounded map, and
//! broadcasts each new event to live subscribers; a subscriber that falls behind loses the
//! oldest events (it is told how many) and never slows the recorder.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::broadcast;

/// Default number of events kept.
pub const DEFAULT_CAPACITY: usize = 1000;
/// Events buffered per live subscriber before it starts losing the oldest.
pub const SUBSCRIBER_BUFFER: usize = 256;
/// Peers whose totals are kept; the least recently active is forgotten beyond this.
pub const MAX_PEERS: usize = 512;
/// Longest string field kept (repositories and references come from clients).
const MAX_FIELD: usize = 256;

/// Which way a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A client or peer asked this node's registry.
    In,
    /// This node fetched from a peer.
    Out,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Served from this node's own content.
    Served,
    /// Served with content fetched from a peer.
    Forwarded,
    /// Nobody had it: 404, so the client falls back to the upstream registry.
    Fallback,
    /// An error (or a broken peer body).
    Failed,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Sequence number, increasing by one per recorded event.
    pub id: u64,
    /// Unix time in milliseconds when the request started.
    pub time_ms: u64,
    /// In or out.
    pub direction: Direction,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// Registry the content belongs to.
    pub registry: String,
    /// Repository.
    pub repository: String,
    /// Tag or digest asked for.
    pub reference: String,
    /// Peer ID of the other side, when it is a known peer.
    pub peer: Option<String>,
    /// Address of the other side (client for incoming, peer for outgoing).
    pub remote: Option<String>,
    /// HTTP status.
    pub status: u16,
    /// Body bytes (sent for incoming, received for outgoing).
    pub bytes: u64,
    /// Time from request start to the end of the body (incoming: to the response head).
    pub duration_ms: f64,
    /// How it ended.
    pub outcome: Outcome,
    /// More than one peer was asked for this response.
    pub hedged: bool,
    /// The body was resumed from another peer after breaking.
    pub resumed: bool,
    /// A HEAD request.
    pub head: bool,
    /// Time spent waiting for another node that was fetching the blob from upstream (0: none).
    pub waited_ms: f64,
}

impl Event {
    /// An event with the given fields and the rest zero; `id` and `time_ms` are set when
    /// recorded unless `time_ms` is already set.
    pub fn new(direction: Direction, kind: &'static str, outcome: Outcome) -> Self {
        Event {
            id: 0,
            time_ms: 0,
            direction,
            kind,
            registry: String::new(),
            repository: String::new(),
            reference: String::new(),
            peer: None,
            remote: None,
            status: 0,
            bytes: 0,
            duration_ms: 0.0,
            outcome,
            hedged: false,
            resumed: false,
            head: false,
            waited_ms: 0.0,
        }
    }

    fn bound(&mut self) {
        for s in [
            &mut self.registry,
            &mut self.repository,
            &mut self.reference,
        ] {
            truncate(s);
        }
        for s in [&mut self.peer, &mut self.remote].into_iter().flatten() {
            truncate(s);
        }
    }
}

fn truncate(s: &mut String) {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Totals of the outgoing fetches from one peer and the requests it sent us.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PeerTotals {
    /// Peer ID.
    pub peer: String,
    /// Bytes fetched from the peer.
    pub bytes_in: u64,
    /// Bytes served to the peer.
    pub bytes_out: u64,
    /// Fetches from the peer.
    pub fetches: u64,
    /// Fetches from the peer that failed.
    pub failures: u64,
    /// Time spent on fetches from the peer, in milliseconds.
    pub busy_ms: f64,
    /// Bytes per second over all successful fetches with a body.
    pub throughput: f64,
    /// Unix ms of the last event involving the peer.
    pub last_ms: u64,
}

struct Inner {
    capacity: usize,
    ring: Mutex<VecDeque<Arc<Event>>>,
    peers: Mutex<HashMap<String, PeerTotals>>,
    tx: broadcast::Sender<Arc<Event>>,
    next_id: AtomicU64,
}

/// The record; cheap to clone. [`Activity::default`] is disabled.
#[derive(Clone, Default)]
pub struct Activity {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl Activity {
    /// A record that records nothing.
    pub fn disabled() -> Self {
        Activity { inner: None }
    }

    /// A record of the last `capacity` events (at least 1).
    pub fn enabled(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Activity {
            inner: Some(Arc::new(Inner {
                capacity,
                ring: Mutex::new(VecDeque::with_capacity(capacity)),
                peers: Mutex::new(HashMap::new()),
                tx,
                next_id: AtomicU64::new(1),
            })),
        }
    }

    /// Whether events are recorded.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Records the event `make` builds; `make` is not called when disabled.
    pub fn record(&self, make: impl FnOnce() -> Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut event = make();
        event.bound();
        event.id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        if event.time_ms == 0 {
            event.time_ms = now_ms();
        }
        crate::metrics::global().visualize_events_total.inc();
        if let Some(peer) = &event.peer {
            let mut peers = lock(&inner.peers);
            if !peers.contains_key(peer)
                && peers.len() >= MAX_PEERS
                && let Some(oldest) = peers
                    .values()
                    .min_by_key(|t| t.last_ms)
                    .map(|t| t.peer.clone())
            {
                peers.remove(&oldest);
            }
            let t = peers.entry(peer.clone()).or_insert_with(|| PeerTotals {
                peer: peer.clone(),
                ..Default::default()
            });
            t.last_ms = event.time_ms;
            match event.direction {
                Direction::Out => {
                    t.fetches += 1;
                    t.bytes_in += event.bytes;
                    if event.outcome == Outcome::Failed {
                        t.failures += 1;
                    } else if event.bytes > 0 && event.duration_ms > 0.0 {
                        t.busy_ms += event.duration_ms;
                        t.throughput = t.bytes_in as f64 / (t.busy_ms / 1000.0);
                    }
                }
                Direction::In => t.bytes_out += event.bytes,
            }
        }
        let event = Arc::new(event);
        {
            let mut ring = lock(&inner.ring);
            if ring.len() >= inner.capacity {
                ring.pop_front();
            }
            ring.push_back(event.clone());
        }
        // No receivers is not an error: nobody is watching.
        let _ = inner.tx.send(event);
    }

    /// The events in the ring, oldest first.
    pub fn recent(&self) -> Vec<Arc<Event>> {
        match &self.inner {
            Some(inner) => lock(&inner.ring).iter().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// Number of events in the ring.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| lock(&i.ring).len())
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per-peer totals, most recently active first.
    pub fn peer_totals(&self) -> Vec<PeerTotals> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let mut v: Vec<PeerTotals> = lock(&inner.peers).values().cloned().collect();
        v.sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then(a.peer.cmp(&b.peer)));
        v
    }

    /// A live feed of events recorded from now on; `None` when disabled.
    pub fn subscribe(&self) -> Option<Subscription> {
        self.inner.as_ref().map(|i| Subscription {
            rx: i.tx.subscribe(),
        })
    }

    /// Live subscribers right now.
    pub fn subscribers(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.tx.receiver_count())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a subscription yields next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A new event.
    Event(Arc<Event>),
    /// The subscriber fell behind and this many events were dropped for it.
    Lagged(u64),
    /// The record is gone.
    Closed,
}

/// A live feed of events.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
}

impl Subscription {
    /// Waits for the next event.
    pub async fn next(&mut self) -> Next {
        match self.rx.recv().await {
            Ok(e) => Next::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Next::Lagged(n),
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }

    /// Waits for the next event at most `timeout`; `None` when nothing came.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<Next> {
        tokio::time::timeout(timeout, self.next()).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u64) -> Event {
        let mut e = Event::new(Direction::In, "blob", Outcome::Served);
        e.bytes = n;
        e
    }

    #[test]
    fn ring_keeps_the_newest_capacity_events() {
        let a = Activity::enabled(3);
        for n in 0..10 {
            a.record(|| ev(n));
        }
        let recent = a.recent();
        assert_eq!(recent.len(), 3);
        assert_eq!(
            recent.iter().map(|e| e.bytes).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        assert_eq!(recent.iter().map(|e| e.id).collect::<Vec<_>>(), [8, 9, 10]);
        assert!(recent.iter().all(|e| e.time_ms > 0));
    }

    #[test]
    fn disabled_records_nothing_and_never_builds_events() {
        let a = Activity::disabled();
        let mut built = 0;
        for _ in 0..5 {
            a.record(|| {
                built += 1;
                ev(1)
            });
        }
        assert_eq!(built, 0);
        assert!(a.is_empty());
        assert!(a.subscribe().is_none());
        assert!(a.peer_totals().is_empty());
    }

    #[test]
    fn long_fields_are_truncated_on_char_boundaries() {
        let a = Activity::enabled(2);
        a.record(|| {
            let mut e = ev(0);
            e.repository = "é".repeat(400);
            e.peer = Some("p".repeat(1000));
            e
        });
        let e = &a.recent()[0];
        assert!(e.repository.len() <= MAX_FIELD && e.repository.len() >= MAX_FIELD - 1);
        assert_eq!(e.peer.as_deref().map(str::len), Some(MAX_FIELD));
    }

    #[test]
    fn peer_totals_are_bounded_and_summed() {
        let a = Activity::enabled(10);
        for i in 0..(MAX_PEERS + 20) {
            a.record(|| {
                let mut e = Event::new(Direction::Out, "blob", Outcome::Forwarded);
                e.peer = Some(format!("peer{i}"));
                e.time_ms = 1000 + i as u64;
                e.bytes = 10;
                e.duration_ms = 5.0;
                e
            });
        }
        let totals = a.peer_totals();
        assert_eq!(totals.len(), MAX_PEERS);
        assert_eq!(totals[0].peer, format!("peer{}", MAX_PEERS + 19));
        a.record(|| {
            let mut e = Event::new(Direction::Out, "blob", Outcome::Failed);
            e.peer = Some("peer0-new".into());
            e
        });
        let t = a
            .peer_totals()
            .into_iter()
            .find(|t| t.peer == "peer0-new")
            .unwrap();
        assert_eq!((t.fetches, t.failures), (1, 1));
        let t = a
            .peer_totals()
            .into_iter()
            .find(|t| t.peer == format!("peer{}", MAX_PEERS + 19))
            .unwrap();
        assert_eq!(t.bytes_in, 10);
        assert!((t.throughput - 2000.0).abs() < 1e-6);
    }

    #[tokio::test]
    async fn subscribers_get_new_events_and_laggards_lose_only_old_ones() {
        let a = Activity::enabled(10);
        let mut fast = a.subscribe().unwrap();
        let mut slow = a.subscribe().unwrap();
        assert_eq!(a.subscribers(), 2);
        a.record(|| ev(1));
        assert!(matches!(fast.next().await, Next::Event(e) if e.bytes == 1));
        // The slow subscriber never reads while far more than its buffer is recorded: the
        // recorder is not blocked, and the subscriber is told what it lost.
        let total = SUBSCRIBER_BUFFER as u64 * 3;
        for n in 0..total {
            a.record(|| ev(n + 2));
        }
        assert_eq!(a.len(), 10);
        match slow.next().await {
            Next::Lagged(n) => assert_eq!(n, total + 1 - SUBSCRIBER_BUFFER as u64),
            other => panic!("expected lag, got {other:?}"),
        }
        // After the lag it continues with the oldest event still buffered.
        assert!(matches!(slow.next().await, Next::Event(_)));
        drop(fast);
        drop(slow);
        assert_eq!(a.subscribers(), 0);
        assert!(
            a.subscribe()
                .unwrap()
                .next_timeout(Duration::from_millis(10))
                .await
                .is_none()
        );
    }
}
