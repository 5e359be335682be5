//! HTTP plumbing shared by every listener and every outgoing request; knows nothing of OCI.
//!
//! - [`codec`]: request heads (parsing, limits) and the [`Response`]/[`Body`] types.
//! - [`server`]: the connection loop (keep-alive, pipelining, timeouts, metrics) around a
//!   [`Handler`]; used by the registry, the admin (metrics) port, the HTTP bootstrap `/id`
//!   endpoint and the cleanup probe.
//! - `writer` and `sendfile`: how a response reaches the socket (file bodies by `sendfile(2)`).
//! - [`client`]: the one outgoing HTTP/1.1 client (peers, HTTP bootstrap, cleanup-wait probes).

pub mod client;
pub mod codec;
mod sendfile;
pub mod server;
mod writer;

pub use client::{Client, ClientConfig, ClientError};
pub use codec::{
    Body, Growth, MAX_HEAD, ReadError, Request, Response, parse_head, read_request, reason,
};
pub use sendfile::sendfile_all;
pub use server::{Handler, Limits, Timeouts, serve, serve_with};
