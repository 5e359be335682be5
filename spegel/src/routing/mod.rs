//! Content routing: who in the cluster can serve a digest or tag.
//!
//! NOTE: placeholder interface; the libp2p implementation lands from the `routing` branch and
//! replaces this file (keeping these signatures).

use async_trait::async_trait;

/// A peer that advertised a key, with the addresses of its registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Peer ID.
    pub id: String,
    /// Registry addresses (IP and registry port).
    pub addrs: Vec<std::net::SocketAddr>,
}

/// Routing failures.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The router's event loop is gone.
    #[error("router stopped")]
    Stopped,
}

/// Advertises local content and finds peers that have content.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    /// Whether the node is connected to at least one peer.
    fn ready(&self) -> bool;
    /// Starts providing keys.
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError>;
    /// Stops providing keys.
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RoutingError>;
    /// Streams up to `count` providers of `key` (never self); closes when the lookup ends.
    async fn lookup(
        &self,
        key: &str,
        count: usize,
    ) -> Result<tokio::sync::mpsc::Receiver<Peer>, RoutingError>;
}
