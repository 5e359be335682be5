//! `bench serve`: one large blob served by spegel (sendfile) and by nginx (`sendfile on;
//! tcp_nopush on`), same file, same fast client; throughput and server CPU per GiB.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    containerd::Containerd,
    daemon::{Daemon, spegel_bin},
    images::{self, ImageSpec},
    process::{Process, free_port, require, wait_for},
    registry::Upstream,
    stats,
};

/// One measured transfer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    /// Which server.
    pub server: String,
    /// Bytes received.
    pub bytes: u64,
    /// Wall time of the transfer, seconds.
    pub seconds: f64,
    /// Server CPU time (user + system) during the transfer, seconds.
    pub server_cpu_seconds: f64,
}

/// Summary for one server.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Which server.
    pub server: String,
    /// Median throughput, GiB/s.
    pub gib_per_s: f64,
    /// Median server CPU seconds per GiB.
    pub cpu_s_per_gib: f64,
}

/// Reads a `GET` response (200, or 206 for a `range`) to the end, discarding the body in a
/// 4 MiB buffer; returns body bytes.
pub fn fetch(addr: SocketAddr, target: &str, range: Option<&str>) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: bench\r\n{range}Connection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 4 << 20];
    let mut head = Vec::new();
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed before the head ended");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(pos) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..pos]);
            if !(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.1 206")) {
                bail!("unexpected response: {text}");
            }
            body += (head.len() - pos - 4) as u64;
            break;
        }
    }
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(body);
        }
        body += n as u64;
    }
}

/// CPU seconds (user + system) used so far by `pid` and its children that are still running.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    };
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .sum()
}

/// PIDs of `pid` and its direct children (nginx master and workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
                let ppid = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
                if ppid == Some(pid) {
                    pids.push(child);
                }
            }
        }
    }
    pids
}

fn start_nginx(dir: &Path, root: &Path, port: u16) -> anyhow::Result<Process> {
    require("/usr/sbin/nginx", "nginx")?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n\
         client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
         uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{ root {}; }}\n  }}\n}}\n",
        root.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = std::process::Command::new("/usr/sbin/nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"));
    let p = Process::spawn("nginx", cmd, &dir.join("nginx.log"))?;
    wait_for("nginx", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok(p)
}

/// One server under test and what keeps it running.
struct Server {
    name: String,
    addr: SocketAddr,
    target: String,
    /// Processes whose CPU time is counted.
    pids: Vec<u32>,
    /// Stops the server when dropped.
    _guard: Box<dyn std::any::Any>,
}

/// Runs the benchmark: `size` bytes, `runs` transfers per server.
pub fn run(size: u64, runs: usize, work: &Path) -> anyhow::Result<(Vec<Run>, Vec<Summary>)> {
    run_with(size, runs, work, &[("spegel", &[])], true)
}

/// [`run`] with several spegel daemons, each named and started with extra arguments (e.g.
/// `--ebpf=on` against `--ebpf=off`), nginx optional; transfers alternate between servers so
/// drift hits them alike.
pub fn run_with(
    size: u64,
    runs: usize,
    work: &Path,
    variants: &[(&str, &[&str])],
    with_nginx: bool,
) -> anyhow::Result<(Vec<Run>, Vec<Summary>)> {
    std::fs::create_dir_all(work)?;
    eprintln!("starting containerd and the upstream registry");
    let containerd = Containerd::start(&work.join("ctd"), None)?;
    let upstream = Upstream::start_local(&work.join("registry"))?;
    eprintln!("generating and pushing a {} MiB layer", size >> 20);
    let image = images::push(
        upstream.addr(),
        &ImageSpec {
            repo: "bench/serve".into(),
            tag: "v1".into(),
            layers: vec![size],
            seed: 42,
            platforms: vec![],
        },
    )?;
    eprintln!("pulling it into containerd");
    containerd.pull(&image.reference, false)?;
    let layer = image
        .of_kind(images::BlobKind::Layer)
        .next()
        .context("no layer")?
        .clone();

    let hex = layer.digest.trim_start_matches("sha256:");
    let spegel_target = format!(
        "/v2/bench/serve/blobs/{}?ns={}",
        layer.digest,
        upstream.host().replace(':', "%3A")
    );
    let nginx_target = format!("/blobs/sha256/{hex}");
    let mut servers: Vec<Server> = Vec::new();
    for (name, extra) in variants {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut args: Vec<String> = vec![
            "registry".into(),
            format!("--registry-addr=127.0.0.1:{port}"),
            format!("--metrics-addr=127.0.0.1:{}", free_port()?),
            format!("--router-addr=127.0.0.1:{}", free_port()?),
            format!("--containerd-sock={}", containerd.socket().display()),
            format!(
                "--containerd-content-path={}",
                containerd.content_path().display()
            ),
            "--log-level=INFO".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let daemon = Daemon::start(
            &spegel_bin(),
            &args,
            &[],
            None,
            &work.join(format!("{name}.log")),
            Some(addr),
        )?;
        let pids = vec![daemon.process.pid().context("spegel pid")?];
        servers.push(Server {
            name: name.to_string(),
            addr,
            target: spegel_target.clone(),
            pids,
            _guard: Box::new(daemon),
        });
    }
    if with_nginx {
        let nginx_port = free_port()?;
        let nginx = start_nginx(&work.join("nginx"), &containerd.content_path(), nginx_port)?;
        let nginx_addr: SocketAddr = ([127, 0, 0, 1], nginx_port).into();
        let pids = with_children(nginx.pid().context("nginx pid")?);
        servers.push(Server {
            name: "nginx".into(),
            addr: nginx_addr,
            target: nginx_target,
            pids,
            _guard: Box::new(nginx),
        });
    }

    // Warm the page cache and every server once.
    for s in &servers {
        fetch(s.addr, &s.target, None)?;
    }
    let mut all = Vec::new();
    for i in 0..runs {
        for Server {
            name: server,
            addr: a,
            target,
            pids,
            ..
        } in &servers
        {
            let cpu0 = cpu_seconds(pids);
            let t0 = Instant::now();
            let bytes = fetch(*a, target, None)?;
            let seconds = t0.elapsed().as_secs_f64();
            let server_cpu_seconds = cpu_seconds(pids) - cpu0;
            if bytes != layer.size {
                bail!("{server} sent {bytes} bytes, expected {}", layer.size);
            }
            eprintln!(
                "run {}/{runs} {server}: {:.2} GiB/s, {:.3} CPU s",
                i + 1,
                bytes as f64 / seconds / (1u64 << 30) as f64,
                server_cpu_seconds
            );
            all.push(Run {
                server: server.clone(),
                bytes,
                seconds,
                server_cpu_seconds,
            });
        }
    }
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    drop(servers);
    let summaries = names
        .iter()
        .map(|server| {
            let runs: Vec<&Run> = all.iter().filter(|r| &r.server == server).collect();
            let gib = |r: &Run| r.bytes as f64 / (1u64 << 30) as f64;
            Summary {
                server: server.to_string(),
                gib_per_s: stats::median(
                    &runs.iter().map(|r| gib(r) / r.seconds).collect::<Vec<_>>(),
                ),
                cpu_s_per_gib: stats::median(
                    &runs
                        .iter()
                        .map(|r| r.server_cpu_seconds / gib(r))
                        .collect::<Vec<_>>(),
                ),
            }
        })
        .collect();
    Ok((all, summaries))
}
