//! `bench soak`: continuous pulls through the mirror on the testbed for a fixed time, with every
//! daemon's resident memory, open files and threads sampled from `/proc`; the report shows
//! whether any of them trends upward (a leak) rather than settling.
//!
//! Node 1 holds the images; the other nodes pull them through their mirrors one after the
//! other, forget them (image, snapshots, blobs) and pull again, until the time is up.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    cluster::Cluster,
    images::ImageSpec,
    load::{ProcSample, proc_sample},
    peers::forget_image,
    stats,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Nodes (at least 2): node 1 holds the images, the others pull.
    pub nodes: usize,
    /// How long the pulls go on.
    pub duration: Duration,
    /// Time between samples.
    pub interval: Duration,
    /// Working directory (testbed files).
    pub work: PathBuf,
    /// The daemon binary.
    pub bin: PathBuf,
}

/// One sample of one daemon.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Point {
    /// Seconds since the pulls started.
    pub at_s: f64,
    /// What `/proc` showed.
    pub sample: ProcSample,
}

/// One daemon over the soak.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Series {
    /// Node number.
    pub node: usize,
    /// Every sample, oldest first.
    pub points: Vec<Point>,
}

impl Series {
    fn values(&self, f: impl Fn(&ProcSample) -> u64) -> Vec<(f64, f64)> {
        self.points
            .iter()
            .map(|p| (p.at_s, f(&p.sample) as f64))
            .collect()
    }
}

/// Least-squares slope of `y` over `x` (per unit of `x`); 0 with fewer than two points.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// Median of the values in the first or last `fraction` of the points.
fn edge_median(points: &[(f64, f64)], fraction: f64, last: bool) -> f64 {
    let k = ((points.len() as f64 * fraction).ceil() as usize).clamp(1, points.len().max(1));
    let slice = if last {
        &points[points.len().saturating_sub(k)..]
    } else {
        &points[..k.min(points.len())]
    };
    stats::median(&slice.iter().map(|p| p.1).collect::<Vec<_>>())
}

/// A figure's name, its (seconds, value) points and the unit it is divided by for display.
type Figure = (&'static str, Vec<(f64, f64)>, f64);

/// The whole soak.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Wall time of the pulls, seconds.
    pub seconds: f64,
    /// Pulls that completed (containerd verified every digest).
    pub pulls: usize,
    /// Pulls that failed, with why.
    pub failures: Vec<String>,
    /// One series per daemon.
    pub series: Vec<Series>,
}

impl Report {
    /// A Markdown table: per daemon and figure, the median of the first and last fifth of the
    /// samples and the least-squares trend per minute.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "{:.0} s of pulls, {} pulls completed, {} failed, {} samples per daemon\n\n\
             | daemon | figure | first fifth (median) | last fifth (median) | peak | trend per minute |\n\
             |---|---|---|---|---|---|\n",
            self.seconds,
            self.pulls,
            self.failures.len(),
            self.series.first().map_or(0, |s| s.points.len())
        );
        for s in &self.series {
            let figures: [Figure; 3] = [
                ("RSS (MiB)", s.values(|p| p.rss_kib), 1024.0),
                ("open fds", s.values(|p| p.fds), 1.0),
                ("threads", s.values(|p| p.threads), 1.0),
            ];
            for (name, values, unit) in figures {
                let peak = values.iter().map(|v| v.1).fold(0.0, f64::max);
                out += &format!(
                    "| node {} | {name} | {:.1} | {:.1} | {:.1} | {:+.2} |\n",
                    s.node,
                    edge_median(&values, 0.2, false) / unit,
                    edge_median(&values, 0.2, true) / unit,
                    peak / unit,
                    slope(&values) * 60.0 / unit
                );
            }
        }
        out
    }
}

/// Runs the soak and reports; the testbed is removed afterwards.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    if cfg.nodes < 2 {
        bail!("at least 2 nodes");
    }
    let mut cluster = Cluster::start(cfg.nodes, &cfg.work)?.with_binary(cfg.bin.clone());
    let images = [
        ImageSpec {
            repo: "soak/three".into(),
            tag: "v1".into(),
            layers: vec![8 << 20, 2 << 20, 512 << 10],
            seed: 901,
            platforms: vec![],
        },
        ImageSpec {
            repo: "soak/index".into(),
            tag: "v1".into(),
            layers: vec![4 << 20],
            seed: 902,
            platforms: vec!["amd64".into(), "arm64".into()],
        },
    ]
    .iter()
    .map(|spec| cluster.push(spec))
    .collect::<anyhow::Result<Vec<_>>>()?;
    for image in &images {
        cluster.node(1).pull(&image.reference, false)?;
    }
    for k in 1..=cfg.nodes {
        cluster.start_daemon(k)?;
    }
    for k in 1..=cfg.nodes {
        cluster.wait_ready(k, Duration::from_secs(60))?;
    }
    let pids = cluster.daemon_pids()?;

    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, pids, interval) = (done.clone(), pids.clone(), cfg.interval);
        // Bounded whatever happens to the pulls: the soak's time plus a margin.
        let until = started + cfg.duration + Duration::from_secs(600);
        std::thread::spawn(move || {
            let mut series: Vec<Series> = (1..=pids.len())
                .map(|node| Series {
                    node,
                    points: Vec::new(),
                })
                .collect();
            while !done.load(Ordering::Relaxed) && Instant::now() < until {
                let at_s = started.elapsed().as_secs_f64();
                for (s, pid) in series.iter_mut().zip(&pids) {
                    if let Ok(sample) = proc_sample(*pid) {
                        s.points.push(Point { at_s, sample });
                    }
                }
                // Sleep in short steps so the end of the soak is noticed at once.
                let next = Instant::now() + interval;
                while Instant::now() < next && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            series
        })
    };

    let (mut pulls, mut failures) = (0usize, Vec::new());
    'soak: loop {
        for k in 2..=cfg.nodes {
            for image in &images {
                if started.elapsed() >= cfg.duration {
                    break 'soak;
                }
                let node = cluster.node(k);
                match node.pull(&image.reference, false) {
                    Ok(_) => pulls += 1,
                    Err(e) => failures.push(format!("node {k}, {}: {e:#}", image.reference)),
                }
                if let Err(e) = forget_image(node, image) {
                    failures.push(format!("node {k}, forgetting {}: {e:#}", image.reference));
                }
                // A soak that only fails says nothing about steady state: stop early.
                if failures.len() > 20 {
                    break 'soak;
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let series = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler thread panicked"))?;
    for k in 1..=cfg.nodes {
        cluster.stop_daemon(k);
    }
    Ok(Report {
        seconds,
        pulls,
        failures,
        series,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_a_flat_series() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 7.0)).collect();
        assert_eq!(slope(&flat), 0.0);
        assert_eq!(slope(&[(1.0, 2.0)]), 0.0);
    }

    #[test]
    fn edge_medians_take_the_ends() {
        let v: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, i as f64)).collect();
        assert_eq!(edge_median(&v, 0.2, false), 0.5);
        assert_eq!(edge_median(&v, 0.2, true), 8.5);
    }
}
