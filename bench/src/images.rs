//! Deterministic OCI images of incompressible data, pushed through the distribution API.

use std::{io::Write, net::SocketAddr};

use anyhow::{Context, bail};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest as _, Sha256};

/// Media type of the uncompressed tar layers generated here (no gzip CPU cost on big layers).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const TAR_OVERHEAD: u64 = 512 + 1024;

/// What to generate.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Repository, e.g. `bench/app`.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// Size of each layer blob in bytes (rounded up to a multiple of 512, at least 2048).
    pub layers: Vec<u64>,
    /// Seed: the same spec and seed give the same digests.
    pub seed: u64,
    /// Architectures for an OCI index (each gets its own manifest, config and layers);
    /// empty for a single-platform manifest.
    pub platforms: Vec<String>,
}

/// Kind of a pushed blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// OCI index.
    Index,
    /// Image manifest.
    Manifest,
    /// Image config.
    Config,
    /// Layer.
    Layer,
}

/// One pushed piece of content.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// What it is.
    pub kind: BlobKind,
}

/// An image in the registry.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `host:port/repo:tag`.
    pub reference: String,
    /// Repository.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// Digest the tag points at (index or manifest).
    pub digest: String,
    /// Every blob, root first.
    pub blobs: Vec<Blob>,
}

impl PushedImage {
    /// The blobs of one kind.
    pub fn of_kind(&self, kind: BlobKind) -> impl Iterator<Item = &Blob> {
        self.blobs.iter().filter(move |b| b.kind == kind)
    }

    /// Total bytes of all blobs.
    pub fn total_size(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}

/// Rounds a requested layer size to what the generator produces.
pub fn layer_size(requested: u64) -> u64 {
    requested.max(2048).div_ceil(512) * 512
}

/// Writes a generated tar layer of exactly `layer_size(size)` bytes to `out`.
pub fn write_layer(seed: u64, size: u64, out: &mut dyn Write) -> std::io::Result<()> {
    let total = layer_size(size);
    let payload = total - TAR_OVERHEAD;
    out.write_all(&tar_header("random.bin", payload))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = payload;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.write_all(&[0u8; 1024])
}

fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

struct HashWriter(Sha256, u64);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Digest and size of a generated layer, without keeping it in memory.
pub fn layer_digest(seed: u64, size: u64) -> (String, u64) {
    let mut w = HashWriter(Sha256::new(), 0);
    // Writing to a hasher cannot fail.
    let _ = write_layer(seed, size, &mut w);
    (format!("sha256:{}", hex::encode(w.0.finalize())), w.1)
}

/// A minimal blocking HTTP/1.1 client for the registry API.
struct Client {
    addr: SocketAddr,
}

impl Client {
    fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body_len: u64,
        body: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> anyhow::Result<crate::http::Response> {
        let body = (method != "HEAD").then_some((body_len, body));
        crate::http::request_with_body(self.addr, method, target, headers, body, true)
            .with_context(|| format!("{method} {target} on registry {}", self.addr))
    }

    fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        size: u64,
        write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let head = self.request(
            "HEAD",
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            0,
            &mut |_| Ok(()),
        )?;
        if head.status == 200 {
            return Ok(());
        }
        let r = self.request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            0,
            &mut |_| Ok(()),
        )?;
        if r.status != 202 {
            bail!(
                "upload start for {repo} returned {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        let location = r.header("location").context("upload without Location")?;
        let path = match location.find("/v2/") {
            Some(i) => &location[i..],
            None => location,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let target = format!("{path}{sep}digest={digest}");
        let r = self.request(
            "PUT",
            &target,
            &[("Content-Type", "application/octet-stream")],
            size,
            write,
        )?;
        if r.status != 201 {
            bail!(
                "upload of {digest} returned {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(())
    }

    fn push_bytes(&self, repo: &str, data: &[u8]) -> anyhow::Result<String> {
        let digest = sha256(data);
        self.push_blob(repo, &digest, data.len() as u64, &mut |w| w.write_all(data))?;
        Ok(digest)
    }

    fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let r = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            data.len() as u64,
            &mut |w| w.write_all(data),
        )?;
        if r.status != 201 {
            bail!(
                "manifest put returned {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(())
    }
}

/// Generates `spec` and pushes it to the registry at `addr` (which must be reachable from the
/// calling thread's network namespace).
pub fn push(addr: SocketAddr, spec: &ImageSpec) -> anyhow::Result<PushedImage> {
    let client = Client { addr };
    let mut blobs = Vec::new();
    let arches: Vec<Option<&str>> = if spec.platforms.is_empty() {
        vec![None]
    } else {
        spec.platforms.iter().map(|p| Some(p.as_str())).collect()
    };
    let mut manifests = Vec::new();
    for (pi, arch) in arches.iter().enumerate() {
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (li, &size) in spec.layers.iter().enumerate() {
            let seed = spec
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add((pi * 1000 + li) as u64);
            let (digest, actual) = layer_digest(seed, size);
            client.push_blob(&spec.repo, &digest, actual, &mut |w| {
                write_layer(seed, size, w)
            })?;
            layer_descs.push(serde_json::json!({"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": actual}));
            diff_ids.push(digest.clone());
            blobs.push(Blob {
                digest,
                size: actual,
                media_type: LAYER_MEDIA_TYPE.into(),
                kind: BlobKind::Layer,
            });
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch.unwrap_or("amd64"), "os": "linux",
            "config": {"Env": [format!("SEED={}", spec.seed)]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let config_digest = client.push_bytes(&spec.repo, &config)?;
        blobs.push(Blob {
            digest: config_digest.clone(),
            size: config.len() as u64,
            media_type: CONFIG_MEDIA_TYPE.into(),
            kind: BlobKind::Config,
        });
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
            "layers": layer_descs,
        }))?;
        let manifest_digest = sha256(&manifest);
        if arch.is_some() {
            client.put_manifest(&spec.repo, &manifest_digest, MANIFEST_MEDIA_TYPE, &manifest)?;
        }
        blobs.push(Blob {
            digest: manifest_digest.clone(),
            size: manifest.len() as u64,
            media_type: MANIFEST_MEDIA_TYPE.into(),
            kind: BlobKind::Manifest,
        });
        manifests.push((arch.map(str::to_string), manifest_digest, manifest));
    }
    let digest = if spec.platforms.is_empty() {
        let (_, digest, data) = &manifests[0];
        client.put_manifest(&spec.repo, &spec.tag, MANIFEST_MEDIA_TYPE, data)?;
        digest.clone()
    } else {
        let entries: Vec<_> = manifests
            .iter()
            .map(|(arch, digest, data)| {
                serde_json::json!({
                    "mediaType": MANIFEST_MEDIA_TYPE, "digest": digest, "size": data.len(),
                    "platform": {"architecture": arch, "os": "linux"},
                })
            })
            .collect();
        let index = serde_json::to_vec(
            &serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries}),
        )?;
        client.put_manifest(&spec.repo, &spec.tag, INDEX_MEDIA_TYPE, &index)?;
        let digest = sha256(&index);
        blobs.push(Blob {
            digest: digest.clone(),
            size: index.len() as u64,
            media_type: INDEX_MEDIA_TYPE.into(),
            kind: BlobKind::Index,
        });
        digest
    };
    // Root first, then the rest in push order.
    blobs.sort_by_key(|b| match b.kind {
        BlobKind::Index => 0,
        BlobKind::Manifest => 1,
        BlobKind::Config => 2,
        BlobKind::Layer => 3,
    });
    Ok(PushedImage {
        reference: format!("{addr}/{}:{}", spec.repo, spec.tag),
        repo: spec.repo.clone(),
        tag: spec.tag.clone(),
        digest,
        blobs,
    })
}

/// Runs `f` on a thread that has entered network namespace `netns`, so the pusher can reach
/// addresses that exist only inside it.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || -> anyhow::Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering network namespace")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("pusher thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_deterministic_and_exact() {
        for size in [2048u64, 4096, 100_000, 1 << 20] {
            let mut a = Vec::new();
            write_layer(7, size, &mut a).unwrap();
            assert_eq!(a.len() as u64, layer_size(size));
            let mut b = Vec::new();
            write_layer(7, size, &mut b).unwrap();
            assert_eq!(a, b);
            let mut c = Vec::new();
            write_layer(8, size, &mut c).unwrap();
            assert_ne!(a, c);
            assert_eq!(layer_digest(7, size), (sha256(&a), a.len() as u64));
        }
        assert_eq!(layer_size(1), 2048);
        assert_eq!(layer_size(2049), 2560);
    }

    #[test]
    fn tar_header_is_valid() {
        let mut layer = Vec::new();
        write_layer(1, 4096, &mut layer).unwrap();
        let h = &layer[..512];
        let mut copy = h.to_vec();
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|&b| b as u32).sum();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        assert_eq!(sum, stored);
        let size = u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap(), 8).unwrap();
        assert_eq!(size, 4096 - TAR_OVERHEAD);
    }
}
