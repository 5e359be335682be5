//! Finding the first peers: static multiaddrs, DNS names, or an HTTP `/id` endpoint (§3.6).

use std::{net::IpAddr, sync::Arc, time::Duration};

use libp2p::{Multiaddr, multiaddr::Protocol};

use super::RoutingError;
use crate::http::{Body, Client, ClientConfig, Handler, Request, Response};

/// How many addresses DNS and HTTP bootstrap use, like the original.
const MAX_BOOTSTRAP_PEERS: usize = 3;

/// Where bootstrap peers come from.
#[derive(Debug, Clone)]
pub enum Bootstrapper {
    /// Fixed full multiaddrs (`/ip4/…/tcp/…/p2p/…`).
    Static(Vec<Multiaddr>),
    /// A DNS name resolving to peers' IPs; the router port is assumed equal to ours.
    Dns {
        /// Name to resolve.
        domain: String,
        /// Router port of the peers.
        port: u16,
    },
    /// An HTTP endpoint answering `[{"ID": …, "Addrs": [...]}]`.
    Http {
        /// Full URL.
        url: String,
    },
}

impl Bootstrapper {
    /// The addresses to dial now.
    pub async fn addrs(&self) -> Result<Vec<Multiaddr>, RoutingError> {
        match self {
            Bootstrapper::Static(addrs) => Ok(addrs.clone()),
            Bootstrapper::Dns { domain, port } => {
                let resolved = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::lookup_host((domain.as_str(), *port)),
                )
                .await
                .map_err(|_| RoutingError::Bootstrap(format!("resolving {domain} timed out")))?
                .map_err(|e| RoutingError::Bootstrap(format!("resolving {domain}: {e}")))?;
                let (mut v4, mut v6): (Vec<IpAddr>, Vec<IpAddr>) =
                    resolved.map(|sa| sa.ip()).partition(|ip| ip.is_ipv4());
                v4.sort();
                v4.dedup();
                v6.sort();
                v6.dedup();
                Ok(v4
                    .into_iter()
                    .take(MAX_BOOTSTRAP_PEERS)
                    .chain(v6.into_iter().take(MAX_BOOTSTRAP_PEERS))
                    .map(|ip| Multiaddr::from(ip).with(Protocol::Tcp(*port)))
                    .collect())
            }
            Bootstrapper::Http { url } => http_peers(url).await,
        }
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
struct AddrInfo {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Addrs", default)]
    addrs: Vec<String>,
}

async fn http_peers(url: &str) -> Result<Vec<Multiaddr>, RoutingError> {
    let bad = |m: String| RoutingError::Bootstrap(m);
    let client = Client::new(ClientConfig {
        pool_max_idle_per_host: 0,
        ..ClientConfig::default()
    });
    let (status, body) = client
        .fetch(::http::Method::GET, url, Duration::from_secs(10), 1 << 20)
        .await
        .map_err(|e| bad(format!("GET {url}: {e}")))?;
    if status != ::http::StatusCode::OK {
        return Err(bad(format!("GET {url}: {status}")));
    }
    parse_id_answer(&body).map_err(|e| bad(format!("GET {url}: {e}")))
}

/// Parses the JSON body of an HTTP `/id` answer into the peers' multiaddrs.
pub fn parse_id_answer(body: &[u8]) -> Result<Vec<Multiaddr>, RoutingError> {
    let infos: Vec<AddrInfo> = serde_json::from_slice(body)
        .map_err(|e| RoutingError::Bootstrap(format!("invalid JSON: {e}")))?;
    let mut out = Vec::new();
    for info in infos.into_iter().take(MAX_BOOTSTRAP_PEERS) {
        for a in info.addrs {
            let Ok(mut addr) = a.parse::<Multiaddr>() else {
                continue;
            };
            if !info.id.is_empty()
                && let Ok(id) = info.id.parse()
            {
                addr = addr.with(Protocol::P2p(id));
            }
            out.push(addr);
        }
    }
    Ok(out)
}

/// Serves `/id` with this node's address info, for other nodes' HTTP bootstrap.
pub struct HttpBootstrapHandler {
    info: Arc<dyn Fn() -> (String, Vec<String>) + Send + Sync>,
}

#[async_trait::async_trait]
impl Handler for HttpBootstrapHandler {
    async fn handle(&self, req: &Request) -> Response {
        if req.path != "/id" {
            return Response::empty(404);
        }
        let (id, addrs) = (self.info)();
        let body = serde_json::to_vec(&[AddrInfo { id, addrs }]).unwrap_or_default();
        Response::empty(200)
            .header("Content-Type", "application/json")
            .body(Body::Bytes(body.into()))
    }
}

/// Serves the HTTP bootstrap endpoint on `listener` until `shutdown` turns true.
pub async fn serve_http_bootstrap(
    listener: tokio::net::TcpListener,
    info: Arc<dyn Fn() -> (String, Vec<String>) + Send + Sync>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    crate::http::serve(
        listener,
        Arc::new(HttpBootstrapHandler { info }),
        Default::default(),
        shutdown,
    )
    .await
}
