//! Summaries, the Markdown table and the SVG chart of a `bench pull` run.

use std::path::{Path, PathBuf};

use super::{Report, Scenario, ScenarioRun, Setup};
use crate::stats;

/// Figures of one setup, scenario and case, over all repetitions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Setup.
    pub setup: Setup,
    /// Scenario.
    pub scenario: Scenario,
    /// Case label.
    pub case: String,
    /// Bytes of one image of this case.
    pub image_bytes: u64,
    /// Node pulls measured (nodes × repetitions).
    pub pulls: usize,
    /// Pulls that failed or left content different from what was pushed.
    pub failed: usize,
    /// Median pull duration over every node and repetition, seconds.
    pub p50_s: f64,
    /// 95th percentile, seconds.
    pub p95_s: f64,
    /// Slowest pull, seconds.
    pub max_s: f64,
    /// Mean, seconds.
    pub mean_s: f64,
    /// Median over repetitions of the time until every node had the image, seconds.
    pub cluster_s: f64,
    /// Median over repetitions of the bytes the upstream sent.
    pub upstream_bytes: f64,
    /// `upstream_bytes` in images' worth (nodes' worth without any mirror).
    pub upstream_images: f64,
    /// Median over repetitions of the mirror processes' CPU seconds, all nodes together.
    pub mirror_cpu_s: f64,
    /// Largest peak resident memory of one mirror process, MiB.
    pub mirror_peak_rss_mib: f64,
}

