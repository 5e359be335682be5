//! The testbed itself: namespaces, upstream registry and per-node containerd work together.

use std::{path::Path, process::Command, time::Duration};

use bench::{
    cluster::Cluster,
    images::{BlobKind, ImageSpec, PushOptions},
    netns::Network,
    process::wait_for,
};

fn namespaces() -> anyhow::Result<String> {
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&list.stdout).into_owned())
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[test]
fn nodes_pull_from_upstream_namespace() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(2, dir.path())?;
    let image = cluster.push(&ImageSpec {
        repo: "testbed/app".into(),
        tag: "v1".into(),
        layers: vec![100_000, 200_000],
        seed: 9,
        platforms: vec![],
    })?;
    let index = cluster.push_with(
        &ImageSpec {
            repo: "testbed/multi".into(),
            tag: "v1".into(),
            layers: vec![30_000],
            seed: 10,
            platforms: vec!["amd64".into(), "arm64".into()],
        },
        &PushOptions {
            shared_layers: true,
        },
    )?;
    assert_eq!(index.of_kind(BlobKind::Layer).count(), 1);
    assert!(image.reference.starts_with("10.99.0.254:5000/"));
    cluster.shape_upstream("500mbit")?;
    let qdisc = Command::new("ip")
        .args(["netns", "exec", &cluster.network().upstream()])
        .args(["tc", "qdisc", "show", "dev", "eth0"])
        .output()?;
    assert!(
        String::from_utf8_lossy(&qdisc.stdout).contains("tbf"),
        "{qdisc:?}"
    );
    for k in 1..=2 {
        cluster.node(k).pull(&image.reference, false)?;
        cluster.node(k).pull(&index.reference, true)?;
        for blob in image.blobs.iter().chain(&index.blobs) {
            assert_eq!(
                cluster.node(k).blob_size(&blob.digest),
                Some(blob.size),
                "node {k}: {:?} {}",
                blob.kind,
                blob.digest
            );
        }
    }

    // Upstream down, then up again on the same data.
    cluster.node(1).remove_image(&image.reference)?;
    cluster.upstream().stop();
    assert!(cluster.node(1).pull(&image.reference, false).is_err());
    cluster.upstream().resume()?;
    cluster.node(1).pull(&image.reference, false)?;

    // A caller's program runs inside the node's namespace and stops with its guard.
    let mut guard = cluster.spawn_in_node(
        2,
        Path::new("/bin/sh"),
        &[
            "-c".into(),
            "ip -o addr show dev eth0; echo $MARK; exec sleep 1000".into(),
        ],
        &[("MARK".into(), "marker-42".into())],
    )?;
    wait_for("the node's program", Duration::from_secs(10), || {
        std::fs::read_to_string(guard.log()).is_ok_and(|l| l.contains("marker-42"))
    })?;
    let log = std::fs::read_to_string(guard.log())?;
    assert!(log.contains(&cluster.network().node_ip(2)), "{log}");
    let pid = guard.pid().expect("started");
    assert!(guard.is_running());
    drop(guard);
    assert!(!alive(pid));

    // An extra host joins the bridge and reaches the upstream; its address cannot be reused.
    let host = cluster.add_host("extra", "10.99.0.50")?;
    let addr = cluster.upstream_host().parse()?;
    let r = bench::images::in_netns(&host, move || bench::http::get(addr, "/v2/", &[]))?;
    assert_eq!(r.status, 200);
    assert!(cluster.add_host("again", "10.99.0.50").is_err());
    assert!(cluster.add_host("clash", "10.99.0.1").is_err());

    let ns = cluster.network().node(1);
    assert!(namespaces()?.contains(&ns) && namespaces()?.contains(&host));
    drop(cluster);
    // Teardown removed the namespaces.
    assert!(!namespaces()?.contains(&ns) && !namespaces()?.contains(&host));
    Ok(())
}

#[test]
fn namespaces_are_removed_when_a_test_panics() -> anyhow::Result<()> {
    let created = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = created.clone();
    let result = std::panic::catch_unwind(move || {
        let net = Network::create(2).expect("network");
        let names = vec![net.node(1), net.node(2), net.upstream()];
        seen.lock().expect("lock").extend(names);
        panic!("test failure while the network is up");
    });
    assert!(result.is_err());
    let names = created.lock().expect("lock").clone();
    assert_eq!(names.len(), 3);
    let list = namespaces()?;
    for name in names {
        assert!(!list.contains(&name), "{name} left behind");
    }
    Ok(())
}
