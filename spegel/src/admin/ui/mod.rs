//! The web pages on the metrics port: `/visualize` (live request graph, feed, peer table and
//! pulls, pushed by Server-Sent Events) and `/debug/web/` (node status and the measure tool).
//!
//! Every asset is compiled in and served with a strict Content-Security-Policy, so the pages
//! work offline and load nothing from anywhere but the daemon. The UI reads its data through
//! the small traits below, never the router itself.

mod format;
mod measure;
pub mod sse;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    activity::Activity,
    advertise::AdvertisedView,
    http::{Body, Request, Response},
    mirror::SelectorStats,
    oci::Reference,
    routing::{Peer, Router, RouterView, RoutingError},
};

pub use format::{escape_html, format_bytes, format_duration};
pub use measure::{MeasureError, parse_image_param};

/// Sent with every page and asset: nothing but the daemon itself may be contacted.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
/// Most concurrent `/visualize/events` streams; more are refused with 503.
pub const MAX_SSE_CLIENTS: usize = 64;
/// Interval of the peer-table pushes on an event stream (also its keep-alive).
pub const PEERS_INTERVAL: Duration = Duration::from_secs(2);

const VISUALIZE_HTML: &str = include_str!("assets/visualize.html");
const VISUALIZE_JS: &str = include_str!("assets/visualize.js");
const DEBUG_HTML: &str = include_str!("assets/debug.html");
const DEBUG_JS: &str = include_str!("assets/debug.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// One image the node holds and advertises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRow {
    /// `registry/repository`.
    pub name: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Manifest or index digest.
    pub digest: String,
}

