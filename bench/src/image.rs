//! The container image, built without a Docker engine: an OCI image layout (and an
//! `oci-archive` tar that `ctr images import` takes) holding the spegel binary and the shared
//! libraries it links against.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use sha2::{Digest as _, Sha256};

/// Fixed modification time so the same inputs give the same image.
const MTIME: u64 = 1_700_000_000;

/// What was built.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The `oci-archive` tar of the layout.
    pub archive: PathBuf,
    /// Image reference recorded in the layout.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Layer size in bytes.
    pub layer_size: u64,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Shared libraries (and the loader) `binary` needs, from `ldd`.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        // A static binary: ldd says so and exits non-zero.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn append_file(
    tar: &mut tar::Builder<Vec<u8>>,
    path_in_image: &str,
    data: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(MTIME);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path_in_image, data)?;
    Ok(())
}

fn append_dir(
    tar: &mut tar::Builder<Vec<u8>>,
    path_in_image: &str,
    mode: u32,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(mode);
    header.set_mtime(MTIME);
    header.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut header, path_in_image, std::io::empty())?;
    Ok(())
}

/// The binary without debug sections (`objcopy --strip-debug`), or as is without objcopy.
fn stripped(binary: &Path) -> anyhow::Result<Vec<u8>> {
    let tmp = tempfile::NamedTempFile::new()?;
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(tmp.path())
        .status()
        .is_ok_and(|s| s.success());
    Ok(std::fs::read(if ok { tmp.path() } else { binary })?)
}

/// Builds the image from `binary` into `output` (created), tagged `reference`.
pub fn build(binary: &Path, output: &Path, reference: &str) -> anyhow::Result<BuiltImage> {
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p spegel`",
            binary.display()
        );
    }
    let mut layer = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        ("spegel".into(), stripped(binary)?, 0o755),
        (
            "etc/os-release".into(),
            b"PRETTY_NAME=\"spegel\"\nID=spegel\n".to_vec(),
            0o644,
        ),
    ];
    for lib in shared_libraries(binary)? {
        let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        files.push((
            lib.to_string_lossy().trim_start_matches('/').to_string(),
            data,
            0o755,
        ));
    }
    for (path, _, _) in &files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    dirs.insert("tmp".into());
    for d in &dirs {
        append_dir(&mut layer, d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    for (path, data, mode) in &files {
        append_file(&mut layer, path, data, *mode)?;
    }
    let layer = layer.into_inner()?;
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/spegel"], "User": "0:0", "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = sha256(&manifest);
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": tag},
        }],
    }))?;

    let layout = output.join("spegel-oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let entries: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
        (format!("blobs/sha256/{}", &layer_digest[7..]), &layer),
        (format!("blobs/sha256/{}", &config_digest[7..]), &config),
        (format!("blobs/sha256/{}", &manifest_digest[7..]), &manifest),
    ];
    let mut archive = tar::Builder::new(Vec::new());
    append_dir(&mut archive, "blobs", 0o755)?;
    append_dir(&mut archive, "blobs/sha256", 0o755)?;
    for (path, data) in &entries {
        std::fs::write(layout.join(path), data)?;
        append_file(&mut archive, path, data, 0o644)?;
    }
    let archive_path = output.join("spegel.tar");
    std::fs::write(&archive_path, archive.into_inner()?)?;
    Ok(BuiltImage {
        layout,
        archive: archive_path,
        reference: reference.to_string(),
        digest: manifest_digest,
        layer_size: layer.len() as u64,
    })
}
