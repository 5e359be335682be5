//! A small HTTP/1.1 codec: request heads in, response heads out.
//!
//! The daemon serves only GET and HEAD, so it needs no request bodies. The server owns the socket
//! so blob bodies can be written with `sendfile(2)`, which hyper's body abstraction cannot carry.

use std::{fmt::Write as _, io, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use tokio::{io::AsyncReadExt, net::TcpStream};

/// Largest accepted request head; anything longer is rejected with 431.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query, exactly as received.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Headers with lowercase names, in order.
    pub headers: Vec<(String, String)>,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// Whether the request announced a body (which the registry never reads).
    pub has_body: bool,
    /// The client's address, set by the server loop.
    pub remote: Option<std::net::SocketAddr>,
}

impl Request {
    /// First header value with this (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this is a HEAD request.
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between requests.
    #[error("connection closed")]
    Closed,
    /// No complete head arrived in time.
    #[error("timed out reading request head")]
    Timeout,
    /// The head is larger than [`MAX_HEAD`].
    #[error("request head too large")]
    TooLarge,
    /// The head is not valid HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// Socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one request head from `stream`, keeping bytes past the head in `buf` for pipelining.
///
/// `idle` bounds the wait for the first byte, `head_timeout` the time to a complete head.
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    idle: Duration,
    head_timeout: Duration,
) -> Result<Request, ReadError> {
    let mut started: Option<tokio::time::Instant> = if buf.is_empty() {
        None
    } else {
        Some(tokio::time::Instant::now())
    };
    loop {
        if !buf.is_empty() {
            if let Some((request, len)) = parse_head(buf)? {
                let _ = buf.split_to(len);
                return Ok(request);
            }
            if buf.len() >= MAX_HEAD {
                return Err(ReadError::TooLarge);
            }
        }
        let deadline = match started {
            Some(t) => t + head_timeout,
            None => tokio::time::Instant::now() + idle,
        };
        buf.reserve(4096);
        let n = match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(r) => r?,
            Err(_) if started.is_none() => return Err(ReadError::Closed),
            Err(_) => return Err(ReadError::Timeout),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Malformed("truncated head".into())
            });
        }
        started.get_or_insert_with(tokio::time::Instant::now);
    }
}

/// Parses one request head from the start of `buf`: `None` while it is incomplete, else the
/// request and the head's length (bytes after it belong to the next request).
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((to_request(&req)?, len))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ReadError::TooLarge),
        Err(e) => Err(ReadError::Malformed(e.to_string())),
    }
}

/// The body length the `Content-Length` fields announce (RFC 9112 §6.3): several fields or a
/// list are accepted only when every value is the same decimal number, since a server that
/// picks one of them frames the message differently from one that picks another.
fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, ReadError> {
    let mut length: Option<u64> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        for part in value.split(',') {
            let part = part.trim_matches([' ', '\t']);
            let parsed = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| ReadError::Malformed(format!("invalid Content-Length {value:?}")))?;
            match length {
                Some(l) if l != parsed => {
                    return Err(ReadError::Malformed(
                        "conflicting Content-Length values".into(),
                    ));
                }
                _ => length = Some(parsed),
            }
        }
    }
    Ok(length)
}

fn to_request(req: &httparse::Request<'_, '_>) -> Result<Request, ReadError> {
    let method = req
        .method
        .ok_or_else(|| ReadError::Malformed("no method".into()))?
        .to_string();
    let target = req
        .path
        .ok_or_else(|| ReadError::Malformed("no path".into()))?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| ReadError::Malformed(format!("header {} is not UTF-8", h.name)))?;
        headers.push((h.name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let connection = find("connection").unwrap_or_default();
    let keep_alive = match req.version {
        Some(1) => !connection.split(',').any(|t| t.trim() == "close"),
        _ => connection.split(',').any(|t| t.trim() == "keep-alive"),
    };
    let length = content_length(&headers)?;
    let codings: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .flat_map(|(_, v)| v.split(','))
        .map(|c| c.trim_matches([' ', '\t']).to_ascii_lowercase())
        .collect();
    let chunked = match codings.last() {
        None => false,
        Some(last) if last == "chunked" => true,
        // RFC 9112 §6.1: without chunked last the body length cannot be determined.
        Some(_) => {
            return Err(ReadError::Malformed(
                "chunked is not the final coding".into(),
            ));
        }
    };
    if chunked && length.is_some() {
        // §6.1 lets a server reject both together; accepting them is the classic smuggling vector.
        return Err(ReadError::Malformed(
            "both Transfer-Encoding and Content-Length".into(),
        ));
    }
    // Bodies are never read: a request with one (any Transfer-Encoding, including HTTP/1.0's,
    // which §6.1 calls faulty framing) ends the connection after its response.
    let has_body = chunked || length.is_some_and(|l| l > 0);
    Ok(Request {
        method,
        path,
        query,
        headers,
        keep_alive,
        has_body,
        remote: None,
    })
}

/// How far a file that is still being written holds final bytes (see [`Body::Growing`]).
#[async_trait::async_trait]
pub trait Growth: Send {
    /// Waits until more than `have` bytes of the file are final and returns how many are (at
    /// most the content's size). An error means no more will come: the response is cut.
    async fn wait_beyond(&mut self, have: u64) -> io::Result<u64>;
}

/// A response body.
pub enum Body {
    /// No body.
    Empty,
    /// Bytes in memory.
    Bytes(Bytes),
    /// `len` bytes of `file` from `offset`, sent with `sendfile(2)`.
    File {
        /// The open content file.
        file: std::fs::File,
        /// First byte to send.
        offset: u64,
        /// Number of bytes to send.
        len: u64,
    },
    /// `len` bytes of `file` from `offset`, where the file is still being written: sent with
    /// `sendfile(2)` as far as `growth` says the bytes are final, then waiting for more.
    Growing {
        /// The open file being written.
        file: std::fs::File,
        /// First byte to send.
        offset: u64,
        /// Number of bytes to send (the content's final size decides the promise).
        len: u64,
        /// Says how far the file is final; an error cuts the response.
        growth: Box<dyn Growth>,
    },
    /// Exactly `len` bytes from a stream.
    Stream {
        /// The chunks.
        stream: BoxStream<'static, io::Result<Bytes>>,
        /// Total bytes the stream yields.
        len: u64,
    },
    /// A stream of unknown length (e.g. Server-Sent Events), delimited by closing the
    /// connection; it ends when the stream ends, the client stops reading, or on shutdown.
    Unbounded(BoxStream<'static, io::Result<Bytes>>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Body::File { offset, len, .. } => write!(f, "File({offset}+{len})"),
            Body::Growing { offset, len, .. } => write!(f, "Growing({offset}+{len})"),
            Body::Stream { len, .. } => write!(f, "Stream({len})"),
            Body::Unbounded(_) => f.write_str("Unbounded"),
        }
    }
}

