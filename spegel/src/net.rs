//! Go-style `host:port` addresses as the original's flags take them (`:5000`, `10.0.0.1:5001`,
//! `[::1]:5000`, `name:8080`): the one parser behind listen addresses, the router address and
//! the cleanup probe endpoint.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why an address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {addr:?}: {reason}")]
pub struct AddrError {
    /// The address as given.
    pub addr: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Splits `host:port` like Go's `net.SplitHostPort` (IPv6 hosts bracketed), with a numeric
/// port. The host may be empty (`:5000`).
pub fn split_host_port(addr: &str) -> Result<(String, u16), AddrError> {
    let invalid = |reason| AddrError {
        addr: addr.to_string(),
        reason,
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("missing ']' in address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("missing port in address"))?;
        (host, port)
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| invalid("missing port in address"))?;
        if host.contains(':') {
            return Err(invalid("too many colons in address"));
        }
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid("port must be a number between 0 and 65535"))?;
    Ok((host.to_string(), port))
}

/// A listen address: an IP literal and port; an empty host means every interface (`[::]`).
pub fn parse_listen_addr(addr: &str) -> Result<SocketAddr, AddrError> {
    let (host, port) = split_host_port(addr)?;
    if host.is_empty() {
        return Ok(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port));
    }
    let ip: IpAddr = host.parse().map_err(|_| AddrError {
        addr: addr.to_string(),
        reason: "host must be an IP address",
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// Binds a Go-style listen address; `:port` listens on every interface, IPv6 and IPv4 where
/// the node has IPv6, IPv4 only where it does not.
pub async fn bind_listen_addr(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let parsed = parse_listen_addr(addr)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    bind(parsed).await
}

/// Binds `addr`; the IPv6 wildcard falls back to the IPv4 one on nodes without IPv6.
pub async fn bind(parsed: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(parsed).await {
        Ok(l) => Ok(l),
        Err(e) if parsed.ip() == IpAddr::from(Ipv6Addr::UNSPECIFIED) => {
            tracing::debug!(error = %e, "IPv6 listen failed, using IPv4");
            tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, parsed.port())).await
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_go() {
        let ok = |s: &str| split_host_port(s).unwrap();
        assert_eq!(ok("spegel-cleanup:8080"), ("spegel-cleanup".into(), 8080));
        assert_eq!(ok("[::1]:8080"), ("::1".into(), 8080));
        assert_eq!(ok(":5000"), (String::new(), 5000));
        for bad in ["nohost", "a:b:c", "host:port", "[::1]80", "[::1", "h:70000"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addrs() {
        assert_eq!(
            parse_listen_addr(":5000").unwrap(),
            "[::]:5000".parse().unwrap()
        );
        assert_eq!(
            parse_listen_addr("[::1]:1").unwrap(),
            "[::1]:1".parse().unwrap()
        );
        assert!(parse_listen_addr("localhost:5000").is_err());
    }
}
