//! Starting the spegel binary as a user would.

use std::{net::SocketAddr, path::Path, path::PathBuf, time::Duration};

use anyhow::bail;

use crate::process::{Process, command_in, wait_for};

/// Path of the spegel binary: `$SPEGEL_BIN`, else the workspace's release or debug build.
pub fn spegel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SPEGEL_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let release = root.join("target/release/spegel");
    let debug = root.join("target/debug/spegel");
    match (
        release.metadata().and_then(|m| m.modified()),
        debug.metadata().and_then(|m| m.modified()),
    ) {
        (Ok(r), Ok(d)) if d > r => debug,
        (Ok(_), _) => release,
        _ => debug,
    }
}

/// A running `spegel` process.
pub struct Daemon {
    /// The process guard.
    pub process: Process,
    /// Registry address, when reachable from the root namespace (loopback).
    pub registry: Option<SocketAddr>,
}

impl Daemon {
    /// Starts `bin args…` (inside `netns` if given), logging to `log`. When `probe` is a
    /// loopback registry address, waits until `/livez` answers.
    pub fn start(
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        netns: Option<&str>,
        log: &Path,
        probe: Option<SocketAddr>,
    ) -> anyhow::Result<Daemon> {
        if !bin.exists() {
            bail!(
                "spegel binary {} not found: run `cargo build -p spegel` or set SPEGEL_BIN",
                bin.display()
            );
        }
        let mut cmd = command_in(netns, &bin.to_string_lossy());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut process = Process::spawn("spegel", cmd, log)?;
        if let Some(addr) = probe {
            let ok = wait_for("spegel /livez", Duration::from_secs(30), || {
                crate::http::get(addr, "/livez", &[]).is_ok_and(|r| r.status == 200)
            });
            if let Err(e) = ok {
                let tail = process.log_tail();
                process.stop();
                bail!("{e}\nspegel log:\n{tail}");
            }
        }
        Ok(Daemon {
            process,
            registry: probe,
        })
    }
}
