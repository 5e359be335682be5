//! Coverage-guided fuzzing of the parsers that see untrusted input (crate `fuzz/`, libFuzzer).
//!
//! Built on the stable toolchain with the same SanitizerCoverage flags cargo-fuzz passes (no
//! AddressSanitizer: the parsers are safe Rust, so panics, overflow checks and debug
//! assertions are what a crash means). The crate has its own workspace and lockfile so the
//! main build never compiles libFuzzer.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// Every fuzz target, one per parser (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "request_head",
    "reference",
    "digest",
    "range",
    "hosts_toml",
    "bootstrap",
    "peer_response",
];

/// Seconds each target runs in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 10;

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

const SANCOV_FLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing";

/// What one target's run did.
pub struct RunStats {
    /// Target name.
    pub target: String,
    /// Inputs executed.
    pub executions: u64,
    /// Inputs in the working corpus at the end.
    pub corpus: usize,
}

fn target_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz")
}

/// Builds every target with coverage instrumentation.
pub fn build(root: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--release", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        // An explicit target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
        .args(["--target", TRIPLE, "--locked"])
        .env("RUSTFLAGS", SANCOV_FLAGS)
        .env("CARGO_TARGET_DIR", target_dir(root));
    crate::run(&mut cmd)
}

/// Runs `target` for `seconds`, seeded from `fuzz/corpus/<target>`; new inputs go to a scratch
/// corpus under `target/fuzz` so the committed corpus stays small. A crash, hang (10 s per
/// input) or memory blow-up fails with the reproducer's path.
pub fn run(root: &Path, target: &str, seconds: u64) -> anyhow::Result<RunStats> {
    if !TARGETS.contains(&target) {
        bail!(
            "unknown fuzz target {target:?}; targets: {}",
            TARGETS.join(", ")
        );
    }
    let seeds = root.join("fuzz/corpus").join(target);
    let work = target_dir(root).join("corpus").join(target);
    let artifacts = target_dir(root).join("artifacts").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    std::fs::create_dir_all(&artifacts)?;
    let bin = target_dir(root).join(TRIPLE).join("release").join(target);
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-max_len=65536")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&work)
        .arg(&seeds);
    eprintln!("+ {cmd:?}");
    let out = cmd.output().with_context(|| {
        format!(
            "running {} (build it with `cargo xtask fuzz`)",
            bin.display()
        )
    })?;
    let log = String::from_utf8_lossy(&out.stderr);
    let executions = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); reproducer in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    let corpus = std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0);
    Ok(RunStats {
        target: target.to_string(),
        executions,
        corpus,
    })
}

/// Builds, then runs `targets` one after the other (one job: the machines are shared), and
/// prints executions per target; fails if any target failed.
pub fn run_all(root: &Path, targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    build(root)?;
    let mut failures = Vec::new();
    for target in targets {
        match run(root, target, seconds) {
            Ok(s) => eprintln!(
                "fuzz {}: {} executions in {seconds} s, corpus {}",
                s.target, s.executions, s.corpus
            ),
            Err(e) => {
                eprintln!("{e:#}");
                failures.push(*target);
            }
        }
    }
    if !failures.is_empty() {
        bail!("fuzz targets failed: {}", failures.join(", "));
    }
    Ok(())
}
