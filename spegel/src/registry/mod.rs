//! The OCI registry handler (pull-only): request routing, auth, filters, and the local
//! manifest and blob responses (§2.1–§2.7). Content this node lacks goes to the [`Mirror`] it
//! is given; the HTTP server around it is [`crate::http`].

mod report;

pub use report::CheckedRegistry;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tracing::{debug, warn};

use crate::{
    activity::{self, Activity, Direction, Event, Outcome},
    auth::BasicAuth,
    http::{Body, Growth, Handler, Request, Response},
    metrics,
    mirror::{Mirror, MirrorRequest},
    oci::{
        ByteRange, ContentRange, Digest, DistributionPath, ErrorCode, Filters, Kind,
        MIRRORED_HEADER, OciError, SERVED_BY_HEADER, is_manifest_media_type,
        response::{
            ContentHead, content_response, not_found_anywhere, oci_error, range_not_satisfiable,
        },
    },
    store::{Content, Descriptor, Store},
};

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
    /// Blobs this node's containerd is asking peers for right now.
    pub searching: Searching,
}

/// Blobs whose forward to peers has not yet found a provider, or whose body from a peer is
/// still streaming to this node's containerd. containerd creates a blob's
/// ingest before it asks the mirror, so such an ingest is advertised while its node is itself
/// still looking for a source: serving it would let two nodes that miss the same blob at the
/// same moment wait on each other's empty ingest until the stall bound. A node refuses to serve
/// in progress what it is still searching for; the asker then tries other providers or goes
/// upstream at once. While the body streams, the ingest is fed by a peer: serving it in progress
/// could feed that peer's own download through this node (a cycle, which stalls both until
/// the stall bound), so it is refused then too; in-progress bytes only go out of ingests fed by
/// upstream.
#[derive(Debug, Default, Clone)]
pub struct Searching(Arc<Mutex<HashMap<Digest, usize>>>);

impl Searching {
    fn contains(&self, digest: &Digest) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(digest)
    }

    fn enter(&self, digest: Digest) -> SearchGuard {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.clone())
            .or_default() += 1;
        SearchGuard {
            searching: self.clone(),
            digest,
        }
    }
}

/// Ends a search when dropped (also when the request is cancelled).
struct SearchGuard {
    searching: Searching,
    digest: Digest,
}

impl Drop for SearchGuard {
    fn drop(&mut self) {
        let mut map = self.searching.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.digest);
            }
        }
    }
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

/// 405 for a method other than GET or HEAD on a route this pull-only registry serves.
fn method_not_allowed() -> Response {
    Response::empty(405).header("Allow", "GET, HEAD")
}

/// Counts the bytes of a growing body as they are released to the socket.
struct CountedGrowth<G> {
    inner: G,
    end: u64,
}

#[async_trait::async_trait]
impl<G: Growth> Growth for CountedGrowth<G> {
    async fn wait_beyond(&mut self, have: u64) -> std::io::Result<u64> {
        let ready = self.inner.wait_beyond(have).await?.min(self.end);
        metrics::global()
            .in_progress_served_bytes
            .inc_by(ready.saturating_sub(have));
        Ok(ready)
    }
}

/// Why requested content is not in the local store.
enum Missing {
    /// A tag that names no image here.
    Tag,
    /// A digest (given or resolved from the tag) without content here.
    Digest(Digest),
}

#[async_trait::async_trait]
impl Handler for Registry {
    async fn handle(&self, req: &Request) -> Response {
        Registry::handle(self, req).await
    }

    fn label(&self, req: &Request) -> &'static str {
        handler_label(&req.path)
    }

    fn log_served(&self, label: &'static str) -> bool {
        label == "/v2/*"
    }

    fn reserved(&self, req: &Request) -> bool {
        matches!(req.path.as_str(), "/readyz" | "/livez")
    }
}

