//! Keeps the router's advertisements in step with the images in the store (§3.7, §4.5).
//!
//! Unlike the original, tag events are advertised live (§11.1), registry filters apply to every
//! key (§11.3), the advertised gauges are maintained (§11.2), and a broken containerd event
//! stream is re-subscribed with a full resync instead of exiting.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::{
    metrics,
    oci::{Digest, Filters, Reference},
    routing::{Router, in_progress_key},
    store::{Image, ImageEvent, Store, StoreError},
};

/// What one image name contributes to the advertised keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ImageKeys {
    registry: String,
    tag: Option<String>,
    digests: Vec<String>,
}

/// One advertised image name, as the admin pages show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdvertisedImage {
    /// The name as containerd stores it.
    pub name: String,
    /// Its registry.
    pub registry: String,
    /// The tag key, when tags are advertised and the name has one.
    pub tag: Option<String>,
    /// The digest the name points at.
    pub digest: Option<String>,
    /// Content digests advertised for it (root included).
    pub digests: usize,
}

/// What is advertised right now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Advertised {
    /// Advertised image names, sorted.
    pub images: Vec<AdvertisedImage>,
    /// Distinct keys advertised.
    pub keys: usize,
}

/// Read-only view of an [`Advertiser`]'s state, updated after every sync and event.
pub trait AdvertisedView: Send + Sync + 'static {
    /// The latest snapshot.
    fn advertised(&self) -> Advertised;
}

/// Shared snapshot handle; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AdvertisedHandle(Arc<RwLock<Advertised>>, Arc<std::sync::atomic::AtomicU64>);

