//! The node's image content: what containerd holds, behind the [`Store`] trait.

mod containerd;
pub mod ingest;
pub mod integrity;
mod memory;

use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::oci::{ContentRange, Digest, Reference};

pub use containerd::{ContainerdStore, ContainerdStoreConfig, MAX_CONTENT_STREAMS, STREAM_PIECE};
pub use ingest::{GrowingFile, Ingest};
pub use integrity::{
    CheckedStore, DEFAULT_VERIFY_BYTES_PER_SECOND, Integrity, MISMATCH_REPORT_PATH, Trigger,
    Verdict, abort_poisoned_ingests,
};
pub use memory::MemoryStore;

/// Size and media type of one piece of content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Content digest.
    pub digest: Digest,
    /// Media type, as recorded by the manifest that references it or fingerprinted.
    pub media_type: String,
    /// Size in bytes.
    pub size: u64,
}

/// A named image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The name as containerd stores it.
    pub name: String,
    /// The parsed, normalised name.
    pub reference: Reference,
    /// The digest the name points at (manifest or index).
    pub digest: Digest,
}

/// Readable content, chosen so blob bodies can go to the socket without a userspace copy.
pub enum Content {
    /// A regular file holding the whole content; bodies are sent from it with `sendfile(2)`.
    File(std::fs::File),
    /// The whole content, in memory (small content, or test fakes).
    Bytes(Bytes),
    /// Exactly the requested range, streamed (containerd's content API when no file is usable).
    Stream(BoxStream<'static, io::Result<Bytes>>),
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::File(file) => f.debug_tuple("File").field(file).finish(),
            Content::Bytes(b) => f.debug_tuple("Bytes").field(&b.len()).finish(),
            Content::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// A change to the store's images, as containerd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageEvent {
    /// An image name was created.
    Created(String),
    /// An image name now points at other content.
    Updated(String),
    /// An image name was deleted.
    Deleted(String),
    /// A blob was removed through the content API (containerd's garbage collector sends no
    /// such event; image deletes cover it).
    ContentDeleted(Digest),
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The image or content does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// containerd answered with an error.
    #[error("containerd: {0}")]
    Backend(String),
    /// containerd could not be reached (not running, restarting).
    #[error("containerd unavailable: {0}")]
    Unavailable(String),
    /// Too many content streams are open; the request may be retried shortly.
    #[error("busy: {0}")]
    Busy(String),
    /// Content exists but is unusable (e.g. a file that is not a regular file).
    #[error("invalid content: {0}")]
    Invalid(String),
    /// Reading content failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl StoreError {
    /// Whether this error means the content simply is not here.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }

    /// Whether the store refused for lack of capacity (answer 503 with `Retry-After`).
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Busy(_))
    }

    /// Whether the backend could not be reached, so nothing can be concluded about content.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Read access to the node's images and content.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name of the backend, for logs.
    fn name(&self) -> &str;

    /// Every image with a parsable name; unparsable names are logged and skipped.
    async fn list_images(&self) -> Result<Vec<Image>, StoreError>;

    /// The digest an image name (`registry/repo:tag`) points at.
    async fn resolve(&self, name: &str) -> Result<Digest, StoreError>;

    /// Size and media type of present content.
    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError>;

    /// Opens present content. [`Content::Stream`] yields only `range` (all when `None`); the
    /// other variants hold the whole content.
    async fn open(
        &self,
        digest: &Digest,
        range: Option<ContentRange>,
    ) -> Result<Content, StoreError>;

    /// Every present descriptor reachable from `digest` (index → manifests → config and
    /// layers), root first. Missing content is skipped with its subtree.
    async fn walk(&self, digest: &Digest) -> Result<Vec<Descriptor>, StoreError>;

    /// Image events from now on; the stream ends when the backend's event stream breaks.
    async fn subscribe(&self) -> Result<BoxStream<'static, ImageEvent>, StoreError>;

    /// Blobs being written into the store right now (pulls in progress).
    async fn in_progress(&self) -> Result<Vec<Ingest>, StoreError> {
        Ok(Vec::new())
    }

    /// Opens a blob that is being written, to serve it while it grows; `None` when it is not
    /// being written or its final size is unknown.
    async fn open_in_progress(&self, _digest: &Digest) -> Result<Option<GrowingFile>, StoreError> {
        Ok(None)
    }

    /// Aborts the writes of blob `digest` into the store that started before `started_before`
    /// (they received bytes that do not match it, and would poison every retry that resumes
    /// them); returns how many were aborted.
    async fn abort_ingests(
        &self,
        _digest: &Digest,
        _started_before: std::time::SystemTime,
    ) -> Result<usize, StoreError> {
        Ok(0)
    }
}

/// Children of a manifest or index, parsed from its JSON: `(digest, media type, size)`.
pub(crate) fn manifest_children(data: &[u8]) -> Vec<Descriptor> {
    #[derive(serde::Deserialize)]
    struct Desc {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        digest: String,
        size: u64,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        manifests: Vec<Desc>,
        config: Option<Desc>,
        #[serde(default)]
        layers: Vec<Desc>,
    }
    let Ok(doc) = serde_json::from_slice::<Doc>(data) else {
        return Vec::new();
    };
    doc.manifests
        .into_iter()
        .chain(doc.config)
        .chain(doc.layers)
        .filter_map(|d| {
            Some(Descriptor {
                digest: d.digest.parse().ok()?,
                media_type: if d.media_type.is_empty() {
                    crate::oci::OCTET_STREAM.to_string()
                } else {
                    d.media_type
                },
                size: d.size,
            })
        })
        .collect()
}

/// Reads whole small content (manifests) into memory, whatever form `open` returns.
pub(crate) async fn read_all<S: Store + ?Sized>(
    store: &S,
    digest: &Digest,
) -> Result<Bytes, StoreError> {
    use futures::StreamExt;
    use std::io::Read;
    match store.open(digest, None).await? {
        Content::Bytes(b) => Ok(b),
        Content::File(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            Ok(buf.into())
        }
        Content::Stream(mut s) => {
            let mut buf = Vec::new();
            while let Some(chunk) = s.next().await {
                buf.extend_from_slice(&chunk?);
            }
            Ok(buf.into())
        }
    }
}

/// Largest content the walker parses as a manifest; layers are never read.
const MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// Depth-first walk from `root` over present content, shared by every [`Store`].
pub(crate) async fn walk_store<S: Store + ?Sized>(
    store: &S,
    root: &Digest,
) -> Result<Vec<Descriptor>, StoreError> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Media types declared by the parent manifest beat fingerprinting (e.g. layer types).
    let mut stack: Vec<(Digest, Option<String>)> = vec![(root.clone(), None)];
    while let Some((digest, declared)) = stack.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let mut desc = match store.descriptor(&digest).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        if let Some(mt) =
            declared.filter(|mt| !mt.is_empty() && mt.as_str() != crate::oci::OCTET_STREAM)
        {
            desc.media_type = mt;
        }
        let is_manifest = crate::oci::is_manifest_media_type(&desc.media_type);
        out.push(desc.clone());
        if is_manifest && desc.size <= MAX_MANIFEST_SIZE {
            let data = read_all(store, &digest).await?;
            // Reverse so the stack visits children in document order.
            stack.extend(
                manifest_children(&data)
                    .into_iter()
                    .rev()
                    .map(|d| (d.digest, Some(d.media_type))),
            );
        }
    }
    Ok(out)
}
