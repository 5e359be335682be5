//! An in-memory [`Router`] for unit tests: a shared map of key → peers.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Peer, Router, RoutingError};

/// Routes from a fixed table; `advertise` adds `self_peer`.
#[derive(Clone)]
pub struct MemoryRouter {
    table: Arc<Mutex<HashMap<String, Vec<Peer>>>>,
    self_peer: Peer,
    ready: Arc<AtomicBool>,
}

impl MemoryRouter {
    /// A router whose own identity is `self_peer`, sharing `table` with other fakes.
    pub fn new(self_peer: Peer, table: Arc<Mutex<HashMap<String, Vec<Peer>>>>) -> Self {
        MemoryRouter {
            table,
            self_peer,
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Adds a provider for `key`.
    pub fn add(&self, key: &str, peer: Peer) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .push(peer);
    }

    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

#[async_trait]
impl Router for MemoryRouter {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError> {
        for k in keys {
            self.add(&k, self.self_peer.clone());
        }
        Ok(())
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RoutingError> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if let Some(peers) = table.get_mut(&k) {
                peers.retain(|p| p.id != self.self_peer.id);
            }
        }
        Ok(())
    }

    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RoutingError> {
        let peers: Vec<Peer> = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|v| {
                v.iter()
                    .filter(|p| p.id != self.self_peer.id)
                    .take(count)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(peers.len().max(1));
        for p in peers {
            let _ = tx.try_send(p);
        }
        Ok(rx)
    }
}
