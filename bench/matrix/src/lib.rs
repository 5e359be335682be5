//! The containerd versions of the test matrix: where each comes from (a Debian suite), where
//! `cargo xtask deps` unpacks it, and the config it starts with.
//!
//! Standard library only, so `xtask` can use it before anything is installed (the testbed
//! crate needs protoc and clang to build).

use std::path::{Path, PathBuf};

/// Environment variable choosing the containerd release line of the testbed (`1.6`, `1.7`, `2.x`).
pub const VERSION_ENV: &str = "SPEGEL_CONTAINERD";
/// Environment variable overriding where `cargo xtask deps` unpacked the newer containerds.
pub const VERSIONS_DIR_ENV: &str = "SPEGEL_CONTAINERD_VERSIONS_DIR";

/// A containerd release line of the test matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 1.6, the system's package (Debian bookworm).
    V1_6,
    /// 1.7, Debian trixie's package unpacked by `cargo xtask deps`.
    V1_7,
    /// The newest 2.x Debian ships (sid), unpacked by `cargo xtask deps`.
    V2,
}

impl Version {
    /// Every version of the matrix, oldest first.
    pub const ALL: [Version; 3] = [Version::V1_6, Version::V1_7, Version::V2];

    /// Parses `1.6`, `1.7`, `2`, `2.x` or `2.<minor>`.
    pub fn parse(s: &str) -> Option<Version> {
        match s.trim() {
            "1.6" => Some(Version::V1_6),
            "1.7" => Some(Version::V1_7),
            v if v == "2" || v.starts_with("2.") => Some(Version::V2),
            _ => None,
        }
    }

    /// The version chosen by [`VERSION_ENV`]; 1.6 when unset.
    pub fn from_env() -> Result<Version, UnknownVersion> {
        match std::env::var(VERSION_ENV) {
            Ok(v) if !v.is_empty() => Version::parse(&v).ok_or(UnknownVersion(v)),
            _ => Ok(Version::V1_6),
        }
    }

    /// The name used in [`VERSION_ENV`], directory names and test output.
    pub fn label(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V1_7 => "1.7",
            Version::V2 => "2.x",
        }
    }

    /// The Debian suite the package comes from.
    pub fn suite(self) -> &'static str {
        match self {
            Version::V1_6 => "bookworm",
            Version::V1_7 => "trixie",
            Version::V2 => "sid",
        }
    }

    /// Where this version was unpacked (`None` for the system's 1.6).
    pub fn unpacked_dir(self) -> Option<PathBuf> {
        match self {
            Version::V1_6 => None,
            v => Some(versions_dir().join(v.label())),
        }
    }

    /// Directory holding `containerd`, `ctr` and the shims.
    pub fn bin_dir(self) -> PathBuf {
        self.unpacked_dir()
            .map(|d| d.join("usr/bin"))
            .unwrap_or_else(|| PathBuf::from("/usr/bin"))
    }

    /// The `containerd` binary.
    pub fn containerd_bin(self) -> PathBuf {
        self.bin_dir().join("containerd")
    }

    /// The `ctr` binary of the same version.
    pub fn ctr_bin(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }

    /// A config in this version's native format (version 2 for 1.x, version 3 for 2.x), with
    /// everything under `dir` and the CRI image service reading hosts.toml from `certs_d`.
    pub fn config(self, dir: &Path, certs_d: &Path) -> String {
        let common = format!(
            r#"root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "info"
"#,
            d = dir.display()
        );
        let certs = certs_d.display();
        match self {
            Version::V1_6 | Version::V1_7 => format!(
                r#"version = 2
{common}[plugins."io.containerd.grpc.v1.cri"]
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#
            ),
            // 2.x split the CRI plugin into image and runtime services. NRI (on by default)
            // listens on one machine-wide socket, which several instances cannot share.
            Version::V2 => format!(
                r#"version = 3
{common}[plugins.'io.containerd.cri.v1.images']
  discard_unpacked_layers = false
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{certs}"
[plugins.'io.containerd.cri.v1.runtime']
  disable_apparmor = true
[plugins.'io.containerd.nri.v1.nri']
  disable = true
"#
            ),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Where `cargo xtask deps` unpacks the newer containerds: [`VERSIONS_DIR_ENV`], else the
/// workspace's `target/containerd-versions`.
pub fn versions_dir() -> PathBuf {
    match std::env::var_os(VERSIONS_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            // This crate lives at `<workspace>/bench/matrix`.
            let here = Path::new(env!("CARGO_MANIFEST_DIR"));
            here.ancestors()
                .nth(2)
                .unwrap_or(here)
                .join("target/containerd-versions")
        }
    }
}

/// A [`VERSION_ENV`] value that names no version of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVersion(pub String);

impl std::fmt::Display for UnknownVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{VERSION_ENV}={}: expected 1.6, 1.7 or 2.x", self.0)
    }
}

impl std::error::Error for UnknownVersion {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_matrix_labels() {
        for v in Version::ALL {
            assert_eq!(Version::parse(v.label()), Some(v));
        }
        assert_eq!(Version::parse("2.1"), Some(Version::V2));
        assert_eq!(Version::parse("1.5"), None);
        assert_eq!(Version::parse(""), None);
    }

    #[test]
    fn configs_use_each_version_s_native_format() {
        let dir = Path::new("/x");
        let certs = Path::new("/x/certs.d");
        assert!(Version::V1_6.config(dir, certs).starts_with("version = 2"));
        assert!(Version::V1_7.config(dir, certs).starts_with("version = 2"));
        let v3 = Version::V2.config(dir, certs);
        assert!(v3.starts_with("version = 3"));
        assert!(v3.contains("[plugins.'io.containerd.cri.v1.images'.registry]"));
        assert!(v3.contains("config_path = \"/x/certs.d\""));
    }
}
