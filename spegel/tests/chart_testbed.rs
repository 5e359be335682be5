//! The Helm chart's rendered DaemonSet commands, run for real on the testbed: the init
//! container's `configuration` and the main container's `registry`, with the chart's args and
//! env, host paths remapped to each node's containerd, and a pull through the mirror.

use std::{path::PathBuf, process::Command, time::Duration};

use bench::{
    cluster::{Cluster, REGISTRY_PORT},
    images::ImageSpec,
};

/// Renders the chart (default values, DEBUG logs) and returns the init and main args with
/// `$(NODE_IP)` expanded.
fn rendered_args(node_ip: &str) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = r#"
import json, sys
sys.path.insert(0, "charts/tests")
import render
m = render.render({"spegel": {"logLevel": "DEBUG"}})
args = render.daemonset_args(m, {"NODE_IP": sys.argv[1]})
spec = render.daemonset(m)["spec"]["template"]["spec"]
env = sorted({e["name"] for c in spec.get("initContainers", []) + spec["containers"] for e in c.get("env", [])})
print(json.dumps({"configuration": args["configuration"], "registry": args["registry"], "env": env}))
"#;
    let out = Command::new("python3")
        .current_dir(&root)
        .args(["-c", script, node_ip])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rendering the chart failed (pip install -r charts/tests/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let list = |k: &str| -> Vec<String> {
        doc[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok((list("configuration"), list("registry"), list("env")))
}

#[test]
fn chart_daemonset_commands_work_on_the_testbed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster =
        Cluster::start(2, dir.path())?.with_binary(PathBuf::from(env!("CARGO_BIN_EXE_spegel")));
    let image = cluster.push(&ImageSpec {
        repo: "chart/app".into(),
        tag: "v1".into(),
        layers: vec![1 << 20, 300_000],
        seed: 31,
        platforms: vec![],
    })?;
    for k in 1..=2 {
        let ip = cluster.network().node_ip(k);
        let (configuration, registry, env) = rendered_args(&ip)?;
        assert_eq!(env, ["NODE_IP"], "the only env the containers need");
        assert_eq!(
            configuration.first().map(String::as_str),
            Some("configuration")
        );
        assert_eq!(registry.first().map(String::as_str), Some("registry"));
        let node = cluster.node(k);
        let data = dir.path().join(format!("node{k}/spegel-data"));
        // Host paths of a real node, mapped to this node's containerd; the NodePort (what
        // kube-proxy maps to the pod's registry port) and the headless bootstrap Service
        // (which resolves to the pods) mapped to what exists here.
        let remap = |arg: &String| -> String {
            arg.replace("/etc/containerd/certs.d", &node.certs_d().to_string_lossy())
                .replace(
                    "/run/containerd/containerd.sock",
                    &node.socket().to_string_lossy(),
                )
                .replace(
                    "/var/lib/containerd/io.containerd.content.v1.content",
                    &node.content_path().to_string_lossy(),
                )
                .replace("/var/lib/spegel", &data.to_string_lossy())
                .replace(":30020", &format!(":{REGISTRY_PORT}"))
        };
        let configuration: Vec<String> = configuration.iter().map(remap).collect();
        let registry: Vec<String> = registry
            .iter()
            .map(remap)
            .map(|a| match a.strip_prefix("--dns-bootstrap-domain=") {
                Some(_) => "--dns-bootstrap-domain=10.99.0.1".to_string(),
                None => a,
            })
            .collect();
        cluster.run_in_node(k, &configuration)?;
        let hosts = std::fs::read_to_string(node.certs_d().join("_default/hosts.toml"))?;
        assert!(
            hosts.contains(&format!("[host.'http://{ip}:{REGISTRY_PORT}']")),
            "{hosts}"
        );
        cluster.spawn_daemon(k, &registry)?;
    }
    for k in 1..=2 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    cluster.node(1).pull(&image.reference, false)?;
    let node2 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(2));
    let probe = format!(
        "/v2/{}/manifests/{}?ns={}",
        image.repo,
        image.tag,
        cluster.upstream_host().replace(':', "%3A")
    );
    bench::process::wait_for("advertisement", Duration::from_secs(30), || {
        cluster
            .get_from(2, &node2, &probe, &[])
            .is_ok_and(|r| r.status == 200)
    })?;
    cluster.upstream().pause();
    cluster.node(2).pull(&image.reference, false)?;
    for blob in &image.blobs {
        assert_eq!(
            std::fs::metadata(cluster.node(2).blob_path(&blob.digest))?.len(),
            blob.size
        );
    }
    // The persisted identity the chart asks for exists.
    assert!(dir.path().join("node2/spegel-data/private.key").exists());
    for k in 1..=2 {
        assert!(cluster.stop_daemon(k).is_some_and(|s| s.success()));
    }
    Ok(())
}
