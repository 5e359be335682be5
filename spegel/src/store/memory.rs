//! An in-memory [`Store`] for tests.

use std::{collections::HashMap, path::PathBuf, sync::Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use super::{Content, Descriptor, Image, ImageEvent, Store, StoreError};
use crate::oci::{ContentRange, Digest, Reference, fingerprint_media_type};

/// Images and blobs held in memory; optionally mirrored to files so `open` returns
/// [`Content::File`] and exercises the sendfile path.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    files: Option<PathBuf>,
    events: broadcast::Sender<ImageEvent>,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<Digest, (String, Bytes)>,
    images: HashMap<String, Digest>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store serving from memory.
    pub fn new() -> Self {
        MemoryStore {
            inner: Mutex::default(),
            files: None,
            events: broadcast::channel(1024).0,
        }
    }

    /// An empty store that writes each blob under `dir/blobs/<alg>/<hex>` and serves the file.
    pub fn with_files(dir: PathBuf) -> Self {
        MemoryStore {
            files: Some(dir),
            ..Self::new()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds content with a known media type; returns its digest.
    pub fn add_blob(&self, media_type: &str, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let digest = Digest::sha256_of(&data);
        self.add_blob_as(&digest, media_type, data);
        digest
    }

    /// Adds `data` under `digest` whether or not it hashes to it (a corrupt copy, for tests).
    pub fn add_blob_as(&self, digest: &Digest, media_type: &str, data: impl Into<Bytes>) {
        let data = data.into();
        if let Some(dir) = &self.files {
            let path = dir
                .join("blobs")
                .join(digest.algorithm().as_str())
                .join(digest.hex());
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&path, &data);
        }
        self.lock()
            .blobs
            .insert(digest.clone(), (media_type.to_string(), data));
    }

    /// Removes content.
    pub fn remove_blob(&self, digest: &Digest) {
        self.lock().blobs.remove(digest);
    }

    /// Names an image and emits a create event.
    pub fn add_image(&self, name: &str, digest: Digest) {
        let existed = self
            .lock()
            .images
            .insert(name.to_string(), digest)
            .is_some();
        let _ = self.events.send(if existed {
            ImageEvent::Updated(name.to_string())
        } else {
            ImageEvent::Created(name.to_string())
        });
    }

    /// Removes content and emits a content-delete event, as containerd's content API does.
    pub fn delete_content(&self, digest: &Digest) {
        self.remove_blob(digest);
        let _ = self.events.send(ImageEvent::ContentDeleted(digest.clone()));
    }

    /// Deletes an image name and emits a delete event.
    pub fn remove_image(&self, name: &str) {
        self.lock().images.remove(name);
        let _ = self.events.send(ImageEvent::Deleted(name.to_string()));
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &str {
        "memory"
    }

    async fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        let mut images: Vec<Image> = self
            .lock()
            .images
            .iter()
            .filter_map(|(name, digest)| {
                let reference = Reference::parse_image_name(name).ok()?;
                Some(Image {
                    name: name.clone(),
                    reference,
                    digest: digest.clone(),
                })
            })
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    async fn resolve(&self, name: &str) -> Result<Digest, StoreError> {
        self.lock()
            .images
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(name.to_string()))
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        let inner = self.lock();
        let (media_type, data) = inner
            .blobs
            .get(digest)
            .ok_or_else(|| StoreError::NotFound(digest.to_string()))?;
        let media_type = if media_type.is_empty() {
            fingerprint_media_type(data).to_string()
        } else {
            media_type.clone()
        };
        Ok(Descriptor {
            digest: digest.clone(),
            media_type,
            size: data.len() as u64,
        })
    }

    async fn open(
        &self,
        digest: &Digest,
        range: Option<ContentRange>,
    ) -> Result<Content, StoreError> {
        let data = {
            let inner = self.lock();
            inner
                .blobs
                .get(digest)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| StoreError::NotFound(digest.to_string()))?
        };
        if let Some(dir) = &self.files {
            let path = dir
                .join("blobs")
                .join(digest.algorithm().as_str())
                .join(digest.hex());
            return Ok(Content::File(std::fs::File::open(path)?));
        }
        Ok(match range {
            // Serve ranges as a stream so the streaming path is exercised too.
            Some(r) => {
                let slice = data.slice(r.start as usize..=r.end as usize);
                Content::Stream(Box::pin(futures::stream::iter([Ok(slice)])))
            }
            None => Content::Bytes(data),
        })
    }

    async fn walk(&self, digest: &Digest) -> Result<Vec<Descriptor>, StoreError> {
        super::walk_store(self, digest).await
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, ImageEvent>, StoreError> {
        let rx = self.events.subscribe();
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((ev, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })))
    }
}
