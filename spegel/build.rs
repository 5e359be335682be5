//! Records the git commit and compiler version for `spegel version`.

use std::process::Command;

fn main() {
    let run = |cmd: &str, args: &[&str]| -> Option<String> {
        let out = Command::new(cmd).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = std::env::var("SPEGEL_COMMIT")
        .ok()
        .or_else(|| run("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = run(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SPEGEL_COMMIT={commit}");
    println!("cargo:rustc-env=SPEGEL_RUSTC={rustc_version}");
    println!("cargo:rerun-if-env-changed=SPEGEL_COMMIT");
    // Watch the files that really move with a commit; in a worktree `.git` is a file, and a
    // watched path that does not exist would rerun this script (and rebuild the crate) every time.
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let git_path = |arg: &str| run("git", &["rev-parse", arg]).map(|p| dir.join(p));
    let mut watched = Vec::new();
    if let Some(git_dir) = git_path("--git-dir") {
        watched.push(git_dir.join("HEAD"));
    }
    if let (Some(common), Some(head)) = (
        git_path("--git-common-dir"),
        run("git", &["symbolic-ref", "-q", "HEAD"]),
    ) {
        watched.push(common.join(head));
        watched.push(common.join("packed-refs"));
    }
    for path in watched.into_iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