impl Registry {
    /// Handles one request.
    pub async fn handle(&self, req: &Request) -> Response {
        let head = req.is_head();
        if req.method != "GET" && !head {
            // A pull-only registry: known routes name the methods they take (RFC 9110 §15.5.6).
            return match req.path.as_str() {
                "/readyz" | "/livez" | "/v2" => method_not_allowed(),
                p if p.starts_with("/v2/") => method_not_allowed(),
                _ => Response::empty(404),
            };
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
            // RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
            return oci_error(
                401,
                OciError::new(ErrorCode::Unauthorized, "invalid credentials"),
                head,
            )
            .header("WWW-Authenticate", r#"Basic realm="spegel""#);
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
                // RFC 9110 §14.2: a Range that is not one valid byte range is ignored (the
                // whole body, 200); only an unsatisfiable one gets a 416, further down.
                Err(e) => {
                    debug!(range = h, error = %e, "ignoring unsupported range");
                    None
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
            e.reference = path.reference.digest_or_tag();
            e.remote = req.remote.map(|a| a.ip().to_string());
            e.head = head;
            e
        });
        // One store lookup per request; the descriptor found is what the response describes.
        let found = self.locate(&path).await;
        let (response, outcome) = if !from_peer && found.is_err() {
            // Held until the forwarded body ends (see `Searching`).
            let searching = match (path.kind, &found) {
                (Kind::Blob, Err(Missing::Digest(digest))) => {
                    Some(self.searching.enter(digest.clone()))
                }
                _ => None,
            };
            let request = MirrorRequest {
                path: path.clone(),
                head,
                range,
            };
            let mut response = self.forward(request).await;
            if let Some(guard) = searching {
                response.body = match std::mem::replace(&mut response.body, Body::Empty) {
                    Body::Stream { stream, len } => Body::Stream {
                        stream: futures::StreamExt::boxed(futures::StreamExt::map(
                            stream,
                            move |chunk| {
                                let _held = &guard;
                                chunk
                            },
                        )),
                        len,
                    },
                    other => other,
                };
            }
            (response, Outcome::Forwarded)
        } else {
            // Only a peer is served a blob still downloading: this node's own containerd asking
            // for it would be asking for the bytes it is writing itself.
            let in_progress = match (path.kind, &found) {
                (Kind::Blob, Err(Missing::Digest(digest))) => {
                    self.in_progress(&path, digest, head, range).await
                }
                _ => None,
            };
            let response = match (in_progress, path.kind) {
                (Some(response), _) => response,
                (None, Kind::Manifest) => self.manifest(&path, found, head).await,
                (None, Kind::Blob) => self.blob(&path, found, head, range).await,
            };
            (response, Outcome::Served)
        };
        if let Some(mut e) = event {
            e.outcome = match response.status {
                200 | 206 => outcome,
                404 => Outcome::Fallback,
                _ => Outcome::Failed,
            };
            e.status = response.status;
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

    /// Resolves the tag (if any) and looks the digest up, once.
    async fn locate(&self, path: &DistributionPath) -> Result<Descriptor, Missing> {
        let digest = match &path.reference.digest {
            Some(d) => d.clone(),
            None => self
                .store
                .resolve(&path.reference.identifier())
                .await
                .map_err(|_| Missing::Tag)?,
        };
        self.store
            .descriptor(&digest)
            .await
            .map_err(|_| Missing::Digest(digest))
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
        let registry = m.registry_labels.label(&registry);
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

    async fn manifest(
        &self,
        path: &DistributionPath,
        found: Result<Descriptor, Missing>,
        head: bool,
    ) -> Response {
        let unknown =
            |msg: String| oci_error(404, OciError::new(ErrorCode::ManifestUnknown, msg), head);
        let desc = match found {
            Ok(d) if is_manifest_media_type(&d.media_type) => d,
            Ok(d) => return unknown(format!("could not get manifest {}", d.digest)),
            Err(Missing::Digest(digest)) => {
                return unknown(format!("could not get manifest {digest}"));
            }
            Err(Missing::Tag) => {
                let id = path.reference.identifier();
                return unknown(format!("could not get digest for image tag {id}"));
            }
        };
        let digest = desc.digest.to_string();
        let response = content_response(ContentHead {
            kind: Kind::Manifest,
            media_type: &desc.media_type,
            size: desc.size,
            digest: &digest,
            namespace: &path.reference.registry,
            range: None,
        });
        if head {
            return response;
        }
        match self.body(&desc, None).await {
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
        found: Result<Descriptor, Missing>,
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
        let desc = match found {
            Ok(d) if !is_manifest_media_type(&d.media_type) => d,
            _ => return unknown(),
        };
        let content_range = match range.map(|r| r.resolve(desc.size)).transpose() {
            Ok(cr) => cr,
            Err(_) => return range_not_satisfiable(desc.size),
        };
        let response = content_response(ContentHead {
            kind: Kind::Blob,
            media_type: &desc.media_type,
            size: desc.size,
            digest: &digest.to_string(),
            namespace: &path.reference.registry,
            range: content_range,
        });
        if head {
            return response;
        }
        match self.body(&desc, content_range).await {
            Ok(body) => response.body(body),
            Err(e) if e.is_busy() => {
                debug!(%digest, error = %e, "blob stream refused");
                Response::empty(503).header("Retry-After", "1")
            }
            Err(e) => {
                warn!(%digest, error = %e, "could not open blob");
                unknown()
            }
        }
    }

    /// A blob containerd is downloading right now, served as it grows; `None` when it is not
    /// being downloaded or its size is unknown (the caller answers 404).
    async fn in_progress(
        &self,
        path: &DistributionPath,
        digest: &Digest,
        head: bool,
        range: Option<ByteRange>,
    ) -> Option<Response> {
        let outcome = |o: &str| {
            metrics::global()
                .in_progress_requests
                .with_label_values(&[o])
                .inc()
        };
        if self.searching.contains(digest) {
            outcome("searching");
            return None;
        }
        let growing = match self.store.open_in_progress(digest).await {
            Ok(Some(g)) => g,
            Ok(None) => {
                outcome("unavailable");
                return None;
            }
            Err(e) => {
                warn!(%digest, error = %e, "could not open blob in progress");
                outcome("unavailable");
                return None;
            }
        };
        let size = growing.size;
        let content_range = match range.map(|r| r.resolve(size)).transpose() {
            Ok(cr) => cr,
            Err(_) => return Some(range_not_satisfiable(size)),
        };
        outcome("served");
        // The media type of an ingest is not recorded; containerd does not check a blob's.
        let response = content_response(ContentHead {
            kind: Kind::Blob,
            media_type: crate::oci::OCTET_STREAM,
            size,
            digest: &digest.to_string(),
            namespace: &path.reference.registry,
            range: content_range,
        });
        if head {
            return Some(response);
        }
        let (offset, len) = content_range.map_or((0, size), |r| (r.start, r.len()));
        debug!(%digest, offset, len, "serving blob in progress");
        Some(response.body(Body::Growing {
            file: growing.file,
            offset,
            len,
            growth: Box::new(CountedGrowth {
                inner: growing.growth,
                end: offset + len,
            }),
        }))
    }

    /// The body for `range` (or everything) of the content `desc` describes.
    async fn body(
        &self,
        desc: &Descriptor,
        range: Option<ContentRange>,
    ) -> Result<Body, crate::store::StoreError> {
        let (digest, size) = (&desc.digest, desc.size);
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
