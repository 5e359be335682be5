//! A real containerd with its own root, state and sockets.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::process::{Process, command_in, require, wait_for};

/// The containerd namespace Kubernetes (and spegel's default) uses.
pub const NAMESPACE: &str = "k8s.io";

/// A running containerd; stopped on drop.
pub struct Containerd {
    dir: PathBuf,
    netns: Option<String>,
    process: Process,
}

/// How [`Containerd::pull_with`] pulls.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `--plain-http`: talk HTTP, not HTTPS, to the registry.
    pub plain_http: bool,
    /// `--hosts-dir`: where hosts.toml files are read; `None` for this instance's certs.d.
    pub hosts_dir: Option<PathBuf>,
    /// `--all-platforms`: fetch every manifest of an index, not only the host's.
    pub all_platforms: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            plain_http: true,
            hosts_dir: None,
            all_platforms: false,
        }
    }
}

/// Result of a `ctr images pull`.
#[derive(Debug)]
pub struct Pull {
    /// Wall time of the pull.
    pub duration: Duration,
    /// ctr's combined output.
    pub output: String,
}

impl Containerd {
    /// Starts containerd under `dir` (created), optionally inside network namespace `netns`.
    /// Its CRI registry `config_path` is `<dir>/certs.d`.
    pub fn start(dir: &Path, netns: Option<&str>) -> anyhow::Result<Containerd> {
        require("/usr/bin/containerd", "containerd")?;
        require("/usr/bin/ctr", "containerd")?;
        std::fs::create_dir_all(dir.join("certs.d"))?;
        let dir = dir.canonicalize()?;
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let process = Self::spawn_and_wait(&dir, netns)?;
        Ok(Containerd {
            dir,
            netns: netns.map(str::to_string),
            process,
        })
    }

    /// Starts containerd with the config under `dir` and waits until it answers.
    fn spawn_and_wait(dir: &Path, netns: Option<&str>) -> anyhow::Result<Process> {
        let mut cmd = command_in(netns, "/usr/bin/containerd");
        cmd.arg("-c").arg(dir.join("config.toml"));
        let mut process = Process::spawn("containerd", cmd, &dir.join("containerd.log"))?;
        let sock = dir.join("containerd.sock");
        let mut exited = None;
        let res = wait_for("containerd to answer", Duration::from_secs(30), || {
            // A containerd that died (bad config, socket in use) will never answer.
            exited = process.try_wait();
            exited.is_some()
                || sock.exists()
                    && Command::new("ctr")
                        .arg("-a")
                        .arg(&sock)
                        .arg("version")
                        .output()
                        .is_ok_and(|o| o.status.success())
        });
        let res = match exited {
            Some(status) => Err(anyhow::anyhow!(
                "containerd exited during startup: {status}"
            )),
            None => res,
        };
        if let Err(e) = res {
            let tail = process.log_tail();
            process.stop();
            bail!("{e}\ncontainerd log:\n{tail}");
        }
        Ok(process)
    }

    /// Starts containerd again with the same root, state, socket and namespace, after
    /// [`Containerd::stop`] (or stops it first, by PID, when it still runs), and waits until it
    /// answers: a containerd restart under running clients.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.stop();
        self.process = Self::spawn_and_wait(&self.dir, self.netns.as_deref())?;
        Ok(())
    }

    /// Whether containerd is running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The ttrpc socket.
    pub fn ttrpc_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock.ttrpc")
    }

    /// The config file containerd was started with.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// containerd's log file.
    pub fn log(&self) -> &Path {
        self.process.log()
    }

    /// The content store root, as spegel's `--containerd-content-path` expects.
    pub fn content_path(&self) -> PathBuf {
        self.dir.join("root/io.containerd.content.v1.content")
    }

    /// The hosts.toml directory containerd reads (`config_path`).
    pub fn certs_d(&self) -> PathBuf {
        self.dir.join("certs.d")
    }

    /// The directory holding everything of this instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network namespace it runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs `ctr` against this containerd (inside its namespace) and returns its output.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = command_in(self.netns.as_deref(), "ctr");
        cmd.arg("-a")
            .arg(self.socket())
            .args(["-n", NAMESPACE])
            .args(args);
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("{cmd:?} failed: {text}");
        }
        Ok(text)
    }

    /// Pulls `reference` over plain HTTP using the mirror configuration in `certs.d`;
    /// `all_platforms` fetches every manifest of an index.
    pub fn pull(&self, reference: &str, all_platforms: bool) -> anyhow::Result<Pull> {
        self.pull_with(
            reference,
            &PullOptions {
                all_platforms,
                ..PullOptions::default()
            },
        )
    }

    /// Runs `ctr -n k8s.io images pull [--plain-http] --hosts-dir DIR [--all-platforms] REF`
    /// (inside the network namespace when there is one) and times it.
    pub fn pull_with(&self, reference: &str, options: &PullOptions) -> anyhow::Result<Pull> {
        let hosts = options
            .hosts_dir
            .clone()
            .unwrap_or_else(|| self.certs_d())
            .to_string_lossy()
            .into_owned();
        let mut args = vec!["images", "pull"];
        if options.plain_http {
            args.push("--plain-http");
        }
        args.extend(["--hosts-dir", &hosts]);
        if options.all_platforms {
            args.push("--all-platforms");
        }
        args.push(reference);
        let started = Instant::now();
        let output = self.ctr(&args)?;
        Ok(Pull {
            duration: started.elapsed(),
            output,
        })
    }

    /// Removes an image name.
    pub fn remove_image(&self, reference: &str) -> anyhow::Result<()> {
        self.ctr(&["images", "rm", reference]).map(|_| ())
    }

    /// Image names in the namespace.
    pub fn list_images(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .ctr(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// The path of a blob in the content store.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        self.content_path().join("blobs").join(alg).join(hex)
    }

    /// Size of a blob in the content store, `None` when it is not there.
    pub fn blob_size(&self, digest: &str) -> Option<u64> {
        std::fs::metadata(self.blob_path(digest))
            .ok()
            .map(|m| m.len())
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.process.stop();
    }
}
