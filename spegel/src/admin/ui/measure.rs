//! The measure tool: find an image's providers in the DHT, then pull it through this node's
//! own registry (never anywhere else) and time each manifest and blob.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty};

use super::{ProviderLookup, escape_html, format_bytes, format_duration};
use crate::{
    http::{Client, ClientConfig},
    oci::{MANIFEST_MEDIA_TYPES, Reference, ReferenceError, SERVED_BY_HEADER},
};

/// Longest accepted `image` parameter.
pub const MAX_IMAGE_PARAM: usize = 512;
/// How long providers are looked up.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Most providers listed.
pub const MAX_PROVIDERS: usize = 32;
/// Most manifests and blobs pulled by one measurement.
pub const MAX_ITEMS: usize = 256;
/// Largest manifest parsed.
const MAX_MANIFEST: usize = 4 << 20;
/// Deadline of one request (head and body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// No `image` parameter, or an empty one.
    #[error("image parameter is required")]
    Empty,
    /// The parameter is longer than [`MAX_IMAGE_PARAM`].
    #[error("image parameter is longer than {MAX_IMAGE_PARAM} bytes")]
    TooLong,
    /// Not an image reference.
    #[error("invalid image reference: {0}")]
    Invalid(#[from] ReferenceError),
    /// The DHT lookup failed.
    #[error("lookup failed: {0}")]
    Lookup(String),
    /// Pulling through the local registry failed.
    #[error("pull through the local registry failed: {0}")]
    Pull(String),
}

/// Parses `image=<ref>` from a raw query, with Docker's defaults (`ubuntu` ⇒
/// `docker.io/library/ubuntu:latest`).
pub fn parse_image_param(query: Option<&str>) -> Result<Reference, MeasureError> {
    let value = query
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "image")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    let value = value.trim();
    if value.is_empty() {
        return Err(MeasureError::Empty);
    }
    if value.len() > MAX_IMAGE_PARAM {
        return Err(MeasureError::TooLong);
    }
    match Reference::parse_image_name(value) {
        Err(ReferenceError::NoTagOrDigest(_)) => {
            Ok(Reference::parse_image_name(&format!("{value}:latest"))?)
        }
        other => Ok(other?),
    }
}

/// One provider found by the lookup.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Peer ID.
    pub peer: String,
    /// Registry addresses.
    pub addrs: Vec<SocketAddr>,
    /// Time from the start of the lookup.
    pub found_after: Duration,
}

/// One manifest or blob pulled.
#[derive(Debug, Clone)]
pub struct Item {
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// Digest.
    pub digest: String,
    /// Media type.
    pub media_type: String,
    /// HTTP status.
    pub status: u16,
    /// Body bytes received.
    pub size: u64,
    /// Request start to the end of the body.
    pub duration: Duration,
    /// `local`, the serving peer's ID, or `not found` (containerd would fall back upstream).
    pub source: String,
}

/// A measurement.
#[derive(Debug, Clone)]
pub struct Report {
    /// The normalised reference.
    pub image: String,
    /// Providers in the order found.
    pub providers: Vec<Provider>,
    /// What was pulled.
    pub items: Vec<Item>,
    /// Why the pull stopped early, if it did.
    pub error: Option<String>,
}

impl Report {
    /// The `#measure-result` fragment.
    pub fn to_html(&self) -> String {
        let mut h = String::with_capacity(2048);
        let _ = write!(
            h,
            "<h2>Measurement of <span class=\"mono\">{}</span></h2>",
            escape_html(&self.image)
        );
        if self.providers.is_empty() {
            h.push_str("<p id=\"no-peers\">No peers found for image</p>");
            return h;
        }
        h.push_str("<h3>Lookup</h3><table id=\"lookup\"><thead><tr><th>Peer</th><th>Addresses</th><th>Found after</th></tr></thead><tbody>");
        for p in &self.providers {
            let addrs: Vec<String> = p.addrs.iter().map(|a| a.to_string()).collect();
            let _ = write!(
                h,
                "<tr data-peer=\"{}\"><td class=\"mono\">{}</td><td>{}</td><td>{}</td></tr>",
                escape_html(&p.peer),
                escape_html(&p.peer),
                escape_html(&addrs.join(", ")),
                format_duration(p.found_after)
            );
        }
        h.push_str("</tbody></table><h3>Pull</h3><table id=\"pull\"><thead><tr><th>Kind</th><th>Digest</th><th>Media type</th><th>Status</th><th>Size</th><th>Duration</th><th>Source</th></tr></thead><tbody>");
        let mut total = 0u64;
        let mut time = Duration::ZERO;
        for i in &self.items {
            total += i.size;
            time += i.duration;
            let _ = write!(
                h,
                "<tr data-kind=\"{}\" data-source=\"{}\" data-size=\"{}\"><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
                i.kind,
                escape_html(&i.source),
                i.size,
                i.kind,
                escape_html(&i.digest),
                escape_html(&i.media_type),
                i.status,
                format_bytes(i.size),
                format_duration(i.duration),
                escape_html(&i.source)
            );
        }
        let _ = write!(
            h,
            "</tbody><tfoot><tr><td colspan=\"4\">Total</td><td id=\"pull-total\">{}</td><td>{}</td><td></td></tr></tfoot></table>",
            format_bytes(total),
            format_duration(time)
        );
        if let Some(e) = &self.error {
            let _ = write!(h, "<p class=\"error\">{}</p>", escape_html(e));
        }
        h
    }
}