/// Groups `runs` by case, scenario and setup, in the order they first appear.
pub fn summarise(runs: &[ScenarioRun]) -> Vec<Summary> {
    let mut keys: Vec<(String, Scenario, Setup)> = Vec::new();
    for r in runs {
        let key = (r.case.clone(), r.scenario, r.setup);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    // Cases in first-seen order, then scenario, then setup (report order).
    let mut cases: Vec<String> = Vec::new();
    for (c, _, _) in &keys {
        if !cases.contains(c) {
            cases.push(c.clone());
        }
    }
    keys.sort_by_key(|(c, sc, se)| {
        (
            cases.iter().position(|x| x == c),
            Scenario::ALL.iter().position(|x| x == sc),
            Setup::ALL.iter().position(|x| x == se),
        )
    });
    keys.into_iter()
        .map(|(case, scenario, setup)| {
            let group: Vec<&ScenarioRun> = runs
                .iter()
                .filter(|r| r.case == case && r.scenario == scenario && r.setup == setup)
                .collect();
            let durations: Vec<f64> = group
                .iter()
                .flat_map(|r| r.pulls.iter().filter(|p| p.ok).map(|p| p.seconds))
                .collect();
            let per_rep = |f: &dyn Fn(&ScenarioRun) -> f64| {
                stats::median(&group.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let image_bytes = group.first().map_or(0, |r| r.image_bytes);
            let upstream_bytes = per_rep(&|r| r.upstream_tx_bytes as f64);
            Summary {
                setup,
                scenario,
                case,
                image_bytes,
                pulls: group.iter().map(|r| r.pulls.len()).sum(),
                failed: group
                    .iter()
                    .flat_map(|r| &r.pulls)
                    .filter(|p| !p.ok || !p.digest_ok)
                    .count(),
                p50_s: stats::median(&durations),
                p95_s: stats::percentile(&durations, 95.0),
                max_s: stats::percentile(&durations, 100.0),
                mean_s: if durations.is_empty() {
                    0.0
                } else {
                    durations.iter().sum::<f64>() / durations.len() as f64
                },
                cluster_s: per_rep(&|r| r.cluster_seconds),
                upstream_bytes,
                upstream_images: upstream_bytes / (image_bytes.max(1) as f64),
                mirror_cpu_s: per_rep(&|r| r.processes.iter().map(|p| p.cpu_seconds).sum()),
                mirror_peak_rss_mib: group
                    .iter()
                    .flat_map(|r| &r.processes)
                    .map(|p| p.vm_hwm_kib as f64 / 1024.0)
                    .fold(0.0, f64::max),
            }
        })
        .collect()
}

/// For one case and scenario: the fastest setup by median pull and how it compares.
#[derive(Debug, Clone, PartialEq)]
pub struct Winner {
    /// Case label.
    pub case: String,
    /// Scenario.
    pub scenario: Scenario,
    /// Setup with the lowest median pull.
    pub fastest: Setup,
    /// Its median, seconds.
    pub p50_s: f64,
    /// Baseline median ÷ fastest median (None when the baseline did not run).
    pub vs_baseline: Option<f64>,
    /// Runner-up setup and its median ÷ the fastest median.
    pub vs_next: Option<(Setup, f64)>,
    /// Setups with the shortest time until the whole cluster had the image (within 2 %).
    pub fastest_cluster: Vec<Setup>,
    /// Setups that fetched the fewest bytes from upstream (within 2 %: a tie).
    pub least_upstream: Vec<Setup>,
}

/// The winner of every case and scenario present in `summary`.
pub fn winners(summary: &[Summary]) -> Vec<Winner> {
    let mut out = Vec::new();
    let mut seen: Vec<(String, Scenario)> = Vec::new();
    for s in summary {
        let key = (s.case.clone(), s.scenario);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let mut group: Vec<&Summary> = summary
            .iter()
            .filter(|x| x.case == s.case && x.scenario == s.scenario && x.pulls > x.failed)
            .collect();
        if group.is_empty() {
            continue;
        }
        group.sort_by(|a, b| a.p50_s.total_cmp(&b.p50_s));
        let best = group[0];
        let ratio = |x: f64| x / best.p50_s.max(1e-9);
        // Differences under 2 % are within what counters and clocks can tell apart.
        let by = |f: fn(&Summary) -> f64| {
            let min = group.iter().map(|x| f(x)).fold(f64::INFINITY, f64::min);
            let mut best: Vec<Setup> = group
                .iter()
                .filter(|x| f(x) <= min * 1.02)
                .map(|x| x.setup)
                .collect();
            best.sort_by_key(|s| Setup::ALL.iter().position(|x| x == s));
            best
        };
        out.push(Winner {
            case: s.case.clone(),
            scenario: s.scenario,
            fastest: best.setup,
            p50_s: best.p50_s,
            vs_baseline: group
                .iter()
                .find(|x| x.setup == Setup::Baseline)
                .map(|b| ratio(b.p50_s)),
            vs_next: group.get(1).map(|x| (x.setup, ratio(x.p50_s))),
            fastest_cluster: by(|x| x.cluster_s),
            least_upstream: by(|x| x.upstream_bytes),
        });
    }
    out
}

fn config_text(report: &Report) -> String {
    let c = &report.config;
    let rate = c["rate"].as_str().unwrap_or("unshaped");
    let sizes: Vec<String> = c["sizes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["label"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let scale = c["scale"].as_u64().unwrap_or(1);
    format!(
        "{} nodes, upstream link shaped to {rate} (tc tbf), images {}{} × {} layer(s), {} repetition(s), update batches of {}% with {:.1} s between batches; {} CPUs, kernel {}, {}.",
        c["nodes"],
        sizes.join(", "),
        if scale > 1 {
            format!(" (divided by {scale})")
        } else {
            String::new()
        },
        c["layer_counts"]
            .as_array()
            .map(|a| a
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("/"))
            .unwrap_or_default(),
        c["repetitions"],
        c["update_batch_percent"],
        c["batch_gap"].as_f64().unwrap_or(0.0),
        report.environment.cpus,
        report.environment.kernel,
        report.environment.containerd,
    )
}

/// The Markdown report: configuration, one row per case × scenario × setup, and the winners.
pub fn markdown(report: &Report) -> String {
    let mut out = format!(
        "{}\n\nPull = `ctr images pull` (fetch, unpack, image record) per node. Upstream bytes = the upstream namespace's `eth0` tx counter (TCP/IP overhead included); ×image = that in whole images. Mirror CPU = all spegel daemons (or the cache) together during the scenario; RSS = largest `VmHWM` of one mirror process.\n\n",
        config_text(report)
    );
    out.push_str("| image | scenario | setup | pull p50 (s) | mean (s) | p95 (s) | max (s) | cluster (s) | upstream (MB) | ×image | mirror CPU (s) | mirror peak RSS (MiB) | failed |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in &report.summary {
        let mirror = s.setup != Setup::Baseline;
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {} | {} |\n",
            s.case,
            s.scenario,
            s.setup,
            s.p50_s,
            s.mean_s,
            s.p95_s,
            s.max_s,
            s.cluster_s,
            s.upstream_bytes / 1e6,
            s.upstream_images,
            if mirror {
                format!("{:.2}", s.mirror_cpu_s)
            } else {
                "–".into()
            },
            if mirror {
                format!("{:.0}", s.mirror_peak_rss_mib)
            } else {
                "–".into()
            },
            if s.failed > 0 {
                format!("**{}/{}**", s.failed, s.pulls)
            } else {
                format!("0/{}", s.pulls)
            },
        ));
    }
    out.push_str("\n| image | scenario | fastest (p50) | p50 (s) | vs baseline | vs runner-up | whole cluster first | fewest upstream bytes |\n|---|---|---|---|---|---|---|---|\n");
    for w in winners(&report.summary) {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} |\n",
            w.case,
            w.scenario,
            w.fastest,
            w.p50_s,
            match (w.fastest, w.vs_baseline) {
                (Setup::Baseline, _) | (_, None) => "–".to_string(),
                (_, Some(r)) => format!("{r:.2}× faster"),
            },
            w.vs_next
                .map_or("–".into(), |(s, r)| format!("{r:.2}× ({s})")),
            join(&w.fastest_cluster),
            join(&w.least_upstream),
        ));
    }
    out
}

