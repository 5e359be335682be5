//! Deterministic OCI images of incompressible data, pushed through the distribution API.

use std::{io::Write, net::SocketAddr};

use anyhow::{Context, bail};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest as _, Sha256};

/// Media type of the uncompressed tar layers generated here (no gzip CPU cost on big layers).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of the image manifests generated here.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the index generated for multi-platform images.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of the image configs generated here.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// What to generate.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Repository, e.g. `bench/app`.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// Exact size of each layer blob in bytes (at least [`MIN_LAYER_SIZE`]; smaller requests
    /// are raised to it).
    pub layers: Vec<u64>,
    /// Seed: the same spec and seed give the same digests.
    pub seed: u64,
    /// Architectures for an OCI index (each gets its own manifest and config);
    /// empty for a single-platform manifest.
    pub platforms: Vec<String>,
}

/// How [`push_with`] lays out an index.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// All platforms of an index reference the same layers (those of platform 0) instead of
    /// each having its own.
    pub shared_layers: bool,
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
    /// Architecture of the manifest it belongs to; `None` for the index, for a
    /// single-platform image and for layers shared by all platforms.
    pub platform: Option<String>,
    /// Seed that regenerates it with [`write_layer`] (layers only).
    pub seed: Option<u64>,
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
    /// Media type of what the tag points at.
    pub media_type: String,
    /// Every distinct blob, root first (index, manifests, configs, layers).
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

    /// The blobs a pull of one platform fetches: the root, that platform's manifest and
    /// config, and its layers (shared layers included).
    pub fn platform_blobs(&self, arch: &str) -> Vec<&Blob> {
        self.blobs
            .iter()
            .filter(|b| {
                b.kind == BlobKind::Index
                    || b.platform.is_none()
                    || b.platform.as_deref() == Some(arch)
            })
            .collect()
    }
}

/// Smallest layer the generator makes: one tar header and the end-of-archive marker.
pub const MIN_LAYER_SIZE: u64 = 512 + 1024;

/// The size a requested layer size produces: exactly the request, at least [`MIN_LAYER_SIZE`].
pub fn layer_size(requested: u64) -> u64 {
    requested.max(MIN_LAYER_SIZE)
}

/// Seed of layer `layer` of platform `platform` (0 for a single-platform image) of an image
/// generated with `seed`; with [`write_layer`] it regenerates the exact bytes.
pub fn layer_seed(seed: u64, platform: usize, layer: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add((platform * 1000 + layer) as u64)
}

