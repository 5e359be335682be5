//! HTML fragments of `/debug/web/`, with the original's byte and duration formatting (§6).

use std::{fmt::Write as _, time::Duration};

use super::ImageRow;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `"<n> B"` below 1024, else one decimal and K/M/G/T/P/E before `B` (`19456` ⇒ `19.0 KB`).
pub fn format_bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let units = ['K', 'M', 'G', 'T', 'P', 'E'];
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}B", units[unit])
}

/// `<1ms` below 1 ms, else the two most significant consecutive non-zero units of
/// d/h/m/s/ms (`36ms`, `7m 8s`, `2h`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "<1ms".into();
    }
    let parts = [
        (ms / 86_400_000, "d"),
        (ms / 3_600_000 % 24, "h"),
        (ms / 60_000 % 60, "m"),
        (ms / 1000 % 60, "s"),
        (ms % 1000, "ms"),
    ];
    let first = parts.iter().position(|(v, _)| *v > 0).unwrap_or(4);
    let mut out = format!("{}{}", parts[first].0, parts[first].1);
    if let Some((v, u)) = parts.get(first + 1)
        && *v > 0
    {
        let _ = write!(out, " {v}{u}");
    }
    out
}

/// The status boxes and tables of `/debug/web/stats`.
pub fn stats_fragment(
    peer_id: &str,
    addrs: &[String],
    last_success_unix: f64,
    images: &[ImageRow],
    peers: &[(String, Vec<String>)],
) -> String {
    let mut h = String::with_capacity(4096);
    h.push_str("<div class=\"boxes\">");
    let mut ips: Vec<String> = addrs
        .iter()
        .filter_map(|a| super::multiaddr_ip(a))
        .filter(|ip| ip != "127.0.0.1" && ip != "::1")
        .collect();
    ips.dedup();
    for ip in &ips {
        let _ = write!(
            h,
            "<div class=\"box\"><h3>Local Address</h3><p>{}</p></div>",
            escape_html(ip)
        );
    }
    let _ = write!(
        h,
        "<div class=\"box\"><h3>Peer ID</h3><p class=\"mono\" id=\"peer-id\">{}</p></div>",
        escape_html(peer_id)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if last_success_unix > 0.0 {
        let ago = Duration::from_secs_f64((now - last_success_unix).max(0.0));
        let _ = write!(
            h,
            "<div class=\"box\"><h3>Last Mirror Success</h3><p class=\"ok\">{} ago</p></div>",
            format_duration(ago)
        );
    } else {
        h.push_str(
            "<div class=\"box\"><h3>Last Mirror Success</h3><p class=\"pending\">Pending</p></div>",
        );
    }
    let _ = write!(
        h,
        "<div class=\"box\"><h3>Images</h3><p id=\"image-count\">{}</p></div>",
        images.len()
    );
    let _ = write!(
        h,
        "<div class=\"box\"><h3>Connected Peers</h3><p id=\"peer-count\">{}</p></div></div>",
        peers.len()
    );
    h.push_str("<h2>Peer Network Status</h2><table id=\"peers\"><thead><tr><th>Peer ID</th><th>Addresses</th></tr></thead><tbody>");
    for (id, addrs) in peers {
        let ips: Vec<String> = addrs
            .iter()
            .filter_map(|a| super::multiaddr_ip(a))
            .collect();
        let _ = write!(
            h,
            "<tr><td class=\"mono\">{}</td><td>{}</td></tr>",
            escape_html(id),
            escape_html(&ips.join(", "))
        );
    }
    h.push_str("</tbody></table><h2>Available Images</h2><table id=\"images\"><thead><tr><th>Image</th><th>Tag</th><th>Digest</th></tr></thead><tbody>");
    for i in images {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            escape_html(&i.name),
            escape_html(i.tag.as_deref().unwrap_or("")),
            escape_html(&i.digest)
        );
    }
    h.push_str("</tbody></table>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_original() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(19456), "19.0 KB");
        assert_eq!(format_bytes(1_073_741_824), "1.0 GB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EB");
        assert_eq!(format_duration(Duration::from_micros(500)), "<1ms");
        assert_eq!(format_duration(Duration::from_millis(36)), "36ms");
        assert_eq!(format_duration(Duration::from_secs(428)), "7m 8s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_millis(1_050)), "1s 50ms");
    }

    #[test]
    fn escapes_and_renders_stats() {
        assert_eq!(
            escape_html("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let html = stats_fragment(
            "12D3<script>",
            &[
                "/ip4/10.1.2.3/tcp/5001".into(),
                "/ip4/127.0.0.1/tcp/5001".into(),
            ],
            0.0,
            &[ImageRow {
                name: "docker.io/library/x".into(),
                tag: Some("<t>".into()),
                digest: "sha256:ab".into(),
            }],
            &[("peerA".into(), vec!["/ip4/10.0.0.9/tcp/5001".into()])],
        );
        assert!(html.contains("<p>10.1.2.3</p>"));
        assert!(!html.contains("127.0.0.1"));
        assert!(html.contains("12D3&lt;script&gt;"));
        assert!(html.contains("Pending"));
        assert!(html.contains("&lt;t&gt;"));
        assert!(html.contains("<td>10.0.0.9</td>"));
        assert!(html.contains("<p id=\"peer-count\">1</p>"));
    }
}