impl AdvertisedView for AdvertisedHandle {
    fn advertised(&self) -> Advertised {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl AdvertisedHandle {
    /// Counts the advertiser's publications: it moves whenever an image was named, changed or
    /// deleted (and on every sync).
    pub fn generation(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// First delay before re-subscribing after the event stream broke.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between re-subscription attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A synced subscription that lasted this long worked, even if containerd never answered it.
const STABLE_AFTER: Duration = Duration::from_secs(1);

/// Doubling delay between `min` and `max`, back to `min` on [`Backoff::reset`].
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What the subscription task hands to [`Advertiser::follow`].
enum Feed {
    /// containerd answered the subscription: it is in effect.
    Subscribed,
    /// One image event.
    Event(ImageEvent),
    /// The subscription could not be made or broke.
    Failed(StoreError),
}

/// How one subscription ended.
struct Session {
    /// Whether the subscription was in effect and synced, so the backoff starts over.
    worked: bool,
    /// `Ok` when the event stream ended, the error that ended it otherwise.
    result: Result<(), StoreError>,
}

/// Aborts the task when dropped, so an abandoned subscription does not linger.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Subscribes, then forwards every event until the stream ends or nobody listens.
async fn feed(store: Arc<dyn Store>, tx: tokio::sync::mpsc::UnboundedSender<Feed>) {
    let mut events = match store.subscribe().await {
        Ok(events) => events,
        Err(e) => {
            let _ = tx.send(Feed::Failed(e));
            return;
        }
    };
    if tx.send(Feed::Subscribed).is_err() {
        return;
    }
    while let Some(event) = events.next().await {
        if tx.send(Feed::Event(event)).is_err() {
            return;
        }
    }
}

/// Advertises what the store holds and withdraws what it loses.
pub struct Advertiser {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    filters: Filters,
    resolve_tags: bool,
    images: HashMap<String, ImageKeys>,
    refcounts: HashMap<String, usize>,
    view: AdvertisedHandle,
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
            view: AdvertisedHandle::default(),
        }
    }

    /// A handle on what this advertiser has advertised, for the admin pages.
    pub fn view(&self) -> AdvertisedHandle {
        self.view.clone()
    }

    /// Every key currently advertised.
    pub fn advertised(&self) -> HashSet<String> {
        self.refcounts.keys().cloned().collect()
    }

    /// Runs until the task is cancelled: full sync, then follow events; when the event stream
    /// breaks (containerd restarted), back off and start over with a full sync.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let session = self.follow().await;
            match &session.result {
                Ok(()) => warn!("containerd event stream ended, resubscribing"),
                Err(e) => warn!(error = %e, "advertisement sync failed, retrying"),
            }
            if session.worked {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One subscription: sync at once, then apply events until the stream ends.
    ///
    /// containerd sends a subscription's response headers only with its first event, so the
    /// subscribe call is left to a task that buffers events; nothing here waits for it before
    /// syncing. Events between the listing and the subscription taking effect could be missed,
    /// and the subscription is known to be in effect only once it answers, so that answer
    /// triggers one more full sync.
    async fn follow(&mut self) -> Session {
        let started = tokio::time::Instant::now();
        // Unbounded: the feed must never block containerd's sender, and it only holds the
        // events of one sync's duration.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _feed = AbortOnDrop(tokio::spawn(feed(self.store.clone(), tx)));
        let mut subscribed = false;
        let mut failed = None;
        // Whatever the feed already delivered is covered by the sync that follows.
        while let Ok(item) = rx.try_recv() {
            match item {
                Feed::Subscribed => subscribed = true,
                Feed::Event(_) => {}
                Feed::Failed(e) => failed = Some(e),
            }
        }
        if let Err(e) = self.sync().await {
            return Session {
                worked: false,
                result: Err(e),
            };
        }
        if let Some(e) = failed {
            return Session {
                worked: false,
                result: Err(e),
            };
        }
        let mut worked = subscribed;
        let result = loop {
            match rx.recv().await {
                None => break Ok(()),
                Some(Feed::Subscribed) if !subscribed => {
                    subscribed = true;
                    if let Err(e) = self.sync().await {
                        break Err(e);
                    }
                    worked = true;
                }
                Some(Feed::Subscribed) => {}
                Some(Feed::Event(event)) => {
                    if let Err(e) = self.apply(event).await {
                        warn!(error = %e, "could not apply image event");
                    }
                }
                Some(Feed::Failed(e)) => break Err(e),
            }
        };
        Session {
            // A quiet node never sees the subscription answer; a synced subscription that
            // held for a while counts as working too, so a later restart starts from the
            // shortest delay again, while one that breaks at once keeps backing off.
            worked: worked || started.elapsed() >= STABLE_AFTER,
            result,
        }
    }

    /// Makes the advertised set match the store's current images.
    pub async fn sync(&mut self) -> Result<(), StoreError> {
        let images = self.store.list_images().await?;
        let mut wanted = HashMap::new();
        for image in images {
            if let Some(keys) = self.keys_for(&image).await? {
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
        match self.keys_for(&image).await? {
            Some(keys) => self.set(name, keys).await,
            None => self.remove(&name).await,
        }
        Ok(())
    }

    /// The keys `image` contributes; `None` when it contributes nothing. Fails only when the
    /// store is unreachable, so a containerd restart mid-sync withdraws nothing.
    async fn keys_for(&self, image: &Image) -> Result<Option<ImageKeys>, StoreError> {
        if self.filters.is_filtered(&image.reference) {
            return Ok(None);
        }
        let descriptors = match self.store.walk(&image.digest).await {
            Ok(d) => d,
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                warn!(image = %image.name, error = %e, "could not walk image");
                return Ok(None);
            }
        };
        if descriptors.is_empty() {
            return Ok(None);
        }
        let tag = if self.resolve_tags {
            image.reference.tag_name()
        } else {
            None
        };
        Ok(Some(ImageKeys {
            registry: image.reference.registry.clone(),
            tag,
            digests: descriptors
                .into_iter()
                .map(|d| d.digest.to_string())
                .collect(),
        }))
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
        self.publish();
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
        // Registries of local images are known label values for request metrics too.
        m.registry_labels.add_known(contents.keys().copied());
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

impl Advertiser {
    /// Publishes the current state to the [`AdvertisedHandle`].
    fn publish(&self) {
        let mut images: Vec<AdvertisedImage> = self
            .images
            .iter()
            .map(|(name, keys)| AdvertisedImage {
                name: name.clone(),
                registry: keys.registry.clone(),
                tag: keys.tag.clone(),
                digest: keys.digests.first().cloned(),
                digests: keys.digests.len(),
            })
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        let snapshot = Advertised {
            images,
            keys: self.refcounts.len(),
        };
        *self.view.0.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
        self.view
            .1
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

/// How often the in-progress advertiser looks at containerd's ingests.
pub const IN_PROGRESS_POLL: Duration = Duration::from_millis(20);
/// How long a blob that finished downloading stays advertised as in progress: containerd names
/// an image (and the image advertiser picks its blobs up) only once every blob of it is in, so
/// without this a committed layer would be invisible to peers until the whole pull ends.
pub const IN_PROGRESS_LINGER: Duration = Duration::from_secs(60);

/// Advertises blobs containerd is downloading (under [`in_progress_key`]) within one poll of
/// their ingest appearing, and withdraws them when the ingest is abandoned or stalls (or a
/// while after it is committed). Only ingests whose final size is known are advertised: the
/// others cannot be served in progress.
pub struct InProgressAdvertiser {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    poll: Duration,
    linger: Duration,
    stall: Duration,
    /// Advertised digests; `Some((t, g))` once committed: withdrawn at `t`, or as soon as the
    /// image advertiser's generation moves past `g`.
    advertised: HashMap<Digest, Option<(tokio::time::Instant, u64)>>,
    /// The image advertiser, whose next publication after a commit names the blob's image.
    images: Option<AdvertisedHandle>,
}

impl InProgressAdvertiser {
    /// An advertiser with nothing advertised, polling every [`IN_PROGRESS_POLL`].
    pub fn new(store: Arc<dyn Store>, router: Arc<dyn Router>) -> Self {
        InProgressAdvertiser {
            store,
            router,
            poll: IN_PROGRESS_POLL,
            linger: IN_PROGRESS_LINGER,
            stall: crate::store::ingest::DEFAULT_STALL,
            advertised: HashMap::new(),
            images: None,
        }
    }

    /// Ends a committed blob's linger at the image advertiser's next publication: by then the
    /// image that holds it is advertised under its own keys (or was deleted, and the blob
    /// must not stay visible through this one).
    pub fn with_images(mut self, images: AdvertisedHandle) -> Self {
        self.images = Some(images);
        self
    }

    /// Sets how long a committed blob stays advertised as in progress.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets how long an ingest may add nothing before it is withdrawn (the store's stall bound).
    pub fn with_stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Digests advertised as in progress now.
    pub fn advertised(&self) -> HashSet<Digest> {
        self.advertised.keys().cloned().collect()
    }

    /// Polls until the task is cancelled.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.step().await;
        }
    }

    /// One look at the ingests: advertise new ones, withdraw ended ones.
    pub async fn step(&mut self) {
        let ingests = match self.store.in_progress().await {
            Ok(ingests) => ingests,
            Err(e) => {
                debug!(error = %e, "could not list ingests");
                return;
            }
        };
        // Servable ones; a quiet writer may have died with its containerd, leaving the
        // directory behind: peers must not wait on it.
        let current: HashSet<Digest> = ingests
            .iter()
            .filter(|i| i.total.is_some() && i.idle < self.stall)
            .map(|i| i.digest.clone())
            .collect();
        let stalled: HashSet<&Digest> = ingests
            .iter()
            .filter(|i| !current.contains(&i.digest))
            .map(|i| &i.digest)
            .collect();
        let now = tokio::time::Instant::now();
        let fresh: Vec<Digest> = current
            .iter()
            .filter(|d| !self.advertised.contains_key(*d))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            let keys = fresh
                .iter()
                .map(|d| in_progress_key(&d.to_string()))
                .collect();
            match self.router.advertise(keys).await {
                Ok(()) => {
                    metrics::global()
                        .in_progress_advertisements
                        .inc_by(fresh.len() as u64);
                    for d in fresh {
                        debug!(digest = %d, "advertising blob in progress");
                        self.advertised.insert(d, None);
                    }
                }
                Err(e) => warn!(error = %e, "could not advertise blobs in progress"),
            }
        }
        let mut gone = Vec::new();
        let generation = self.images.as_ref().map(AdvertisedHandle::generation);
        let ended: Vec<(Digest, Option<(tokio::time::Instant, u64)>)> = self
            .advertised
            .iter()
            .map(|(d, s)| (d.clone(), *s))
            .collect();
        for (digest, state) in ended {
            if current.contains(&digest) {
                // Written again (e.g. deleted and pulled anew): in progress once more.
                self.advertised.insert(digest, None);
                continue;
            }
            let reason = match state {
                None if stalled.contains(&digest) => "stalled",
                None if self.store.descriptor(&digest).await.is_ok() => {
                    let at = now + self.linger;
                    self.advertised
                        .insert(digest, Some((at, generation.unwrap_or(0))));
                    continue;
                }
                None => "abandoned",
                Some((at, seen)) if now < at && generation.is_none_or(|g| g == seen) => continue,
                Some(_) => "committed",
            };
            metrics::global()
                .in_progress_withdrawals
                .with_label_values(&[reason])
                .inc();
            gone.push(digest);
        }
        if !gone.is_empty() {
            let keys = gone
                .iter()
                .map(|d| in_progress_key(&d.to_string()))
                .collect();
            if let Err(e) = self.router.withdraw(keys).await {
                warn!(error = %e, "could not withdraw blobs in progress");
            }
            for d in gone {
                debug!(digest = %d, "blob no longer in progress");
                self.advertised.remove(&d);
            }
        }
        metrics::global()
            .in_progress_advertised
            .set(self.advertised.len() as i64);
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
        let view = adv.view().advertised();
        assert_eq!(view.keys, want.len());
        assert_eq!(view.images.len(), 1);
        assert_eq!(view.images[0].name, "docker.io/library/a:1");
        assert_eq!(view.images[0].tag.as_deref(), Some("docker.io/library/a:1"));
        assert_eq!(view.images[0].digest, Some(m1.to_string()));
        assert_eq!(view.images[0].digests, keys1.len());

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

    /// Behaves like containerd where it matters here: a subscription answers only with its
    /// first event, and a restart ends every event stream and fails every call while down.
    struct ContainerdLike {
        inner: MemoryStore,
        down: std::sync::atomic::AtomicBool,
        restarts: tokio::sync::watch::Sender<u64>,
        answered: std::sync::atomic::AtomicUsize,
    }

    impl ContainerdLike {
        fn new() -> Self {
            ContainerdLike {
                inner: MemoryStore::new(),
                down: Default::default(),
                restarts: tokio::sync::watch::channel(0).0,
                answered: Default::default(),
            }
        }

        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("containerd is down".into()));
            }
            Ok(())
        }

        fn stop(&self) {
            self.down.store(true, std::sync::atomic::Ordering::SeqCst);
            self.break_streams();
        }

        fn break_streams(&self) {
            self.restarts.send_modify(|n| *n += 1);
        }

        fn answered(&self) -> usize {
            self.answered.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn start(&self) {
            self.down.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Store for ContainerdLike {
        fn name(&self) -> &str {
            "containerd-like"
        }
        async fn list_images(&self) -> Result<Vec<Image>, StoreError> {
            self.check()?;
            self.inner.list_images().await
        }
        async fn resolve(&self, name: &str) -> Result<crate::oci::Digest, StoreError> {
            self.check()?;
            self.inner.resolve(name).await
        }
        async fn descriptor(
            &self,
            digest: &crate::oci::Digest,
        ) -> Result<crate::store::Descriptor, StoreError> {
            self.check()?;
            self.inner.descriptor(digest).await
        }
        async fn open(
            &self,
            digest: &crate::oci::Digest,
            range: Option<crate::oci::ContentRange>,
        ) -> Result<crate::store::Content, StoreError> {
            self.check()?;
            self.inner.open(digest, range).await
        }
        async fn walk(
            &self,
            digest: &crate::oci::Digest,
        ) -> Result<Vec<crate::store::Descriptor>, StoreError> {
            crate::store::walk_store(self, digest).await
        }
        async fn subscribe(
            &self,
        ) -> Result<futures::stream::BoxStream<'static, ImageEvent>, StoreError> {
            self.check()?;
            let mut restart = self.restarts.subscribe();
            let mut events = self.inner.subscribe().await?;
            let first = tokio::select! {
                ev = events.next() => ev,
                _ = restart.changed() => None,
            };
            let first = first.ok_or_else(|| StoreError::Unavailable("restarted".into()))?;
            self.answered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let rest = events.take_until(async move {
                let _ = restart.changed().await;
            });
            Ok(Box::pin(futures::stream::once(async { first }).chain(rest)))
        }
    }

    /// Polls (bounded: at most 10 s) until the router holds exactly `want`.
    async fn until_advertised(router: &RecordingRouter, want: &HashSet<String>) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while *router.keys.lock().unwrap() != *want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "advertised {:?}, want {want:?}",
            router.keys.lock().unwrap()
        );
    }

    fn with_tag(keys: &[String], tag: &str) -> HashSet<String> {
        keys.iter().cloned().chain([tag.to_string()]).collect()
    }

    #[tokio::test]
    async fn quiet_node_is_advertised_without_any_event() {
        let store = Arc::new(ContainerdLike::new());
        let router = Arc::new(RecordingRouter::default());
        let (m, keys) = image(&store.inner, b"quiet");
        // Created before the daemon: its event reaches nobody, and none follows.
        store.inner.add_image("docker.io/library/q:1", m);
        let adv = Advertiser::new(store.clone(), router.clone(), Filters::default(), true);
        let task = AbortOnDrop(tokio::spawn(adv.run()));
        until_advertised(&router, &with_tag(&keys, "docker.io/library/q:1")).await;
        drop(task);
    }

    #[tokio::test]
    async fn restart_resyncs_without_a_later_event() {
        let store = Arc::new(ContainerdLike::new());
        let router = Arc::new(RecordingRouter::default());
        let (a, keys_a) = image(&store.inner, b"a");
        store.inner.add_image("docker.io/library/a:1", a);
        let adv = Advertiser::new(store.clone(), router.clone(), Filters::default(), true);
        let task = AbortOnDrop(tokio::spawn(adv.run()));
        until_advertised(&router, &with_tag(&keys_a, "docker.io/library/a:1")).await;

        // Live events still arrive (the first one also answers the subscription).
        let (b, keys_b) = image(&store.inner, b"b");
        store.inner.add_image("docker.io/library/b:1", b);
        let mut want = with_tag(&keys_a, "docker.io/library/a:1");
        want.extend(with_tag(&keys_b, "docker.io/library/b:1"));
        until_advertised(&router, &want).await;

        // Two restarts; changes made while down have events nobody receives.
        for round in 0..2u8 {
            store.stop();
            let (c, keys_c) = image(&store.inner, &[b'c', round]);
            let name = format!("docker.io/library/c:{round}");
            store.inner.add_image(&name, c);
            if round == 0 {
                store.inner.remove_image("docker.io/library/a:1");
            }
            store.start();
            want.retain(|k| !keys_a.contains(k) && k != "docker.io/library/a:1");
            want.extend(with_tag(&keys_c, &name));
            until_advertised(&router, &want).await;
        }
        drop(task);
    }

    #[tokio::test]
    async fn a_session_works_once_subscribed_and_synced() {
        let store = Arc::new(ContainerdLike::new());
        let router = Arc::new(RecordingRouter::default());
        let mut adv = Advertiser::new(store.clone(), router.clone(), Filters::default(), true);

        store.stop();
        let session = adv.follow().await;
        assert!(!session.worked);
        assert!(session.result.is_err_and(|e| e.is_unavailable()));

        store.start();
        let (m, keys) = image(&store.inner, b"s");
        let follower = tokio::spawn(async move { (adv.follow().await, adv) });
        // containerd answers a subscription with its first event: send until it has answered.
        tokio::time::timeout(Duration::from_secs(10), async {
            while store.answered() == 0 {
                store.inner.add_image("docker.io/library/s:1", m.clone());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("subscription answered");
        store.break_streams();
        let (session, _) = follower.await.unwrap();
        assert!(session.worked, "{:?}", session.result);
        assert!(session.result.is_ok());
        assert_eq!(
            *router.keys.lock().unwrap(),
            with_tag(&keys, "docker.io/library/s:1")
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn ingests_are_advertised_in_progress_and_withdrawn() {
        use crate::store::{ContainerdStore, ingest::fake::FakeIngest};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("content");
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        // No containerd behind the socket: committed content cannot be confirmed, so a
        // finished ingest is withdrawn at once.
        let store = ContainerdStore::without_containerd(dir.path(), &root).await;
        let router = Arc::new(RecordingRouter::default());
        let mut adv = InProgressAdvertiser::new(Arc::new(store), router.clone());
        let before = metrics::global().in_progress_advertisements.get();
        let mut a = FakeIngest::start(&root, b"layer a", Some(7));
        a.write(b"lay");
        let b = FakeIngest::start(&root, b"layer b", Some(7));
        let no_size = FakeIngest::start(&root, b"no total", None);
        adv.step().await;
        let key = |d: &Digest| in_progress_key(&d.to_string());
        assert_eq!(
            *router.keys.lock().unwrap(),
            set(&[&key(&a.digest), &key(&b.digest)])
        );
        assert!(!adv.advertised().contains(&no_size.digest));
        assert_eq!(
            metrics::global().in_progress_advertisements.get(),
            before + 2
        );
        // Unchanged ingests are not advertised again (the router asserts it).
        adv.step().await;
        b.abort();
        a.commit();
        adv.step().await;
        assert!(router.keys.lock().unwrap().is_empty());
        assert!(adv.advertised().is_empty());

        // A writer that goes quiet (its containerd died, the directory stays) is withdrawn,
        // and advertised again when it writes again.
        let withdrawn = |reason: &str| {
            metrics::global()
                .in_progress_withdrawals
                .with_label_values(&[reason])
                .get()
        };
        let stalled_before = withdrawn("stalled");
        let mut c = FakeIngest::start(&root, b"layer c", Some(7));
        c.write(b"la");
        adv.step().await;
        assert_eq!(*router.keys.lock().unwrap(), set(&[&key(&c.digest)]));
        let quiet = std::time::SystemTime::now() - crate::store::ingest::DEFAULT_STALL * 2;
        c.data.set_modified(quiet).unwrap();
        adv.step().await;
        assert!(router.keys.lock().unwrap().is_empty());
        assert_eq!(withdrawn("stalled"), stalled_before + 1);
        adv.step().await;
        assert!(
            router.keys.lock().unwrap().is_empty(),
            "a quiet ingest is not advertised"
        );
        c.write(b"y");
        adv.step().await;
        assert_eq!(*router.keys.lock().unwrap(), set(&[&key(&c.digest)]));
    }
}
