//! The `spegel` binary: subcommands `registry`, `configuration`, `cleanup`, `cleanup-wait`, `version`.
//!
//! It only parses flags, sets up logging and runs; the daemon is composed in [`spegel::app`].

use std::process::ExitCode;

use clap::Parser;
use spegel::{
    app::{App, AppConfig},
    auth,
    config::{Cli, Command, RegistryArgs, VersionArgs, VersionFormat},
};
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(spegel::config::log_directives(cli.log_level))
    });
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .init();
    if let Command::Version(args) = &cli.command {
        return version(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => {
            info!("exit gracefully");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "exit with error");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Configuration(args) => Ok(spegel::host_config::run_configuration(&args).await?),
        Command::Cleanup(args) => Ok(spegel::cleanup::run_cleanup(&args, shutdown_signal()).await?),
        Command::CleanupWait(args) => tokio::select! {
            r = spegel::cleanup::run_cleanup_wait(&args) => Ok(r?),
            _ = shutdown_signal() => anyhow::bail!("interrupted before every cleanup instance was ready"),
        },
        Command::Registry(args) => run_registry(*args).await,
        Command::Version(_) => Ok(()),
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run_registry(args: RegistryArgs) -> anyhow::Result<()> {
    let config = AppConfig::from_args(&args, std::path::Path::new(auth::DEFAULT_DIR))?;
    App::start(config)
        .await?
        .run_until(shutdown_signal())
        .await?;
    Ok(())
}

fn version(args: &VersionArgs) -> ExitCode {
    let name = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "spegel".into());
    let version = env!("CARGO_PKG_VERSION");
    let commit = option_env!("SPEGEL_COMMIT").unwrap_or("unknown");
    match args.format {
        VersionFormat::Text => println!("{name} version {version} {commit}"),
        VersionFormat::Json => {
            let distro = std::fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        l.strip_prefix("PRETTY_NAME=")
                            .map(|v| v.trim_matches('"').to_string())
                    })
                })
                .unwrap_or_else(|| "unknown".into());
            let doc = serde_json::json!({
                "build": {"rustVersion": option_env!("SPEGEL_RUSTC").unwrap_or("unknown"), "version": version, "commit": commit},
                "runtime": {"distro": distro, "os": std::env::consts::OS, "arch": std::env::consts::ARCH},
            });
            print!("{doc}");
        }
    }
    ExitCode::SUCCESS
}
