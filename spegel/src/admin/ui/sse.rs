//! Server-Sent Events: framing, and the live stream of `/visualize`.
//!
//! The stream is fed by a broadcast subscription, so the recorder never waits for a client:
//! a client that does not read lags (and is told how many events it lost), and one that stops
//! reading entirely is cut off by the server's write-stall timeout.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::activity::{Next, Subscription};

/// One SSE message: optional `id` and `event` name, and `data` split into `data:` lines.
///
/// Line breaks in `event` are removed (they would end the field); every line ending in
/// `data` (CRLF, CR or LF) starts a new `data:` line, so no input can inject fields.
pub fn frame(event: Option<&str>, id: Option<u64>, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    if let Some(event) = event {
        let clean: String = event.chars().filter(|c| *c != '\n' && *c != '\r').collect();
        out.push_str(&format!("event: {clean}\n"));
    }
    let normalised = data.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalised.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// An SSE comment line (ignored by clients; keeps proxies and dead-peer detection going).
pub fn comment(text: &str) -> String {
    let clean: String = text.chars().filter(|c| *c != '\n' && *c != '\r').collect();
    format!(": {clean}\n\n")
}

/// Counts one open stream against a limit; released when dropped.
pub struct ClientGuard {
    counter: Arc<AtomicUsize>,
}

impl ClientGuard {
    /// Takes a slot if fewer than `max` are taken.
    pub fn acquire(counter: &Arc<AtomicUsize>, max: usize) -> Option<ClientGuard> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ClientGuard {
            counter: counter.clone(),
        })
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Builds the `peers` message pushed every interval.
pub type PeersFn = Box<dyn Fn() -> String + Send + Sync>;

struct State {
    subscription: Subscription,
    _guard: ClientGuard,
    interval: tokio::time::Interval,
    peers: PeersFn,
    started: bool,
}

/// The live stream: `retry` and `hello` first, then a `request` message per event, `lagged`
/// when events were dropped for this client, and `peers` every `interval`.
pub fn stream(
    subscription: Subscription,
    guard: ClientGuard,
    interval: Duration,
    peers: PeersFn,
) -> BoxStream<'static, io::Result<Bytes>> {
    let mut interval = tokio::time::interval(interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State {
        subscription,
        _guard: guard,
        interval,
        peers,
        started: false,
    };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        if !s.started {
            s.started = true;
            let hello = format!("retry: 2000\n\n{}", frame(Some("hello"), None, "{}"));
            return Some((Ok(Bytes::from(hello)), s));
        }
        let text = tokio::select! {
            next = s.subscription.next() => match next {
                Next::Event(e) => {
                    let data = serde_json::to_string(&*e).unwrap_or_else(|_| "{}".into());
                    frame(Some("request"), Some(e.id), &data)
                }
                Next::Lagged(n) => frame(Some("lagged"), None, &n.to_string()),
                Next::Closed => return None,
            },
            _ = s.interval.tick() => frame(Some("peers"), None, &(s.peers)()),
        };
        Some((Ok(Bytes::from(text)), s))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::{Activity, Direction, Event, Outcome};
    use futures::StreamExt;

    #[test]
    fn frames_messages() {
        assert_eq!(
            frame(Some("request"), Some(7), "{\"a\":1}"),
            "id: 7\nevent: request\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(frame(None, None, ""), "data: \n\n");
        // Line breaks of every kind become separate data lines; nothing can start a field.
        assert_eq!(
            frame(None, None, "a\nb\r\nc\rid: 9"),
            "data: a\ndata: b\ndata: c\ndata: id: 9\n\n"
        );
        assert_eq!(
            frame(Some("x\nid: 3"), None, "d"),
            "event: xid: 3\ndata: d\n\n"
        );
        assert_eq!(comment("ping\nevent: x"), ": pingevent: x\n\n");
    }

    #[test]
    fn guard_limits_clients() {
        let c = Arc::new(AtomicUsize::new(0));
        let a = ClientGuard::acquire(&c, 2).unwrap();
        let b = ClientGuard::acquire(&c, 2).unwrap();
        assert!(ClientGuard::acquire(&c, 2).is_none());
        drop(a);
        let _c2 = ClientGuard::acquire(&c, 2).unwrap();
        drop(b);
        assert_eq!(c.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn stream_sends_hello_events_lag_and_peers() {
        let activity = Activity::enabled(10);
        let counter = Arc::new(AtomicUsize::new(0));
        let guard = ClientGuard::acquire(&counter, 1).unwrap();
        let mut s = stream(
            activity.subscribe().unwrap(),
            guard,
            Duration::from_secs(3600),
            Box::new(|| "[]".to_string()),
        );
        let first = s.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"retry: 2000\n\nevent: hello\n"));
        // The interval's first tick is immediate.
        let peers = s.next().await.unwrap().unwrap();
        assert_eq!(&peers[..], b"event: peers\ndata: []\n\n");
        activity.record(|| Event::new(Direction::Out, "blobs", Outcome::Forwarded));
        let msg = s.next().await.unwrap().unwrap();
        let text = std::str::from_utf8(&msg).unwrap();
        assert!(text.starts_with("id: 1\nevent: request\ndata: {"), "{text}");
        assert!(text.contains("\"outcome\":\"forwarded\""));
        assert!(text.contains("\"direction\":\"out\""));
        for _ in 0..(crate::activity::SUBSCRIBER_BUFFER + 5) {
            activity.record(|| Event::new(Direction::In, "blobs", Outcome::Served));
        }
        let msg = s.next().await.unwrap().unwrap();
        assert_eq!(&msg[..], b"event: lagged\ndata: 5\n\n");
        assert_eq!(counter.load(Ordering::Relaxed), 1);
        drop(s);
        assert_eq!(counter.load(Ordering::Relaxed), 0);
        assert_eq!(activity.subscribers(), 0);
    }
}
