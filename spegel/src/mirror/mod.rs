//! Forwarding requests for content this node lacks to peers that advertised it: provider
//! lookup through the [`Router`], peer choice ([`PeerSelector`]), hedged races (`race`),
//! resuming bodies (`body`), and the OCI requests to peers (`client`, over
//! [`crate::http::Client`]). The registry sees only the [`Mirror`] trait.

mod blame;
mod body;
mod client;
mod cost;
mod hedger;
mod intent;
mod lookup;
mod race;
mod selector;
mod verify;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tracing::{Instrument, debug, info_span, warn};

pub use blame::{BAD_PEER_CAPACITY, BAD_PEER_TTL, BadPeers};
pub use client::{FetchError, FetchSpec, describe};
pub use cost::{EXPLORE_PER_MILLE, TelemetrySelector, UNKNOWN_BLOB_BYTES};
pub use hedger::{Hedger, INITIAL_HEDGE};
pub use intent::{INTENT_TTL, WaitOutcome, score as intent_score};
pub use selector::{
    LatencySelector, LeastUsedSelector, Outcome, PeerSelector, PeerStat, SelectorStats,
};

use crate::{
    activity::{self, Activity, Direction, Event},
    http::{Body, Response},
    oci::{
        ByteRange, DistributionPath, Kind, SERVED_BY_HEADER,
        response::{ContentHead, content_response, not_found_anywhere, range_not_satisfiable},
    },
    routing::Router,
    telemetry::{AdaptiveTimeouts, NetTelemetry, UserspaceTelemetry},
};
use body::ResumingBody;
use client::PeerClient;
use race::{Pool, RaceError, race};

/// The selector for `selection`, fed by `telemetry` where it uses telemetry.
pub fn selector_for(
    selection: crate::telemetry::PeerSelection,
    telemetry: Option<Arc<dyn NetTelemetry>>,
) -> Arc<dyn PeerSelector> {
    use crate::telemetry::PeerSelection;
    match selection {
        PeerSelection::Telemetry => Arc::new(TelemetrySelector::new(telemetry)),
        PeerSelection::Latency => Arc::new(LatencySelector::new()),
        PeerSelection::LeastUsed => Arc::new(LeastUsedSelector::new()),
    }
}

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

/// What [`MirrorConfig::on_corrupt_blob`] calls with the digest of a blob relayed corrupt.
pub type CorruptBlobHook = Arc<dyn Fn(&crate::oci::Digest) + Send + Sync>;
/// Default of [`MirrorConfig::intent_wait`]: well under a second of added latency when the
/// node waited for is slow to start.
pub const DEFAULT_INTENT_WAIT: Duration = Duration::from_millis(300);

/// Settings of [`PeerMirror`].
#[derive(Clone)]
pub struct MirrorConfig {
    /// Longest wait for a provider while the lookup runs and no fetch is in flight.
    pub resolve_timeout: Duration,
    /// Providers asked of the router per lookup.
    pub resolve_retries: usize,
    /// Total deadline of HEAD and manifest requests (lookup, fetch and body).
    pub bounded_timeout: Duration,
    /// `Authorization` header value sent to peers (`Basic …`), if any.
    pub basic_auth_header: Option<String>,
    /// Decides which provider is tried next.
    pub selector: Arc<dyn PeerSelector>,
    /// Lower bound of the time a race waits for response headers (`max(2×p90, floor)`).
    pub race_timeout_floor: Duration,
    /// Times a broken blob body is resumed before the response is abandoned.
    pub max_resumes: usize,
    /// A peer body that delivers nothing for this long counts as broken.
    pub body_stall_timeout: Duration,
    /// Peer RTTs that stretch the resolve, race and hedge timeouts (configured values are
    /// the floor); `None` keeps them as configured.
    pub telemetry: Option<Arc<dyn NetTelemetry>>,
    /// Where the peer client records its connections (connect time, `TCP_INFO`), if anywhere.
    pub connection_telemetry: Option<Arc<UserspaceTelemetry>>,
    /// Record of peer fetches for `/visualize` (disabled by default).
    pub activity: Activity,
    /// Called with the digest when a whole blob relayed from peers did not match it (the
    /// client holds a wrong partial copy), e.g. to abort the local ingest.
    pub on_corrupt_blob: Option<CorruptBlobHook>,
    /// This node's peer ID, for the election among nodes that miss a blob at the same time;
    /// `None` (the default) disables intents and waits.
    pub local_peer_id: Option<String>,
    /// Longest wait for another node that fetches a blob this one missed at the same time;
    /// zero disables waits.
    pub intent_wait: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            resolve_timeout: Duration::from_millis(20),
            resolve_retries: 3,
            bounded_timeout: Duration::from_secs(3),
            basic_auth_header: None,
            selector: Arc::new(LatencySelector::new()),
            race_timeout_floor: Duration::from_millis(100),
            max_resumes: 5,
            body_stall_timeout: Duration::from_secs(30),
            telemetry: None,
            connection_telemetry: None,
            activity: Activity::disabled(),
            on_corrupt_blob: None,
            local_peer_id: None,
            intent_wait: DEFAULT_INTENT_WAIT,
        }
    }
}

