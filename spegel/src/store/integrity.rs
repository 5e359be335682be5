//! Self-check of the node's own content: blobs this node serves are hashed in the background
//! (paced to a byte budget, each file version once), and a peer's report that a blob it got
//! from here did not match its digest triggers the same check. A blob whose bytes do not match
//! its digest is then neither served nor advertised: [`CheckedStore`] reports it missing, and
//! its subscription carries a [`ImageEvent::ContentDeleted`] so the advertiser withdraws it.
//! Nothing is dropped on anyone's word: only this node's own hash marks a blob corrupt.

use std::{
    collections::{HashMap, HashSet},
    io::{self, Read},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use sha2::Digest as _;
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, warn};

use super::{Content, Descriptor, GrowingFile, Image, ImageEvent, Ingest, Store, StoreError};
use crate::{
    metrics,
    oci::{Algorithm, ContentRange, Digest},
};

/// Path prefix (then the digest) of the request telling a peer that a blob it served did not
/// match its digest: `POST /spegel/v1/mismatch/sha256:…`, no body, on the registry port. It
/// only queues the peer's own verification of its copy; the peer decides from its own hash.
pub const MISMATCH_REPORT_PATH: &str = "/spegel/v1/mismatch/";

/// Default hashing budget of the background verification, in bytes per second.
pub const DEFAULT_VERIFY_BYTES_PER_SECOND: u64 = 64 << 20;
/// Digests waiting for verification at most; more are dropped (and retried when served again).
const QUEUE: usize = 1024;
/// Verification results remembered at most.
const CACHE: usize = 16384;
/// A peer's report re-hashes a blob already verified unchanged only this long after the last
/// hash: bit rot does not change a file's metadata, but reports must not make a node hash
/// the same blob over and over.
const REPORT_RECHECK: Duration = Duration::from_secs(30);
/// Bytes hashed between pacing checks.
const CHUNK: usize = 1 << 20;

/// What the verification of one version of a blob is keyed on: a changed file is a new
/// version and is hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    inode: u64,
    size: u64,
    mtime_ns: i128,
}

impl Fingerprint {
    fn of_file(file: &std::fs::File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Fingerprint {
            inode: m.ino(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }

    /// Content without a file (the content API, memory) is known by its size only.
    fn of_size(size: u64) -> Self {
        Fingerprint {
            inode: 0,
            size,
            mtime_ns: 0,
        }
    }
}

/// Why a blob is being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The blob was served from this node's store.
    Served,
    /// A peer reported that the copy it got from here did not match the digest.
    Report,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Served => "served",
            Trigger::Report => "report",
        }
    }
}

#[derive(Default)]
struct State {
    /// Versions that hashed to their digest, and when.
    verified: HashMap<Digest, (Fingerprint, Instant)>,
    /// Blobs whose content does not match their digest.
    corrupt: HashSet<Digest>,
    /// Queued, not yet verified.
    pending: HashSet<Digest>,
}

/// The verification state shared by the serving path (which only looks and enqueues) and the
/// background task that hashes.
pub struct Integrity {
    state: Mutex<State>,
    queue: mpsc::Sender<(Digest, Trigger)>,
    receiver: Mutex<Option<mpsc::Receiver<(Digest, Trigger)>>>,
    corrupted: broadcast::Sender<Digest>,
    bytes_per_second: u64,
}

impl std::fmt::Debug for Integrity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integrity")
            .field("bytes_per_second", &self.bytes_per_second)
            .finish_non_exhaustive()
    }
}

/// Outcome of one verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The content hashes to its digest.
    Intact,
    /// The content does not match its digest; it is no longer served or advertised.
    Corrupt,
    /// This version was verified before; nothing was hashed.
    Cached,
    /// The content is not in the store.
    Skipped,
}

