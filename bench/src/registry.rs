//! The real `docker-registry` (CNCF distribution) as the upstream registry.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::bail;

use crate::process::{Process, command_in, require, wait_for};

/// An upstream registry that can be stopped and started again on the same data.
pub struct Upstream {
    dir: PathBuf,
    addr: SocketAddr,
    netns: Option<String>,
    process: Option<Process>,
}

impl Upstream {
    /// Starts a registry storing under `dir`, listening on `addr` (inside `netns` if given).
    pub fn start(dir: &Path, addr: SocketAddr, netns: Option<&str>) -> anyhow::Result<Upstream> {
        require("/usr/bin/docker-registry", "docker-registry")?;
        std::fs::create_dir_all(dir.join("data"))?;
        let dir = dir.canonicalize()?;
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let mut up = Upstream {
            dir,
            addr,
            netns: netns.map(str::to_string),
            process: None,
        };
        up.resume()?;
        Ok(up)
    }

    /// Starts on a free 127.0.0.1 port, not in any namespace.
    pub fn start_local(dir: &Path) -> anyhow::Result<Upstream> {
        let port = crate::process::free_port()?;
        Self::start(dir, SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    /// `host:port` of the registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of the registry, e.g. `http://127.0.0.1:5000`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the registry stores blobs and manifests.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The registry's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// Whether the registry process is running (not paused).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Stops the registry (its data stays); same as [`Upstream::stop`].
    pub fn pause(&mut self) {
        self.stop();
    }

    /// Stops the registry (SIGTERM, then SIGKILL); its data stays for [`Upstream::resume`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// Whether `GET /v2/` answers 200, asked from the registry's own network namespace.
    pub fn answers(&self) -> bool {
        let addr = self.addr;
        let get = move || crate::http::get(addr, "/v2/", &[]).map(|r| r.status == 200);
        match &self.netns {
            // Only talk to 10.x from inside the namespace that owns it.
            Some(ns) => crate::images::in_netns(ns, get).unwrap_or(false),
            None => get().unwrap_or(false),
        }
    }

    /// Starts the registry again after [`Upstream::stop`], on the same address and data, and
    /// waits until `GET /v2/` answers 200.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let mut cmd = command_in(self.netns.as_deref(), "/usr/bin/docker-registry");
        cmd.arg("serve").arg(self.dir.join("config.yml"));
        let mut process = Process::spawn("docker-registry", cmd, &self.log())?;
        let mut exited = None;
        let res = wait_for(
            "registry to answer GET /v2/",
            Duration::from_secs(20),
            || {
                // A registry that died (port taken, bad config) will never answer.
                exited = process.try_wait();
                exited.is_some() || self.answers()
            },
        );
        let res = match exited {
            Some(status) => Err(anyhow::anyhow!("docker-registry exited: {status}")),
            None => res,
        };
        if let Err(e) = res {
            let tail = process.log_tail();
            process.stop();
            bail!("{e}\nregistry log:\n{tail}");
        }
        self.process = Some(process);
        Ok(())
    }
}
