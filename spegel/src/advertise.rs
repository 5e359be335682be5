//! Keeps the router's advertisements in step with the images in the store (§3.7, §4.5).
//!
//! Unlike the original, tag events are advertised live (§11.1), registry filters apply to every
//! key (§11.3), the advertised gauges are maintained (§11.2), and a broken containerd event
//! stream is re-subscribed with a full resync instead of exiting.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::{
    metrics,
    oci::Reference,
    registry::Filters,
    routing::Router,
    store::{Image, ImageEvent, Store, StoreError},
};

/// What one image name contributes to the advertised keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ImageKeys {
    registry: String,
    tag: Option<String>,
    digests: Vec<String>,
}

/// Advertises what the store holds and withdraws what it loses.
pub struct Advertiser {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    filters: Filters,
    resolve_tags: bool,
    images: HashMap<String, ImageKeys>,
    refcounts: HashMap<String, usize>,
}

impl Advertiser {
    /// An advertiser with nothing advertised yet.
    pub fn new(
        store: Arc<dyn Store>,
        router: Arc<dyn Router>,
        filters: Filters,
        resolve_tags: bool,
    ) -> Self {
        Advertiser {
            store,
            router,
            filters,
            resolve_tags,
            images: HashMap::new(),
            refcounts: HashMap::new(),
        }
    }

    /// Every key currently advertised.
    pub fn advertised(&self) -> HashSet<String> {
        self.refcounts.keys().cloned().collect()
    }

    /// Runs until the task is cancelled: subscribe, full sync, then follow events; when the
    /// event stream breaks (containerd restarted), back off and start over.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow().await {
                Ok(()) => warn!("containerd event stream ended, resubscribing"),
                Err(e) => warn!(error = %e, "advertisement sync failed, retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn follow(&mut self) -> Result<(), StoreError> {
        // Subscribe before listing so nothing that happens in between is missed.
        let mut events = self.store.subscribe().await?;
        self.sync().await?;
        while let Some(event) = events.next().await {
            if let Err(e) = self.apply(event).await {
                warn!(error = %e, "could not apply image event");
            }
        }
        Ok(())
    }

    /// Makes the advertised set match the store's current images.
    pub async fn sync(&mut self) -> Result<(), StoreError> {
        let images = self.store.list_images().await?;
        let mut wanted = HashMap::new();
        for image in images {
            if let Some(keys) = self.keys_for(&image).await {
                wanted.insert(image.name.clone(), keys);
            }
        }
        let stale: Vec<String> = self
            .images
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in stale {
            self.remove(&name).await;
        }
        let total = wanted.len();
        for (name, keys) in wanted {
            self.set(name, keys).await;
        }
        info!(
            images = total,
            keys = self.refcounts.len(),
            "advertised store content"
        );
        self.update_gauges();
        Ok(())
    }

    /// Applies one image event.
    pub async fn apply(&mut self, event: ImageEvent) -> Result<(), StoreError> {
        debug!(?event, "image event");
        match event {
            ImageEvent::Created(name) | ImageEvent::Updated(name) => self.refresh(name).await?,
            ImageEvent::Deleted(name) => self.remove(&name).await,
            ImageEvent::ContentDeleted(digest) => {
                // Walking again skips the missing blob, so exactly that key goes.
                let digest = digest.to_string();
                let affected: Vec<String> = self
                    .images
                    .iter()
                    .filter(|(_, keys)| keys.digests.contains(&digest))
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in affected {
                    self.refresh(name).await?;
                }
            }
        }
        self.update_gauges();
        Ok(())
    }