impl Integrity {
    /// A verifier hashing at most `bytes_per_second` (0: unpaced) once [`Integrity::run`] runs.
    pub fn new(bytes_per_second: u64) -> Arc<Self> {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let (corrupted, _) = broadcast::channel(64);
        Arc::new(Integrity {
            state: Mutex::new(State::default()),
            queue,
            receiver: Mutex::new(Some(receiver)),
            corrupted,
            bytes_per_second,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `digest` was found not to match its content.
    pub fn is_corrupt(&self, digest: &Digest) -> bool {
        self.state().corrupt.contains(digest)
    }

    /// Asks for `digest` to be verified in the background; never waits. Whether it was queued
    /// (false: already queued, or the queue is full).
    pub fn schedule(&self, digest: &Digest, trigger: Trigger) -> bool {
        let mut state = self.state();
        if trigger == Trigger::Served && state.corrupt.contains(digest) {
            return false;
        }
        if !state.pending.insert(digest.clone()) {
            return false;
        }
        if self.queue.try_send((digest.clone(), trigger)).is_err() {
            state.pending.remove(digest);
            return false;
        }
        true
    }

    /// Forgets everything about `digest` (its content was deleted: a new copy is a new blob).
    pub fn forget(&self, digest: &Digest) {
        let mut state = self.state();
        state.verified.remove(digest);
        state.corrupt.remove(digest);
    }

    /// Digests found corrupt from now on.
    fn subscribe(&self) -> broadcast::Receiver<Digest> {
        self.corrupted.subscribe()
    }

    /// Hashes the queued blobs of `store` (the unchecked store) one at a time until the task
    /// is cancelled. Only the first call runs; later ones return at once.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>) {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut receiver) = receiver else {
            return;
        };
        while let Some((digest, trigger)) = receiver.recv().await {
            let verdict = self.verify(store.as_ref(), &digest, trigger).await;
            self.state().pending.remove(&digest);
            match verdict {
                Ok(v) => debug!(%digest, trigger = trigger.label(), verdict = ?v, "blob verified"),
                Err(e) => debug!(%digest, error = %e, "could not verify blob"),
            }
        }
    }

    /// Verifies `digest` now (the background task's step).
    pub async fn verify(
        &self,
        store: &dyn Store,
        digest: &Digest,
        trigger: Trigger,
    ) -> Result<Verdict, StoreError> {
        let content = match store.open(digest, None).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => return Ok(Verdict::Skipped),
            Err(e) => return Err(e),
        };
        let fingerprint = match &content {
            Content::File(f) => Fingerprint::of_file(f)?,
            Content::Bytes(b) => Fingerprint::of_size(b.len() as u64),
            Content::Stream(_) => Fingerprint::of_size(store.descriptor(digest).await?.size),
        };
        {
            let state = self.state();
            if let Some((known, at)) = state.verified.get(digest)
                && *known == fingerprint
                && (trigger == Trigger::Served || at.elapsed() < REPORT_RECHECK)
            {
                return Ok(Verdict::Cached);
            }
            if trigger == Trigger::Served && state.corrupt.contains(digest) {
                return Ok(Verdict::Cached);
            }
        }
        metrics::global()
            .store_verifications
            .with_label_values(&[trigger.label()])
            .inc();
        let pace = Pace::new(self.bytes_per_second);
        let algorithm = digest.algorithm();
        let actual = match content {
            Content::File(file) => {
                tokio::task::spawn_blocking(move || hash_file(file, algorithm, pace))
                    .await
                    .map_err(|e| StoreError::Io(io::Error::other(e.to_string())))??
            }
            Content::Bytes(bytes) => {
                let mut h = Hasher::new(algorithm);
                h.update(&bytes);
                metrics::global()
                    .store_verified_bytes
                    .inc_by(bytes.len() as u64);
                h.finish()
            }
            Content::Stream(mut stream) => {
                let mut h = Hasher::new(algorithm);
                let mut pace = pace;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    h.update(&chunk);
                    metrics::global()
                        .store_verified_bytes
                        .inc_by(chunk.len() as u64);
                    tokio::time::sleep(pace.after(chunk.len() as u64)).await;
                }
                h.finish()
            }
        };
        if actual == digest.hex() {
            let mut state = self.state();
            if state.verified.len() >= CACHE
                && let Some(oldest) = state
                    .verified
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(d, _)| d.clone())
            {
                state.verified.remove(&oldest);
            }
            state
                .verified
                .insert(digest.clone(), (fingerprint, Instant::now()));
            if state.corrupt.remove(digest) {
                info!(%digest, "blob matches its digest again");
            }
            if trigger == Trigger::Report {
                info!(%digest, "a peer reported a mismatch, but the local copy matches its digest");
            }
            return Ok(Verdict::Intact);
        }
        let fresh = {
            let mut state = self.state();
            state.verified.remove(digest);
            state.corrupt.insert(digest.clone())
        };
        if fresh {
            error!(%digest, actual = %format!("{}:{actual}", algorithm.as_str()), trigger = trigger.label(),
                "local blob does not match its digest; no longer serving or advertising it");
            metrics::global().store_corrupt_blobs.inc();
            let _ = self.corrupted.send(digest.clone());
        }
        Ok(Verdict::Corrupt)
    }
}

/// Keeps hashing under the byte budget.
struct Pace {
    bytes_per_second: u64,
    started: Instant,
    bytes: u64,
}

