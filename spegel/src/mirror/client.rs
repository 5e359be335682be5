//! OCI requests to peers' registries (Happy Eyeballs over their addresses, response-head
//! checks), sent through the daemon's one [`crate::http::Client`].

use std::{net::SocketAddr, time::Duration};

use futures::{StreamExt, stream::FuturesUnordered};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;

use crate::{
    http::{Client, ClientError},
    oci::{
        ByteRange, ContentRange, DistributionPath, Kind, MANIFEST_MEDIA_TYPES, MIRRORED_HEADER,
        OCTET_STREAM,
    },
    routing::Peer,
    store::MISMATCH_REPORT_PATH,
};

/// Delay between connection attempts to a peer's successive addresses (Happy Eyeballs).
const EYEBALLS_DELAY: Duration = Duration::from_millis(15);

/// Longest a mismatch report may take; it is a hint, nobody waits for it.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What to ask a peer for.
#[derive(Debug, Clone)]
pub struct FetchSpec {
    /// The distribution path (repository, manifest or blob, digest or tag, registry).
    pub path: DistributionPath,
    /// HEAD instead of GET.
    pub head: bool,
    /// Byte range to request (blobs only).
    pub range: Option<ByteRange>,
}

/// A peer's successful response head, with the body still to be read.
pub struct Fetched {
    /// Media type of the content.
    pub media_type: String,
    /// Total size of the content (not of this response).
    pub size: u64,
    /// Digest of the content.
    pub digest: String,
    /// The part of the content this response carries, when a range was requested.
    pub range: Option<ContentRange>,
    /// The response body (empty for HEAD).
    pub body: Incoming,
}

/// Why a peer could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting or exchanging the request failed.
    #[error("{0}")]
    Http(#[from] ClientError),
    /// The peer answered with a status other than 200 or 206.
    #[error(
        "expected one of the following statuses [200 OK, 206 Partial Content], but received {0}"
    )]
    Status(StatusCode),
    /// The response head lacks or contradicts what the request implies.
    #[error("invalid response: {0}")]
    Invalid(String),
    /// The requested range lies outside content of this size (the peer answered 416).
    #[error("range not satisfiable for size {size}")]
    Unsatisfiable {
        /// Total content size reported by the peer.
        size: u64,
    },
    /// The peer has no addresses.
    #[error("peer has no addresses")]
    NoAddress,
    /// Every address failed; the errors in order of the attempts.
    #[error("all addresses failed: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    AllAddresses(Vec<FetchError>),
}

/// Sends requests to peers' registries.
#[derive(Clone)]
pub struct PeerClient {
    http: Client,
    authorization: Option<HeaderValue>,
}