/// Pulls through the node's own registry.
pub struct Measurer {
    client: Client,
    registry: SocketAddr,
    authorization: Option<String>,
}

impl Measurer {
    /// A measurer pulling from `registry` (this node's registry listener).
    pub fn new(registry: SocketAddr, authorization: Option<String>) -> Self {
        Measurer {
            client: Client::new(ClientConfig {
                connect_timeout: Duration::from_secs(5),
                ..ClientConfig::default()
            }),
            registry,
            authorization,
        }
    }

    /// Looks `reference` up, then pulls it if any peer provides it.
    pub async fn run(
        &self,
        lookup: &dyn ProviderLookup,
        reference: &Reference,
    ) -> Result<Report, MeasureError> {
        let started = Instant::now();
        let mut rx = lookup
            .providers(&reference.identifier(), MAX_PROVIDERS)
            .await
            .map_err(|e| MeasureError::Lookup(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
        let mut providers: Vec<Provider> = Vec::new();
        while providers.len() < MAX_PROVIDERS {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(peer)) => {
                    if providers.iter().any(|p| p.peer == peer.id) {
                        continue;
                    }
                    providers.push(Provider {
                        peer: peer.id,
                        addrs: peer.addrs,
                        found_after: started.elapsed(),
                    });
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut report = Report {
            image: reference.to_string(),
            providers,
            items: Vec::new(),
            error: None,
        };
        if !report.providers.is_empty()
            && let Err(e) = self.pull(reference, &mut report.items).await
        {
            report.error = Some(e.to_string());
        }
        Ok(report)
    }

    async fn pull(&self, reference: &Reference, items: &mut Vec<Item>) -> Result<(), MeasureError> {
        let target = match (&reference.digest, &reference.tag) {
            (Some(d), _) => d.to_string(),
            (None, t) => t.clone().unwrap_or_else(|| "latest".into()),
        };
        let (item, body) = self.get(reference, "manifests", &target, true).await?;
        let ok = item.status == 200;
        items.push(item);
        if !ok {
            return Ok(());
        }
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| MeasureError::Pull(format!("manifest is not JSON: {e}")))?;
        let manifest = if let Some(list) = doc.get("manifests").and_then(|m| m.as_array()) {
            let (os, arch) = default_platform();
            let Some(digest) = list
                .iter()
                .find(|m| {
                    m["platform"]["os"].as_str() == Some(os)
                        && m["platform"]["architecture"].as_str() == Some(arch)
                })
                .and_then(|m| m["digest"].as_str())
            else {
                return Err(MeasureError::Pull(format!(
                    "index has no manifest for {os}/{arch}"
                )));
            };
            let (item, body) = self.get(reference, "manifests", digest, true).await?;
            let ok = item.status == 200;
            items.push(item);
            if !ok {
                return Ok(());
            }
            serde_json::from_slice(&body)
                .map_err(|e| MeasureError::Pull(format!("manifest is not JSON: {e}")))?
        } else {
            doc
        };
        let mut blobs: Vec<String> = Vec::new();
        if let Some(d) = manifest["config"]["digest"].as_str() {
            blobs.push(d.to_string());
        }
        if let Some(layers) = manifest["layers"].as_array() {
            blobs.extend(
                layers
                    .iter()
                    .filter_map(|l| l["digest"].as_str().map(str::to_string)),
            );
        }
        for digest in blobs {
            if items.len() >= MAX_ITEMS {
                return Err(MeasureError::Pull(format!(
                    "stopped after {MAX_ITEMS} items"
                )));
            }
            // Digests come from the manifest: only well-formed ones become request paths.
            if digest.parse::<crate::oci::Digest>().is_err() {
                return Err(MeasureError::Pull(format!("invalid digest {digest:?}")));
            }
            let (item, _) = self.get(reference, "blobs", &digest, false).await?;
            items.push(item);
        }
        Ok(())
    }

    /// GETs `/v2/<repo>/<what>/<target>?ns=<registry>` from the own registry, without the
    /// peer marker so the registry forwards what it lacks; keeps the body only for manifests.
    async fn get(
        &self,
        reference: &Reference,
        what: &'static str,
        target: &str,
        keep: bool,
    ) -> Result<(Item, Vec<u8>), MeasureError> {
        let ns: String =
            url::form_urlencoded::byte_serialize(reference.registry.as_bytes()).collect();
        let uri = format!(
            "http://{}/v2/{}/{what}/{target}?ns={ns}",
            self.registry, reference.repository
        );
        let mut builder = http::Request::builder()
            .uri(uri)
            .header(http::header::USER_AGENT, "spegel-measure");
        for media_type in MANIFEST_MEDIA_TYPES {
            builder = builder.header(http::header::ACCEPT, media_type);
        }
        if let Some(a) = &self.authorization {
            builder = builder.header(http::header::AUTHORIZATION, a.as_str());
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| MeasureError::Pull(e.to_string()))?;
        let started = Instant::now();
        let fut = async {
            let response = self
                .client
                .send(request)
                .await
                .map_err(|e| MeasureError::Pull(e.to_string()))?;
            let status = response.status().as_u16();
            let header = |n: &str| {
                response
                    .headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let source = match (status, header(SERVED_BY_HEADER)) {
                (200, Some(peer)) => peer,
                (200, None) => "local".to_string(),
                (404, _) => "not found (upstream fallback)".to_string(),
                _ => "error".to_string(),
            };
            let media_type = header("content-type").unwrap_or_default();
            let digest = header("docker-content-digest").unwrap_or_else(|| target.to_string());
            let mut body = response.into_body();
            let mut size = 0u64;
            let mut kept = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| MeasureError::Pull(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    size += data.len() as u64;
                    if keep {
                        if kept.len() + data.len() > MAX_MANIFEST {
                            return Err(MeasureError::Pull("manifest too large".into()));
                        }
                        kept.extend_from_slice(&data);
                    }
                }
            }
            Ok((
                Item {
                    kind: if what == "blobs" { "blob" } else { "manifest" },
                    digest,
                    media_type,
                    status,
                    size,
                    duration: started.elapsed(),
                    source,
                },
                kept,
            ))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| MeasureError::Pull(format!("{what}/{target} timed out")))?
    }
}

/// The platform this process would pull (`linux` and the Go architecture name).
fn default_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_image_parameters_with_defaults() {
        let r = parse_image_param(Some("image=ubuntu")).unwrap();
        assert_eq!(r.to_string(), "docker.io/library/ubuntu:latest");
        let r =
            parse_image_param(Some("x=1&image=ghcr.io%2Fspegel-org%2Fspegel%3Av0.3.0")).unwrap();
        assert_eq!(r.to_string(), "ghcr.io/spegel-org/spegel:v0.3.0");
        let r = parse_image_param(Some("image=10.99.0.254:5000/demo/app:v1")).unwrap();
        assert_eq!(r.registry, "10.99.0.254:5000");
        assert!(matches!(parse_image_param(None), Err(MeasureError::Empty)));
        assert!(matches!(
            parse_image_param(Some("image=+")),
            Err(MeasureError::Empty)
        ));
        assert!(matches!(
            parse_image_param(Some("image=UPPER/case")),
            Err(MeasureError::Invalid(_))
        ));
        assert!(matches!(
            parse_image_param(Some("image=a/..%2F..%2Fetc:x")),
            Err(MeasureError::Invalid(_))
        ));
        let long = format!("image={}", "a".repeat(600));
        assert!(matches!(
            parse_image_param(Some(&long)),
            Err(MeasureError::TooLong)
        ));
    }

    #[test]
    fn report_html_escapes_and_totals() {
        let report = Report {
            image: "x/<y>:1".into(),
            providers: vec![Provider {
                peer: "p<1>".into(),
                addrs: vec!["10.0.0.1:5000".parse().unwrap()],
                found_after: Duration::from_millis(3),
            }],
            items: vec![
                Item {
                    kind: "manifest",
                    digest: "sha256:aa".into(),
                    media_type: "m".into(),
                    status: 200,
                    size: 1000,
                    duration: Duration::from_millis(2),
                    source: "local".into(),
                },
                Item {
                    kind: "blob",
                    digest: "sha256:bb".into(),
                    media_type: "b".into(),
                    status: 200,
                    size: 1048,
                    duration: Duration::from_millis(5),
                    source: "p<1>".into(),
                },
            ],
            error: None,
        };
        let html = report.to_html();
        assert!(html.contains("x/&lt;y&gt;:1"));
        assert!(html.contains("data-peer=\"p&lt;1&gt;\""));
        assert!(html.contains("<td id=\"pull-total\">2.0 KB</td>"));
        assert!(html.contains("<td>3ms</td>"));
        let empty = Report {
            providers: vec![],
            ..report
        };
        assert!(empty.to_html().contains("No peers found for image"));
    }
}
