//! Project tasks: `cargo xtask deps|test|demo|bench|fuzz|image`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod deps;
mod fuzz;

#[derive(Parser)]
#[command(name = "xtask", about = "spegel project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the system and Python packages the tests, demo and benchmarks need.
    Deps,
    /// Run the whole test suite (what CI runs), installing what is missing first.
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the local demo cluster: pull through the mirror and print who served what.
    Demo {
        /// Arguments for the demo (see `cargo xtask demo -- --help`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the container image (OCI layout and `oci-archive` tar) without a Docker engine.
    Image {
        /// Output directory.
        #[arg(long, default_value = "target/image")]
        output: PathBuf,
        /// Image reference recorded in the archive.
        #[arg(long, default_value = concat!("ghcr.io/spegel-rs/spegel:", env!("CARGO_PKG_VERSION")))]
        tag: String,
    },
    /// Fuzz the parsers that see untrusted input (all targets, or one), one after the other.
    Fuzz {
        /// Target name (see `fuzz/fuzz_targets`); all targets when omitted.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Run a benchmark (`serve`, `p2p`, `pull`, `peers`, `load`, `soak`, `relay`); see
    /// `cargo xtask bench -- --help`.
    Bench {
        /// Benchmark name and its arguments.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Deps => deps::install(),
        Task::Test { args } => test(&root, &args),
        Task::Demo { args } => {
            deps::install()?;
            run_bench_binary(&root, "demo", &args)
        }
        Task::Image { output, tag } => {
            deps::install()?;
            let args = [
                "--output".to_string(),
                output.to_string_lossy().into_owned(),
                "--tag".to_string(),
                tag,
            ];
            run_bench_binary(&root, "image", &args)
        }
        Task::Fuzz { target, seconds } => {
            deps::install()?;
            match target {
                Some(t) => fuzz::run_all(&root, &[t.as_str()], seconds),
                None => fuzz::run_all(&root, fuzz::TARGETS, seconds),
            }
        }
        Task::Bench { args } => {
            deps::install()?;
            run_bench_binary(&root, "bench", &args)
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask must live in the workspace")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    deps::install()?;
    deps::prepare_kernel();
    // Build the daemon first: integration tests run it as a separate process, as users do.
    build_daemon()?;
    let mut rust = Command::new("cargo");
    rust.args(["test", "--workspace", "--release", "--no-fail-fast"])
        .args(args)
        .env("SPEGEL_BIN", root.join("target/release/spegel"));
    eprintln!(
        "main run on containerd {} (set {} to change)",
        containerd_matrix::Version::from_env()?,
        containerd_matrix::VERSION_ENV
    );
    let rust_result = run(&mut rust);
    let chart_result = if root.join("charts/tests").is_dir() && args.is_empty() {
        run(Command::new("python3")
            .args(["-m", "pytest", "-q", "charts/tests"])
            .env("SPEGEL_BIN", root.join("target/release/spegel")))
    } else {
        Ok(())
    };
    let matrix_result = if args.is_empty() {
        containerd_matrix(root)
    } else {
        Ok(())
    };
    // A short bounded run of every fuzz target: a crash on the committed corpus or one found
    // within seconds fails the suite.
    let fuzz_result = if args.is_empty() {
        fuzz::run_all(root, fuzz::TARGETS, fuzz::SMOKE_SECONDS)
    } else {
        Ok(())
    };
    rust_result
        .and(chart_result)
        .and(matrix_result)
        .and(fuzz_result)
}

/// Tests that run against every containerd version of the matrix; the main run covers the
/// default version.
const MATRIX_TESTS: &[&str] = &["cluster_e2e", "chart_testbed"];

/// Runs [`MATRIX_TESTS`] once per containerd version other than the default, naming the
/// versions that failed.
fn containerd_matrix(root: &Path) -> anyhow::Result<()> {
    use containerd_matrix::{VERSION_ENV, Version};
    let default = Version::from_env()?;
    let mut failed = Vec::new();
    for version in Version::ALL.into_iter().filter(|v| *v != default) {
        let binary = version.containerd_bin();
        let reported = Command::new(&binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|e| format!("{} not runnable: {e}", binary.display()));
        eprintln!("\n==== containerd {version}: {reported} ====");
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--release", "-p", "spegel"]);
        for test in MATRIX_TESTS {
            cmd.args(["--test", test]);
        }
        cmd.env(VERSION_ENV, version.label())
            .env("SPEGEL_BIN", root.join("target/release/spegel"));
        if let Err(e) = run(&mut cmd) {
            eprintln!("==== containerd {version}: FAILED ({e}) ====");
            failed.push(version.label());
        } else {
            eprintln!("==== containerd {version}: passed ====");
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} failed on containerd {}",
            MATRIX_TESTS.join(" and "),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Release build of the daemon, which tests, the demo and benchmarks run as a process.
fn build_daemon() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "spegel", "--bin", "spegel"]))
}

fn run_bench_binary(root: &Path, bin: &str, args: &[String]) -> anyhow::Result<()> {
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "spegel",
        "--bin",
        "spegel",
        "-p",
        "bench",
        "--bin",
        bin,
    ]))?;
    run(Command::new(root.join("target/release").join(bin))
        .args(pass_through(args))
        .env("SPEGEL_BIN", root.join("target/release/spegel")))
}

/// The arguments for a bench binary, without the `--` users write before them as in
/// `cargo xtask bench serve -- --runs 7` (clap keeps it in a trailing list; the binary rejects it).
fn pass_through(args: &[String]) -> Vec<&String> {
    let mut dropped = false;
    args.iter()
        .filter(|a| {
            let skip = !dropped && a.as_str() == "--";
            dropped |= skip;
            !skip
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::pass_through;

    #[test]
    fn the_first_separator_is_dropped() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = |v: &[&str]| {
            pass_through(&args(v))
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got(&["serve", "--", "--runs", "7"]),
            args(&["serve", "--runs", "7"])
        );
        assert_eq!(got(&["--", "--keep"]), args(&["--keep"]));
        assert_eq!(
            got(&["serve", "--runs", "7"]),
            args(&["serve", "--runs", "7"])
        );
        assert_eq!(got(&["a", "--", "--"]), args(&["a", "--"]));
    }

    /// `cargo xtask deps` installs protoc and clang, so xtask itself must build without them:
    /// nothing of the daemon or the testbed may be among its dependencies.
    #[test]
    fn xtask_builds_without_the_daemon_s_build_tools() {
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "tree",
                "-p",
                "xtask",
                "--prefix",
                "none",
                "--edges",
                "normal,build",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        for heavy in [
            "spegel ",
            "spegel-ebpf ",
            "bench ",
            "containerd-client ",
            "prost-build ",
        ] {
            assert!(
                !tree.lines().any(|l| l.starts_with(heavy)),
                "xtask depends on {heavy}:\n{tree}"
            );
        }
    }
}