/// The advertised images as the debug page lists them.
fn image_rows(view: &dyn AdvertisedView) -> Vec<ImageRow> {
    let mut rows: Vec<ImageRow> = view
        .advertised()
        .images
        .into_iter()
        .filter_map(|i| {
            let reference = Reference::parse_image_name(&i.name).ok()?;
            Some(ImageRow {
                name: format!("{}/{}", reference.registry, reference.repository),
                tag: reference.tag,
                digest: i.digest.unwrap_or_default(),
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
    rows
}

/// Connected peers as the selector sees them (IDs and addresses), to ask which it prefers.
/// The router lists peers by bare IP: their registries listen on `port`, as this node's does.
fn peers_of(node: &dyn RouterView, port: u16) -> Vec<Peer> {
    node.peers()
        .into_iter()
        .map(|(id, addrs)| Peer {
            id,
            addrs: addrs
                .iter()
                .filter_map(|a| crate::telemetry::peer_socket_addr(a, port))
                .collect(),
        })
        .collect()
}

/// Provider lookups in the DHT, for the measure tool.
#[async_trait]
pub trait ProviderLookup: Send + Sync + 'static {
    /// Streams up to `count` providers of `key`.
    async fn providers(
        &self,
        key: &str,
        count: usize,
    ) -> Result<mpsc::Receiver<Peer>, RoutingError>;
}

#[async_trait]
impl<R: Router> ProviderLookup for R {
    async fn providers(
        &self,
        key: &str,
        count: usize,
    ) -> Result<mpsc::Receiver<Peer>, RoutingError> {
        self.lookup(key, count).await
    }
}

/// Which pages are served and where the measure tool pulls from.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// Serve `/debug/web/` (pages, stats, measure).
    pub debug_web: bool,
    /// Serve `/visualize` (needs an enabled [`Activity`]).
    pub visualize: bool,
    /// This node's own registry, the only place the measure tool pulls from.
    pub registry: SocketAddr,
    /// `Authorization` value for the own registry, when basic auth is on.
    pub authorization: Option<String>,
}

/// The data sources of the UI.
#[derive(Clone)]
pub struct UiSources {
    /// Identity and peers.
    pub node: Arc<dyn RouterView>,
    /// Advertised images.
    pub images: Arc<dyn AdvertisedView>,
    /// Peer selector figures.
    pub selector: Arc<dyn SelectorStats>,
    /// DHT lookups.
    pub lookup: Arc<dyn ProviderLookup>,
    /// The request record.
    pub activity: Activity,
}

/// The pages; mount with [`AdminUi::handle`] before the other metrics-port routes.
pub struct AdminUi {
    config: UiConfig,
    sources: UiSources,
    sse_clients: Arc<AtomicUsize>,
    measure: measure::Measurer,
}

impl AdminUi {
    /// The UI over `sources`.
    pub fn new(config: UiConfig, sources: UiSources) -> Self {
        let measure = measure::Measurer::new(config.registry, config.authorization.clone());
        AdminUi {
            config,
            sources,
            sse_clients: Arc::new(AtomicUsize::new(0)),
            measure,
        }
    }

    /// Live event streams open right now.
    pub fn sse_clients(&self) -> usize {
        self.sse_clients.load(Ordering::Relaxed)
    }

    fn visualize_on(&self) -> bool {
        self.config.visualize && self.sources.activity.is_enabled()
    }

    /// Answers the UI's routes; `None` for every other request (and for disabled pages).
    pub async fn handle(&self, req: &Request) -> Option<Response> {
        if req.method != "GET" && req.method != "HEAD" {
            return None;
        }
        let path = req.path.as_str();
        let ui = self.visualize_on();
        let debug = self.config.debug_web;
        let response = match path {
            "/ui/style.css" if ui || debug => asset("text/css; charset=utf-8", STYLE_CSS),
            "/visualize" | "/visualize/" if ui => asset("text/html; charset=utf-8", VISUALIZE_HTML),
            "/visualize/app.js" if ui => asset("text/javascript; charset=utf-8", VISUALIZE_JS),
            "/visualize/state" if ui => json(&self.state()),
            "/visualize/events" if ui => self.events(req),
            "/debug/web" if debug => secure(Response::empty(301).header("Location", "/debug/web/")),
            "/debug/web/" if debug => asset("text/html; charset=utf-8", DEBUG_HTML),
            "/debug/web/app.js" if debug => asset("text/javascript; charset=utf-8", DEBUG_JS),
            "/debug/web/stats" if debug => self.stats().await,
            "/debug/web/measure" if debug => self.measure(req).await,
            _ => return None,
        };
        Some(response)
    }

    /// Everything `/visualize` shows at load; later changes come over the event stream.
    pub fn state(&self) -> serde_json::Value {
        let peers = peers_of(self.sources.node.as_ref(), self.config.registry.port());
        let recent = self.sources.activity.recent();
        let events: Vec<&crate::activity::Event> = recent.iter().map(|e| &**e).collect();
        serde_json::json!({
            "node": {
                "id": self.sources.node.local_peer_id(),
                "addrs": self.sources.node.listen_addrs(),
            },
            "peers": self.peers_json(),
            "preferred": self.sources.selector.preferred(&peers),
            "events": events,
            "capacity": crate::activity::DEFAULT_CAPACITY,
        })
    }

    /// The per-peer table: connected peers, selector figures and transfer totals.
    pub fn peers_json(&self) -> serde_json::Value {
        PeerTable {
            node: self.sources.node.as_ref(),
            selector: self.sources.selector.as_ref(),
            activity: &self.sources.activity,
            port: self.config.registry.port(),
        }
        .json()["peers"]
            .take()
    }

    fn events(&self, req: &Request) -> Response {
        let Some(subscription) = self.sources.activity.subscribe() else {
            return secure(Response::empty(404));
        };
        let Some(guard) = sse::ClientGuard::acquire(&self.sse_clients, MAX_SSE_CLIENTS) else {
            return secure(Response::empty(503).header("Retry-After", "5"));
        };
        let response = secure(
            Response::empty(200)
                .header("Content-Type", "text/event-stream")
                .header("X-Accel-Buffering", "no"),
        );
        if req.is_head() {
            return response;
        }
        let peers = PeersSnapshot {
            node: self.sources.node.clone(),
            selector: self.sources.selector.clone(),
            activity: self.sources.activity.clone(),
            port: self.config.registry.port(),
        };
        response.body(Body::Unbounded(sse::stream(
            subscription,
            guard,
            PEERS_INTERVAL,
            Box::new(move || peers.json().to_string()),
        )))
    }

    async fn stats(&self) -> Response {
        let images = image_rows(self.sources.images.as_ref());
        let peers = self.sources.node.peers();
        let last = crate::metrics::global().mirror_last_success.get();
        let html = format::stats_fragment(
            &self.sources.node.local_peer_id(),
            &self.sources.node.listen_addrs(),
            last,
            &images,
            &peers,
        );
        secure(
            Response::empty(200)
                .header("Content-Type", "text/html; charset=utf-8")
                .body(Body::Bytes(Bytes::from(html))),
        )
    }

    async fn measure(&self, req: &Request) -> Response {
        let reference = match parse_image_param(req.query.as_deref()) {
            Ok(r) => r,
            Err(e) => return error_fragment(400, &e.to_string()),
        };
        match self
            .measure
            .run(self.sources.lookup.as_ref(), &reference)
            .await
        {
            Ok(report) => secure(
                Response::empty(200)
                    .header("Content-Type", "text/html; charset=utf-8")
                    .body(Body::Bytes(Bytes::from(report.to_html()))),
            ),
            Err(e) => error_fragment(500, &e.to_string()),
        }
    }
}

/// What the event stream pushes every [`PEERS_INTERVAL`].
struct PeersSnapshot {
    node: Arc<dyn RouterView>,
    selector: Arc<dyn SelectorStats>,
    activity: Activity,
    port: u16,
}

impl PeersSnapshot {
    fn json(&self) -> serde_json::Value {
        PeerTable {
            node: self.node.as_ref(),
            selector: self.selector.as_ref(),
            activity: &self.activity,
            port: self.port,
        }
        .json()
    }
}

struct PeerTable<'a> {
    node: &'a dyn RouterView,
    selector: &'a dyn SelectorStats,
    activity: &'a Activity,
    port: u16,
}

impl PeerTable<'_> {
    fn json(&self) -> serde_json::Value {
        let peers = self.node.peers();
        let stats = self.selector.peer_stats();
        let totals = self.activity.peer_totals();
        let preferred = self.selector.preferred(&peers_of(self.node, self.port));
        let rows: Vec<serde_json::Value> = peers
            .iter()
            .map(|(id, addrs)| {
                let s = stats.iter().find(|s| &s.id == id);
                let t = totals.iter().find(|t| &t.peer == id);
                serde_json::json!({
                    "id": id,
                    "addrs": addrs,
                    "ips": addrs.iter().filter_map(|a| multiaddr_ip(a)).collect::<Vec<_>>(),
                    "latency_ms": s.and_then(|s| s.latency_ms),
                    "rtt_ms": s.and_then(|s| s.rtt_ms),
                    "failures_decayed": s.map(|s| s.penalty),
                    "inflight": s.map_or(0, |s| s.inflight),
                    "bytes_in": t.map_or(0, |t| t.bytes_in),
                    "fetches": t.map_or(0, |t| t.fetches),
                    "failures": t.map_or(0, |t| t.failures),
                    "throughput": s
                        .and_then(|s| s.throughput_bytes_per_second)
                        .or(t.map(|t| t.throughput)),
                    "preferred": preferred.as_deref() == Some(id.as_str()),
                })
            })
            .collect();
        serde_json::json!({"peers": rows, "preferred": preferred})
    }
}