impl Body {
    /// Length in bytes (0 for [`Body::Unbounded`], whose length is unknown).
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty | Body::Unbounded(_) => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } | Body::Growing { len, .. } | Body::Stream { len, .. } => *len,
        }
    }

    /// Whether the body has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && !self.is_unbounded()
    }

    /// Whether the body is close-delimited.
    pub fn is_unbounded(&self) -> bool {
        matches!(self, Body::Unbounded(_))
    }
}

/// A response: status, headers and body. `Content-Length` is always written from the body,
/// unless a handler set it explicitly (HEAD responses describe the body they would send).
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Body,
}

impl Response {
    /// A response with no headers and no body.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// First value of a header set on this response.
    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Serialises the status line and headers; `Content-Length` is added from the body when
    /// the handler did not set one.
    pub fn head_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let keep_alive = keep_alive && !self.body.is_unbounded();
        let mut out = String::with_capacity(256);
        let _ = write!(out, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        if self.get_header("content-length").is_none() && !self.body.is_unbounded() {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        if !keep_alive {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Reason phrase for the status codes this server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, String> {
        match parse_head(raw) {
            Ok(Some((request, _))) => Ok(request),
            Ok(None) => Err("partial".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn with_headers(headers: &str) -> Result<Request, String> {
        parse(format!("GET /v2/ HTTP/1.1\r\nHost: h\r\n{headers}\r\n").as_bytes())
    }

    #[test]
    fn content_length_must_be_one_decimal_number() {
        // RFC 9112 §6.3: differing values would let two parsers frame the body differently.
        for bad in [
            "Content-Length: 0\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 0\r\n",
            "Content-Length: 0, 5\r\n",
            "Content-Length: abc\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +1\r\n",
            "Content-Length: 0x10\r\n",
            "Content-Length: \r\n",
            "Content-Length: 1,\r\n",
            "Content-Length: 18446744073709551616\r\n",
        ] {
            assert!(with_headers(bad).is_err(), "{bad:?} accepted");
        }
        let same = with_headers("Content-Length: 5\r\nContent-Length: 5, 5\r\n").unwrap();
        assert!(same.has_body);
        assert!(
            !with_headers("Content-Length: 0\r\nContent-Length: 00\r\n")
                .unwrap()
                .has_body
        );
    }

    #[test]
    fn transfer_encoding_framing() {
        assert!(
            with_headers("Transfer-Encoding: chunked\r\n")
                .unwrap()
                .has_body
        );
        assert!(
            with_headers("Transfer-Encoding: gzip, Chunked\r\n")
                .unwrap()
                .has_body
        );
        // RFC 9112 §6.1: without chunked last the length is unknowable; with Content-Length too
        // the two framings disagree.
        for bad in [
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            "Transfer-Encoding: \r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert!(with_headers(bad).is_err(), "{bad:?} accepted");
        }
        // HTTP/1.0 has no chunked coding: the framing is faulty, so the connection must end.
        let r = parse(
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
        assert!(r.has_body);
    }

    #[test]
    fn obsolete_line_folding_and_space_before_colon_are_rejected() {
        // RFC 9112 §5.2 and §5.1.
        assert!(with_headers("X-A: a\r\n b\r\n").is_err());
        assert!(with_headers("X-A: a\r\n\tb\r\n").is_err());
        assert!(with_headers("Content-Length : 5\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n").is_err());
    }

    #[test]
    fn parses_heads() {
        let r =
            parse(b"GET /v2/x/manifests/1?ns=a.io HTTP/1.1\r\nHost: h\r\nRange: bytes=1-2\r\n\r\n")
                .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/v2/x/manifests/1");
        assert_eq!(r.query.as_deref(), Some("ns=a.io"));
        assert_eq!(r.header("range"), Some("bytes=1-2"));
        assert!(r.keep_alive);
        assert!(!r.has_body);
        let r = parse(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!r.keep_alive);
        let r = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!r.keep_alive);
        let r = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(r.keep_alive);
        let r = parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert!(r.has_body);
        assert!(parse(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n").is_err());
    }

    #[test]
    fn head_has_content_length_from_body_unless_set() {
        let r = Response::empty(200).body(Body::Bytes(Bytes::from_static(b"abc")));
        assert_eq!(
            r.head_bytes(true),
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
        );
        let r = Response::empty(200).body(Body::Unbounded(Box::pin(futures::stream::empty())));
        assert_eq!(
            r.head_bytes(true),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        );
        let r = Response::empty(404).header("Content-Length", "10");
        assert_eq!(
            r.head_bytes(false),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
        );
    }
}
