//! Content routing: who in the cluster can serve a digest or tag. [`Router`] is the seam the
//! advertiser and the mirror use; [`P2pRouter`] implements it over a Kademlia DHT (`p2p`),
//! finding first peers through [`Bootstrapper`] (`bootstrap`, which also serves `/id`).
//! [`RouterView`] is the read-only membership snapshot for `/id` and the admin pages.

mod bootstrap;
mod identity;
mod p2p;

use async_trait::async_trait;

pub use bootstrap::{Bootstrapper, parse_id_answer, serve_http_bootstrap};
pub use identity::load_or_create_identity;
pub use p2p::{IDLE_CONNECTION_TIMEOUT, P2pConfig, P2pRouter, RouterStats};

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
    /// The router could not be set up.
    #[error("router setup: {0}")]
    Setup(String),
    /// The identity file is unusable.
    #[error("identity {path}: {reason}")]
    Identity {
        /// File path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Bootstrap configuration or lookup failed.
    #[error("bootstrap: {0}")]
    Bootstrap(String),
}

/// Advertises local content and finds peers that have content.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    /// Whether the node is connected to at least one peer.
    fn ready(&self) -> bool;
    /// Starts providing keys (and keeps re-providing them until withdrawn).
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError>;
    /// Stops providing keys.
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RoutingError>;
    /// Streams up to `count` providers of `key` (never self); closes when the lookup ends.
    /// Providers the router already knows and can reach are in the channel when it is handed
    /// over (the mirror tells a hit known at once from a lookup still running by this).
    async fn lookup(
        &self,
        key: &str,
        count: usize,
    ) -> Result<tokio::sync::mpsc::Receiver<Peer>, RoutingError>;
}

/// Read-only snapshot of the router's membership.
pub trait RouterView: Send + Sync + 'static {
    /// This node's peer ID.
    fn local_peer_id(&self) -> String;
    /// Addresses this node's router listens on.
    fn listen_addrs(&self) -> Vec<String>;
    /// Connected peers and their addresses.
    fn peers(&self) -> Vec<(String, Vec<String>)>;
}

/// The routing key under which a node provides a blob it is still downloading (`digest` as
/// `sha256:<hex>`): its own namespace, so a lookup tells complete providers from in-progress ones.
pub fn in_progress_key(digest: &str) -> String {
    format!("in-progress/{digest}")
}

/// The routing key under which a node announces, for a short while, that it missed a blob
/// (`digest` as `sha256:<hex>`) and is about to fetch it: nodes that miss it at the same time
/// elect one fetcher among these providers instead of all going upstream.
pub fn intent_key(digest: &str) -> String {
    format!("intent/{digest}")
}

/// The DHT key of a routing key string: the sha2-256 multihash of its UTF-8 bytes, as the
/// original's CIDv1 (raw) keys carry it (§3.2).
pub fn multihash_key(key: &str) -> Vec<u8> {
    use sha2::Digest as _;
    let mut out = Vec::with_capacity(34);
    out.extend_from_slice(&[0x12, 0x20]);
    out.extend_from_slice(&sha2::Sha256::digest(key.as_bytes()));
    out
}

/// The original's CID string of a key (CIDv1, raw codec, base32), for logs and interop checks.
pub fn cid_string(key: &str) -> String {
    let mut bytes = vec![0x01, 0x55];
    bytes.extend_from_slice(&multihash_key(key));
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::from("b");
    let (mut buffer, mut bits) = (0u32, 0u32);
    for b in bytes {
        buffer = (buffer << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_vector() {
        assert_eq!(
            cid_string("foobar"),
            "bafkreigdvoh7cnza5cwzar65hfdgwpejotszfqx2ha6uuolaofgk54ge6i"
        );
        assert_eq!(multihash_key("foobar").len(), 34);
    }
}