/// The IP of a plain IP, `ip:port`, or `/ip4/…` / `/ip6/…` multiaddr.
fn multiaddr_ip(addr: &str) -> Option<String> {
    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
        return Some(ip.to_string());
    }
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Some(sa.ip().to_string());
    }
    let mut parts = addr.split('/').skip(1);
    match (parts.next(), parts.next()) {
        (Some("ip4" | "ip6"), Some(ip)) => Some(ip.to_string()),
        _ => None,
    }
}

/// Adds the headers every UI response carries.
fn secure(r: Response) -> Response {
    r.header("Content-Security-Policy", CSP)
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
        .header("Cache-Control", "no-store")
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secure(
        Response::empty(200)
            .header("Content-Type", content_type)
            .body(Body::Bytes(Bytes::from_static(body.as_bytes()))),
    )
}

fn json(value: &serde_json::Value) -> Response {
    secure(
        Response::empty(200)
            .header("Content-Type", "application/json")
            .body(Body::Bytes(Bytes::from(value.to_string()))),
    )
}

fn error_fragment(status: u16, message: &str) -> Response {
    secure(
        Response::empty(status)
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(Body::Bytes(Bytes::from(format!(
                "<p class=\"error\">{}</p>",
                escape_html(message)
            )))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiaddr_ips() {
        assert_eq!(
            multiaddr_ip("/ip4/10.0.0.1/tcp/5001").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(multiaddr_ip("/ip6/::1/tcp/5001").as_deref(), Some("::1"));
        assert_eq!(multiaddr_ip("/dns/x/tcp/1"), None);
        assert_eq!(multiaddr_ip("10.0.0.2").as_deref(), Some("10.0.0.2"));
        assert_eq!(multiaddr_ip("[::1]:5000").as_deref(), Some("::1"));
        assert_eq!(multiaddr_ip(""), None);
    }

    #[test]
    fn assets_load_nothing_external_and_have_no_inline_script_or_style() {
        for (name, text) in [
            ("visualize.html", VISUALIZE_HTML),
            ("debug.html", DEBUG_HTML),
            ("visualize.js", VISUALIZE_JS),
            ("debug.js", DEBUG_JS),
            ("style.css", STYLE_CSS),
        ] {
            // The SVG namespace is an identifier, not a location.
            let text = text.replace("'http://www.w3.org/2000/svg'", "");
            assert!(!text.contains("http://"), "{name} names an http URL");
            assert!(!text.contains("https://"), "{name} names an https URL");
            assert!(!text.contains("//cdn"), "{name} names a CDN");
            assert!(!text.contains(" style=\""), "{name} has an inline style");
            assert!(!text.contains("eval("), "{name} uses eval");
        }
        for html in [VISUALIZE_HTML, DEBUG_HTML] {
            // Every script is an external file of ours: CSP script-src 'self' allows no other.
            for part in html.split("<script").skip(1) {
                assert!(part.trim_start().starts_with("src=\"/"), "{part}");
                assert!(part.contains("></script>"));
            }
            assert!(!html.contains(" on"), "inline event handler");
        }
    }
}
