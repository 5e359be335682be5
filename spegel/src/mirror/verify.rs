//! Digest check of a whole blob forwarded from a peer: a peer may serve a blob it is still
//! downloading, whose bytes nobody has verified yet. The stream is hashed as it passes and its
//! last chunk is released only when the digest matches; on a mismatch the body is cut, so the
//! client never receives a complete wrong blob.

use std::io;

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use sha2::Digest as _;
use tracing::warn;

use crate::{metrics, oci::Digest};

/// Wraps `stream`, which yields exactly `len` bytes of content that must hash to `expected`;
/// `on_mismatch` runs once when it does not, before the body is cut.
pub(super) fn verified(
    stream: BoxStream<'static, io::Result<Bytes>>,
    expected: Digest,
    len: u64,
    on_mismatch: impl FnOnce() + Send + 'static,
) -> BoxStream<'static, io::Result<Bytes>> {
    let on_mismatch = std::sync::Arc::new(std::sync::Mutex::new(Some(on_mismatch)));
    let state = (stream, sha2::Sha256::new(), 0u64, false);
    Box::pin(futures::stream::unfold(
        state,
        move |(mut stream, mut hasher, mut seen, done)| {
            let expected = expected.clone();
            let on_mismatch = on_mismatch.clone();
            async move {
                if done {
                    return None;
                }
                let chunk = match stream.next().await? {
                    Ok(c) => c,
                    Err(e) => return Some((Err(e), (stream, hasher, seen, true))),
                };
                hasher.update(&chunk);
                seen += chunk.len() as u64;
                if seen < len {
                    return Some((Ok(chunk), (stream, hasher, seen, false)));
                }
                let actual = hex::encode(hasher.finalize_reset());
                let outcome = if actual == expected.hex() {
                    "ok"
                } else {
                    "mismatch"
                };
                metrics::global()
                    .mirror_digest_checks
                    .with_label_values(&[outcome])
                    .inc();
                if outcome == "ok" {
                    return Some((Ok(chunk), (stream, hasher, seen, true)));
                }
                warn!(%expected, actual = %format!("sha256:{actual}"),
                    "peer sent a blob that does not match its digest, cutting the response");
                let callback = on_mismatch.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(callback) = callback {
                    callback();
                }
                Some((
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "blob from peer does not match its digest",
                    )),
                    (stream, hasher, seen, true),
                ))
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(content: &'static [u8], expected: Digest) -> Vec<io::Result<Bytes>> {
        run_counting(content, expected, Default::default()).await
    }

    async fn run_counting(
        content: &'static [u8],
        expected: Digest,
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Vec<io::Result<Bytes>> {
        let chunks: Vec<io::Result<Bytes>> = content
            .chunks(3)
            .map(|c| Ok(Bytes::from_static(c)))
            .collect();
        verified(
            Box::pin(futures::stream::iter(chunks)),
            expected,
            content.len() as u64,
            move || {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
        )
        .collect()
        .await
    }

    #[tokio::test]
    async fn matching_blob_passes_whole() {
        let content = b"0123456789";
        let out = run(content, Digest::sha256_of(content)).await;
        let bytes: Vec<u8> = out.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        assert_eq!(bytes, content);
    }

    #[tokio::test]
    async fn mismatching_blob_loses_its_last_chunk() {
        let content = b"0123456789";
        let out = run(content, Digest::sha256_of(b"something else")).await;
        assert_eq!(out.len(), 4);
        let sent: usize = out
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|c| c.len())
            .sum();
        assert_eq!(sent, 9, "every byte but the last chunk's");
        let err = out.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn the_mismatch_callback_runs_once_and_only_on_a_mismatch() {
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        let content = b"0123456789";
        let calls = Arc::new(AtomicUsize::new(0));
        run_counting(content, Digest::sha256_of(content), calls.clone()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        run_counting(content, Digest::sha256_of(b"other"), calls.clone()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