impl Pace {
    fn new(bytes_per_second: u64) -> Self {
        Pace {
            bytes_per_second,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// How long to wait after `n` more bytes so the average stays within the budget.
    fn after(&mut self, n: u64) -> Duration {
        self.bytes += n;
        if self.bytes_per_second == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_second as f64);
        due.saturating_sub(self.started.elapsed())
    }
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha384(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

fn hash_file(mut file: std::fs::File, algorithm: Algorithm, mut pace: Pace) -> io::Result<String> {
    let mut hasher = Hasher::new(algorithm);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        metrics::global().store_verified_bytes.inc_by(n as u64);
        std::thread::sleep(pace.after(n as u64));
    }
    Ok(hasher.finish())
}

/// A [`Store`] that hides content found corrupt and schedules a background verification of
/// whatever it opens for serving.
pub struct CheckedStore {
    inner: Arc<dyn Store>,
    integrity: Arc<Integrity>,
}

impl CheckedStore {
    /// Wraps `inner`; `integrity` decides what is corrupt.
    pub fn new(inner: Arc<dyn Store>, integrity: Arc<Integrity>) -> Self {
        CheckedStore { inner, integrity }
    }

    fn hidden(&self, digest: &Digest) -> Result<(), StoreError> {
        if self.integrity.is_corrupt(digest) {
            return Err(StoreError::NotFound(format!(
                "{digest} (does not match its digest)"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for CheckedStore {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        self.inner.list_images().await
    }

    async fn resolve(&self, name: &str) -> Result<Digest, StoreError> {
        self.inner.resolve(name).await
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        self.hidden(digest)?;
        self.inner.descriptor(digest).await
    }

    async fn open(
        &self,
        digest: &Digest,
        range: Option<ContentRange>,
    ) -> Result<Content, StoreError> {
        self.hidden(digest)?;
        let content = self.inner.open(digest, range).await?;
        self.integrity.schedule(digest, Trigger::Served);
        Ok(content)
    }

    async fn walk(&self, digest: &Digest) -> Result<Vec<Descriptor>, StoreError> {
        let mut descriptors = self.inner.walk(digest).await?;
        descriptors.retain(|d| !self.integrity.is_corrupt(&d.digest));
        Ok(descriptors)
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, ImageEvent>, StoreError> {
        // Subscribed before the inner stream, so a corruption found meanwhile is not missed.
        let corrupted = self.integrity.subscribe();
        let inner = self.inner.subscribe().await?;
        let integrity = self.integrity.clone();
        let inner = inner.inspect(move |event| {
            // A deleted blob that comes back is a new copy, verified afresh.
            if let ImageEvent::ContentDeleted(digest) = event {
                integrity.forget(digest);
            }
        });
        Ok(Box::pin(merge_corruptions(inner, corrupted)))
    }

    async fn in_progress(&self) -> Result<Vec<Ingest>, StoreError> {
        self.inner.in_progress().await
    }

    async fn open_in_progress(&self, digest: &Digest) -> Result<Option<GrowingFile>, StoreError> {
        if self.integrity.is_corrupt(digest) {
            return Ok(None);
        }
        self.inner.open_in_progress(digest).await
    }

    async fn abort_ingests(
        &self,
        digest: &Digest,
        started_before: std::time::SystemTime,
    ) -> Result<usize, StoreError> {
        self.inner.abort_ingests(digest, started_before).await
    }
}

/// Tries a few times in the next seconds to abort the local writes of `digest` begun by now:
/// this node's mirror just relayed them bytes that do not match the digest, all but the last
/// of which the client (containerd) has written into its ingest. containerd resumes an ingest
/// where it stopped, so a later pull would complete the wrong prefix and fail its commit again
/// and again; aborted, the retry starts from byte 0 (from another peer or upstream).
pub fn abort_poisoned_ingests(store: Arc<dyn Store>, digest: Digest) {
    const TRIES: usize = 10;
    const PAUSE: Duration = Duration::from_millis(500);
    let now = std::time::SystemTime::now();
    tokio::spawn(async move {
        for _ in 0..TRIES {
            match store.abort_ingests(&digest, now).await {
                Ok(0) => {}
                Ok(_) => return,
                Err(e) => debug!(%digest, error = %e, "could not abort ingest yet"),
            }
            tokio::time::sleep(PAUSE).await;
        }
    });
}

/// `inner`'s events with a [`ImageEvent::ContentDeleted`] for every blob found corrupt; ends
/// when `inner` ends.
fn merge_corruptions(
    inner: impl futures::Stream<Item = ImageEvent> + Send + 'static,
    corrupted: broadcast::Receiver<Digest>,
) -> impl futures::Stream<Item = ImageEvent> + Send + 'static {
    let inner: BoxStream<'static, ImageEvent> = Box::pin(inner);
    futures::stream::unfold(
        (inner, Some(corrupted)),
        |(mut inner, mut corrupted)| async move {
            loop {
                let event = match &mut corrupted {
                    Some(rx) => tokio::select! {
                        event = inner.next() => event,
                        found = rx.recv() => match found {
                            Ok(digest) => Some(ImageEvent::ContentDeleted(digest)),
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                warn!(missed = n, "corrupt-blob notices lagged");
                                continue;
                            }
                            Err(broadcast::error::RecvError::Closed) => {
                                corrupted = None;
                                continue;
                            }
                        },
                    },
                    None => inner.next().await,
                };
                return event.map(|e| (e, (inner, corrupted)));
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn corrupt_store() -> (Arc<MemoryStore>, Digest, Digest) {
        let store = MemoryStore::new();
        let good = store.add_blob("application/octet-stream", b"good bytes".to_vec());
        let bad = Digest::sha256_of(b"the bytes it should have");
        store.add_blob_as(
            &bad,
            "application/octet-stream",
            b"the bytes it should hav3".to_vec(),
        );
        (Arc::new(store), good, bad)
    }

    #[tokio::test]
    async fn a_corrupt_blob_is_hidden_and_counted_once() {
        let (store, good, bad) = corrupt_store();
        let integrity = Integrity::new(0);
        let checked = CheckedStore::new(store.clone(), integrity.clone());
        let before = metrics::global().store_corrupt_blobs.get();
        assert!(
            checked.descriptor(&bad).await.is_ok(),
            "unknown until verified"
        );
        assert_eq!(
            integrity
                .verify(store.as_ref(), &good, Trigger::Served)
                .await
                .unwrap(),
            Verdict::Intact
        );
        assert_eq!(
            integrity
                .verify(store.as_ref(), &good, Trigger::Served)
                .await
                .unwrap(),
            Verdict::Cached
        );
        assert_eq!(
            integrity
                .verify(store.as_ref(), &bad, Trigger::Report)
                .await
                .unwrap(),
            Verdict::Corrupt
        );
        integrity
            .verify(store.as_ref(), &bad, Trigger::Report)
            .await
            .unwrap();
        assert!(metrics::global().store_corrupt_blobs.get() > before);
        assert!(checked.descriptor(&bad).await.unwrap_err().is_not_found());
        assert!(checked.open(&bad, None).await.unwrap_err().is_not_found());
        assert!(checked.descriptor(&good).await.is_ok());
        integrity.forget(&bad);
        assert!(checked.descriptor(&bad).await.is_ok());
    }

    #[tokio::test]
    async fn serving_schedules_a_verification_that_hides_the_blob() {
        let (store, _good, bad) = corrupt_store();
        let integrity = Integrity::new(0);
        let checked = Arc::new(CheckedStore::new(store.clone(), integrity.clone()));
        let mut events = checked.subscribe().await.unwrap();
        let task = tokio::spawn(integrity.clone().run(store.clone()));
        // Serving opens it; the hash runs in the background.
        assert!(checked.open(&bad, None).await.is_ok());
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("no notice of the corrupt blob")
            .expect("stream ended");
        assert_eq!(event, ImageEvent::ContentDeleted(bad.clone()));
        assert!(integrity.is_corrupt(&bad));
        assert!(checked.open(&bad, None).await.unwrap_err().is_not_found());
        assert!(
            !integrity.schedule(&bad, Trigger::Served),
            "a corrupt blob is not re-hashed when served"
        );
        task.abort();
    }

    #[test]
    fn pacing_spreads_bytes_over_the_budget() {
        let mut pace = Pace::new(1 << 20);
        let wait = pace.after(4 << 20);
        assert!(wait > Duration::from_secs(3) && wait <= Duration::from_secs(4));
        assert_eq!(Pace::new(0).after(1 << 30), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_changed_file_is_a_new_version() {
        let dir = std::env::temp_dir().join(format!("spegel-integrity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        std::fs::write(&path, b"abc").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let a = Fingerprint::of_file(&file).unwrap();
        std::fs::write(&path, b"abd").unwrap();
        let filetime = std::time::SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(filetime)
            .unwrap();
        let b = Fingerprint::of_file(&std::fs::File::open(&path).unwrap()).unwrap();
        assert_ne!(a, b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