impl PeerClient {
    /// Requests over `http`; `authorization` is sent verbatim on every request.
    pub fn new(
        authorization: Option<&str>,
        http: Client,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let authorization = authorization
            .map(|a| {
                let mut v = HeaderValue::from_str(a)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        Ok(PeerClient {
            http,
            authorization,
        })
    }

    /// Fetches `spec` from `peer`, trying its addresses IPv6 first, staggered (Happy Eyeballs).
    pub async fn fetch(&self, peer: &Peer, spec: &FetchSpec) -> Result<Fetched, FetchError> {
        let mut addrs = peer.addrs.clone();
        // Stable: keeps the router's order within each family.
        addrs.sort_by_key(|a| !a.is_ipv6());
        let mut pending = addrs.into_iter();
        let Some(first) = pending.next() else {
            return Err(FetchError::NoAddress);
        };
        let mut attempts = FuturesUnordered::new();
        attempts.push(Box::pin(self.fetch_addr(first, spec)));
        let mut errors = Vec::new();
        loop {
            let more = pending.len() > 0;
            tokio::select! {
                Some(result) = attempts.next() => match result {
                    Ok(fetched) => return Ok(fetched),
                    Err(e @ FetchError::Unsatisfiable { .. }) => return Err(e),
                    Err(e) => {
                        errors.push(e);
                        match pending.next() {
                            Some(addr) => attempts.push(Box::pin(self.fetch_addr(addr, spec))),
                            None if attempts.is_empty() => break,
                            None => {}
                        }
                    }
                },
                _ = tokio::time::sleep(EYEBALLS_DELAY), if more => {
                    if let Some(addr) = pending.next() {
                        attempts.push(Box::pin(self.fetch_addr(addr, spec)));
                    }
                }
            }
        }
        Err(if errors.len() == 1 {
            errors.remove(0)
        } else {
            FetchError::AllAddresses(errors)
        })
    }

    /// Tells `peer` that its copy of blob `digest` did not match the digest (so it verifies
    /// it), trying its addresses in turn; success is any answer the peer gives.
    pub async fn report_mismatch(
        &self,
        peer: &Peer,
        digest: &crate::oci::Digest,
    ) -> Result<StatusCode, FetchError> {
        let mut errors = Vec::new();
        for addr in &peer.addrs {
            let mut builder = http::Request::builder()
                .method(Method::POST)
                .uri(format!("http://{addr}{MISMATCH_REPORT_PATH}{digest}"))
                .header(MIRRORED_HEADER, "true")
                .header(header::USER_AGENT, "spegel");
            if let Some(auth) = &self.authorization {
                builder = builder.header(header::AUTHORIZATION, auth.clone());
            }
            let request = builder
                .body(Empty::new())
                .map_err(|e| FetchError::Invalid(format!("building request: {e}")))?;
            match tokio::time::timeout(REPORT_TIMEOUT, self.http.send(request)).await {
                Ok(Ok(response)) => return Ok(response.status()),
                Ok(Err(e)) => errors.push(FetchError::Http(e)),
                Err(_) => errors.push(FetchError::Invalid("report timed out".into())),
            }
        }
        Err(match errors.len() {
            0 => FetchError::NoAddress,
            1 => errors.remove(0),
            _ => FetchError::AllAddresses(errors),
        })
    }

    async fn fetch_addr(&self, addr: SocketAddr, spec: &FetchSpec) -> Result<Fetched, FetchError> {
        let reference = &spec.path.reference;
        let target = match (&reference.digest, &reference.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => {
                return Err(FetchError::Invalid(
                    "reference without tag or digest".into(),
                ));
            }
        };
        let ns: String =
            url::form_urlencoded::byte_serialize(reference.registry.as_bytes()).collect();
        let uri = format!(
            "http://{addr}/v2/{}/{}/{target}?ns={ns}",
            reference.repository,
            spec.path.kind.as_str()
        );
        let mut builder = http::Request::builder()
            .method(if spec.head { Method::HEAD } else { Method::GET })
            .uri(uri)
            .header(MIRRORED_HEADER, "true")
            .header(header::USER_AGENT, "spegel");
        for media_type in MANIFEST_MEDIA_TYPES {
            builder = builder.header(header::ACCEPT, media_type);
        }
        if let Some(auth) = &self.authorization {
            builder = builder.header(header::AUTHORIZATION, auth.clone());
        }
        if let Some(range) = spec.range {
            builder = builder.header(header::RANGE, range.to_string());
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| FetchError::Invalid(format!("building request: {e}")))?;
        let response = self.http.send(request).await?;
        let (parts, body) = response.into_parts();
        match parts.status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::RANGE_NOT_SATISFIABLE if spec.range.is_some() => {
                let size = header_str(&parts.headers, "content-range")
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.parse().ok())
                    .ok_or(FetchError::Status(parts.status))?;
                return Err(FetchError::Unsatisfiable { size });
            }
            status => return Err(FetchError::Status(status)),
        }
        let (media_type, size, digest, range) = describe(spec, parts.status, &parts.headers)?;
        Ok(Fetched {
            media_type,
            size,
            digest,
            range,
            body,
        })
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Checks a peer's success response head against the request and extracts the content
/// descriptor: media type, total size, digest and the range the body carries.
pub fn describe(
    spec: &FetchSpec,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<(String, u64, String, Option<ContentRange>), FetchError> {
    let invalid = |msg: String| Err(FetchError::Invalid(msg));
    let media_type = match (header_str(headers, "content-type"), spec.path.kind) {
        (Some(t), _) if !t.is_empty() => t.to_string(),
        (_, Kind::Blob) => OCTET_STREAM.to_string(),
        (_, Kind::Manifest) => return invalid("missing Content-Type".into()),
    };
    let Some(length) = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok())
    else {
        return invalid("missing or invalid Content-Length".into());
    };
    let requested = spec.path.reference.digest.as_ref().map(|d| d.to_string());
    let digest = match (header_str(headers, "docker-content-digest"), &requested) {
        (Some(got), Some(want)) if got != want => {
            return invalid(format!("Docker-Content-Digest {got} for requested {want}"));
        }
        (Some(got), _) => got.to_string(),
        (None, Some(want)) => want.clone(),
        (None, None) => return invalid("missing Docker-Content-Digest".into()),
    };
    let content_range = header_str(headers, "content-range");
    let (size, range) = match (spec.range, status) {
        (None, StatusCode::OK) => (length, None),
        (Some(asked), StatusCode::PARTIAL_CONTENT) => {
            let Some(got) = content_range.and_then(ContentRange::parse_header) else {
                return invalid(format!("206 with Content-Range {content_range:?}"));
            };
            // A body that is not exactly the requested bytes would corrupt the client's
            // stream (and resumes), so anything but the exact range is a failure.
            let want = asked
                .resolve(got.size)
                .map_err(|e| FetchError::Invalid(format!("peer range for {asked}: {e}")))?;
            if got != want || length != want.len() {
                return invalid(format!("range {got} with length {length} for {asked}"));
            }
            (got.size, Some(got))
        }
        (_, status) => return invalid(format!("status {status} for range {:?}", spec.range)),
    };
    Ok((media_type, size, digest, range))
}
