//! Provider lookup for a blob that also finds nodes still downloading it: complete providers
//! (the blob's own key) come first, in-progress ones (its [`in_progress_key`]) only once the
//! complete lookup found none within a short grace or ended, and then as backups.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tracing::debug;

use crate::{
    metrics,
    routing::{Peer, Router, RoutingError, in_progress_key},
};

/// A lookup's stream of providers.
pub(super) struct Found {
    /// Providers, complete ones first.
    pub rx: mpsc::Receiver<Peer>,
    /// A complete provider was known (and connected) when the lookup started: no DHT query
    /// had to find it.
    pub known_at_once: bool,
    /// When the lookup was asked of the router.
    pub started: std::time::Instant,
}

/// Streams the providers of `key` and, for blobs, of its in-progress key, complete ones first.
/// `grace` is how long in-progress providers are held back while the complete lookup runs
/// without a result (it must stay below the race's idle wait, or the race gives up first).
pub(super) async fn lookup(
    router: &Arc<dyn Router>,
    key: &str,
    count: usize,
    blob: bool,
    grace: Duration,
) -> Result<Found, RoutingError> {
    let started = std::time::Instant::now();
    let mut complete = router.lookup(key, count).await?;
    if !blob {
        return Ok(Found {
            rx: complete,
            known_at_once: false,
            started,
        });
    }
    // The router hands the channel over with the providers it knew already in it.
    let first = complete.try_recv().ok();
    let known_at_once = first.is_some();
    let (tx, rx) = mpsc::channel(count.max(1) * 2 + 1);
    let in_progress = match router.lookup(&in_progress_key(key), count).await {
        Ok(rx) => rx,
        Err(e) => {
            debug!(error = %e, "in-progress lookup failed");
            // An in-progress lookup that ended at once: only the complete providers remain.
            mpsc::channel(1).1
        }
    };
    tokio::spawn(merge(first, complete, in_progress, tx, grace));
    Ok(Found {
        rx,
        known_at_once,
        started,
    })
}

async fn merge(
    first: Option<Peer>,
    mut complete: mpsc::Receiver<Peer>,
    mut in_progress: mpsc::Receiver<Peer>,
    tx: mpsc::Sender<Peer>,
    grace: Duration,
) {
    let release_at = tokio::time::Instant::now() + grace;
    let mut sent: HashSet<String> = HashSet::new();
    let mut held: Vec<Peer> = Vec::new();
    let (mut complete_open, mut in_progress_open) = (true, true);
    // Whether in-progress providers go out as they come (no complete one in the grace, or the
    // complete lookup is over).
    let mut releasing = false;
    let mut found_complete = false;
    if let Some(peer) = first {
        found_complete = true;
        sent.insert(peer.id.clone());
        if tx.send(peer).await.is_err() {
            return;
        }
    }
    while complete_open || in_progress_open || !held.is_empty() {
        if releasing || (!complete_open && !held.is_empty()) {
            releasing = true;
            for peer in held.drain(..) {
                if sent.insert(peer.id.clone()) {
                    metrics::global().mirror_in_progress_providers.inc();
                    if tx.send(peer).await.is_err() {
                        return;
                    }
                }
            }
            if !complete_open && !in_progress_open {
                return;
            }
        }
        tokio::select! {
            peer = complete.recv(), if complete_open => match peer {
                Some(peer) => {
                    found_complete = true;
                    if sent.insert(peer.id.clone()) && tx.send(peer).await.is_err() {
                        return;
                    }
                }
                None => complete_open = false,
            },
            peer = in_progress.recv(), if in_progress_open => match peer {
                Some(peer) => held.push(peer),
                None => in_progress_open = false,
            },
            _ = tokio::time::sleep_until(release_at), if !releasing && !found_complete => {
                releasing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> Peer {
        Peer {
            id: id.into(),
            addrs: vec![],
        }
    }

    async fn collect(rx: &mut mpsc::Receiver<Peer>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(p) = rx.recv().await {
            out.push(p.id);
        }
        out
    }

    #[tokio::test]
    async fn complete_providers_come_first_and_duplicates_once() {
        let (ctx, crx) = mpsc::channel(8);
        let (itx, irx) = mpsc::channel(8);
        let (tx, mut rx) = mpsc::channel(8);
        itx.send(peer("downloading")).await.unwrap();
        itx.send(peer("both")).await.unwrap();
        drop(itx);
        let task = tokio::spawn(merge(None, crx, irx, tx, Duration::from_secs(3600)));
        tokio::task::yield_now().await;
        ctx.send(peer("both")).await.unwrap();
        ctx.send(peer("done")).await.unwrap();
        drop(ctx);
        assert_eq!(collect(&mut rx).await, vec!["both", "done", "downloading"]);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn in_progress_providers_are_released_after_the_grace() {
        let (_ctx, crx) = mpsc::channel::<Peer>(8);
        let (itx, irx) = mpsc::channel(8);
        let (tx, mut rx) = mpsc::channel(8);
        itx.send(peer("downloading")).await.unwrap();
        tokio::spawn(merge(None, crx, irx, tx, Duration::from_millis(10)));
        // The complete lookup is still open: the in-progress provider comes after the grace.
        let got = rx.recv().await.unwrap();
        assert_eq!(got.id, "downloading");
    }
}
