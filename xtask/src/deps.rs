//! Installs what tests, the demo and benchmarks need on a fresh Debian machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use containerd_matrix::{Version, versions_dir};

/// Debian packages, with a binary whose presence shows the package is installed.
const APT: &[(&str, &str)] = &[
    ("containerd", "/usr/bin/containerd"),
    ("runc", "/usr/sbin/runc"),
    ("docker-registry", "/usr/bin/docker-registry"),
    ("nginx", "/usr/sbin/nginx"),
    ("protobuf-compiler", "/usr/bin/protoc"),
    ("iproute2", "/usr/sbin/ip"),
    ("wrk", "/usr/bin/wrk"),
    ("curl", "/usr/bin/curl"),
    ("busybox-static", "/bin/busybox"),
    ("clang", "/usr/bin/clang"),
    // C++ compiler and libstdc++ for libFuzzer, which the fuzz targets link.
    ("g++", "/usr/bin/g++"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("linux-libc-dev", "/usr/include/linux/bpf.h"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("python3-pip", "/usr/bin/pip3"),
    // Headless browser for the UI tests (driven over CDP on a pipe; never downloads one).
    ("chromium", "/usr/bin/chromium"),
];

/// Python packages for the chart tests, with the module that shows each is importable.
const PIP: &[(&str, &str)] = &[
    ("helm-python-sdk", "helm_python"),
    ("kubernetes-validate", "kubernetes_validate"),
    ("pytest", "pytest"),
    ("pyyaml", "yaml"),
];

/// Installs missing apt and pip packages (needs root for apt).
pub fn install() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(_, probe)| !std::path::Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .filter(|pkg| *pkg != "python3-pip" || !python_has("pip"))
        .collect();
    if !missing.is_empty() {
        eprintln!("installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let missing_pip: Vec<&str> = PIP
        .iter()
        .filter(|(_, module)| !python_has(module))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing_pip.is_empty() {
        eprintln!("installing Python packages: {}", missing_pip.join(" "));
        run(Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(&missing_pip))?;
    }
    containerd_versions()
}

/// Debian's archive signing keys, used when the system's entry names none.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Unpacks Debian's containerd packages for the newer versions of the test matrix into
/// [`versions_dir`], one directory per version, without touching the system's apt setup:
/// a private sources list (the mirror the system already uses for Debian), state and cache.
/// Skips versions already unpacked.
pub fn containerd_versions() -> anyhow::Result<()> {
    let wanted: Vec<Version> = Version::ALL
        .into_iter()
        .filter(|v| {
            v.unpacked_dir()
                .is_some_and(|_| !v.containerd_bin().is_file() || !v.ctr_bin().is_file())
        })
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let root = versions_dir();
    let apt = PrivateApt::create(&root.join("apt"))?;
    let suites: Vec<&str> = wanted.iter().map(|v| v.suite()).collect();
    apt.write_sources(&suites)?;
    eprintln!(
        "fetching containerd {} from Debian ({}) into {}",
        wanted
            .iter()
            .map(|v| v.label())
            .collect::<Vec<_>>()
            .join(", "),
        suites.join(", "),
        root.display()
    );
    apt.update()?;
    let available = apt.versions("containerd")?;
    for v in wanted {
        let Some(pkg_version) = pick(v, &available) else {
            bail!(
                "Debian {} has no containerd {} (found: {})",
                v.suite(),
                v.label(),
                available
                    .iter()
                    .map(|(ver, suite)| format!("{ver} in {suite}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let deb = apt.download("containerd", &pkg_version)?;
        let Some(dest) = v.unpacked_dir() else {
            continue;
        };
        // Unpack next to the destination and rename, so an interrupted run leaves no half tree.
        let partial = root.join(format!(".{}.partial", v.label()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        std::fs::write(
            partial.join("PACKAGE"),
            format!("containerd {pkg_version}\n"),
        )?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::rename(&partial, &dest)?;
        // The unpacked tree is what is used; the archive would only take space.
        let _ = std::fs::remove_file(&deb);
        eprintln!(
            "containerd {} = Debian containerd {pkg_version} in {}",
            v.label(),
            dest.display()
        );
    }
    Ok(())
}

/// The package version for `v`: the newest of its line among `(version, suite)` pairs.
fn pick(v: Version, available: &[(String, String)]) -> Option<String> {
    let prefix = match v {
        Version::V1_6 => "1.6.",
        Version::V1_7 => "1.7.",
        Version::V2 => "2.",
    };
    // apt-cache madison lists the newest first.
    available
        .iter()
        .find(|(ver, _)| ver.starts_with(prefix))
        .map(|(ver, _)| ver.clone())
}

/// apt with its own sources list, state and cache under one directory.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn create(dir: &Path) -> anyhow::Result<PrivateApt> {
        for sub in [
            "etc/preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
            "debs",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let status = dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        Ok(PrivateApt {
            dir: dir.canonicalize()?,
        })
    }

    /// One-line sources for `suites`, on the mirror the system uses for Debian.
    fn write_sources(&self, suites: &[&str]) -> anyhow::Result<()> {
        let (uri, keyring) = system_debian_mirror()?;
        let mut list = String::new();
        for suite in suites {
            list.push_str(&format!("deb [signed-by={keyring}] {uri} {suite} main\n"));
        }
        std::fs::write(self.dir.join("etc/sources.list"), list)?;
        Ok(())
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::Etc::SourceList={d}/etc/sources.list"),
            "Dir::Etc::SourceParts=/nonexistent".to_string(),
            format!("Dir::Etc::Preferences={d}/etc/preferences"),
            format!("Dir::Etc::PreferencesParts={d}/etc/preferences.d"),
            format!("Dir::State={d}/state"),
            format!("Dir::State::status={d}/state/status"),
            format!("Dir::Cache={d}/cache"),
            // Only package lists are needed, not AppStream metadata.
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".to_string(),
            // Files land in a root-owned directory the _apt user cannot write.
            "APT::Sandbox::User=root".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    fn update(&self) -> anyhow::Result<()> {
        run(Command::new("apt-get")
            .args(["-q", "-q"])
            .args(self.options())
            .arg("update"))
    }

    /// `(version, suite)` of every candidate of `package`, newest first.
    fn versions(&self, package: &str) -> anyhow::Result<Vec<(String, String)>> {
        let out = Command::new("apt-cache")
            .args(self.options())
            .args(["madison", package])
            .output()
            .context("running apt-cache madison")?;
        if !out.status.success() {
            bail!(
                "apt-cache madison {package} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                // "containerd | 2.1.9+ds1-5 | http://… sid/main amd64 Packages"
                let mut fields = line.split('|').map(str::trim);
                let _name = fields.next()?;
                let version = fields.next()?.to_string();
                let suite = fields
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .split('/')
                    .next()?
                    .to_string();
                Some((version, suite))
            })
            .collect())
    }

    /// Downloads `package=version` into the private `debs` directory and returns the file.
    fn download(&self, package: &str, version: &str) -> anyhow::Result<PathBuf> {
        let debs = self.dir.join("debs");
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(["-q", "-q"])
            .args(self.options())
            .arg("download")
            .arg(format!("{package}={version}")))?;
        // apt names the file package_version_arch.deb, with ':' in the version escaped.
        let stem = format!("{package}_{}_", version.replace(':', "%3a"));
        std::fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&stem) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {stem}*.deb in {}", debs.display()))
    }
}

/// The URI and keyring of the Debian archive the system's apt already uses (the entry for the
/// main archive, not security), so no other host is contacted.
fn system_debian_mirror() -> anyhow::Result<(String, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            debian_in_deb822(&text)
        } else if name.ends_with(".list") {
            debian_in_one_line(&text)
        } else {
            None
        };
        if let Some(found) = found {
            return Ok(found);
        }
    }
    bail!("no Debian archive (suite bookworm, component main) in the system's apt sources")
}

/// Whether `suites` holds the system's release (the main archive, not security or updates).
fn is_debian_release(uri: &str, suite: &str) -> bool {
    suite == "bookworm" && uri.contains("/debian") && !uri.contains("security")
}

fn debian_in_deb822(text: &str) -> Option<(String, String)> {
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if stanza.lines().any(|l| l.trim() == "Enabled: no")
            || !types.split_whitespace().any(|t| t == "deb")
        {
            continue;
        }
        for uri in uris.split_whitespace() {
            if suites.split_whitespace().any(|s| is_debian_release(uri, s)) {
                let keyring = field("Signed-By").unwrap_or_else(|| DEBIAN_KEYRING.to_string());
                return Some((uri.to_string(), keyring));
            }
        }
    }
    None
}

fn debian_in_one_line(text: &str) -> Option<(String, String)> {
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let (options, rest) = match rest.trim_start().strip_prefix('[') {
            Some(r) => r.split_once(']').unwrap_or(("", r)),
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if is_debian_release(uri, suite) {
            let keyring = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .unwrap_or(DEBIAN_KEYRING);
            return Some((uri.to_string(), keyring.to_string()));
        }
    }
    None
}

/// Mounts tracefs for eBPF tracepoints; harmless when already mounted or not permitted.
pub fn prepare_kernel() {
    if !std::path::Path::new("/sys/kernel/tracing/events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
