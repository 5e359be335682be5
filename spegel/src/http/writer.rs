//! Writes a response to the socket: heads and in-memory bodies with `write_all`, file bodies with
//! `sendfile(2)` under `TCP_CORK` (no body byte passes through userspace), files still being
//! written by `sendfile(2)` as far as they are final, streams chunk by chunk.

use std::time::Duration;

use futures::StreamExt;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    Timeouts,
    codec::{Body, Response},
    sendfile::{self, sendfile_all},
};

/// Writes `response` (only its head when `head_only`), each write bounded by the write-stall
/// timeout.
pub(super) async fn write_response(
    stream: &mut TcpStream,
    response: Response,
    head_only: bool,
    keep_alive: bool,
    timeouts: Timeouts,
) -> std::io::Result<()> {
    let head = response.head_bytes(keep_alive);
    let stall = timeouts.write_stall;
    if head_only {
        return timed(stall, stream.write_all(&head)).await;
    }
    match response.body {
        Body::Empty => timed(stall, stream.write_all(&head)).await,
        Body::Bytes(bytes) => {
            let mut out = Vec::with_capacity(head.len() + bytes.len());
            out.extend_from_slice(&head);
            out.extend_from_slice(&bytes);
            timed(stall, stream.write_all(&out)).await
        }
        Body::File { file, offset, len } => {
            // Cork so the head and the first body bytes share packets; uncork flushes the tail.
            let corked = sendfile::set_cork(stream, true).is_ok();
            let result = async {
                timed(stall, stream.write_all(&head)).await?;
                sendfile_all(stream, &file, offset, len, stall).await
            }
            .await;
            if corked {
                let _ = sendfile::set_cork(stream, false);
            }
            result
        }
        Body::Growing {
            file,
            offset,
            len,
            mut growth,
        } => {
            timed(stall, stream.write_all(&head)).await?;
            let end = offset + len;
            let mut at = offset;
            while at < end {
                // Only bytes the source vouches for go out: never one not at its final offset.
                let ready = growth.wait_beyond(at).await?.min(end);
                if ready <= at {
                    return Err(std::io::Error::other("growing body made no progress"));
                }
                sendfile_all(stream, &file, at, ready - at, stall).await?;
                at = ready;
            }
            Ok(())
        }
        Body::Stream {
            stream: mut body,
            len,
        } => {
            timed(stall, stream.write_all(&head)).await?;
            let mut sent = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                let take = chunk.len().min((len - sent) as usize);
                timed(stall, stream.write_all(&chunk[..take])).await?;
                sent += take as u64;
                if sent == len {
                    break;
                }
            }
            if sent < len {
                // The promised length cannot be met: closing tells the client the body is short.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "body stream ended early",
                ));
            }
            Ok(())
        }
        Body::Unbounded(mut body) => {
            timed(stall, stream.write_all(&head)).await?;
            while let Some(chunk) = body.next().await {
                timed(stall, stream.write_all(&chunk?)).await?;
            }
            Ok(())
        }
    }
}

/// Bounds a socket write so a client that stops reading cannot pin the task forever.
async fn timed<F: std::future::Future<Output = std::io::Result<()>>>(
    stall: Duration,
    fut: F,
) -> std::io::Result<()> {
    tokio::time::timeout(stall, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading"))?
}
