//! The body of a forwarded response: streams a peer's body and, for blobs, resumes a body that
//! broke mid-stream from the exact byte reached, with a range request to another provider.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::stream::BoxStream;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{Instrument, Span, debug, info, warn};

use super::{
    Shared,
    blame::Contributors,
    client::FetchSpec,
    race::{InFlight, Pool, Winner, race},
    selector::Outcome,
};
use crate::{
    oci::{ByteRange, Kind},
    routing::Peer,
};

/// Least bytes for a throughput sample: below this, round trips dominate the time.
const MIN_SAMPLE_BYTES: u64 = 1 << 20;
/// A long body reports its throughput this often, so concurrent choices see a slow link.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Times one body may move to a faster provider (failures are bounded separately).
const MAX_SWITCHES: usize = 3;

/// Streams exactly `len` bytes of content starting at content offset `start`.
pub struct ResumingBody {
    pub(super) shared: Arc<Shared>,
    pub(super) pool: Pool,
    /// The request as first sent; resumes replace its range.
    pub(super) spec: FetchSpec,
    pub(super) current: Option<(Peer, Incoming, InFlight)>,
    /// Content offset of the first byte the client receives.
    pub(super) start: u64,
    /// Bytes the client receives in total.
    pub(super) len: u64,
    /// Total content size, which every resumed response must agree on.
    pub(super) size: u64,
    pub(super) digest: String,
    /// Manifests are not resumed: a short one is rejected by the client's digest check anyway.
    pub(super) resumable: bool,
    /// Bounds reading the body (HEAD and manifest requests are bounded as a whole).
    pub(super) deadline: Option<tokio::time::Instant>,
    pub(super) span: Span,
    pub(super) sent: u64,
    pub(super) resumes: usize,
    /// Moves to a faster provider so far.
    pub(super) switches: usize,
    pub(super) done: bool,
    /// Bytes read from the current peer since the instant, for its throughput.
    pub(super) segment: (Instant, u64),
    /// Recorded for `/visualize` when the body ends or is dropped.
    pub(super) record: Option<super::OutRecord>,
    pub(super) failed: bool,
    /// Peers whose bytes went into the body, blamed if the whole does not match its digest.
    pub(super) contributors: Contributors,
}

impl Drop for ResumingBody {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            let broken = self.failed || self.sent < self.len;
            r.finish(self.sent, self.resumes > 0, broken);
        }
    }
}