impl std::fmt::Debug for MirrorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorConfig")
            .field("resolve_timeout", &self.resolve_timeout)
            .field("resolve_retries", &self.resolve_retries)
            .field("bounded_timeout", &self.bounded_timeout)
            .field("basic_auth", &self.basic_auth_header.is_some())
            .field("race_timeout_floor", &self.race_timeout_floor)
            .field("max_resumes", &self.max_resumes)
            .field("body_stall_timeout", &self.body_stall_timeout)
            .field("telemetry", &self.telemetry.as_ref().map(|t| t.source()))
            .field("connection_telemetry", &self.connection_telemetry.is_some())
            .field("local_peer_id", &self.local_peer_id)
            .field("intent_wait", &self.intent_wait)
            .finish_non_exhaustive()
    }
}

/// The outgoing event of one forward, recorded when its body ends.
pub(crate) struct OutRecord {
    activity: Activity,
    event: Event,
    started: std::time::Instant,
}

impl OutRecord {
    /// Records the fetch with the bytes received and how the body ended.
    pub(crate) fn finish(mut self, bytes: u64, resumed: bool, failed: bool) {
        self.event.bytes = bytes;
        self.event.resumed = resumed;
        self.event.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if failed {
            self.event.outcome = activity::Outcome::Failed;
        }
        let event = self.event;
        self.activity.record(|| event);
    }
}

/// Why a [`PeerMirror`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The configured `Authorization` value is not a valid header value.
    #[error("invalid basic auth header value")]
    InvalidAuthorization(#[from] http::header::InvalidHeaderValue),
}

/// State shared by all forwards and their body streams.
struct Shared {
    router: Arc<dyn Router>,
    client: PeerClient,
    selector: Arc<dyn PeerSelector>,
    hedger: Hedger,
    timeouts: AdaptiveTimeouts,
    intents: intent::Intents,
    config: MirrorConfig,
    /// Peers that sent a blob not matching its digest, skipped for that digest.
    bad_peers: BadPeers,
}

/// Forwards requests to the providers the router finds, hedging and resuming (§2.8).
#[derive(Clone)]
pub struct PeerMirror {
    shared: Arc<Shared>,
}

impl PeerMirror {
    /// A mirror looking providers up in `router`, with its own pooled HTTP client.
    pub fn new(router: Arc<dyn Router>, config: MirrorConfig) -> Result<Self, MirrorError> {
        let http_client = crate::http::Client::with_telemetry(
            Default::default(),
            config.connection_telemetry.clone(),
        );
        Self::with_client(router, config, http_client)
    }

    /// A mirror sending its peer requests through `http_client`.
    pub fn with_client(
        router: Arc<dyn Router>,
        config: MirrorConfig,
        http_client: crate::http::Client,
    ) -> Result<Self, MirrorError> {
        let client = PeerClient::new(config.basic_auth_header.as_deref(), http_client)?;
        Ok(PeerMirror {
            shared: Arc::new(Shared {
                router,
                client,
                selector: config.selector.clone(),
                hedger: Hedger::new(),
                timeouts: AdaptiveTimeouts::new(config.telemetry.clone()),
                intents: intent::Intents::new(config.local_peer_id.clone()),
                config,
                bad_peers: BadPeers::default(),
            }),
        })
    }

    /// The hedge timing shared by this mirror's forwards.
    pub fn hedger(&self) -> &Hedger {
        &self.shared.hedger
    }

    /// The selector ordering this mirror's providers (for metrics of what it measured).
    pub fn selector(&self) -> &Arc<dyn PeerSelector> {
        &self.shared.selector
    }

