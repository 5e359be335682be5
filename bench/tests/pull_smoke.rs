//! `bench pull` end to end at tiny sizes: every node of every setup pulls, the content is what
//! was pushed, upstream bytes are counted, and the JSON, table and chart are written.

use std::collections::HashSet;

use bench::pull::{Report, Scenario, Setup};

#[test]
fn tiny_pull_benchmark_is_complete_and_consistent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let nodes = 3;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["pull", "--nodes", "3", "--sizes", "1MB", "--layers", "1,2"])
        .args([
            "--repetitions",
            "1",
            "--rate",
            "200mbit",
            "--batch-gap-ms",
            "100",
        ])
        .args(["--pull-timeout-s", "60", "--output"])
        .arg(&out)
        .arg("--work")
        .arg(dir.path().join("work"))
        .env("SPEGEL_BIN", bench::daemon::spegel_bin())
        .status()?;
    assert!(status.success(), "bench pull exited with {status}");

    let report: Report = serde_json::from_slice(&std::fs::read(out.join("pull.json"))?)?;
    let cases = ["1MB-1", "1MB-2"];
    // Every setup × case × scenario ran once, on every node.
    assert_eq!(report.runs.len(), Setup::ALL.len() * cases.len() * 2);
    for setup in Setup::ALL {
        for case in cases {
            for scenario in Scenario::ALL {
                let n = report
                    .runs
                    .iter()
                    .filter(|r| r.setup == setup && r.case == case && r.scenario == scenario)
                    .count();
                assert_eq!(n, 1, "{setup} {case} {scenario}");
            }
        }
    }
    for run in &report.runs {
        let what = format!("{} {} {}", run.setup, run.case, run.scenario);
        let pulled: HashSet<usize> = run.pulls.iter().map(|p| p.node).collect();
        assert_eq!(pulled, (1..=nodes).collect(), "{what}: nodes");
        for p in &run.pulls {
            assert!(p.ok && p.digest_ok, "{what} node {}: {:?}", p.node, p.error);
            assert_eq!(p.digest.as_deref(), Some(run.digest.as_str()), "{what}");
            assert!(p.seconds > 0.0 && p.start_s + p.seconds <= run.cluster_seconds + 1e-6);
        }
        // The image crossed the upstream link at least once, and never more than once per
        // node, doubled for the proxy cache (which fetches a blob once per concurrent request
        // and once more to store it), plus headers.
        assert!(
            run.upstream_tx_bytes >= run.image_bytes,
            "{what}: upstream bytes"
        );
        assert!(
            run.upstream_tx_bytes < 2 * (nodes as u64 + 1) * run.image_bytes * 11 / 10,
            "{what}: {} upstream bytes for a {}-byte image",
            run.upstream_tx_bytes,
            run.image_bytes
        );
        let batches: HashSet<usize> = run.pulls.iter().map(|p| p.batch).collect();
        match run.scenario {
            Scenario::Create => assert_eq!(batches.len(), 1, "{what}"),
            // 20 % of 3 nodes rounds up to one node per batch.
            Scenario::Update => assert_eq!(batches.len(), nodes, "{what}"),
        }
        match run.setup {
            Setup::Baseline => {
                assert!(run.processes.is_empty());
                // Without a mirror every node fetches the whole image from upstream.
                assert!(
                    run.upstream_tx_bytes >= nodes as u64 * run.image_bytes,
                    "{what}"
                );
            }
            Setup::Spegel => {
                assert_eq!(run.processes.len(), nodes, "{what}: one daemon per node");
                assert!(run.processes.iter().all(|p| p.vm_hwm_kib > 0));
            }
            Setup::CentralCache => {
                assert_eq!(run.processes.len(), 1, "{what}: the cache");
                // The nodes got the image from the cache, not around it.
                assert!(
                    run.cache_tx_bytes >= nodes as u64 * run.image_bytes,
                    "{what}"
                );
            }
        }
    }
    // In a rolling update spegel serves later batches from peers: upstream sends less than
    // one copy per node.
    for case in cases {
        let spegel_update = report
            .runs
            .iter()
            .find(|r| r.setup == Setup::Spegel && r.case == case && r.scenario == Scenario::Update)
            .expect("spegel update ran");
        assert!(
            spegel_update.upstream_tx_bytes < nodes as u64 * spegel_update.image_bytes,
            "{case}: spegel's update fetched {} bytes upstream",
            spegel_update.upstream_tx_bytes
        );
        assert!(spegel_update.nodes_tx_bytes >= spegel_update.image_bytes);
    }
    // Pushed images match what the runs pulled.
    let digests: HashSet<&str> = report.images.iter().map(|i| i.digest.as_str()).collect();
    assert_eq!(digests.len(), cases.len() * 2, "every image is distinct");
    assert!(
        report
            .runs
            .iter()
            .all(|r| digests.contains(r.digest.as_str()))
    );

    assert_eq!(report.summary.len(), report.runs.len());
    let table = std::fs::read_to_string(out.join("pull.md"))?;
    for s in &report.summary {
        assert_eq!(s.failed, 0);
        let row = format!("| {} | {} | {} |", s.case, s.scenario, s.setup);
        assert!(table.contains(&row), "table lacks {row}");
    }
    let chart = std::fs::read_to_string(out.join("pull.svg"))?;
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    for setup in Setup::ALL {
        assert!(
            chart.contains(&format!(">{setup}</text>")),
            "legend lacks {setup}"
        );
    }
    Ok(())
}
