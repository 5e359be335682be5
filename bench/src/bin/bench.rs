//! Benchmarks: `bench serve` (data path against nginx).

use std::path::PathBuf;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::P2p {
            runs,
            large_mib,
            output,
        } => {
            let work = tempfile::tempdir()?;
            let report = bench::p2p::run(work.path(), runs.max(1), large_mib)?;
            std::fs::create_dir_all(&output)?;
            std::fs::write(output.join("p2p.json"), serde_json::to_vec_pretty(&report)?)?;
            let table = bench::p2p::table(&report);
            std::fs::write(output.join("p2p.md"), &table)?;
            println!("{table}");
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
