//! Benchmarks: `bench serve` (data path against nginx), `bench p2p`, `bench pull` (cluster
//! pulls under three setups), `bench peers` (peer choice, probe overhead), `bench load`
//! (concurrent GETs, memory and files), `bench soak` (resource trend under continuous pulls),
//! `bench relay` (CPU cost of verifying forwarded blobs).

use std::{path::PathBuf, time::Duration};

use bench::pull::{Setup, Size};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "spegel benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Serve one large blob with spegel and with nginx; throughput and server CPU per GiB.
    Serve {
        /// Blob size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Transfers per server (medians are reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/serve")]
        output: PathBuf,
    },
    /// Peer choice on links that differ: one throttled provider, one distant provider, plain
    /// ones; pull time and bytes per provider for every `--peer-selection` policy, same run.
    /// `--probe-overhead` also runs `bench serve` with eBPF on against off.
    Peers {
        /// Nodes (at least 5): providers 1..n-1, the puller n.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Layer size in MiB.
        #[arg(long, default_value_t = 128)]
        size_mib: u64,
        /// Pulls per policy per run.
        #[arg(long, default_value_t = 6)]
        pulls: usize,
        /// Rounds over every policy (medians over all pulls are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Sending rate of the throttled provider (node 1).
        #[arg(long, default_value = "50mbit")]
        rate: String,
        /// Round-trip time added on node 2's link, milliseconds.
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
        /// Extra argument for every daemon (repeatable), e.g. `--extra=--ebpf=off`.
        #[arg(long, allow_hyphen_values = true)]
        extra: Vec<String>,
        /// Skip the peer-choice part (only with `--probe-overhead`).
        #[arg(long)]
        no_choice: bool,
        /// Also measure the probes' cost: `bench serve` with `--ebpf=on` against `--ebpf=off`.
        #[arg(long)]
        probe_overhead: bool,
        /// Blob size of the probe-overhead transfers, MiB.
        #[arg(long, default_value_t = 1024)]
        serve_size_mib: u64,
        /// Transfers per daemon for the probe overhead.
        #[arg(long, default_value_t = 9)]
        serve_runs: usize,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/peers")]
        output: PathBuf,
    },
    /// Concurrent blob GETs against a local, a forwarding and a content-API daemon, some
    /// clients slow: byte-exact count, peak RSS and open files per daemon.
    Load {
        /// Clients of the local, the forwarding and the content-API daemon.
        #[arg(long, value_delimiter = ',', default_value = "200,150,150")]
        clients: Vec<usize>,
        /// Layer size in MiB.
        #[arg(long, default_value_t = 4)]
        size_mib: u64,
        /// Every n-th client reads slowly; 0 for none.
        #[arg(long, default_value_t = 10)]
        slow_every: usize,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/load")]
        output: PathBuf,
    },
    /// Continuous pulls through the mirror for a fixed time; every daemon's RSS, open files and
    /// threads sampled, with their trend per minute.
    Soak {
        /// Nodes (node 1 holds the images, the others pull).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Minutes of pulls.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 5)]
        interval_s: u64,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/soak")]
        output: PathBuf,
    },
    /// CPU cost of verifying forwarded blobs: node 2 relays one layer from node 1, whole
    /// (sha256-verified) against `Range: bytes=1-` (same path, not verifiable), alternating.
    Relay {
        /// Layer size in MiB.
        #[arg(long, default_value_t = 512)]
        size_mib: u64,
        /// Transfer pairs (medians are reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/relay")]
        output: PathBuf,
    },
    /// Peer-to-peer on a 3-node testbed: hit latency, miss penalty, large pull peer vs registry.
    P2p {
        /// Repetitions of each measurement.
        #[arg(long, default_value_t = 9)]
        runs: usize,
        /// Size of the large image in MiB.
        #[arg(long, default_value_t = 128)]
        large_mib: u64,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/p2p")]
        output: PathBuf,
    },
    /// Routing at scale: routers on loopback (convergence, lookups, leave, crash, churn) at
    /// each size, every size in its own process (so memory figures stay apart), its routers in
    /// that process or spread over worker processes.
    Routing {
        /// Cluster sizes; the last one gets the full table, all of them the growth table.
        #[arg(long, value_delimiter = ',', default_value = "10,100,300")]
        sizes: Vec<usize>,
        /// Images per node (10 keys each).
        #[arg(long, default_value_t = 30)]
        images: usize,
        /// Provider record TTL, seconds (the daemon's default is 10 minutes).
        #[arg(long, default_value_t = 600)]
        ttl_s: u64,
        /// Steady-state window, seconds.
        #[arg(long, default_value_t = 60)]
        window_s: u64,
        /// Churn phase, seconds (10 % of the nodes replaced per minute).
        #[arg(long, default_value_t = 60)]
        churn_s: u64,
        /// Idle connection timeout of the routers, seconds: the daemon's day by default. (With
        /// 10 s, 300 routers on 2 cores spent their CPU on reconnect handshakes and no provide
        /// completed in 5 minutes.)
        #[arg(long, default_value_t = 86_400)]
        idle_timeout_s: u64,
        /// Worker processes hosting the routers (file descriptors are per process; 0 runs
        /// them all in one). Default: 0 up to 100 nodes, else one per 40 nodes.
        #[arg(long)]
        workers: Option<usize>,
        /// Upper bound on the wait until every key is findable, seconds.
        #[arg(long, default_value_t = 900)]
        converge_limit_s: u64,
        /// Hits and misses (each) looked up one at a time, apart from the bursts (0: none).
        #[arg(long, default_value_t = 200)]
        solo_lookups: usize,
        /// Where results (JSON, Markdown) are written.
        #[arg(long, default_value = "target/bench/routing")]
        output: PathBuf,
        /// Run one size in this process and write its JSON report here (used internally).
        #[arg(long, hide = true)]
        one: Option<PathBuf>,
    },
    /// A worker process of `bench routing`: hosts routers, obeys JSON commands on stdin
    /// (internal).
    #[command(hide = true)]
    RoutingWorker {
        /// Its number, for logs.
        #[arg(long, default_value_t = 0)]
        index: usize,
    },
    /// The original's cluster benchmark: every node pulls a new image at once ("create"), then a
    /// rolling update in 20 % batches ("update"), with no mirror, with spegel and with a central
    /// pull-through cache; the upstream link is shaped with tc.
    Pull {
        /// Number of nodes.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Image sizes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).
        #[arg(long, value_delimiter = ',', default_value = "10MB,100MB")]
        sizes: Vec<Size>,
        /// Layer counts; every size is run with each.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        layers: Vec<usize>,
        /// Divide every size by this (for small machines).
        #[arg(long, default_value_t = 1)]
        scale: u64,
        /// Upstream link rate as tc understands it (e.g. 200mbit, 1gbit); `none` leaves it
        /// unshaped.
        #[arg(long, default_value = "200mbit")]
        rate: String,
        /// Repetitions of every case, each with its own images.
        #[arg(long, short = 'r', default_value_t = 1)]
        repetitions: usize,
        /// Setups to compare.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "baseline,spegel,central-cache"
        )]
        setups: Vec<Setup>,
        /// Nodes per update batch, percent (a DaemonSet's maxUnavailable).
        #[arg(long, default_value_t = 20)]
        update_batch_percent: u32,
        /// Pause between update batches, milliseconds (a rolled pod becoming ready).
        #[arg(long, default_value_t = 1000)]
        batch_gap_ms: u64,
        /// Timeout of one node's pull, seconds.
        #[arg(long, default_value_t = 900)]
        pull_timeout_s: u64,
        /// Where results (JSON, Markdown, SVG) are written.
        #[arg(long, default_value = "target/bench/pull")]
        output: PathBuf,
        /// Working directory for the testbed (default: a temporary directory, removed after).
        #[arg(long)]
        work: Option<PathBuf>,
        /// Only write the table and chart again from an earlier run's `pull.json`.
        #[arg(long)]
        from_json: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    // Off unless asked for: the routers' own warnings (libp2p's dropped streams, timeouts) are
    // what explains a lookup the report counts as failed.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match Cli::parse().bench {
        Bench::Pull {
            output,
            from_json: Some(json),
            ..
        } => {
            let report: bench::pull::Report = serde_json::from_slice(&std::fs::read(&json)?)?;
            let [_, md, svg] = bench::pull::report::write(&report, &output)?;
            println!("table: {}\nchart: {}", md.display(), svg.display());
        }
        Bench::Pull {
            nodes,
            sizes,
            layers,
            scale,
            rate,
            repetitions,
            setups,
            update_batch_percent,
            batch_gap_ms,
            pull_timeout_s,
            output,
            work,
            from_json: None,
        } => {
            let temp = tempfile::tempdir()?;
            let config = bench::pull::Config {
                nodes,
                sizes,
                layer_counts: layers,
                scale,
                rate: (rate != "none").then_some(rate),
                repetitions,
                setups,
                update_batch_percent,
                batch_gap: Duration::from_millis(batch_gap_ms),
                pull_timeout: Duration::from_secs(pull_timeout_s),
                work: work.unwrap_or_else(|| temp.path().to_path_buf()),
            };
            let mut progress = bench::pull::Progress::new();
            let report = bench::pull::run(&config, &mut progress)?;
            let [json, md, svg] = bench::pull::report::write(&report, &output)?;
            println!("{}", bench::pull::report::markdown(&report));
            println!(
                "raw figures: {}
table: {}
chart: {}",
                json.display(),
                md.display(),
                svg.display()
            );
        }
        Bench::Routing {
            sizes,
            images,
            ttl_s,
            window_s,
            churn_s,
            idle_timeout_s,
            workers,
            converge_limit_s,
            solo_lookups,
            output,
            one,
        } => {
            // A worker holds at most about 40 routers: with every connection kept (up to one
            // per other node, about 330 descriptors per router at 300 nodes) it stays under
            // the 20,000-descriptor hard limit.
            let workers =
                |nodes: usize| workers.unwrap_or(if nodes <= 100 { 0 } else { nodes.div_ceil(40) });
            let config = |nodes: usize| {
                let mut c = bench::routing::SimConfig::bench(nodes);
                c.images_per_node = images.max(1);
                c.ttl = Duration::from_secs(ttl_s.max(2));
                c.window = Duration::from_secs(window_s);
                c.churn = Duration::from_secs(churn_s);
                c.idle_timeout = Duration::from_secs(idle_timeout_s.max(1));
                c.workers = workers(nodes);
                c.converge_limit = Duration::from_secs(converge_limit_s.max(1));
                c.solo_lookups = solo_lookups;
                c
            };
            if let Some(path) = one {
                let nodes = *sizes.first().ok_or_else(|| anyhow::anyhow!("no size"))?;
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let report = runtime.block_on(bench::routing::run(config(nodes)))?;
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
                return Ok(());
            }
            std::fs::create_dir_all(&output)?;
            let mut reports = vec![];
            for nodes in sizes {
                eprintln!("== {nodes} routers");
                let path = output.join(format!("routing-{nodes}.json"));
                let status = std::process::Command::new(std::env::current_exe()?)
                    .args(["routing", "--sizes", &nodes.to_string()])
                    .args([
                        "--images",
                        &images.to_string(),
                        "--ttl-s",
                        &ttl_s.to_string(),
                    ])
                    .args(["--window-s", &window_s.to_string()])
                    .args(["--churn-s", &churn_s.to_string()])
                    .args(["--idle-timeout-s", &idle_timeout_s.to_string()])
                    .args(["--workers", &workers(nodes).to_string()])
                    .args(["--converge-limit-s", &converge_limit_s.to_string()])
                    .args(["--solo-lookups", &solo_lookups.to_string()])
                    .arg("--one")
                    .arg(&path)
                    .status()?;
                anyhow::ensure!(status.success(), "{nodes} routers: {status}");
                let report: bench::routing::SimReport =
                    serde_json::from_slice(&std::fs::read(&path)?)?;
                reports.push(report);
            }
            let table = bench::routing::table(&reports);
            std::fs::write(output.join("routing.md"), &table)?;
            println!("{table}");
        }
        Bench::RoutingWorker { index } => {
            bench::routing::raise_fd_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            eprintln!("routing worker {index}: pid {}", std::process::id());
            runtime.block_on(bench::routing::worker::serve_stdio())?;
            eprintln!("routing worker {index}: done");
        }
        Bench::Load {
            clients,
            size_mib,
            slow_every,
            output,
        } => {
            let clients: [usize; 3] = clients.try_into().map_err(|_| {
                anyhow::anyhow!("--clients takes three counts: local,forwarded,content-api")
            })?;
            let work = tempfile::tempdir()?;
            let report = bench::load::run(&bench::load::Config {
                clients,
                size_mib,
                slow_every,
                work: work.path().to_path_buf(),
                bin: bench::daemon::spegel_bin(),
            })?;
            std::fs::create_dir_all(&output)?;
            std::fs::write(
                output.join("load.json"),
                serde_json::to_vec_pretty(&report)?,
            )?;
            let table = report.markdown();
            std::fs::write(output.join("load.md"), &table)?;
            println!("{table}");
            for f in report.failures.iter().take(10) {
                println!("failed: {f}");
            }
        }
        Bench::Soak {
            nodes,
            minutes,
            interval_s,
            output,
        } => {
            let work = tempfile::tempdir()?;
            let report = bench::soak::run(&bench::soak::Config {
                nodes,
                duration: Duration::from_secs(minutes * 60),
                interval: Duration::from_secs(interval_s.max(1)),
                work: work.path().to_path_buf(),
                bin: bench::daemon::spegel_bin(),
            })?;
            std::fs::create_dir_all(&output)?;
            std::fs::write(
                output.join("soak.json"),
                serde_json::to_vec_pretty(&report)?,
            )?;
            let table = report.markdown();
            std::fs::write(output.join("soak.md"), &table)?;
            println!("{table}");
            for f in report.failures.iter().take(10) {
                println!("failed: {f}");
            }
        }
        Bench::Relay {
            size_mib,
            runs,
            output,
        } => {
            let work = tempfile::tempdir()?;
            let report = bench::relay::run(work.path(), runs.max(1), size_mib)?;
            std::fs::create_dir_all(&output)?;
            std::fs::write(
                output.join("relay.json"),
                serde_json::to_vec_pretty(&report)?,
            )?;
            let table = bench::relay::table(&report);
            std::fs::write(output.join("relay.md"), &table)?;
            println!("{table}");
        }
        Bench::P2p {
            runs,
            large_mib,
            output,
        } => {
            let work = tempfile::tempdir()?;
            let report = bench::p2p::run(work.path(), runs.max(1), large_mib)?;
            std::fs::create_dir_all(&output)?;
            // The daemons' debug logs (timestamped) explain where a request's time went.
            for k in 1..=3 {
                let log = work.path().join(format!("node{k}/spegel.log"));
                if log.exists() {
                    std::fs::copy(&log, output.join(format!("node{k}-spegel.log")))?;
                }
            }
            std::fs::write(output.join("p2p.json"), serde_json::to_vec_pretty(&report)?)?;
            let table = bench::p2p::table(&report);
            std::fs::write(output.join("p2p.md"), &table)?;
            println!("{table}");
        }
        Bench::Peers {
            nodes,
            size_mib,
            pulls,
            runs,
            rate,
            delay_ms,
            extra,
            no_choice,
            probe_overhead,
            serve_size_mib,
            serve_runs,
            output,
        } => {
            std::fs::create_dir_all(&output)?;
            if !no_choice {
                let work = tempfile::tempdir()?;
                let config = bench::peers::Config {
                    nodes,
                    size_mib,
                    pulls: pulls.max(1),
                    runs: runs.max(1),
                    rate,
                    delay: Duration::from_millis(delay_ms),
                    extra,
                    work: work.path().to_path_buf(),
                };
                let report = bench::peers::run(&config)?;
                let [json, md] = bench::peers::write(&report, &output)?;
                println!("{}", bench::peers::markdown(&report));
                println!("raw figures: {}\ntable: {}", json.display(), md.display());
            }
            if probe_overhead {
                let work = tempfile::tempdir()?;
                let (runs, summaries) = bench::serve::run_with(
                    serve_size_mib << 20,
                    serve_runs.max(1),
                    work.path(),
                    &[
                        ("spegel-ebpf-on", &["--ebpf=on"]),
                        ("spegel-ebpf-off", &["--ebpf=off"]),
                    ],
                    false,
                )?;
                std::fs::write(
                    output.join("probe-overhead.json"),
                    serde_json::to_vec_pretty(
                        &serde_json::json!({"runs": runs, "summary": summaries}),
                    )?,
                )?;
                let off = summaries.iter().find(|s| s.server == "spegel-ebpf-off");
                let mut table = String::from(
                    "| daemon | throughput (GiB/s, median) | CPU s per GiB (median) | throughput vs off | CPU vs off |\n|---|---:|---:|---:|---:|\n",
                );
                for s in &summaries {
                    let (t, c) = off
                        .map(|o| (s.gib_per_s / o.gib_per_s, s.cpu_s_per_gib / o.cpu_s_per_gib))
                        .unwrap_or((1.0, 1.0));
                    table.push_str(&format!(
                        "| {} | {:.2} | {:.3} | {:+.1} % | {:+.1} % |\n",
                        s.server,
                        s.gib_per_s,
                        s.cpu_s_per_gib,
                        (t - 1.0) * 100.0,
                        (c - 1.0) * 100.0
                    ));
                }
                std::fs::write(output.join("probe-overhead.md"), &table)?;
                println!("{table}");
            }
        }
        Bench::Serve {
            size_mib,
            runs,
            output,
        } => {
            let work = tempfile::tempdir()?;
            let (runs, summaries) = bench::serve::run(size_mib << 20, runs.max(1), work.path())?;
            std::fs::create_dir_all(&output)?;
            std::fs::write(
                output.join("serve.json"),
                serde_json::to_vec_pretty(
                    &serde_json::json!({"runs": runs, "summary": summaries}),
                )?,
            )?;
            let nginx = summaries.iter().find(|s| s.server == "nginx").cloned();
            let mut table = String::from(
                "| server | throughput (GiB/s, median) | server CPU s per GiB (median) | throughput vs nginx | CPU vs nginx |\n|---|---|---|---|---|\n",
            );
            for s in &summaries {
                let (t, c) = nginx
                    .as_ref()
                    .map(|n| (s.gib_per_s / n.gib_per_s, s.cpu_s_per_gib / n.cpu_s_per_gib))
                    .unwrap_or((1.0, 1.0));
                table.push_str(&format!(
                    "| {} | {:.2} | {:.3} | {:.2}× | {:.2}× |\n",
                    s.server, s.gib_per_s, s.cpu_s_per_gib, t, c
                ));
            }
            std::fs::write(output.join("serve.md"), &table)?;
            println!("{table}");
            println!("raw figures: {}", output.join("serve.json").display());
        }
    }
    Ok(())
}
