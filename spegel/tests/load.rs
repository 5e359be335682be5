//! 500 concurrent blob GETs on the testbed (from the content directory, forwarded from a peer,
//! and through containerd's content API), some clients reading slowly: every body byte-exact,
//! and each daemon's memory and open files bounded while it serves and released afterwards.

use bench::load::{self, Config, NodeReport};

/// Clients of the local, the forwarding and the content-API node: 500 at once.
const CLIENTS: [usize; 3] = [200, 150, 150];
const SIZE_MIB: u64 = 4;

/// Memory a daemon may add at its peak under this load, whatever the path: bodies go out with
/// sendfile or in bounded pieces, so it must not scale with clients × blob size (2 GiB here).
const PEAK_GROWTH_KIB: u64 = 192 << 10;

fn check(n: &NodeReport) -> Vec<String> {
    let mut problems = Vec::new();
    // A daemon serving its own content always answers; a forwarding one may find no peer that
    // answers in time on a saturated machine and send the client upstream (a 404, never a
    // broken pull), but not for every request.
    let may_fall_back = n.role == "forwarded";
    if n.exact + n.fell_back != n.clients
        || (n.fell_back > 0 && !may_fall_back)
        || (n.clients > 0 && n.exact == 0)
    {
        problems.push(format!(
            "{}: {} of {} byte-exact, {} sent upstream",
            n.role, n.exact, n.clients, n.fell_back
        ));
    }
    let peak = n.peak.hwm_kib.max(n.peak.rss_kib);
    if peak > n.before.rss_kib + PEAK_GROWTH_KIB {
        problems.push(format!(
            "{}: RSS peaked at {} KiB from {} KiB (bound +{} KiB)",
            n.role, peak, n.before.rss_kib, PEAK_GROWTH_KIB
        ));
    }
    // One socket per client, one more per forwarded fetch and an open blob file per response.
    let fd_bound = n.before.fds + 3 * n.clients as u64 + 64;
    if n.peak.fds > fd_bound {
        problems.push(format!(
            "{}: {} fds at the peak (bound {fd_bound})",
            n.role, n.peak.fds
        ));
    }
    // Every connection and file of the load is closed once its client is gone; what may stay
    // is the mirror's keep-alive pool (at most 100 idle connections per peer, two peers).
    if n.after.fds > n.before.fds + 2 * 100 + 32 {
        problems.push(format!(
            "{}: {} fds after the load, {} before",
            n.role, n.after.fds, n.before.fds
        ));
    }
    problems
}

#[test]
fn five_hundred_concurrent_gets_are_exact_and_bounded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let work = match std::env::var_os("LOAD_KEEP") {
        Some(p) => std::path::PathBuf::from(p),
        None => dir.path().to_path_buf(),
    };
    let report = load::run(&Config {
        clients: std::env::var("LOAD_SPLIT")
            .ok()
            .and_then(|v| {
                let n: Vec<usize> = v.split(',').filter_map(|x| x.parse().ok()).collect();
                n.try_into().ok()
            })
            .unwrap_or(CLIENTS),
        size_mib: SIZE_MIB,
        slow_every: 10,
        work,
        bin: env!("CARGO_BIN_EXE_spegel").into(),
    })?;
    eprintln!("{}", report.markdown());
    assert!(
        report.failures.is_empty(),
        "{} requests failed, first: {:?}",
        report.failures.len(),
        report.failures.iter().take(5).collect::<Vec<_>>()
    );
    let problems: Vec<String> = report.nodes.iter().flat_map(check).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
