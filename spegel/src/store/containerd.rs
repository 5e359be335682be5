//! [`Store`] backed by containerd's gRPC API, with blob files read from its content directory.

use std::{
    collections::HashMap,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use containerd_client::events::ContentDelete;
use containerd_client::services::v1::{
    AbortRequest, GetImageRequest, ImageCreate, ImageDelete, ImageUpdate, InfoRequest,
    ListImagesRequest, ListStatusesRequest, PluginsRequest, ReadContentRequest, SubscribeRequest,
    content_client::ContentClient, events_client::EventsClient, images_client::ImagesClient,
    introspection_client::IntrospectionClient,
};
use futures::{StreamExt, stream::BoxStream};
use prost::Message;
use tonic::{Code, Request, Status, transport::Channel};
use tracing::{debug, info, warn};

use super::{Content, Descriptor, Image, ImageEvent, Store, StoreError};
use crate::{
    metrics,
    oci::{ContentRange, Digest, OCTET_STREAM, Reference, fingerprint_media_type},
};

/// Content larger than this is never read to guess its media type.
const FINGERPRINT_LIMIT: u64 = 4 << 20;
/// Bound on remembered media types; cleared wholesale when reached (cheap and rare).
const MEDIA_TYPE_CACHE_LIMIT: usize = 200_000;
/// Least time between two questions to containerd about where its content lives, while the
/// answer is unknown (containerd down when we started). A `stat` of a known candidate costs
/// nothing next to a content API read, so that is re-done on every open instead.
const CONTENT_ROOT_ASK_INTERVAL: Duration = Duration::from_secs(5);

/// Content-API streams open at once; more get [`StoreError::Busy`] (503 + `Retry-After`).
/// With [`STREAM_PIECE`] this bounds what the streams buffer in total to about 16 MiB.
pub const MAX_CONTENT_STREAMS: usize = 64;
/// Bytes asked of the content API per read: a stream holds at most one piece (containerd
/// answers a read in messages of up to 1 MiB, and gRPC buffers a whole message), and the next
/// piece is asked for only once the client took the previous one (flow control).
pub const STREAM_PIECE: u64 = 256 << 10;

/// Connection settings for [`ContainerdStore`].
#[derive(Debug, Clone)]
pub struct ContainerdStoreConfig {
    /// containerd socket path.
    pub socket: String,
    /// containerd namespace.
    pub namespace: String,
    /// Content store root; empty asks containerd.
    pub content_path: String,
}

/// containerd-backed store. Blob bodies come from `<content root>/blobs/<alg>/<hex>` so they can
/// be sent with `sendfile(2)`; when that directory is unusable, from the content API.
pub struct ContainerdStore {
    channel: Channel,
    namespace: String,
    /// Set once `<root>/blobs` is a directory; never unset (containerd does not remove it).
    content_root: OnceLock<PathBuf>,
    /// How to find the root while it is not usable yet.
    probe: Mutex<RootProbe>,
    media_types: Mutex<HashMap<Digest, String>>,
    /// One permit per open content-API stream.
    streams: std::sync::Arc<tokio::sync::Semaphore>,
    /// How long a body served from an ingest waits for a writer that adds nothing.
    ingest_stall: Duration,
}

/// Re-probing state for a content directory that was not usable at start: a fresh node's
/// containerd creates `<root>/blobs` only when it writes its first content.
#[derive(Debug, Default)]
struct RootProbe {
    /// `--containerd-content-path`; empty asks containerd.
    configured: String,
    /// The root to check: the configured one, or containerd's answer once it gave one.
    candidate: Option<PathBuf>,
    /// No question to containerd before this.
    next_ask: Option<Instant>,
    /// Whether "not usable" was already logged for the candidate, so re-probes stay quiet.
    warned: bool,
    /// Whether the startup probe is done, so a root found later is logged as it appears.
    started: bool,
}

/// Logs and counts a blob file that must not be served, and the error that answers it.
fn reject(path: &Path, digest: &Digest, reason: &'static str) -> StoreError {
    warn!(path = %path.display(), %digest, reason, "blob file is not a regular file, not serving it");
    metrics::global()
        .content_rejected
        .with_label_values(&[reason])
        .inc();
    StoreError::Invalid(format!("{}: {reason}", path.display()))
}

fn status_to_error(what: &str, status: Status) -> StoreError {
    match status.code() {
        Code::NotFound => StoreError::NotFound(what.to_string()),
        Code::Unavailable => StoreError::Unavailable(format!("{what}: {}", status.message())),
        _ => StoreError::Backend(format!("{what}: {}", status.message())),
    }
}

impl ContainerdStore {
    /// Connects (lazily: containerd may start after us) and resolves the content directory.
    pub async fn connect(config: ContainerdStoreConfig) -> Result<Self, StoreError> {
        let socket = PathBuf::from(&config.socket);
        let channel = tonic::transport::Endpoint::try_from("http://[::]")
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }));
        let store = ContainerdStore {
            channel,
            namespace: config.namespace,
            content_root: OnceLock::new(),
            probe: Mutex::new(RootProbe {
                candidate: (!config.content_path.is_empty())
                    .then(|| PathBuf::from(&config.content_path)),
                configured: config.content_path,
                ..RootProbe::default()
            }),
            media_types: Mutex::default(),
            streams: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONTENT_STREAMS)),
            ingest_stall: super::ingest::DEFAULT_STALL,
        };
        match store.probe_content_root().await {
            Some(root) => info!(path = %root.display(), "serving blobs from the content directory"),
            None => warn!(
                "content directory not usable, serving blobs through the containerd content API \
                 until it appears"
            ),
        }
        store.lock_probe().started = true;
        Ok(store)
    }

    /// The usable content root, probing again when there is none yet: cheap (a `stat`) when the
    /// candidate is known, one introspection call per [`CONTENT_ROOT_ASK_INTERVAL`] otherwise.
    async fn probe_content_root(&self) -> Option<&Path> {
        if let Some(root) = self.content_root.get() {
            return Some(root);
        }
        let (candidate, ask) = {
            let mut probe = self.lock_probe();
            let now = Instant::now();
            let ask = probe.candidate.is_none()
                && probe.configured.is_empty()
                && probe.next_ask.is_none_or(|t| now >= t);
            if ask {
                probe.next_ask = Some(now + CONTENT_ROOT_ASK_INTERVAL);
            }
            (probe.candidate.clone(), ask)
        };
        let candidate = match candidate {
            Some(c) => c,
            None if ask => {
                let answer = self.ask_content_root().await?;
                self.lock_probe().candidate = Some(answer.clone());
                answer
            }
            None => return None,
        };
        match std::fs::metadata(candidate.join("blobs")) {
            Ok(m) if m.is_dir() => {
                let first = self.content_root.set(candidate).is_ok();
                let root = self.content_root.get()?;
                if first && self.lock_probe().started {
                    info!(path = %root.display(), "content directory appeared, serving blobs from it");
                }
                Some(root)
            }
            Ok(_) => {
                self.warn_once(&candidate, "blobs is not a directory");
                None
            }
            Err(e) => {
                self.warn_once(&candidate, &e.to_string());
                None
            }
        }
    }

    fn warn_once(&self, candidate: &Path, error: &str) {
        let mut probe = self.lock_probe();
        if !probe.warned {
            probe.warned = true;
            warn!(path = %candidate.display(), error, "content directory not readable");
        }
    }

    fn lock_probe(&self) -> std::sync::MutexGuard<'_, RootProbe> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// containerd's own answer to where its content store lives.
    async fn ask_content_root(&self) -> Option<PathBuf> {
        let mut client = IntrospectionClient::new(self.channel.clone());
        let req = PluginsRequest {
            filters: vec!["type==io.containerd.content.v1,id==content".to_string()],
        };
        match client.plugins(req).await {
            Ok(resp) => resp
                .into_inner()
                .plugins
                .into_iter()
                .find_map(|p| p.exports.get("root").cloned())
                .map(PathBuf::from),
            Err(e) => {
                warn!(error = %e.message(), "could not ask containerd for its content directory");
                None
            }
        }
    }

    /// Sets how long a body served from an ingest waits for a writer that adds nothing.
    pub fn with_ingest_stall(mut self, stall: Duration) -> Self {
        self.ingest_stall = stall;
        self
    }

    /// The content directory blobs are read from, if usable.
    pub fn content_root(&self) -> Option<&Path> {
        self.content_root.get().map(PathBuf::as_path)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        if let Ok(value) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", value);
        }
        req
    }

    fn cached_media_type(&self, digest: &Digest) -> Option<String> {
        self.media_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    fn remember_media_type(&self, digest: &Digest, media_type: &str) {
        let mut cache = self.media_types.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MEDIA_TYPE_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(digest.clone(), media_type.to_string());
    }

    fn blob_path(&self, root: &Path, digest: &Digest) -> PathBuf {
        // Safe: Digest guarantees the algorithm name and lowercase hex of exact length.
        root.join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Opens the blob file without following links, and only if it is a regular file.
    fn open_file(&self, root: &Path, digest: &Digest) -> Result<Option<std::fs::File>, StoreError> {
        let path = self.blob_path(root, digest);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            // O_NONBLOCK: opening a FIFO planted in place of a blob must not block the thread
            // (it has no effect on regular files).
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(digest.to_string()));
            }
            // A link in place of a blob: the content API would follow it and serve whatever
            // it points at, so this digest is not served at all (containerd goes upstream).
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(reject(&path, digest, metrics::CONTENT_REJECTED_SYMLINK));
            }
            Err(e) => {
                debug!(path = %path.display(), error = %e, "cannot open blob file, using the content API");
                return Ok(None);
            }
        };
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(reject(&path, digest, metrics::CONTENT_REJECTED_NOT_REGULAR));
        }
        Ok(Some(file))
    }

    /// Content-API streams open now.
    pub fn open_streams(&self) -> usize {
        MAX_CONTENT_STREAMS - self.streams.available_permits()
    }

    /// Size of present content, from the content API.
    async fn content_size(&self, digest: &Digest) -> Result<u64, StoreError> {
        let mut client = ContentClient::new(self.channel.clone());
        let info = client
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
            .map_err(|s| status_to_error(&digest.to_string(), s))?
            .into_inner()
            .info
            .ok_or_else(|| StoreError::NotFound(digest.to_string()))?;
        u64::try_from(info.size)
            .map_err(|_| StoreError::Invalid(format!("{digest} has negative size {}", info.size)))
    }

    /// `range` (or everything) through the content API, one [`STREAM_PIECE`] at a time.
    async fn read_stream(
        &self,
        digest: &Digest,
        range: Option<ContentRange>,
    ) -> Result<BoxStream<'static, std::io::Result<bytes::Bytes>>, StoreError> {
        let permit =
            self.streams.clone().try_acquire_owned().map_err(|_| {
                StoreError::Busy(format!("{MAX_CONTENT_STREAMS} content streams open"))
            })?;
        let (start, end) = match range {
            Some(r) => (r.start, r.end + 1),
            None => (0, self.content_size(digest).await?),
        };
        struct Cursor {
            client: ContentClient<Channel>,
            namespace: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
            digest: String,
            offset: u64,
            end: u64,
            // Released when the stream is dropped, finished or not.
            _permit: tokio::sync::OwnedSemaphorePermit,
        }
        let cursor = Cursor {
            client: ContentClient::new(self.channel.clone()),
            namespace: self.namespace.parse().ok(),
            digest: digest.to_string(),
            offset: start,
            end,
            _permit: permit,
        };
        let stream = futures::stream::try_unfold(cursor, |mut c| async move {
            if c.offset >= c.end {
                return Ok(None);
            }
            let want = (c.end - c.offset).min(STREAM_PIECE);
            let mut req = Request::new(ReadContentRequest {
                digest: c.digest.clone(),
                offset: c.offset as i64,
                size: want as i64,
            });
            if let Some(ns) = &c.namespace {
                req.metadata_mut()
                    .insert("containerd-namespace", ns.clone());
            }
            let mut messages = c
                .client
                .read(req)
                .await
                .map_err(|s| std::io::Error::other(s.message().to_string()))?
                .into_inner();
            let mut piece = bytes::BytesMut::with_capacity(want as usize);
            while let Some(m) = messages.next().await {
                let m = m.map_err(|s| std::io::Error::other(s.message().to_string()))?;
                if piece.len() + m.data.len() > want as usize {
                    return Err(std::io::Error::other("content API sent more than asked"));
                }
                piece.extend_from_slice(&m.data);
            }
            if piece.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "content ended early",
                ));
            }
            c.offset += piece.len() as u64;
            Ok(Some((piece.freeze(), c)))
        });
        Ok(Box::pin(stream))
    }

    async fn media_type_for(&self, digest: &Digest, size: u64) -> Result<String, StoreError> {
        if let Some(mt) = self.cached_media_type(digest) {
            return Ok(mt);
        }
        let mt = if size > FINGERPRINT_LIMIT {
            OCTET_STREAM.to_string()
        } else {
            let data = super::read_all(self, digest).await?;
            fingerprint_media_type(&data).to_string()
        };
        self.remember_media_type(digest, &mt);
        Ok(mt)
    }
}

