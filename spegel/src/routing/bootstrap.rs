//! Finding the first peers: static multiaddrs, DNS names, or an HTTP `/id` endpoint (§3.6).

use std::{net::IpAddr, sync::Arc, time::Duration};

use libp2p::{Multiaddr, multiaddr::Protocol};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::RoutingError;
use crate::{
    config::{BootstrapKind, RegistryArgs},
    registry::{
        Handler,
        http::{Body, Request, Response},
    },
};

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
    /// Builds the bootstrapper the flags ask for; `None` for a lone node.
    pub fn from_args(
        args: &RegistryArgs,
        router_port: u16,
    ) -> Result<Option<Bootstrapper>, RoutingError> {
        let bad = |m: String| RoutingError::Bootstrap(m);
        let Some(kind) = args.bootstrap_kind else {
            return Ok(None);
        };
        Ok(Some(match kind {
            BootstrapKind::Static => {
                if args.static_bootstrap_peers.is_empty() {
                    return Err(bad(
                        "--static-bootstrap-peers is required with --bootstrap-kind=static".into(),
                    ));
                }
                let addrs = args
                    .static_bootstrap_peers
                    .iter()
                    .map(|a| {
                        a.parse::<Multiaddr>()
                            .map_err(|e| bad(format!("invalid multiaddr {a:?}: {e}")))
                    })
                    .collect::<Result<_, _>>()?;
                Bootstrapper::Static(addrs)
            }
            BootstrapKind::Dns => {
                if args.dns_bootstrap_domain.is_empty() {
                    return Err(bad(
                        "--dns-bootstrap-domain is required with --bootstrap-kind=dns".into(),
                    ));
                }
                Bootstrapper::Dns {
                    domain: args.dns_bootstrap_domain.trim_end_matches('.').to_string(),
                    port: router_port,
                }
            }
            BootstrapKind::Http => {
                if args.http_bootstrap_url.is_empty() {
                    return Err(bad(
                        "--http-bootstrap-url is required with --bootstrap-kind=http".into(),
                    ));
                }
                if !args.http_bootstrap_url.starts_with("http://") {
                    return Err(bad(format!(
                        "only http:// bootstrap URLs are supported, not {:?}",
                        args.http_bootstrap_url
                    )));
                }
                if !args.http_bootstrap_cert_dir.is_empty() {
                    return Err(bad(
                        "--http-bootstrap-cert-dir needs an https URL, which is not supported"
                            .into(),
                    ));
                }
                Bootstrapper::Http {
                    url: args.http_bootstrap_url.clone(),
                }
            }
        }))
    }

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
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("invalid URL {url:?}: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| bad(format!("URL {url:?} has no host")))?
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let target = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let fetch = async {
        let mut stream = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
        stream
            .write_all(
                format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut buf = Vec::new();
        stream.take(1 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| bad(format!("GET {url} timed out")))?
        .map_err(|e| bad(format!("GET {url}: {e}")))?;
    parse_id_answer(&raw).map_err(|e| bad(format!("GET {url}: {e}")))
}

/// Parses a raw HTTP `/id` answer (head and JSON body) into the peers' multiaddrs.
pub fn parse_id_answer(raw: &[u8]) -> Result<Vec<Multiaddr>, RoutingError> {
    let bad = |m: String| RoutingError::Bootstrap(m);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("malformed response".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(bad(head.lines().next().unwrap_or_default().to_string()));
    }
    let infos: Vec<AddrInfo> =
        serde_json::from_slice(&raw[split + 4..]).map_err(|e| bad(format!("invalid JSON: {e}")))?;
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
    crate::registry::serve(
        listener,
        Arc::new(HttpBootstrapHandler { info }),
        Default::default(),
        shutdown,
    )
    .await
}
