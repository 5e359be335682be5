//! The metrics/admin port: `/metrics`, the `/debug/web/*` routes, and the pages of [`ui`]
//! (`/visualize`, `/debug/web/`).
//!
//! Routes read the daemon's state only through snapshot handles ([`RouterView`],
//! [`AdvertisedView`], [`SelectorStats`]), never the concrete router, advertiser or mirror, so
//! pages can be added (one entry in [`Admin::ROUTES`]) without touching the components.

pub mod ui;

use std::sync::Arc;

use crate::{
    advertise::AdvertisedView,
    http::{Body, Handler, Request, Response},
    mirror::SelectorStats,
    routing::RouterView,
};

/// Read-only handles on the running daemon.
#[derive(Clone)]
pub struct AdminState {
    /// Router membership: local peer ID, listen addresses, connected peers.
    pub router: Arc<dyn RouterView>,
    /// What the advertiser has advertised.
    pub advertised: Arc<dyn AdvertisedView>,
    /// The mirror's per-peer statistics.
    pub selector: Arc<dyn SelectorStats>,
}

/// One admin route.
struct Route {
    path: &'static str,
    /// Only served with `--debug-web-enabled`.
    debug: bool,
    render: fn(&AdminState) -> Response,
}

/// The admin handler: dispatches GET/HEAD by exact path.
pub struct Admin {
    state: AdminState,
    debug_web: bool,
    ui: Option<ui::AdminUi>,
}

impl Admin {
    /// Every route, in the order they are matched.
    const ROUTES: &'static [Route] = &[
        Route {
            path: "/metrics",
            debug: false,
            render: metrics,
        },
        Route {
            path: "/debug/web/metadata",
            debug: true,
            render: metadata,
        },
        Route {
            path: "/debug/web/peers",
            debug: true,
            render: peers,
        },
    ];

    /// Serves `state`; the `/debug/web/*` routes only when `debug_web`.
    pub fn new(state: AdminState, debug_web: bool) -> Self {
        Admin {
            state,
            debug_web,
            ui: None,
        }
    }

    /// Also serves the HTML pages of `ui`, before the other routes.
    pub fn with_ui(mut self, ui: ui::AdminUi) -> Self {
        self.ui = Some(ui);
        self
    }

    /// The handles the routes read.
    pub fn state(&self) -> &AdminState {
        &self.state
    }
}

#[async_trait::async_trait]
impl Handler for Admin {
    async fn handle(&self, req: &Request) -> Response {
        if req.method != "GET" && !req.is_head() {
            return Response::empty(404);
        }
        if let Some(ui) = &self.ui
            && let Some(response) = ui.handle(req).await
        {
            return response;
        }
        match Self::ROUTES
            .iter()
            .find(|r| r.path == req.path && (self.debug_web || !r.debug))
        {
            Some(route) => (route.render)(&self.state),
            None => Response::empty(404),
        }
    }

    fn reserved(&self, req: &Request) -> bool {
        req.path == "/metrics"
    }
}

fn json(value: &impl serde::Serialize) -> Response {
    Response::empty(200)
        .header("Content-Type", "application/json")
        .body(Body::Bytes(
            serde_json::to_vec(value).unwrap_or_default().into(),
        ))
}

fn metrics(_: &AdminState) -> Response {
    Response::empty(200)
        .header("Content-Type", "text/plain; version=0.0.4")
        .body(Body::Bytes(crate::metrics::global().encode().into()))
}

fn metadata(state: &AdminState) -> Response {
    json(&serde_json::json!({"libp2p": {"id": state.router.local_peer_id()}}))
}

fn peers(state: &AdminState) -> Response {
    let peers: Vec<_> = state
        .router
        .peers()
        .into_iter()
        .map(|(id, addrs)| serde_json::json!({"id": id, "addrs": addrs}))
        .collect();
    json(&peers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        advertise::{Advertised, AdvertisedHandle},
        mirror::{LatencySelector, Outcome, PeerSelector},
        routing::Peer,
    };

    struct Fixed;

    impl RouterView for Fixed {
        fn local_peer_id(&self) -> String {
            "12D3self".into()
        }
        fn listen_addrs(&self) -> Vec<String> {
            vec!["/ip4/127.0.0.1/tcp/5001".into()]
        }
        fn peers(&self) -> Vec<(String, Vec<String>)> {
            vec![("12D3other".into(), vec!["/ip4/127.0.0.2/tcp/5001".into()])]
        }
    }

    fn request(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            headers: Vec::new(),
            keep_alive: true,
            has_body: false,
            remote: None,
        }
    }

    fn body(r: &Response) -> String {
        match &r.body {
            Body::Bytes(b) => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("unexpected body {other:?}"),
        }
    }

    fn admin(debug_web: bool) -> Admin {
        let selector = Arc::new(LatencySelector::new());
        selector.observe(
            &Peer {
                id: "12D3other".into(),
                addrs: Vec::new(),
            },
            Outcome::Failure,
        );
        Admin::new(
            AdminState {
                router: Arc::new(Fixed),
                advertised: Arc::new(AdvertisedHandle::default()),
                selector,
            },
            debug_web,
        )
    }

    #[tokio::test]
    async fn routes_by_path_and_debug_flag() {
        let a = admin(true);
        let r = a.handle(&request("GET", "/metrics")).await;
        assert_eq!(r.status, 200);
        assert!(body(&r).contains("spegel_"), "{}", body(&r));
        let r = a.handle(&request("GET", "/debug/web/metadata")).await;
        assert_eq!(body(&r), r#"{"libp2p":{"id":"12D3self"}}"#);
        let r = a.handle(&request("HEAD", "/debug/web/peers")).await;
        assert_eq!(
            body(&r),
            r#"[{"addrs":["/ip4/127.0.0.2/tcp/5001"],"id":"12D3other"}]"#
        );
        assert_eq!(a.handle(&request("POST", "/metrics")).await.status, 404);
        assert_eq!(a.handle(&request("GET", "/nope")).await.status, 404);
        assert_eq!(a.state().advertised.advertised(), Advertised::default());
        let stats = a.state().selector.peer_stats();
        assert_eq!(stats.len(), 1);
        assert!(stats[0].penalty > 0.5, "{stats:?}");

        let a = admin(false);
        assert_eq!(a.handle(&request("GET", "/metrics")).await.status, 200);
        let r = a.handle(&request("GET", "/debug/web/metadata")).await;
        assert_eq!(r.status, 404);
    }
}