#[async_trait]
impl Store for ContainerdStore {
    fn name(&self) -> &str {
        "containerd"
    }

    async fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let resp = client
            .list(self.request(ListImagesRequest { filters: vec![] }))
            .await
            .map_err(|s| status_to_error("images", s))?;
        let mut images = Vec::new();
        for image in resp.into_inner().images {
            let Some(target) = image.target else { continue };
            let reference = match Reference::parse_image_name(&image.name) {
                Ok(r) => r,
                Err(crate::oci::ReferenceError::ImageId(_)) => continue,
                Err(e) => {
                    warn!(image = %image.name, error = %e, "skipping image with unparsable name");
                    continue;
                }
            };
            let digest = match target.digest.parse::<Digest>() {
                Ok(d) => d,
                Err(e) => {
                    warn!(image = %image.name, error = %e, "skipping image with invalid target digest");
                    continue;
                }
            };
            if crate::oci::is_manifest_media_type(&target.media_type) {
                self.remember_media_type(&digest, &target.media_type);
            }
            images.push(Image {
                name: image.name,
                reference,
                digest,
            });
        }
        Ok(images)
    }

    async fn resolve(&self, name: &str) -> Result<Digest, StoreError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let resp = client
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .await
            .map_err(|s| status_to_error(name, s))?;
        let target = resp
            .into_inner()
            .image
            .and_then(|i| i.target)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let digest: Digest = target.digest.parse().map_err(|e| {
            StoreError::Invalid(format!("image {name} has an invalid target digest: {e}"))
        })?;
        if crate::oci::is_manifest_media_type(&target.media_type) {
            self.remember_media_type(&digest, &target.media_type);
        }
        Ok(digest)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        let mut client = ContentClient::new(self.channel.clone());
        let resp = client
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
            .map_err(|s| status_to_error(&digest.to_string(), s))?;
        let info = resp
            .into_inner()
            .info
            .ok_or_else(|| StoreError::NotFound(digest.to_string()))?;
        let size = u64::try_from(info.size).map_err(|_| {
            StoreError::Invalid(format!("{digest} has negative size {}", info.size))
        })?;
        let media_type = self.media_type_for(digest, size).await?;
        Ok(Descriptor {
            digest: digest.clone(),
            media_type,
            size,
        })
    }

    async fn open(
        &self,
        digest: &Digest,
        range: Option<ContentRange>,
    ) -> Result<Content, StoreError> {
        if let Some(root) = self.probe_content_root().await
            && let Some(file) = self.open_file(root, digest)?
        {
            metrics::global()
                .content_opens
                .with_label_values(&[metrics::CONTENT_PATH_FILE])
                .inc();
            return Ok(Content::File(file));
        }
        let stream = self.read_stream(digest, range).await?;
        metrics::global()
            .content_opens
            .with_label_values(&[metrics::CONTENT_PATH_STREAM])
            .inc();
        Ok(Content::Stream(stream))
    }

    async fn walk(&self, digest: &Digest) -> Result<Vec<Descriptor>, StoreError> {
        let descriptors = super::walk_store(self, digest).await?;
        for d in &descriptors {
            self.remember_media_type(&d.digest, &d.media_type);
        }
        Ok(descriptors)
    }

    async fn in_progress(&self) -> Result<Vec<super::Ingest>, StoreError> {
        Ok(match self.probe_content_root().await {
            Some(root) => super::ingest::scan(root),
            None => Vec::new(),
        })
    }

    async fn abort_ingests(
        &self,
        digest: &Digest,
        started_before: std::time::SystemTime,
    ) -> Result<usize, StoreError> {
        let mut client = ContentClient::new(self.channel.clone());
        let statuses = client
            .list_statuses(self.request(ListStatusesRequest { filters: vec![] }))
            .await
            .map_err(|s| status_to_error("ingests", s))?
            .into_inner()
            .statuses;
        let limit = started_before
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let wanted = digest.to_string();
        let mut aborted = 0;
        for status in statuses {
            let names = status.expected == wanted
                || super::ingest::digest_of_ref(&status.r#ref).as_ref() == Some(digest);
            let started = status.started_at.map(|t| {
                Duration::new(
                    u64::try_from(t.seconds).unwrap_or(0),
                    u32::try_from(t.nanos).unwrap_or(0),
                )
            });
            // A write begun after the mismatch is a fresh retry, not the poisoned one.
            if !names || started.is_some_and(|t| t > limit) {
                continue;
            }
            match client
                .abort(self.request(AbortRequest {
                    r#ref: status.r#ref.clone(),
                }))
                .await
            {
                Ok(_) => {
                    warn!(%digest, reference = %status.r#ref, written = status.offset,
                        "aborted a write that received bytes not matching the blob's digest");
                    aborted += 1;
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(status_to_error(&status.r#ref, s)),
            }
        }
        Ok(aborted)
    }

    async fn open_in_progress(
        &self,
        digest: &Digest,
    ) -> Result<Option<super::GrowingFile>, StoreError> {
        let Some(root) = self.probe_content_root().await else {
            return Ok(None);
        };
        Ok(super::ingest::open_growing(
            root,
            digest,
            self.ingest_stall,
        )?)
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, ImageEvent>, StoreError> {
        let mut client = EventsClient::new(self.channel.clone());
        let req = SubscribeRequest {
            // Filters are alternatives; content deletes come from `ctr content rm` and the like.
            filters: vec![
                r#"topic~="/images/""#.to_string(),
                r#"topic=="/content/delete""#.to_string(),
            ],
        };
        let stream = client
            .subscribe(req)
            .await
            .map_err(|s| status_to_error("events", s))?
            .into_inner();
        let namespace = self.namespace.clone();
        Ok(Box::pin(
            stream
                .take_while(|item| {
                    if let Err(e) = item {
                        warn!(error = %e.message(), "containerd event stream failed");
                    }
                    std::future::ready(item.is_ok())
                })
                .filter_map(move |item| {
                    let event =
                        item.ok()
                            .filter(|env| env.namespace == namespace)
                            .and_then(|env| {
                                let any = env.event?;
                                match env.topic.as_str() {
                                    "/images/create" => ImageCreate::decode(any.value.as_slice())
                                        .ok()
                                        .map(|e| ImageEvent::Created(e.name)),
                                    "/images/update" => ImageUpdate::decode(any.value.as_slice())
                                        .ok()
                                        .map(|e| ImageEvent::Updated(e.name)),
                                    "/images/delete" => ImageDelete::decode(any.value.as_slice())
                                        .ok()
                                        .map(|e| ImageEvent::Deleted(e.name)),
                                    "/content/delete" => {
                                        ContentDelete::decode(any.value.as_slice())
                                            .ok()
                                            .and_then(|e| e.digest.parse().ok())
                                            .map(ImageEvent::ContentDeleted)
                                    }
                                    _ => None,
                                }
                            });
                    std::future::ready(event)
                }),
        ))
    }
}

#[cfg(test)]
impl ContainerdStore {
    /// A store over `content` whose socket (in `dir`) has no containerd behind it: the content
    /// API fails, the directory does not.
    pub(crate) async fn without_containerd(dir: &Path, content: &Path) -> ContainerdStore {
        ContainerdStore::connect(ContainerdStoreConfig {
            socket: dir.join("absent.sock").display().to_string(),
            namespace: "k8s.io".into(),
            content_path: content.display().to_string(),
        })
        .await
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opens(path: &str) -> u64 {
        metrics::global()
            .content_opens
            .with_label_values(&[path])
            .get()
    }

    #[tokio::test]
    async fn content_directory_created_after_start_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("content");
        // No containerd behind the socket: the content API fails, the directory does not.
        let store = ContainerdStore::without_containerd(dir.path(), &root).await;
        assert_eq!(store.content_root(), None);
        let data = b"layer bytes".to_vec();
        let digest = Digest::sha256_of(&data);
        let err = store.open(&digest, None).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");

        // containerd writes its first content.
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(digest.hex()), &data).unwrap();
        let (files, streams) = (
            opens(metrics::CONTENT_PATH_FILE),
            opens(metrics::CONTENT_PATH_STREAM),
        );
        match store.open(&digest, None).await.unwrap() {
            Content::File(f) => assert_eq!(f.metadata().unwrap().len(), data.len() as u64),
            other => panic!("expected the file, got {other:?}"),
        }
        assert_eq!(store.content_root(), Some(root.as_path()));
        assert_eq!(opens(metrics::CONTENT_PATH_FILE), files + 1);
        assert_eq!(opens(metrics::CONTENT_PATH_STREAM), streams);
        let text = String::from_utf8(metrics::global().encode()).unwrap();
        assert!(
            text.contains(r#"spegel_store_content_opens_total{path="file"}"#),
            "{text}"
        );
    }

    fn rejected(reason: &str) -> u64 {
        metrics::global()
            .content_rejected
            .with_label_values(&[reason])
            .get()
    }

    #[tokio::test]
    async fn links_and_special_files_in_place_of_blobs_are_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let store = ContainerdStore::without_containerd(dir.path(), dir.path()).await;
        let same_size = dir.path().join("other");
        std::fs::write(&same_size, b"other bytes").unwrap();
        for (i, target) in [same_size.as_path(), Path::new("/etc/passwd")]
            .into_iter()
            .enumerate()
        {
            let digest = Digest::sha256_of(format!("layer {i}").as_bytes());
            std::os::unix::fs::symlink(target, blobs.join(digest.hex())).unwrap();
            let before = rejected(metrics::CONTENT_REJECTED_SYMLINK);
            // Not Unavailable: the content API (which follows links) is never asked.
            match store.open(&digest, None).await {
                Err(StoreError::Invalid(_)) => {}
                other => panic!("a link must be refused, got {other:?}"),
            }
            assert_eq!(rejected(metrics::CONTENT_REJECTED_SYMLINK), before + 1);
        }
        let fifo = Digest::sha256_of(b"fifo");
        let path =
            std::ffi::CString::new(blobs.join(fifo.hex()).as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let before = rejected(metrics::CONTENT_REJECTED_NOT_REGULAR);
        let opened = tokio::time::timeout(Duration::from_secs(10), store.open(&fifo, None))
            .await
            .expect("opening a FIFO must not block");
        assert!(matches!(opened, Err(StoreError::Invalid(_))), "{opened:?}");
        assert_eq!(rejected(metrics::CONTENT_REJECTED_NOT_REGULAR), before + 1);
    }

    #[tokio::test]
    async fn content_directory_that_is_a_file_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blobs"), b"not a directory").unwrap();
        let store = ContainerdStore::without_containerd(dir.path(), dir.path()).await;
        let digest = Digest::sha256_of(b"x");
        assert!(store.open(&digest, None).await.is_err());
        assert_eq!(store.content_root(), None);
    }
}
