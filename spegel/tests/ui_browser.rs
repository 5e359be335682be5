//! The UI in a real headless browser (Debian's chromium over CDP), on the testbed: node 2 runs
//! with `--visualize-enabled`, node 1 with the default (off). The browser runs inside node 2's
//! network namespace, so it can reach nothing but the testbed, and its request log must show
//! nothing but the daemon's own origin.

use std::{path::PathBuf, time::Duration};

use bench::{
    browser::{Browser, artifacts_dir},
    cluster::{Cluster, METRICS_PORT, REGISTRY_PORT},
    images::{BlobKind, ImageSpec},
};

const KIB: u64 = 1 << 10;

/// GET `path` from node `node`'s metrics port, from inside its namespace, keeping the body.
fn get(cluster: &Cluster, node: usize, path: &str) -> anyhow::Result<bench::http::Response> {
    let addr: std::net::SocketAddr =
        format!("{}:{METRICS_PORT}", cluster.network().node_ip(node)).parse()?;
    let path = path.to_string();
    bench::images::in_netns(&cluster.network().node(node), move || {
        bench::http::get(addr, &path, &[])
    })
}

fn metric(cluster: &Cluster, node: usize, name: &str) -> f64 {
    get(cluster, node, "/metrics")
        .map(|r| {
            String::from_utf8_lossy(&r.body)
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(-1.0)
}

fn peer_id(cluster: &Cluster, node: usize) -> anyhow::Result<String> {
    let r = get(cluster, node, "/debug/web/metadata")?;
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    Ok(v["libp2p"]["id"].as_str().unwrap_or_default().to_string())
}

fn save(name: &str, png: &[u8]) -> anyhow::Result<PathBuf> {
    let path = artifacts_dir()?.join(name);
    std::fs::write(&path, png)?;
    Ok(path)
}

#[test]
fn visualize_and_debug_pages_in_a_real_browser() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster =
        Cluster::start(2, dir.path())?.with_binary(PathBuf::from(env!("CARGO_BIN_EXE_spegel")));
    let image = cluster.push(&ImageSpec {
        repo: "ui/app".into(),
        tag: "v1".into(),
        layers: vec![256 * KIB, 64 * KIB],
        seed: 31,
        platforms: vec![],
    })?;
    cluster.start_daemon(1)?;
    let mut args = cluster.registry_args(2);
    args.push("--visualize-enabled".into());
    cluster.start_daemon_with(2, &args)?;
    for k in 1..=2 {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    let node1 = peer_id(&cluster, 1)?;
    assert!(!node1.is_empty());

    // Node 1 pulls from upstream; node 2 waits until it can find the image on node 1.
    cluster.node(1).pull(&image.reference, false)?;
    let ns = cluster.upstream_host().replace(':', "%3A");
    let probe = format!("/v2/{}/manifests/{}?ns={ns}", image.repo, image.tag);
    let reg2 = format!("{}:{REGISTRY_PORT}", cluster.network().node_ip(2));
    bench::process::wait_for("node 2 to find the image", Duration::from_secs(30), || {
        cluster
            .get_from(2, &reg2, &probe, &[])
            .is_ok_and(|r| r.status == 200)
    })?;

    // The UI is off on node 1: 404, and it recorded nothing although it served node 2.
    assert_eq!(get(&cluster, 1, "/visualize")?.status, 404);
    assert_eq!(get(&cluster, 1, "/visualize/events")?.status, 404);
    assert!(
        metric(
            &cluster,
            1,
            "http_request_duration_seconds_count{code=\"200\",handler=\"/v2/*\""
        ) > 0.0
    );
    assert_eq!(metric(&cluster, 1, "spegel_visualize_events_total"), 0.0);

    let origin = format!("http://{}:{METRICS_PORT}", cluster.network().node_ip(2));
    let log = dir.path().join("chromium.log");
    let mut browser = Browser::launch(Some(&cluster.network().node(2)), &log)?;
    let vis = browser.new_page()?;
    browser.navigate(&vis, &format!("{origin}/visualize"))?;
    browser.wait_until(
        &vis,
        "document.getElementById('conn') && document.getElementById('conn').textContent === 'live' && document.body.dataset.rendered !== undefined",
        Duration::from_secs(15),
    )?;

    // The measure tool on node 2: node 1 is the provider, and every blob comes through
    // node 2's own registry from node 1.
    let dbg = browser.new_page()?;
    browser.navigate(&dbg, &format!("{origin}/debug/web/"))?;
    browser.wait_until(
        &dbg,
        "document.getElementById('peer-count') && document.getElementById('peer-count').textContent === '1'",
        Duration::from_secs(15),
    )?;
    browser.eval(
        &dbg,
        &format!(
            "document.getElementById('image').value = {}; document.getElementById('measure-button').click(); true",
            serde_json::to_string(&image.reference)?
        ),
    )?;
    browser.wait_until(
        &dbg,
        "document.getElementById('measure-result').dataset.done === '1'",
        Duration::from_secs(30),
    )?;
    let measured = browser.eval(
        &dbg,
        "JSON.stringify({status: document.getElementById('measure-result').dataset.status, \
          lookup: [...document.querySelectorAll('#lookup tbody tr')].map(r => r.dataset.peer), \
          pull: [...document.querySelectorAll('#pull tbody tr')].map(r => [r.dataset.kind, r.dataset.source, Number(r.dataset.size)])})",
    )?;
    let measured: serde_json::Value = serde_json::from_str(measured.as_str().unwrap_or("{}"))?;
    assert_eq!(measured["status"], "200", "{measured}");
    assert_eq!(measured["lookup"], serde_json::json!([node1]), "{measured}");
    let pulled = measured["pull"].as_array().cloned().unwrap_or_default();
    // Manifest, config and both layers, every one served by node 1 with its exact size.
    assert_eq!(pulled.len(), image.blobs.len(), "{measured}");
    for (row, blob) in pulled.iter().zip(&image.blobs) {
        assert_eq!(row[1], node1.as_str(), "{measured}");
        assert_eq!(row[2].as_u64(), Some(blob.size), "{measured}");
    }
    let png = browser.screenshot(&dbg)?;
    save("debug-web.png", &png)?;
    assert!(
        browser.pixel_variance(&dbg, &png)? > 50.0,
        "debug page screenshot is blank"
    );

    // A real pull through node 2's mirror shows up live in the graph and the feed.
    cluster.node(2).pull(&image.reference, false)?;
    let layers = image.of_kind(BlobKind::Layer).count() + image.of_kind(BlobKind::Config).count();
    let check = format!(
        "(() => {{ const p = {peer}; \
           const out = [...document.querySelectorAll('#feed tbody tr[data-dir=out][data-outcome=forwarded]')].filter(r => r.dataset.peer === p).length; \
           const inn = [...document.querySelectorAll('#feed tbody tr[data-dir=in][data-outcome=forwarded]')].filter(r => r.dataset.peer === p).length; \
           const edge = [...document.querySelectorAll('#graph g.edge[data-dir=out]')].find(g => g.dataset.peer === p && g.dataset.outcome === 'forwarded'); \
           const pull = document.querySelector('#pulls details[data-image]'); \
           return out >= {n} && inn >= {n} && edge && Number(edge.dataset.bytes) > 0 && pull ? JSON.stringify({{out, inn, bytes: edge.dataset.bytes}}) : ''; }})()",
        peer = serde_json::to_string(&node1)?,
        n = layers * 2,
    );
    let seen = browser.wait_until(&vis, &check, Duration::from_secs(10))?;
    eprintln!("visualize shows {seen}");
    let peers_row = browser.wait_until(
        &vis,
        &format!(
            "(() => {{ const r = document.querySelector('#peers tbody tr[data-peer=\"' + {} + '\"]'); return r ? r.dataset.preferred : ''; }})()",
            serde_json::to_string(&node1)?
        ),
        Duration::from_secs(10),
    )?;
    assert_eq!(peers_row, "1", "the only peer is the preferred one");
    // The filter hides outgoing edges when only incoming requests are shown.
    let filtered = browser.eval(
        &vis,
        "(async () => { const s = document.getElementById('filter-dir'); s.value = 'in'; s.dispatchEvent(new Event('change')); \
          await new Promise(r => setTimeout(r, 300)); \
          const n = document.querySelectorAll('#graph g.edge[data-dir=out]').length; \
          s.value = 'both'; s.dispatchEvent(new Event('change')); await new Promise(r => setTimeout(r, 300)); return n; })()",
    )?;
    assert_eq!(filtered, serde_json::json!(0));
    let png = browser.screenshot(&vis)?;
    save("visualize.png", &png)?;
    assert!(
        browser.pixel_variance(&vis, &png)? > 50.0,
        "visualize screenshot is blank"
    );
    assert!(metric(&cluster, 2, "spegel_visualize_events_total") > 0.0);

    // Nothing but the daemon was contacted, and the pages ran without script errors.
    for page in [&vis, &dbg] {
        let requests = browser.requests(page);
        assert!(!requests.is_empty());
        for url in &requests {
            assert!(
                url.starts_with(&format!("{origin}/")),
                "request outside the daemon: {url}"
            );
        }
        let errors = browser.errors(page);
        assert!(errors.is_empty(), "page errors: {errors:?}");
    }
    // The visualize page still holds its event stream open: shutdown must not wait on it.
    for k in [2, 1] {
        let status = cluster.stop_daemon(k).expect("daemon running");
        assert!(
            status.success(),
            "SIGTERM with an open event stream must exit 0: {status}"
        );
    }
    browser.close();
    Ok(())
}
