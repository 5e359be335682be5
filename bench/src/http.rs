//! A blocking HTTP/1.1 client for tests and benchmarks: one request per connection, bodies
//! either kept or only hashed and counted.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context;
use sha2::{Digest as _, Sha256};

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body (empty when only hashed).
    pub body: Vec<u8>,
    /// `sha256:<hex>` of the body.
    pub sha256: String,
    /// Body length received.
    pub len: u64,
}

impl Response {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request; `keep_body` false hashes the body without storing it.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    keep_body: bool,
) -> anyhow::Result<Response> {
    request_with_body(addr, method, target, headers, None, keep_body)
}

/// A request body: its length and a writer that produces exactly that many bytes.
pub type BodyWriter<'a> = (
    u64,
    &'a mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
);

/// Sends one request with an optional streamed body.
pub fn request_with_body(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<BodyWriter<'_>>,
    keep_body: bool,
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((len, _)) = &body {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut stream);
        w.write_all(head.as_bytes())?;
        if let Some((_, write)) = body {
            write(&mut w)?;
        }
        w.flush()?;
    }
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut resp_headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            resp_headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut hasher = Sha256::new();
    let mut body = Vec::new();
    let mut len = 0u64;
    if method != "HEAD" {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if keep_body {
                body.extend_from_slice(&buf[..n]);
            }
            len += n as u64;
        }
    }
    Ok(Response {
        status,
        headers: resp_headers,
        body,
        sha256: format!("sha256:{}", hex::encode(hasher.finalize())),
        len,
    })
}

/// GET with the body kept.
pub fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> anyhow::Result<Response> {
    request(addr, "GET", target, headers, true)
}
