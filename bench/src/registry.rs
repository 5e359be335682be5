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

    /// Starts on a free loopback port.
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

    /// Stops the registry (its data stays).
    pub fn pause(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// Starts the registry again after [`Upstream::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let mut cmd = command_in(self.netns.as_deref(), "/usr/bin/docker-registry");
        cmd.arg("serve").arg(self.dir.join("config.yml"));
        let mut process = Process::spawn("docker-registry", cmd, &self.dir.join("registry.log"))?;
        let addr = self.addr;
        let netns = self.netns.clone();
        let res = wait_for(
            "registry to listen",
            Duration::from_secs(20),
            || match &netns {
                // Only probe 10.x from inside the namespace that owns it.
                Some(ns) => crate::netns::exec_ok(
                    ns,
                    "busybox",
                    &[
                        "wget",
                        "-q",
                        "-O",
                        "/dev/null",
                        &format!("http://{addr}/v2/"),
                    ],
                ),
                None => {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                }
            },
        );
        if let Err(e) = res {
            let tail = process.log_tail();
            process.stop();
            bail!("{e}\nregistry log:\n{tail}");
        }
        self.process = Some(process);
        Ok(())
    }
}
