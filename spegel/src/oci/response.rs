//! OCI distribution responses shared by the local registry and the mirror: content headers,
//! error bodies, and the 404 that sends containerd to the next host.

use serde_json::json;

use super::{ContentRange, ErrorCode, Kind, OCTET_STREAM, OciError};
use crate::http::{Body, Response};

/// Header marking a request from a peer, which must never be forwarded again.
pub const MIRRORED_HEADER: &str = "x-spegel-mirrored";

/// Response header naming the peer that served a forwarded response (absent when served
/// locally), for `/visualize`, the measure tool and `curl -I` debugging.
pub const SERVED_BY_HEADER: &str = "x-spegel-served-by";

/// What a content response describes: the same whether served locally or from a peer.
#[derive(Debug, Clone, Copy)]
pub struct ContentHead<'a> {
    /// Manifest or blob.
    pub kind: Kind,
    /// Media type of the whole content.
    pub media_type: &'a str,
    /// Size of the whole content.
    pub size: u64,
    /// Content digest.
    pub digest: &'a str,
    /// The registry the content was asked for under (`OCI-Namespace`).
    pub namespace: &'a str,
    /// The part served, for a blob range request.
    pub range: Option<ContentRange>,
}

/// The 200 (or 206 for a blob range) response head for content; the body is set by the caller.
pub fn content_response(head: ContentHead<'_>) -> Response {
    match head.kind {
        Kind::Manifest => Response::empty(200)
            .header("Content-Type", head.media_type.to_string())
            .header("Content-Length", head.size.to_string())
            .header("Docker-Content-Digest", head.digest.to_string())
            .header("OCI-Namespace", head.namespace.to_string()),
        Kind::Blob => {
            let response = Response::empty(if head.range.is_some() { 206 } else { 200 })
                .header("Docker-Content-Digest", head.digest.to_string())
                .header("OCI-Namespace", head.namespace.to_string())
                .header("Accept-Ranges", "bytes");
            match head.range {
                Some(cr) => response
                    .header("Content-Type", OCTET_STREAM)
                    .header("Content-Length", cr.len().to_string())
                    .header("Content-Range", cr.to_string()),
                None => response
                    .header("Content-Type", head.media_type.to_string())
                    .header("Content-Length", head.size.to_string()),
            }
        }
    }
}

/// The 416 for a range outside content of `size` bytes.
pub fn range_not_satisfiable(size: u64) -> Response {
    Response::empty(416).header("Content-Range", format!("bytes */{size}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_mirrored_heads_carry_the_namespace() {
        let head = ContentHead {
            kind: Kind::Blob,
            media_type: "application/x",
            size: 10,
            digest: "sha256:aa",
            namespace: "docker.io",
            range: None,
        };
        let r = content_response(head);
        assert_eq!(r.status, 200);
        assert_eq!(r.get_header("oci-namespace"), Some("docker.io"));
        assert_eq!(r.get_header("content-length"), Some("10"));
        assert_eq!(r.get_header("content-type"), Some("application/x"));
        let r = content_response(ContentHead {
            range: Some(ContentRange {
                start: 2,
                end: 4,
                size: 10,
            }),
            ..head
        });
        assert_eq!(r.status, 206);
        assert_eq!(r.get_header("content-length"), Some("3"));
        assert_eq!(r.get_header("content-range"), Some("bytes 2-4/10"));
        assert_eq!(r.get_header("content-type"), Some(OCTET_STREAM));
        let r = content_response(ContentHead {
            kind: Kind::Manifest,
            ..head
        });
        assert_eq!(r.status, 200);
        assert_eq!(r.get_header("oci-namespace"), Some("docker.io"));
        assert_eq!(r.get_header("accept-ranges"), None);
    }
}
