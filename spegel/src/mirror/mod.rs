//! Forwarding requests for content this node lacks to peers that advertised it.

use async_trait::async_trait;

use crate::{
    oci::{ByteRange, DistributionPath},
    registry::http::Response,
};

/// A pull request the local store could not serve.
#[derive(Debug, Clone)]
pub struct MirrorRequest {
    /// What is asked for.
    pub path: DistributionPath,
    /// HEAD (headers only) or GET.
    pub head: bool,
    /// Requested byte range of a blob, if any.
    pub range: Option<ByteRange>,
}

/// Serves requests from peers. Every failure must end in a 404 so containerd falls back.
#[async_trait]
pub trait Mirror: Send + Sync + 'static {
    /// Fetches from a peer and returns the response to send to the client.
    async fn forward(&self, request: MirrorRequest) -> Response;
}
