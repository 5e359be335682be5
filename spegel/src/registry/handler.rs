//! Request routing and the local manifest and blob handlers (§2.1–§2.7).

use std::sync::Arc;

use serde_json::json;
use tracing::{debug, warn};

use super::http::{Body, Request, Response};
use crate::{
    activity::{self, Activity, Direction, Event, Outcome},
    auth::BasicAuth,
    metrics,
    mirror::{Mirror, MirrorRequest},
    oci::{
        ByteRange, ContentRange, DistributionPath, ErrorCode, Kind, OCTET_STREAM, OciError,
        is_manifest_media_type,
    },
    registry::filter::Filters,
    store::{Content, Store},
};

/// Header marking a request from a peer, which must never be forwarded again.
pub const MIRRORED_HEADER: &str = "x-spegel-mirrored";

/// Response header naming the peer that served a forwarded response (absent when served
/// locally), for `/visualize`, the measure tool and `curl -I` debugging.
pub const SERVED_BY_HEADER: &str = "x-spegel-served-by";

/// Everything a request handler needs.
pub struct Registry {
    /// The node's content.
    pub store: Arc<dyn Store>,
    /// Mirrored-registry whitelist and regex filters.
    pub filters: Filters,
    /// Peer forwarding; `None` answers every miss with 404.
    pub mirror: Option<Arc<dyn Mirror>>,
    /// Optional basic auth for `/v2/`.
    pub auth: Option<BasicAuth>,
    /// Readiness for `/readyz`.
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Record of requests for `/visualize` (disabled by default: records nothing).
    pub activity: Activity,
}

/// An OCI error response; HEAD gets the same headers without the body.
pub fn oci_error(status: u16, error: OciError, head: bool) -> Response {
    let body = error.body();
    let len = body.len();
    let r = Response::empty(status).header("Content-Type", "application/json");
    if head {
        r.header("Content-Length", len.to_string())
    } else {
        r.body(Body::Bytes(body.into()))
    }
}

/// The 404 that tells containerd to try the next host: no peer could serve `id`.
pub fn not_found_anywhere(
    kind: Kind,
    id: &str,
    attempts: usize,
    message: &str,
    head: bool,
) -> Response {
    let code = match kind {
        Kind::Manifest => ErrorCode::ManifestUnknown,
        Kind::Blob => ErrorCode::BlobUnknown,
    };
    oci_error(
        404,
        OciError::with_detail(
            code,
            format!("{message} {id}"),
            json!({"attempts": attempts}),
        ),
        head,
    )
}

/// Metrics label for a request path.
pub fn handler_label(path: &str) -> &'static str {
    match path {
        "/readyz" => "/readyz",
        "/livez" => "/livez",
        p if p.starts_with("/v2") => "/v2/*",
        _ => "other",
    }
}