/// Writes a generated tar layer of exactly `layer_size(size)` bytes to `out`, streaming (1 MiB
/// buffer): one file of seeded random bytes, then zeros. Whatever the 512-byte tar blocks leave
/// over goes after the end-of-archive marker, where tar readers (and containerd, which drains
/// the stream to check the diff ID) ignore it.
pub fn write_layer(seed: u64, size: u64, out: &mut dyn Write) -> std::io::Result<()> {
    let total = layer_size(size);
    let payload = (total - MIN_LAYER_SIZE) / 512 * 512;
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
    let trailer = (total - 512 - payload) as usize;
    out.write_all(&vec![0u8; trailer])
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
/// calling thread's network namespace; see [`in_netns`]).
pub fn push(addr: SocketAddr, spec: &ImageSpec) -> anyhow::Result<PushedImage> {
    push_with(addr, spec, &PushOptions::default())
}

fn blob(digest: &str, size: u64, media_type: &str, kind: BlobKind, platform: Option<&str>) -> Blob {
    Blob {
        digest: digest.to_string(),
        size,
        media_type: media_type.to_string(),
        kind,
        platform: platform.map(str::to_string),
        seed: None,
    }
}

/// [`push`] with options. Layers stream from the generator twice (once to hash, once to
/// upload), so even GiB layers never sit in memory.
pub fn push_with(
    addr: SocketAddr,
    spec: &ImageSpec,
    options: &PushOptions,
) -> anyhow::Result<PushedImage> {
    let client = Client { addr };
    let single = spec.platforms.is_empty();
    let arches: Vec<Option<&str>> = if single {
        vec![None]
    } else {
        spec.platforms.iter().map(|p| Some(p.as_str())).collect()
    };
    let mut blobs: Vec<Blob> = Vec::new();
    let mut manifests = Vec::new();
    for (pi, arch) in arches.iter().enumerate() {
        let shared = options.shared_layers && !single;
        let layer_platform = if shared { 0 } else { pi };
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (li, &size) in spec.layers.iter().enumerate() {
            let seed = layer_seed(spec.seed, layer_platform, li);
            let (digest, actual) = layer_digest(seed, size);
            if !blobs.iter().any(|b| b.digest == digest) {
                client.push_blob(&spec.repo, &digest, actual, &mut |w| {
                    write_layer(seed, size, w)
                })?;
                let owner = if shared { None } else { *arch };
                let mut layer = blob(&digest, actual, LAYER_MEDIA_TYPE, BlobKind::Layer, owner);
                layer.seed = Some(seed);
                blobs.push(layer);
            }
            layer_descs.push(
                serde_json::json!({"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": actual}),
            );
            // Uncompressed layers: the diff ID is the layer digest.
            diff_ids.push(digest);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch.unwrap_or("amd64"), "os": "linux",
            "config": {"Env": [format!("SEED={}", spec.seed)]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let config_digest = client.push_bytes(&spec.repo, &config)?;
        blobs.push(blob(
            &config_digest,
            config.len() as u64,
            CONFIG_MEDIA_TYPE,
            BlobKind::Config,
            *arch,
        ));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
            "layers": layer_descs,
        }))?;
        let manifest_digest = sha256(&manifest);
        if !single {
            client.put_manifest(&spec.repo, &manifest_digest, MANIFEST_MEDIA_TYPE, &manifest)?;
        }
        blobs.push(blob(
            &manifest_digest,
            manifest.len() as u64,
            MANIFEST_MEDIA_TYPE,
            BlobKind::Manifest,
            *arch,
        ));
        manifests.push((arch.map(str::to_string), manifest_digest, manifest));
    }
    let (digest, media_type) = if single {
        let (_, digest, data) = &manifests[0];
        client.put_manifest(&spec.repo, &spec.tag, MANIFEST_MEDIA_TYPE, data)?;
        (digest.clone(), MANIFEST_MEDIA_TYPE)
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
        blobs.push(blob(
            &digest,
            index.len() as u64,
            INDEX_MEDIA_TYPE,
            BlobKind::Index,
            None,
        ));
        (digest, INDEX_MEDIA_TYPE)
    };
    // Root first, then the rest in push order (the sort is stable).
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
        media_type: media_type.to_string(),
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
        for size in [
            1536u64,
            1537,
            2047,
            2048,
            4096,
            100_000,
            1_000_000,
            (1 << 20) + 3,
        ] {
            let mut a = Vec::new();
            write_layer(7, size, &mut a).unwrap();
            assert_eq!(a.len() as u64, size, "requested {size}");
            let mut b = Vec::new();
            write_layer(7, size, &mut b).unwrap();
            assert_eq!(a, b);
            let mut c = Vec::new();
            write_layer(8, size, &mut c).unwrap();
            assert_eq!(c.len(), a.len());
            if size > 2048 {
                assert_ne!(a, c);
            }
            assert_eq!(layer_digest(7, size), (sha256(&a), a.len() as u64));
        }
        assert_eq!(layer_size(1), MIN_LAYER_SIZE);
        assert_eq!(layer_size(2049), 2049);
        assert_ne!(layer_seed(1, 0, 1), layer_seed(1, 1, 0));
        assert_ne!(layer_seed(1, 0, 0), layer_seed(2, 0, 0));
    }

    #[test]
    fn layers_are_incompressible_random_payloads() {
        let mut layer = Vec::new();
        write_layer(3, 1 << 20, &mut layer).unwrap();
        // Seeded random bytes use every byte value about equally often.
        let mut counts = [0u32; 256];
        for &b in &layer[512..layer.len() - 2048] {
            counts[b as usize] += 1;
        }
        let expected = (layer.len() - 2560) as u32 / 256;
        assert!(counts.iter().all(|&c| c > expected / 2 && c < expected * 2));
    }

    #[test]
    fn layers_are_valid_tar_archives() {
        for size in [1536u64, 4096, 5000, 70_001] {
            let mut layer = Vec::new();
            write_layer(1, size, &mut layer).unwrap();
            let h = &layer[..512];
            let mut copy = h.to_vec();
            copy[148..156].copy_from_slice(b"        ");
            let sum: u32 = copy.iter().map(|&b| b as u32).sum();
            let stored =
                u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
            assert_eq!(sum, stored);
            let mut archive = tar::Archive::new(layer.as_slice());
            let entries: Vec<(String, u64)> = archive
                .entries()
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.path().unwrap().display().to_string(), e.size())
                })
                .collect();
            let payload = (size - MIN_LAYER_SIZE) / 512 * 512;
            assert_eq!(entries, vec![("random.bin".to_string(), payload)]);
            // Everything after the file is zeros: the end-of-archive marker and the remainder.
            let end = 512 + payload as usize;
            assert!(layer[end..].iter().all(|&b| b == 0));
            assert!(layer.len() - end >= 1024);
        }
    }
}
