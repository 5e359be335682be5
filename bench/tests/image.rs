//! The container image imports into a real containerd and runs there.

use bench::{containerd::Containerd, daemon::spegel_bin, image};

#[test]
fn image_imports_and_runs_in_containerd() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reference = "ghcr.io/spegel-rs/spegel:test";
    let built = image::build(&spegel_bin(), &dir.path().join("image"), reference)?;
    // The layout is a valid OCI layout.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(built.layout.join("index.json"))?)?;
    assert_eq!(index["manifests"][0]["digest"], built.digest.as_str());
    assert!(built.layout.join("oci-layout").exists());

    let containerd = Containerd::start(&dir.path().join("ctd"), None)?;
    let archive = built.archive.to_string_lossy().into_owned();
    containerd.ctr(&["images", "import", &archive])?;
    assert!(
        containerd.list_images()?.iter().any(|i| i == reference),
        "{:?}",
        containerd.list_images()?
    );

    let out = containerd.ctr(&[
        "run",
        "--rm",
        reference,
        "spegel-version",
        "/spegel",
        "version",
    ])?;
    assert!(out.contains("spegel version"), "{out}");
    let out = containerd.ctr(&[
        "run",
        "--rm",
        reference,
        "spegel-help",
        "/spegel",
        "configuration",
        "--help",
    ])?;
    assert!(out.contains("--mirror-targets"), "{out}");
    // The entrypoint is the binary: arguments alone run a subcommand.
    let out = containerd.ctr(&[
        "run",
        "--rm",
        reference,
        "spegel-json",
        "/spegel",
        "version",
        "--format",
        "json",
    ])?;
    assert!(out.contains(r#""distro":"spegel""#), "{out}");
    Ok(())
}