impl Registry {
    /// Handles one request.
    pub async fn handle(&self, req: &Request) -> Response {
        let head = req.is_head();
        if req.method != "GET" && !head {
            return Response::empty(404);
        }
        match req.path.as_str() {
            "/readyz" => return Response::empty(if (self.ready)() { 200 } else { 500 }),
            "/livez" => return Response::empty(200),
            "/v2" => return Response::empty(301).header("Location", "/v2/"),
            p if p.starts_with("/v2/") => {}
            _ => return Response::empty(404),
        }
        if let Some(auth) = &self.auth
            && !auth.verify(req.header("authorization"))
        {
            return oci_error(
                401,
                OciError::new(ErrorCode::Unauthorized, "invalid credentials"),
                head,
            );
        }
        if req.path == "/v2/" {
            return Response::empty(200);
        }
        let path = match DistributionPath::parse(&req.path, req.query.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                debug!(path = %req.path, error = %e, "unparsable registry path");
                return Response::empty(404);
            }
        };
        if self.filters.is_filtered(&path.reference) {
            return Response::empty(404);
        }
        let range = match (path.kind, req.header("range")) {
            (Kind::Blob, Some(h)) => match h.parse::<ByteRange>() {
                Ok(r) => Some(r),
                Err(e) => {
                    debug!(range = h, error = %e, "unsupported range");
                    return Response::empty(416);
                }
            },
            _ => None,
        };
        let from_peer = req.header(MIRRORED_HEADER) == Some("true");
        let started = std::time::Instant::now();
        let event = self.activity.is_enabled().then(|| {
            let mut e = Event::new(Direction::In, path.kind.as_str(), Outcome::Served);
            e.time_ms = activity::now_ms();
            e.registry = path.reference.registry.clone();
            e.repository = path.reference.repository.clone();
            e.reference = match (&path.reference.digest, &path.reference.tag) {
                (Some(d), _) => d.to_string(),
                (None, Some(t)) => t.clone(),
                (None, None) => String::new(),
            };
            e.remote = req.remote.map(|a| a.ip().to_string());
            e.head = head;
            e
        });
        let (response, outcome) = if !from_peer && !self.present(&path).await {
            let r = self
                .forward(MirrorRequest {
                    path: path.clone(),
                    head,
                    range,
                })
                .await;
            (r, Outcome::Forwarded)
        } else {
            let r = match path.kind {
                Kind::Manifest => self.manifest(&path, head).await,
                Kind::Blob => self.blob(&path, head, range).await,
            };
            (r, Outcome::Served)
        };
        if let Some(mut e) = event {
            let status = response.status;
            e.outcome = match status {
                200 | 206 => outcome,
                404 => Outcome::Fallback,
                _ => Outcome::Failed,
            };
            e.status = status;
            e.peer = response.get_header(SERVED_BY_HEADER).map(str::to_string);
            e.bytes = if head {
                0
            } else {
                response
                    .get_header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| response.body.len())
            };
            e.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            self.activity.record(|| e);
        }
        response
    }

    async fn present(&self, path: &DistributionPath) -> bool {
        match &path.reference.digest {
            Some(d) => self.store.descriptor(d).await.is_ok(),
            None => self
                .store
                .resolve(&path.reference.identifier())
                .await
                .is_ok(),
        }
    }

    async fn forward(&self, request: MirrorRequest) -> Response {
        let registry = request.path.reference.registry.clone();
        let response = match &self.mirror {
            Some(mirror) => mirror.forward(request).await,
            None => not_found_anywhere(
                request.path.kind,
                &request.path.reference.identifier(),
                0,
                "could not find peer for",
                request.head,
            ),
        };
        let m = metrics::global();
        let cache = if matches!(response.status, 200 | 206) {
            "hit"
        } else {
            "miss"
        };
        m.mirror_requests_total
            .with_label_values(&[registry.as_str(), cache])
            .inc();
        if cache == "hit" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            m.mirror_last_success.set(now.as_secs_f64());
        }
        response
    }

    async fn manifest(&self, path: &DistributionPath, head: bool) -> Response {
        let unknown =
            |msg: String| oci_error(404, OciError::new(ErrorCode::ManifestUnknown, msg), head);
        let digest = match &path.reference.digest {
            Some(d) => d.clone(),
            None => {
                let id = path.reference.identifier();
                match self.store.resolve(&id).await {
                    Ok(d) => d,
                    Err(_) => return unknown(format!("could not get digest for image tag {id}")),
                }
            }
        };
        let desc = match self.store.descriptor(&digest).await {
            Ok(d) if is_manifest_media_type(&d.media_type) => d,
            _ => return unknown(format!("could not get manifest {digest}")),
        };
        let response = Response::empty(200)
            .header("Content-Type", desc.media_type.clone())
            .header("Content-Length", desc.size.to_string())
            .header("Docker-Content-Digest", digest.to_string())
            .header("OCI-Namespace", path.reference.registry.clone());
        if head {
            return response;
        }
        match self.body(&digest, desc.size, None).await {
            Ok(body) => response.body(body),
            Err(e) => {
                warn!(%digest, error = %e, "could not open manifest");
                unknown(format!("could not get manifest {digest}"))
            }
        }
    }

    async fn blob(
        &self,
        path: &DistributionPath,
        head: bool,
        range: Option<ByteRange>,
    ) -> Response {
        let Some(digest) = &path.reference.digest else {
            return Response::empty(404);
        };
        let unknown = || {
            oci_error(
                404,
                OciError::new(
                    ErrorCode::BlobUnknown,
                    format!("could not get blob {digest}"),
                ),
                head,
            )
        };
        let desc = match self.store.descriptor(digest).await {
            Ok(d) if !is_manifest_media_type(&d.media_type) => d,
            _ => return unknown(),
        };
        let content_range = match range.map(|r| r.resolve(desc.size)).transpose() {
            Ok(cr) => cr,
            Err(_) => {
                return Response::empty(416)
                    .header("Content-Range", format!("bytes */{}", desc.size));
            }
        };
        let mut response = Response::empty(if content_range.is_some() { 206 } else { 200 })
            .header("Docker-Content-Digest", digest.to_string())
            .header("OCI-Namespace", path.reference.registry.clone())
            .header("Accept-Ranges", "bytes");
        response = match content_range {
            Some(cr) => response
                .header("Content-Type", OCTET_STREAM)
                .header("Content-Length", cr.len().to_string())
                .header("Content-Range", cr.to_string()),
            None => response
                .header("Content-Type", desc.media_type.clone())
                .header("Content-Length", desc.size.to_string()),
        };
        if head {
            return response;
        }
        match self.body(digest, desc.size, content_range).await {
            Ok(body) => response.body(body),
            Err(e) => {
                warn!(%digest, error = %e, "could not open blob");
                unknown()
            }
        }
    }

    /// The body for `range` (or everything) of content whose descriptor says `size` bytes.
    async fn body(
        &self,
        digest: &crate::oci::Digest,
        size: u64,
        range: Option<ContentRange>,
    ) -> Result<Body, crate::store::StoreError> {
        let (offset, len) = range.map(|r| (r.start, r.len())).unwrap_or((0, size));
        Ok(match self.store.open(digest, range).await? {
            Content::File(file) => {
                let actual = file.metadata()?.len();
                if actual != size {
                    return Err(crate::store::StoreError::Invalid(format!(
                        "{digest}: file has {actual} bytes, containerd says {size}"
                    )));
                }
                Body::File { file, offset, len }
            }
            Content::Bytes(bytes) => {
                if bytes.len() as u64 != size {
                    return Err(crate::store::StoreError::Invalid(format!(
                        "{digest}: size mismatch"
                    )));
                }
                Body::Bytes(bytes.slice(offset as usize..(offset + len) as usize))
            }
            Content::Stream(stream) => Body::Stream { stream, len },
        })
    }
}
