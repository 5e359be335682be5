//! `cargo xtask image`: the container image (OCI layout and `oci-archive` tar) of the release
//! daemon, built without a Docker engine.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "image", about = "build spegel's container image")]
struct Args {
    /// The daemon binary to package.
    #[arg(long, env = "SPEGEL_BIN", default_value = "target/release/spegel")]
    binary: PathBuf,
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
    /// Image reference recorded in the archive.
    #[arg(long)]
    tag: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let image = bench::image::build(&args.binary, &args.output, &args.tag)?;
    println!(
        "built {} ({}, layer {} MiB)\n  layout:  {}\n  archive: {} (ctr images import)",
        image.reference,
        image.digest,
        image.layer_size >> 20,
        image.layout.display(),
        image.archive.display()
    );
    Ok(())
}