    /// Recomputes the keys of image `name` from the store.
    async fn refresh(&mut self, name: String) -> Result<(), StoreError> {
        let Ok(reference) = Reference::parse_image_name(&name) else {
            return Ok(());
        };
        let digest = match self.store.resolve(&name).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => {
                self.remove(&name).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let image = Image {
            name: name.clone(),
            reference,
            digest,
        };
        match self.keys_for(&image).await {
            Some(keys) => self.set(name, keys).await,
            None => self.remove(&name).await,
        }
        Ok(())
    }

    async fn keys_for(&self, image: &Image) -> Option<ImageKeys> {
        if self.filters.is_filtered(&image.reference) {
            return None;
        }
        let descriptors = match self.store.walk(&image.digest).await {
            Ok(d) => d,
            Err(e) => {
                warn!(image = %image.name, error = %e, "could not walk image");
                return None;
            }
        };
        if descriptors.is_empty() {
            return None;
        }
        let tag = if self.resolve_tags {
            image.reference.tag_name()
        } else {
            None
        };
        Some(ImageKeys {
            registry: image.reference.registry.clone(),
            tag,
            digests: descriptors
                .into_iter()
                .map(|d| d.digest.to_string())
                .collect(),
        })
    }

    fn keys_of(keys: &ImageKeys) -> impl Iterator<Item = &String> {
        keys.tag.iter().chain(keys.digests.iter())
    }

    async fn set(&mut self, name: String, keys: ImageKeys) {
        if self.images.get(&name) == Some(&keys) {
            return;
        }
        let old = self.images.insert(name, keys.clone());
        let mut added = Vec::new();
        for key in Self::keys_of(&keys) {
            let count = self.refcounts.entry(key.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                added.push(key.clone());
            }
        }
        if !added.is_empty()
            && let Err(e) = self.router.advertise(added).await
        {
            warn!(error = %e, "advertise failed");
        }
        if let Some(old) = old {
            self.release(&old).await;
        }
    }

    async fn remove(&mut self, name: &str) {
        if let Some(old) = self.images.remove(name) {
            self.release(&old).await;
        }
    }

    async fn release(&mut self, keys: &ImageKeys) {
        let mut gone = Vec::new();
        for key in Self::keys_of(keys) {
            if let Some(count) = self.refcounts.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    self.refcounts.remove(key);
                    gone.push(key.clone());
                }
            }
        }
        if !gone.is_empty()
            && let Err(e) = self.router.withdraw(gone).await
        {
            warn!(error = %e, "withdraw failed");
        }
    }

    fn update_gauges(&self) {
        let m = metrics::global();
        let mut tags: HashMap<&str, HashSet<&String>> = HashMap::new();
        let mut images: HashMap<&str, HashSet<&String>> = HashMap::new();
        let mut contents: HashMap<&str, HashSet<&String>> = HashMap::new();
        for keys in self.images.values() {
            let registry = keys.registry.as_str();
            if let Some(t) = &keys.tag {
                tags.entry(registry).or_default().insert(t);
            }
            if let Some(root) = keys.digests.first() {
                images.entry(registry).or_default().insert(root);
            }
            contents
                .entry(registry)
                .or_default()
                .extend(keys.digests.iter());
        }
        m.advertised_image_tags.reset();
        m.advertised_image_digests.reset();
        m.advertised_content_digests.reset();
        for (registry, set) in tags {
            m.advertised_image_tags
                .with_label_values(&[registry])
                .set(set.len() as f64);
        }
        for (registry, set) in images {
            m.advertised_image_digests
                .with_label_values(&[registry])
                .set(set.len() as f64);
        }
        for (registry, set) in contents {
            m.advertised_content_digests
                .with_label_values(&[registry])
                .set(set.len() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::{
        oci::{OCI_CONFIG, OCI_MANIFEST},
        routing::{Peer, RoutingError},
        store::MemoryStore,
    };

    #[derive(Default)]
    struct RecordingRouter {
        keys: Mutex<HashSet<String>>,
    }

    #[async_trait]
    impl Router for RecordingRouter {
        fn ready(&self) -> bool {
            true
        }
        async fn advertise(&self, keys: Vec<String>) -> Result<(), RoutingError> {
            let mut set = self.keys.lock().unwrap();
            for k in keys {
                assert!(set.insert(k.clone()), "{k} advertised twice");
            }
            Ok(())
        }
        async fn withdraw(&self, keys: Vec<String>) -> Result<(), RoutingError> {
            let mut set = self.keys.lock().unwrap();
            for k in keys {
                assert!(set.remove(&k), "{k} withdrawn but not advertised");
            }
            Ok(())
        }
        async fn lookup(
            &self,
            _: &str,
            _: usize,
        ) -> Result<tokio::sync::mpsc::Receiver<Peer>, RoutingError> {
            Err(RoutingError::Stopped)
        }
    }

    fn image(store: &MemoryStore, layer: &[u8]) -> (crate::oci::Digest, Vec<String>) {
        let l = store.add_blob("application/vnd.oci.image.layer.v1.tar", layer.to_vec());
        let c = store.add_blob(
            OCI_CONFIG,
            br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#.to_vec(),
        );
        let m = store.add_blob(
            OCI_MANIFEST,
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{c}","size":1}},"layers":[{{"digest":"{l}","size":1}}]}}"#)
                .into_bytes(),
        );
        (m.clone(), vec![m.to_string(), c.to_string(), l.to_string()])
    }

    fn set(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn sync_events_and_shared_content() {
        let store = Arc::new(MemoryStore::new());
        let router = Arc::new(RecordingRouter::default());
        let (m1, keys1) = image(&store, b"layer one");
        store.add_image("docker.io/library/a:1", m1.clone());
        store.add_image("docker.io/library/a:latest", m1.clone());
        store.add_image("sha256:abcd", m1.clone());
        let filters = Filters::new(&[], &[":latest$".to_string()]).unwrap();
        let mut adv = Advertiser::new(store.clone(), router.clone(), filters, true);
        adv.sync().await.unwrap();
        let mut want: HashSet<String> = keys1.iter().cloned().collect();
        want.insert("docker.io/library/a:1".into());
        assert_eq!(*router.keys.lock().unwrap(), want);
        assert_eq!(adv.advertised(), want);

        // A second tag of the same content, created live: only the tag is new.
        store.add_image("docker.io/library/a:2", m1.clone());
        adv.apply(ImageEvent::Created("docker.io/library/a:2".into()))
            .await
            .unwrap();
        assert!(
            router
                .keys
                .lock()
                .unwrap()
                .contains("docker.io/library/a:2")
        );

        // Deleting one tag keeps the shared digests.
        store.remove_image("docker.io/library/a:1");
        adv.apply(ImageEvent::Deleted("docker.io/library/a:1".into()))
            .await
            .unwrap();
        let now = router.keys.lock().unwrap().clone();
        assert!(!now.contains("docker.io/library/a:1"));
        assert!(keys1.iter().all(|k| now.contains(k)));

        // Deleting the last name withdraws everything.
        store.remove_image("docker.io/library/a:2");
        adv.apply(ImageEvent::Deleted("docker.io/library/a:2".into()))
            .await
            .unwrap();
        assert_eq!(*router.keys.lock().unwrap(), HashSet::new());

        // Update to new content swaps the digests.
        let (m2, keys2) = image(&store, b"layer two");
        store.add_image("ghcr.io/x/y:v", m1.clone());
        adv.apply(ImageEvent::Created("ghcr.io/x/y:v".into()))
            .await
            .unwrap();
        store.add_image("ghcr.io/x/y:v", m2.clone());
        adv.apply(ImageEvent::Updated("ghcr.io/x/y:v".into()))
            .await
            .unwrap();
        let mut want: HashSet<String> = keys2.iter().cloned().collect();
        want.insert("ghcr.io/x/y:v".into());
        assert_eq!(*router.keys.lock().unwrap(), want);

        let text = String::from_utf8(metrics::global().encode()).unwrap();
        assert!(
            text.contains(r#"spegel_advertised_content_digests{registry="ghcr.io"} 3"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn content_delete_withdraws_exactly_that_blob() {
        let store = Arc::new(MemoryStore::new());
        let router = Arc::new(RecordingRouter::default());
        let (m, keys) = image(&store, b"shared layer");
        store.add_image("docker.io/library/c:1", m.clone());
        store.add_image("docker.io/library/c:2", m.clone());
        let (other, other_keys) = image(&store, b"other layer");
        store.add_image("docker.io/library/d:1", other.clone());
        let mut adv = Advertiser::new(store.clone(), router.clone(), Filters::default(), false);
        adv.sync().await.unwrap();
        let layer: crate::oci::Digest = keys[2].parse().unwrap();
        store.delete_content(&layer);
        adv.apply(ImageEvent::ContentDeleted(layer)).await.unwrap();
        let mut want = set(&[&keys[0], &keys[1]]);
        want.extend(other_keys.iter().cloned());
        assert_eq!(*router.keys.lock().unwrap(), want);
        // Deleting the manifest leaves nothing of the image; the other image is untouched.
        let manifest: crate::oci::Digest = keys[0].parse().unwrap();
        store.delete_content(&manifest);
        adv.apply(ImageEvent::ContentDeleted(manifest))
            .await
            .unwrap();
        assert_eq!(
            *router.keys.lock().unwrap(),
            other_keys.iter().cloned().collect::<HashSet<_>>()
        );
        // A digest no image holds changes nothing.
        adv.apply(ImageEvent::ContentDeleted(
            "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                .parse()
                .unwrap(),
        ))
        .await
        .unwrap();
        assert_eq!(router.keys.lock().unwrap().len(), other_keys.len());
    }

    #[tokio::test]
    async fn missing_content_is_not_advertised_and_tags_optional() {
        let store = Arc::new(MemoryStore::new());
        let router = Arc::new(RecordingRouter::default());
        let (m, keys) = image(&store, b"x");
        store.remove_blob(&keys[2].parse().unwrap());
        store.add_image("docker.io/library/b:1", m.clone());
        let mut adv = Advertiser::new(store.clone(), router.clone(), Filters::default(), false);
        adv.sync().await.unwrap();
        assert_eq!(*router.keys.lock().unwrap(), set(&[&keys[0], &keys[1]]));
        // Resync after the image vanished without an event withdraws it.
        store.remove_image("docker.io/library/b:1");
        adv.sync().await.unwrap();
        assert!(router.keys.lock().unwrap().is_empty());
    }
}