impl ResumingBody {
    /// Starts the body with the race winner's response.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shared: Arc<Shared>,
        pool: Pool,
        spec: FetchSpec,
        winner: Winner,
        start: u64,
        len: u64,
        resumable: bool,
        deadline: Option<tokio::time::Instant>,
        record: Option<super::OutRecord>,
    ) -> Self {
        ResumingBody {
            shared,
            pool,
            spec,
            start,
            len,
            size: winner.fetched.size,
            digest: winner.fetched.digest,
            current: Some((winner.peer, winner.fetched.body, winner.guard)),
            resumable,
            deadline,
            span: Span::current(),
            sent: 0,
            resumes: 0,
            switches: 0,
            done: false,
            segment: (Instant::now(), 0),
            record,
            failed: false,
            contributors: Contributors::default(),
        }
    }

    /// The record of which peers delivered bytes of this body (shared, kept up to date).
    pub(super) fn contributors(&self) -> Contributors {
        self.contributors.clone()
    }

    /// Tells the selector how fast the current peer delivered since the last report, and
    /// returns that rate (bytes/s) when a sample was taken.
    fn report_transfer(&mut self, force: bool) -> Option<f64> {
        let (since, bytes) = self.segment;
        let elapsed = since.elapsed();
        if bytes < MIN_SAMPLE_BYTES || (!force && elapsed < SAMPLE_EVERY) {
            return None;
        }
        if let Some((peer, _, _)) = &self.current {
            self.shared.selector.observe_transfer(peer, bytes, elapsed);
        }
        self.segment = (Instant::now(), 0);
        Some(bytes as f64 / elapsed.as_secs_f64().max(1e-6))
    }

    /// After a throughput sample of `rate`: if the selector expects another provider to
    /// deliver the rest much sooner, asks it for the rest (a range request from the byte
    /// reached) and continues with its body. The current body is kept when nobody else
    /// answers, so a switch never fails a transfer.
    async fn maybe_switch(&mut self, rate: f64) {
        if !self.resumable || self.switches >= MAX_SWITCHES || self.sent >= self.len {
            return;
        }
        let Some((peer, _, _)) = &self.current else {
            return;
        };
        let peer = peer.clone();
        let remaining = self.len - self.sent;
        let others = self.pool.alternatives(&peer);
        let key = self.pool.key().to_string();
        if !self
            .shared
            .selector
            .switch_away(&key, &peer, rate, remaining, &others)
        {
            return;
        }
        self.switches += 1;
        // Resumes prefer providers whose body did not break: this one is now the last resort.
        self.pool.mark_broken(&peer);
        let from = self.start + self.sent;
        let spec = FetchSpec {
            range: Some(ByteRange::FromTo(from, self.start + self.len - 1)),
            ..self.spec.clone()
        };
        match race(&self.shared, &mut self.pool, &spec).await {
            Ok(w) if w.peer.id == peer.id => {
                debug!(peer = %peer.id, "no faster provider answered; staying");
            }
            Ok(w) if w.fetched.size == self.size && w.fetched.digest == self.digest => {
                info!(from = %peer.id, to = %w.peer.id, sent = self.sent, len = self.len,
                    rate_bytes_per_second = rate as u64, "moving a slow body to a faster provider");
                self.current = Some((w.peer, w.fetched.body, w.guard));
                self.segment = (Instant::now(), 0);
            }
            Ok(w) => {
                warn!(peer = %w.peer.id, size = w.fetched.size, digest = %w.fetched.digest,
                    "resumed response describes different content");
                self.shared.selector.observe(&w.peer, Outcome::Failure);
                self.pool.mark_failed(&w.peer);
            }
            Err(e) => debug!(error = ?e, "no other provider for the rest of the body; staying"),
        }
    }

    /// The body as the stream the registry writes.
    pub fn into_stream(self) -> BoxStream<'static, io::Result<Bytes>> {
        Box::pin(futures::stream::unfold(self, |mut body| async move {
            let span = body.span.clone();
            let item = body.next_chunk().instrument(span).await?;
            Some((item, body))
        }))
    }

    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.done || self.sent >= self.len {
            return None;
        }
        loop {
            let failure = match &mut self.current {
                None => "no response body".to_string(),
                Some((peer, body, _)) => {
                    let stall = tokio::time::Instant::now() + self.shared.config.body_stall_timeout;
                    let limit = self.deadline.map_or(stall, |d| d.min(stall));
                    match tokio::time::timeout_at(limit, body.frame()).await {
                        Ok(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) if !data.is_empty() => {
                                let take = data.len().min((self.len - self.sent) as usize);
                                self.contributors.add(peer);
                                self.sent += take as u64;
                                self.segment.1 += take as u64;
                                if let Some(rate) = self.report_transfer(self.sent >= self.len) {
                                    self.maybe_switch(rate).await;
                                }
                                return Some(Ok(data.slice(..take)));
                            }
                            _ => continue,
                        },
                        Ok(Some(Err(e))) => e.to_string(),
                        Ok(None) => "peer ended the body early".to_string(),
                        Err(_) => "no body data in time".to_string(),
                    }
                }
            };
            self.report_transfer(true);
            if let Some((peer, body, guard)) = self.current.take() {
                let what = match self.spec.path.kind {
                    Kind::Blob => "blob",
                    Kind::Manifest => "manifest",
                };
                warn!(peer = %peer.id, sent = self.sent, len = self.len, error = %failure,
                    "copying of {what} data failed");
                self.shared.selector.observe(&peer, Outcome::Failure);
                self.pool.mark_broken(&peer);
                drop(body);
                drop(guard);
            }
            if !self.resumable || self.resumes >= self.shared.config.max_resumes {
                self.done = true;
                self.failed = true;
                return Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "peer body failed after {} of {} bytes: {failure}",
                        self.sent, self.len
                    ),
                )));
            }
            self.resumes += 1;
            let from = self.start + self.sent;
            let spec = FetchSpec {
                range: Some(ByteRange::FromTo(from, self.start + self.len - 1)),
                ..self.spec.clone()
            };
            debug!(from, resume = self.resumes, "resuming body");
            match race(&self.shared, &mut self.pool, &spec).await {
                Ok(w) if w.fetched.size == self.size && w.fetched.digest == self.digest => {
                    self.current = Some((w.peer, w.fetched.body, w.guard));
                    self.segment = (Instant::now(), 0);
                }
                Ok(w) => {
                    warn!(peer = %w.peer.id, size = w.fetched.size, digest = %w.fetched.digest,
                        "resumed response describes different content");
                    self.shared.selector.observe(&w.peer, Outcome::Failure);
                    self.pool.mark_failed(&w.peer);
                }
                Err(e) => {
                    self.done = true;
                    self.failed = true;
                    return Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("resuming at byte {from} failed: {e:?}"),
                    )));
                }
            }
        }
    }
}