fn join(setups: &[Setup]) -> String {
    setups
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(" = ")
}

const COLOURS: [(Setup, &str); 3] = [
    (Setup::Baseline, "#9e9e9e"),
    (Setup::Spegel, "#1f77b4"),
    (Setup::CentralCache, "#ff7f0e"),
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `v` (1, 2 or 5 times a power of ten).
pub fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&x| x >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * p)
}

/// Tick step for an axis from 0 to `max` (a [`nice_ceiling`]): 4 or 5 round steps.
fn tick_step(max: f64) -> f64 {
    let p = 10f64.powf(max.log10().floor());
    if (max / p).round() == 2.0 {
        max / 4.0
    } else {
        max / 5.0
    }
}

fn format_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

/// Splits `text` into lines of at most `columns` characters at spaces.
fn wrap(text: &str, columns: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= columns => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// Which figure a chart panel shows.
#[derive(Clone, Copy)]
enum Metric {
    /// Median per-node pull with a whisker to p95.
    NodePull,
    /// Time until every node had the image.
    Cluster,
}

type Figure = fn(&Summary) -> f64;

/// The chart: one panel per scenario and metric (per-node pull: median bar, p95 whisker;
/// whole cluster: time until every node had the image); per case a group of bars per setup.
pub fn svg(report: &Report) -> String {
    let cases: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for s in &report.summary {
            if !v.contains(&s.case) {
                v.push(s.case.clone());
            }
        }
        v
    };
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|x| report.summary.iter().any(|s| s.setup == *x))
        .collect();
    let bar = 18.0;
    let group_w = bar * setups.len().max(1) as f64 + 24.0;
    let plot_w = (group_w * cases.len().max(1) as f64).max(300.0);
    let panel_w = 70.0 + plot_w;
    let (plot_h, panel_h) = (200.0, 270.0);
    let top = 60.0;
    let width = (panel_w * 2.0 + 20.0).max(760.0);
    let notes = wrap(&config_text(report), (width / 6.5) as usize);
    let height = top + 2.0 * panel_h + 16.0 * notes.len() as f64 + 10.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">Cluster pulls: seconds per setup, scenario and image (lower is better)</text>\n"
    );
    let mut lx = 10.0;
    for &s in &setups {
        let colour = COLOURS.iter().find(|c| c.0 == s).map_or("#000", |c| c.1);
        out.push_str(&format!(
            "<rect x=\"{lx}\" y=\"32\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{}\" y=\"42\">{s}</text>\n",
            lx + 16.0
        ));
        lx += 110.0;
    }
    let panels = [
        (Scenario::Create, Metric::NodePull),
        (Scenario::Update, Metric::NodePull),
        (Scenario::Create, Metric::Cluster),
        (Scenario::Update, Metric::Cluster),
    ];
    for (pi, (scenario, metric)) in panels.into_iter().enumerate() {
        let rows: Vec<_> = report
            .summary
            .iter()
            .filter(|s| s.scenario == scenario)
            .collect();
        let (value, whisker, title): (Figure, Option<Figure>, String) = match metric {
            Metric::NodePull => (
                |s| s.p50_s,
                Some(|s| s.p95_s),
                format!("{scenario}: pull per node (bar p50, line p95)"),
            ),
            Metric::Cluster => (
                |s| s.cluster_s,
                None,
                match scenario {
                    Scenario::Create => "create: until every node has the image".to_string(),
                    Scenario::Update => "update: until every node has it (gaps incl.)".to_string(),
                },
            ),
        };
        let ymax = nice_ceiling(
            rows.iter()
                .map(|s| whisker.map_or(value(s), |w| w(s).max(value(s))))
                .fold(0.0, f64::max),
        );
        let step = tick_step(ymax);
        let x0 = 10.0 + (pi % 2) as f64 * panel_w + 50.0;
        let ptop = top + (pi / 2) as f64 * panel_h + 20.0;
        let y0 = ptop + plot_h;
        let scale = |v: f64| plot_h * (v / ymax).clamp(0.0, 1.0);
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" font-weight=\"bold\">{title}</text>\n",
            x0 - 40.0,
            ptop - 8.0
        ));
        for t in 0..=((ymax / step).round() as usize) {
            let v = step * t as f64;
            let y = y0 - scale(v);
            out.push_str(&format!(
                "<line x1=\"{x0}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                x0 + plot_w,
                x0 - 4.0,
                y + 4.0,
                format_tick(v, step)
            ));
        }
        for (ci, case) in cases.iter().enumerate() {
            let gx = x0 + ci as f64 * group_w + 12.0;
            for (si, &setup) in setups.iter().enumerate() {
                let Some(s) = rows.iter().find(|s| s.case == *case && s.setup == setup) else {
                    continue;
                };
                let colour = COLOURS
                    .iter()
                    .find(|c| c.0 == setup)
                    .map_or("#000", |c| c.1);
                let x = gx + si as f64 * bar;
                let h = scale(value(s));
                out.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{colour}\"><title>{} {scenario} {setup}: {:.2} s</title></rect>\n",
                    y0 - h,
                    bar - 2.0,
                    escape(case),
                    value(s),
                ));
                if let Some(w) = whisker {
                    let cx = x + bar / 2.0 - 1.0;
                    out.push_str(&format!(
                        "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
                        y0 - h,
                        y0 - scale(w(s)),
                    ));
                }
            }
            out.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                gx + bar * setups.len() as f64 / 2.0,
                y0 + 16.0,
                escape(case)
            ));
        }
        out.push_str(&format!(
            "<line x1=\"{x0}\" x2=\"{x0}\" y1=\"{ptop}\" y2=\"{y0}\" stroke=\"#333\"/><line x1=\"{x0}\" x2=\"{:.1}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#333\"/>\n",
            x0 + plot_w
        ));
    }
    for (i, line) in notes.iter().enumerate() {
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\" fill=\"#555\">{}</text>\n",
            top + 2.0 * panel_h + 16.0 * i as f64,
            escape(line)
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// Writes `pull.json`, `pull.md` and `pull.svg` into `dir` and returns their paths.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir)?;
    let paths = [
        dir.join("pull.json"),
        dir.join("pull.md"),
        dir.join("pull.svg"),
    ];
    std::fs::write(&paths[0], serde_json::to_vec_pretty(report)?)?;
    std::fs::write(&paths[1], markdown(report))?;
    std::fs::write(&paths[2], svg(report))?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::{Environment, NodePull, ProcessUsage};

    fn run(setup: Setup, scenario: Scenario, rep: usize, secs: &[f64], up: u64) -> ScenarioRun {
        ScenarioRun {
            setup,
            scenario,
            case: "10MB-1".into(),
            rep,
            reference: "r".into(),
            digest: "d".into(),
            image_bytes: 1000,
            pulls: secs
                .iter()
                .enumerate()
                .map(|(i, &s)| NodePull {
                    node: i + 1,
                    batch: 0,
                    start_s: 0.0,
                    seconds: s,
                    ok: s >= 0.0,
                    digest: Some("d".into()),
                    digest_ok: s >= 0.0,
                    error: None,
                })
                .collect(),
            cluster_seconds: secs.iter().copied().fold(0.0, f64::max),
            upstream_tx_bytes: up,
            cache_tx_bytes: 0,
            nodes_tx_bytes: 0,
            processes: if setup == Setup::Baseline {
                vec![]
            } else {
                vec![
                    ProcessUsage {
                        role: "x".into(),
                        node: Some(1),
                        pid: 1,
                        cpu_seconds: 0.5,
                        vm_hwm_kib: 2048,
                    },
                    ProcessUsage {
                        role: "x".into(),
                        node: Some(2),
                        pid: 2,
                        cpu_seconds: 0.25,
                        vm_hwm_kib: 4096,
                    },
                ]
            },
        }
    }

    fn report(runs: Vec<ScenarioRun>) -> Report {
        let summary = summarise(&runs);
        Report {
            config: serde_json::json!({"nodes": 3, "rate": "200mbit", "sizes": [{"label": "10MB", "bytes": 10}], "scale": 1, "layer_counts": [1], "repetitions": 2, "update_batch_percent": 20, "batch_gap": 1.0}),
            environment: Environment {
                cpus: 2,
                kernel: "k".into(),
                containerd: "c".into(),
                spegel_bin: "s".into(),
                started_unix: 0,
                total_seconds: 0.0,
            },
            images: vec![],
            runs,
            summary,
        }
    }

    #[test]
    fn summaries_pool_nodes_and_repetitions() {
        let runs = vec![
            run(Setup::Spegel, Scenario::Update, 0, &[1.0, 2.0, 3.0], 1000),
            run(Setup::Baseline, Scenario::Create, 0, &[4.0, 5.0, 6.0], 3000),
            run(
                Setup::Baseline,
                Scenario::Create,
                1,
                &[7.0, 8.0, -1.0],
                3500,
            ),
            run(Setup::Spegel, Scenario::Create, 0, &[2.0, 2.0, 2.0], 3000),
        ];
        let s = summarise(&runs);
        let order: Vec<(Scenario, Setup)> = s.iter().map(|x| (x.scenario, x.setup)).collect();
        assert_eq!(
            order,
            [
                (Scenario::Create, Setup::Baseline),
                (Scenario::Create, Setup::Spegel),
                (Scenario::Update, Setup::Spegel)
            ]
        );
        let base = &s[0];
        assert_eq!(base.pulls, 6);
        assert_eq!(base.failed, 1);
        assert_eq!(base.p50_s, 6.0);
        assert_eq!(base.max_s, 8.0);
        assert_eq!(base.mean_s, 6.0);
        assert_eq!(base.cluster_s, 7.0);
        assert_eq!(base.upstream_bytes, 3250.0);
        assert_eq!(base.upstream_images, 3.25);
        assert_eq!(base.mirror_cpu_s, 0.0);
        assert_eq!(s[1].mirror_cpu_s, 0.75);
        assert_eq!(s[1].mirror_peak_rss_mib, 4.0);
    }

    #[test]
    fn winners_compare_against_baseline_and_runner_up() {
        let runs = vec![
            run(Setup::Baseline, Scenario::Update, 0, &[4.0, 4.0, 4.0], 3000),
            run(Setup::Spegel, Scenario::Update, 0, &[1.0, 1.0, 9.0], 1000),
            run(
                Setup::CentralCache,
                Scenario::Update,
                0,
                &[2.0, 2.0, 2.0],
                1200,
            ),
        ];
        let w = winners(&summarise(&runs));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].fastest, Setup::Spegel);
        assert_eq!(w[0].vs_baseline, Some(4.0));
        assert_eq!(w[0].vs_next, Some((Setup::CentralCache, 2.0)));
        assert_eq!(w[0].fastest_cluster, [Setup::CentralCache]);
        assert_eq!(w[0].least_upstream, [Setup::Spegel]);
        // Within 2 % is a tie.
        let runs = vec![
            run(Setup::Baseline, Scenario::Create, 0, &[4.0], 3000),
            run(Setup::Spegel, Scenario::Create, 0, &[3.0], 3050),
        ];
        let w = winners(&summarise(&runs));
        assert_eq!(w[0].least_upstream, [Setup::Baseline, Setup::Spegel]);
        assert_eq!(w[0].fastest_cluster, [Setup::Spegel]);
    }

    #[test]
    fn outputs_name_every_row() {
        let r = report(vec![
            run(Setup::Baseline, Scenario::Create, 0, &[4.0, 5.0], 2000),
            run(Setup::CentralCache, Scenario::Update, 0, &[1.0, 2.0], 1000),
        ]);
        let md = markdown(&r);
        assert!(md.contains("| 10MB-1 | create | baseline | 4.50 | 4.50 | 4.95 | 5.00 |"));
        assert!(md.contains("| 10MB-1 | update | central-cache | 1.50 |"));
        assert!(md.contains("3 nodes, upstream link shaped to 200mbit"));
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Legend entries, then a bar per summary row in each of the two metrics' panels.
        assert_eq!(svg.matches("<rect x=").count(), 2 + 2 * 2);
        assert!(svg.contains("central-cache"));
    }

    #[test]
    fn axis_ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(42.0), 50.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("toolongword x", 4), ["toolongword", "x"]);
        assert_eq!(tick_step(2.0), 0.5);
        assert_eq!(tick_step(50.0), 10.0);
        assert!((tick_step(0.5) - 0.1).abs() < 1e-12);
        assert_eq!(format_tick(1.5, 0.5), "1.5");
        assert_eq!(format_tick(0.1, 0.05), "0.10");
        assert_eq!(format_tick(40.0, 10.0), "40");
    }
}
