//! Installs what tests, the demo and benchmarks need on a fresh Debian machine.

use std::process::Command;

use anyhow::{Context, bail};

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
    Ok(())
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