    async fn forward_inner(
        &self,
        request: MirrorRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Response {
        let shared = &self.shared;
        let started = std::time::Instant::now();
        let started_ms = activity::now_ms();
        let kind = request.path.kind;
        let head = request.head;
        let key: Arc<str> = request.path.reference.identifier().into();
        let not_found = |attempts: usize, message: &str| {
            not_found_anywhere(kind, &key, attempts, message, head)
        };
        // Other nodes' intents for a blob are looked up beside the lookup of the blob itself,
        // and read only if that finds no source (see `intent`).
        let election = if kind == Kind::Blob {
            shared.intents.watch(&shared.router, &key)
        } else {
            None
        };
        // A blob is also looked up among the nodes still downloading it (complete ones first);
        // their grace stays under the race's idle wait so it cannot make the race give up.
        let found = match lookup::lookup(
            &shared.router,
            &key,
            shared.config.resolve_retries.max(1),
            kind == Kind::Blob,
            shared.config.resolve_timeout / 2,
        )
        .await
        {
            Ok(found) => found,
            Err(e) => {
                // Still a 404: any other status would not make containerd fall back upstream.
                warn!(error = %e, "lookup failed");
                return not_found(0, "could not find peer for");
            }
        };
        // A possible blob miss is announced as this node's intent. A blob whose provider the
        // router knew at once is a hit: announcing and withdrawing an intent for it would cost
        // every node two notices for nothing.
        let election = election.filter(|_| !found.known_at_once);
        if election.is_some() {
            shared.intents.announce(&shared.router, &key);
        }
        // Ranges and HEADs cannot be verified, but skip the copies already known bad too.
        let mut pool = Pool::new(key.clone(), found.rx)
            .since(found.started)
            .excluding(shared.bad_peers.bad_for(&key));
        let spec = FetchSpec {
            path: request.path.clone(),
            head,
            range: request.range,
        };
        let mut waited = None;
        let raced = race(shared, &mut pool, &spec).await;
        let raced = match (raced, election) {
            (Err(e), Some(election)) if !matches!(e, RaceError::Unsatisfiable { .. }) => {
                match intent::wait(shared, election, &key, &spec).await {
                    Some((from_wait, winner, duration)) => {
                        pool = from_wait;
                        waited = Some(duration);
                        Ok(winner)
                    }
                    None => Err(e),
                }
            }
            (raced, _) => raced,
        };
        let winner = match raced {
            Ok(w) => {
                if kind == Kind::Blob {
                    // A source is found: this node's intent would only mislead later misses.
                    shared.intents.settle(&key);
                }
                w
            }
            Err(e) => {
                debug!(error = ?e, "no peer could serve the request");
                return match e {
                    RaceError::NoPeer => not_found(0, "could not find peer for"),
                    RaceError::Exhausted { attempts } => {
                        not_found(attempts, "all request retries exhausted for")
                    }
                    RaceError::Idle { attempts } => not_found(
                        attempts,
                        "waited too long for new peer with no inflight fetches for",
                    ),
                    RaceError::Timeout { attempts } => not_found(
                        attempts,
                        "waited too long for inflight dials to complete for",
                    ),
                    RaceError::Unsatisfiable { size } => range_not_satisfiable(size),
                };
            }
        };
        let fetched = &winner.fetched;
        // Manifests are never asked for by range, so only a blob carries one.
        let range = fetched.range.filter(|_| kind == Kind::Blob);
        let (start, len) = range.map_or((0, fetched.size), |cr| (cr.start, cr.len()));
        let response = content_response(ContentHead {
            kind,
            media_type: &fetched.media_type,
            size: fetched.size,
            digest: &fetched.digest,
            namespace: &request.path.reference.registry,
            range,
        })
        .header(SERVED_BY_HEADER, winner.peer.id.clone());
        debug!(peer = %winner.peer.id, status = response.status, len, "forwarding peer response");
        let record = shared.config.activity.is_enabled().then(|| OutRecord {
            activity: shared.config.activity.clone(),
            event: {
                let mut e = Event::new(Direction::Out, kind.as_str(), activity::Outcome::Forwarded);
                e.time_ms = started_ms;
                e.registry = request.path.reference.registry.clone();
                e.repository = request.path.reference.repository.clone();
                e.reference = request.path.reference.digest_or_tag();
                e.peer = Some(winner.peer.id.clone());
                e.remote = winner.peer.addrs.first().map(|a| a.ip().to_string());
                e.status = response.status;
                e.hedged = winner.attempts > 1;
                e.head = head;
                e.waited_ms = waited.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
                e
            },
            started,
        });
        if head || len == 0 {
            if let Some(r) = record {
                r.finish(0, false, false);
            }
            return response;
        }
        // A whole blob is checked against the digest it was asked by before its last bytes go
        // out: the provider may have served it while still downloading it, unverified.
        let check = request.path.reference.digest.clone().filter(|d| {
            kind == Kind::Blob
                && start == 0
                && len == fetched.size
                && d.algorithm() == crate::oci::Algorithm::Sha256
        });
        let body = ResumingBody::new(
            shared.clone(),
            pool,
            FetchSpec {
                path: request.path,
                head: false,
                range: request.range,
            },
            winner,
            start,
            len,
            kind == Kind::Blob,
            deadline,
            record,
        );
        let contributors = body.contributors();
        let mut stream = body.into_stream();
        if let Some(digest) = check {
            let (shared, blamed) = (shared.clone(), digest.clone());
            stream = verify::verified(stream, digest, len, move || {
                blame::blob_mismatch(&shared, &blamed, contributors.peers())
            });
        }
        response.body(Body::Stream { stream, len })
    }
}

#[async_trait]
impl Mirror for PeerMirror {
    async fn forward(&self, request: MirrorRequest) -> Response {
        let span = info_span!(
            "mirror",
            key = %request.path.reference.identifier(),
            kind = request.path.kind.as_str(),
            head = request.head,
        );
        // Clients of HEAD and manifest requests wait on the answer; blob GETs may take long.
        let bounded = request.head || request.path.kind == Kind::Manifest;
        if !bounded {
            return self.forward_inner(request, None).instrument(span).await;
        }
        let deadline = tokio::time::Instant::now() + self.shared.config.bounded_timeout;
        match tokio::time::timeout_at(deadline, self.forward_inner(request, Some(deadline)))
            .instrument(span.clone())
            .await
        {
            Ok(response) => response,
            Err(_) => {
                span.in_scope(|| debug!("mirror deadline exceeded"));
                Response::empty(404)
            }
        }
    }
}
