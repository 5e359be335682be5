//! The testbed itself: namespaces, upstream registry and per-node containerd work together.

use bench::{cluster::Cluster, images::ImageSpec};

#[test]
fn nodes_pull_from_upstream_namespace() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(2, dir.path())?;
    let image = cluster.push(&ImageSpec {
        repo: "testbed/app".into(),
        tag: "v1".into(),
        layers: vec![100_000, 200_000],
        seed: 9,
        platforms: vec![],
    })?;
    assert!(image.reference.starts_with("10.99.0.254:5000/"));
    for k in 1..=2 {
        cluster.node(k).pull(&image.reference, false)?;
        for blob in &image.blobs {
            assert_eq!(
                std::fs::metadata(cluster.node(k).blob_path(&blob.digest))?.len(),
                blob.size
            );
        }
    }
    let ns = cluster.network().node(1);
    drop(cluster);
    // Teardown removed the namespaces.
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns));
    Ok(())
}
