//! `cleanup` and `cleanup-wait`: restore containerd's mirror configuration on uninstall.
//!
//! The chart's post-delete hook runs `cleanup` on every node (restore, then report ready on
//! `/readyz`) and one `cleanup-wait` pod that polls every node's probe until all have been ready
//! for `threshold` consecutive rounds, after which the hook resources can be deleted.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hyper::{Method, StatusCode};
use tokio::net::TcpListener;

use crate::config::{CleanupArgs, CleanupWaitArgs};
use crate::host_config::{BACKUP_DIR, FsError, clear_config, dir_exists, read_dir_sorted};
use crate::http::{self, Client, ClientConfig, ClientError, Handler, Request, Response};
use crate::net::{AddrError, parse_listen_addr, split_host_port};

/// Path of the readiness probe served by `cleanup` and polled by `cleanup-wait`.
pub const READYZ_PATH: &str = "/readyz";

/// How long in-flight probe requests may take to finish after shutdown is requested.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Most probe requests in flight at once during one `cleanup-wait` round.
const MAX_PARALLEL_PROBES: usize = 10;

/// Time limit for one probe request, connect included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Reasons `cleanup` or `cleanup-wait` can fail.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Restoring the configuration directory failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// `--addr` is not a listen address.
    #[error(transparent)]
    InvalidAddr(AddrError),
    /// The probe listener could not be bound.
    #[error("bind probe server on {addr}: {cause}")]
    Bind {
        /// Address that failed.
        addr: SocketAddr,
        /// Underlying I/O error.
        cause: std::io::Error,
    },
    /// `--probe-endpoint` is not `host:port`.
    #[error("invalid probe endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `--period` is zero.
    #[error("probe period must be greater than zero")]
    InvalidPeriod,
    /// The probe server stopped with an error.
    #[error("probe server: {0}")]
    Serve(std::io::Error),
}

/// Restores the configuration saved by `configuration` (spec §4.7); a no-op without a backup.
///
/// Deletes everything except `_backup`, moves `_backup`'s entries back and removes `_backup`,
/// so running it twice gives the same result.
pub fn cleanup_mirror_configuration(config_path: &Path) -> Result<(), CleanupError> {
    let backup = config_path.join(BACKUP_DIR);
    if !dir_exists(&backup)? {
        tracing::info!("skipping cleanup because backup directory does not exist");
        return Ok(());
    }
    clear_config(config_path)?;
    for entry in read_dir_sorted(&backup)? {
        let from = backup.join(&entry.name);
        let to = config_path.join(&entry.name);
        std::fs::rename(&from, &to).map_err(|e| FsError {
            action: "move",
            path: from.clone(),
            cause: e,
        })?;
        tracing::info!(path = %from.display(), "recovering containerd host configuration");
    }
    std::fs::remove_dir_all(&backup).map_err(|e| FsError {
        action: "remove",
        path: backup.clone(),
        cause: e,
    })?;
    Ok(())
}

/// Entry point of `cleanup`: restores the configuration, then serves `/readyz` until `shutdown`.
pub async fn run_cleanup(
    args: &CleanupArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CleanupError> {
    cleanup_mirror_configuration(&args.containerd_registry_config_path)?;
    let addr = parse_listen_addr(&args.addr).map_err(CleanupError::InvalidAddr)?;
    let listener = crate::config::bind_listen_addr(&args.addr)
        .await
        .map_err(|cause| CleanupError::Bind { addr, cause })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "waiting to be shutdown");
    serve_probe(listener, shutdown).await
}

/// Serves the cleanup readiness probe on `listener` until `shutdown` completes.
///
/// `GET`/`HEAD /readyz` answer 200 with an empty body; everything else 404 (the original
/// answered 200 to any GET, spec §11.10). On shutdown it stops accepting and lets open
/// connections finish for up to 30 s.
pub async fn serve_probe(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CleanupError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(http::serve(
        listener,
        Arc::new(ProbeHandler),
        http::Timeouts::default(),
        stop_rx,
    ));
    tokio::select! {
        () = shutdown => {}
        // The server only returns on its own when it could not start.
        result = &mut server => return finished(result),
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut server).await {
        Ok(result) => finished(result),
        Err(_) => {
            tracing::warn!("probe connections did not finish in time, aborting them");
            server.abort();
            Ok(())
        }
    }
}

fn finished(
    result: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), CleanupError> {
    match result {
        Ok(r) => r.map_err(CleanupError::Serve),
        Err(e) => Err(CleanupError::Serve(std::io::Error::other(e))),
    }
}

/// Answers `/readyz`; the probe is the only route.
struct ProbeHandler;

#[async_trait::async_trait]
impl Handler for ProbeHandler {
    async fn handle(&self, req: &Request) -> Response {
        if req.path == READYZ_PATH && (req.method == "GET" || req.is_head()) {
            return Response::empty(200);
        }
        tracing::error!(path = %req.path, method = %req.method, "unsupported probe request");
        Response::empty(404)
    }
}

/// Entry point of `cleanup-wait` (spec §1.6): returns once every address behind the probe
/// endpoint answered `/readyz` with 200 in `threshold` consecutive rounds.
///
/// Each round re-resolves the host to all its addresses (a headless Service lists every
/// cleanup pod) and probes them, at most 10 at a time with a 1 s limit each. Any failure resets
/// the count. The first round runs immediately, the next ones every `period`. A threshold of 0
/// is met without probing.
pub async fn run_cleanup_wait(args: &CleanupWaitArgs) -> Result<(), CleanupError> {
    let (host, port) = probe_endpoint(&args.probe_endpoint)?;
    if args.period.is_zero() {
        return Err(CleanupError::InvalidPeriod);
    }
    if args.threshold == 0 {
        tracing::info!("probe threshold reached");
        return Ok(());
    }
    let mut ticker = tokio::time::interval(args.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut successes = 0u32;
    loop {
        ticker.tick().await;
        let start = tokio::time::Instant::now();
        tracing::info!(host = %host, "running probe lookup");
        let ips = match lookup_ips(&host, port).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => {
                tracing::error!(host = %host, "cleanup probe lookup returned no addresses");
                successes = 0;
                continue;
            }
            Err(e) => {
                tracing::error!(host = %host, error = %e, "cleanup probe lookup failed");
                successes = 0;
                continue;
            }
        };
        tracing::info!(endpoints = ips.len(), "running probe request");
        if let Err(e) = probe_ips(&ips, port).await {
            tracing::error!(error = %e, "cleanup probe request failed");
            successes = 0;
            continue;
        }
        successes += 1;
        tracing::info!(threshold = successes, duration = ?start.elapsed(), "probe ran successfully");
        if successes >= args.threshold {
            tracing::info!("probe threshold reached");
            return Ok(());
        }
    }
}

/// The probe endpoint's host and port; the host must not be empty.
fn probe_endpoint(endpoint: &str) -> Result<(String, u16), CleanupError> {
    let invalid = |reason| CleanupError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let (host, port) = split_host_port(endpoint).map_err(|e| invalid(e.reason))?;
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    Ok((host, port))
}

async fn lookup_ips(host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for addr in tokio::net::lookup_host((host, port)).await? {
        if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    Ok(ips)
}

/// Why one probe request did not count as ready.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("probe {addr}: timed out")]
    Timeout { addr: SocketAddr },
    #[error("probe {addr}: {cause}")]
    Connect {
        addr: SocketAddr,
        cause: ClientError,
    },
    #[error("probe {addr}: {cause}")]
    Http {
        addr: SocketAddr,
        cause: ClientError,
    },
    #[error("probe {addr}: expected status 200 but got {status}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
}

async fn probe_ips(ips: &[IpAddr], port: u16) -> Result<(), ProbeError> {
    let mut results = futures::stream::iter(ips.iter().map(|ip| async move {
        let addr = SocketAddr::new(*ip, port);
        let (status, _) = http_request(addr, Method::GET, READYZ_PATH).await?;
        if status != StatusCode::OK {
            return Err(ProbeError::Status { addr, status });
        }
        Ok(())
    }))
    .buffer_unordered(MAX_PARALLEL_PROBES);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

/// The probe client: a fresh connection per probe, so every round tests every instance anew.
fn probe_client() -> Client {
    Client::new(ClientConfig {
        connect_timeout: PROBE_TIMEOUT,
        pool_max_idle_per_host: 0,
        tcp_keepalive: None,
        ..ClientConfig::default()
    })
}

/// One HTTP/1.1 request, bounded by [`PROBE_TIMEOUT`].
async fn http_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes), ProbeError> {
    probe_client()
        .fetch(
            method,
            &format!("http://{addr}{path}"),
            PROBE_TIMEOUT,
            64 * 1024,
        )
        .await
        .map_err(|cause| match cause {
            ClientError::Timeout => ProbeError::Timeout { addr },
            cause if cause.is_connect() => ProbeError::Connect { addr, cause },
            cause => ProbeError::Http { addr, cause },
        })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use std::convert::Infallible;

    use http_body_util::Empty;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;

    use super::*;

    /// Bound on every wait in these tests so a hang fails instead of blocking forever.
    const TEST_BOUND: Duration = Duration::from_secs(20);

    fn tree(root: &Path) -> Vec<(PathBuf, Option<String>)> {
        let mut out = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                if path.is_dir() {
                    out.push((rel, None));
                    pending.push(path);
                } else {
                    out.push((rel, Some(fs::read_to_string(&path).unwrap())));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn cleanup_restores_backup_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("certs.d");
        fs::create_dir_all(config.join(BACKUP_DIR).join("ghcr.io")).unwrap();
        fs::write(config.join(BACKUP_DIR).join("data.txt"), "hello world").unwrap();
        fs::write(
            config.join(BACKUP_DIR).join("ghcr.io").join("hosts.toml"),
            "server = 'x'",
        )
        .unwrap();
        fs::write(config.join("foo.bin"), "hello world").unwrap();
        fs::create_dir_all(config.join("docker.io")).unwrap();
        fs::write(config.join("docker.io").join("hosts.toml"), "ours").unwrap();

        let expected = vec![
            (PathBuf::from("data.txt"), Some("hello world".to_string())),
            (PathBuf::from("ghcr.io"), None),
            (
                PathBuf::from("ghcr.io/hosts.toml"),
                Some("server = 'x'".to_string()),
            ),
        ];
        for _ in 0..2 {
            cleanup_mirror_configuration(&config).unwrap();
            assert_eq!(tree(&config), expected);
        }
    }

    #[test]
    fn cleanup_without_backup_is_a_noop() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("keep.txt"), "x").unwrap();
        let before = tree(dir.path());
        cleanup_mirror_configuration(dir.path()).unwrap();
        assert_eq!(tree(dir.path()), before);
        cleanup_mirror_configuration(&dir.path().join("missing")).unwrap();
        assert!(!dir.path().join("missing").exists());
    }

    #[test]
    fn configuration_then_cleanup_restores_original_tree() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("certs.d");
        fs::create_dir_all(config.join("docker.io")).unwrap();
        fs::write(
            config.join("docker.io").join("hosts.toml"),
            "hello = 'world'",
        )
        .unwrap();
        let before = tree(&config);
        crate::host_config::write_mirror_configuration(
            &config,
            &["https://docker.io".to_string()],
            &["http://127.0.0.1:5000".to_string()],
            true,
            false,
            None,
        )
        .unwrap();
        assert_ne!(tree(&config), before);
        cleanup_mirror_configuration(&config).unwrap();
        assert_eq!(tree(&config), before);
    }

    async fn start_probe_server() -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), CleanupError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(serve_probe(listener, async move {
            let _ = rx.await;
        }));
        (addr, tx, handle)
    }

    #[tokio::test]
    async fn probe_server_only_readyz_is_ok() {
        let (addr, stop, handle) = start_probe_server().await;
        let (status, body) = http_request(addr, Method::GET, "/readyz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        let (status, _) = http_request(addr, Method::HEAD, "/readyz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        for (method, path) in [
            (Method::GET, "/"),
            (Method::GET, "/anything"),
            (Method::GET, "/readyz/extra"),
            (Method::POST, "/readyz"),
            (Method::DELETE, "/other"),
        ] {
            let (status, _) = http_request(addr, method.clone(), path).await.unwrap();
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        }
        stop.send(()).unwrap();
        let result = tokio::time::timeout(TEST_BOUND, handle).await.unwrap();
        result.unwrap().unwrap();
        // The listener is gone after shutdown.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn probe_server_shuts_down_with_idle_keepalive_connection() {
        let (addr, stop, handle) = start_probe_server().await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn_task = tokio::spawn(conn);
        let req = Request::get("/readyz")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Connection is now idle and kept alive; shutdown must still complete.
        stop.send(()).unwrap();
        let result = tokio::time::timeout(TEST_BOUND, handle).await.unwrap();
        result.unwrap().unwrap();
        drop(sender);
        let _ = tokio::time::timeout(TEST_BOUND, conn_task).await.unwrap();
    }

    #[tokio::test]
    async fn run_cleanup_restores_and_exits_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("certs.d");
        fs::create_dir_all(config.join(BACKUP_DIR)).unwrap();
        fs::write(config.join(BACKUP_DIR).join("data.txt"), "x").unwrap();
        fs::create_dir_all(config.join("_default")).unwrap();
        let args = CleanupArgs {
            addr: "127.0.0.1:0".to_string(),
            containerd_registry_config_path: config.clone(),
        };
        tokio::time::timeout(TEST_BOUND, run_cleanup(&args, async {}))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            tree(&config),
            vec![(PathBuf::from("data.txt"), Some("x".to_string()))]
        );
    }

    #[tokio::test]
    async fn run_cleanup_rejects_bad_addr() {
        let dir = tempfile::tempdir().unwrap();
        let args = CleanupArgs {
            addr: "nope".to_string(),
            containerd_registry_config_path: dir.path().to_path_buf(),
        };
        let err = run_cleanup(&args, async {}).await.unwrap_err();
        assert!(matches!(err, CleanupError::InvalidAddr(_)), "{err}");
    }

    /// A server answering the n-th request with `statuses[n]` (the last one repeats), reporting
    /// each request on a channel.
    async fn scripted_server(
        statuses: Vec<u16>,
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<usize>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let statuses = Arc::new(statuses);
        let server_hits = hits.clone();
        let handle = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hits = server_hits.clone();
                let tx = tx.clone();
                let statuses = statuses.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let n = hits.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.send(n);
                        let code = if req.uri().path() == READYZ_PATH {
                            statuses[n.min(statuses.len() - 1)]
                        } else {
                            404
                        };
                        async move {
                            let mut resp = Response::new(Empty::<Bytes>::new());
                            *resp.status_mut() = StatusCode::from_u16(code).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, hits, rx, handle)
    }

    fn wait_args(addr: SocketAddr, threshold: u32) -> CleanupWaitArgs {
        CleanupWaitArgs {
            probe_endpoint: addr.to_string(),
            threshold,
            period: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn cleanup_wait_succeeds_after_threshold_rounds() {
        let (addr, hits, _rx, server) = scripted_server(vec![200]).await;
        tokio::time::timeout(TEST_BOUND, run_cleanup_wait(&wait_args(addr, 3)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        server.abort();
    }

    #[tokio::test]
    async fn cleanup_wait_failure_resets_the_count() {
        let (addr, hits, _rx, server) = scripted_server(vec![200, 200, 500, 200, 200, 200]).await;
        tokio::time::timeout(TEST_BOUND, run_cleanup_wait(&wait_args(addr, 3)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 6);
        server.abort();
    }

    #[tokio::test]
    async fn cleanup_wait_keeps_waiting_while_unready() {
        let (addr, _hits, mut rx, server) = scripted_server(vec![500]).await;
        let args = wait_args(addr, 1);
        let wait = run_cleanup_wait(&args);
        tokio::pin!(wait);
        let five_rounds = async {
            for _ in 0..5 {
                rx.recv().await.unwrap();
            }
        };
        let outcome = tokio::time::timeout(TEST_BOUND, async {
            tokio::select! {
                result = &mut wait => Err(result),
                () = five_rounds => Ok(()),
            }
        })
        .await
        .unwrap();
        assert!(outcome.is_ok(), "cleanup-wait finished: {outcome:?}");
        server.abort();
    }

    #[tokio::test]
    async fn probe_reports_connection_refused() {
        // Nothing listens on this port once the listener is dropped: connection refused.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = probe_ips(&[addr.ip()], addr.port()).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn cleanup_wait_validates_arguments() {
        for endpoint in ["nohost", "a:b:c", ":80", "host:port", "[::1]80", "[::1"] {
            let args = CleanupWaitArgs {
                probe_endpoint: endpoint.to_string(),
                threshold: 3,
                period: Duration::from_millis(5),
            };
            let err = run_cleanup_wait(&args).await.unwrap_err();
            assert!(
                matches!(err, CleanupError::InvalidEndpoint { .. }),
                "{endpoint}: {err}"
            );
        }
        let args = CleanupWaitArgs {
            probe_endpoint: "127.0.0.1:1".to_string(),
            threshold: 3,
            period: Duration::ZERO,
        };
        assert!(matches!(
            run_cleanup_wait(&args).await,
            Err(CleanupError::InvalidPeriod)
        ));
    }

    #[test]
    fn split_host_port_like_go() {
        let split_host_port = probe_endpoint;
        assert_eq!(
            split_host_port("spegel-cleanup:8080").unwrap(),
            ("spegel-cleanup".to_string(), 8080)
        );
        assert_eq!(
            split_host_port("[::1]:8080").unwrap(),
            ("::1".to_string(), 8080)
        );
        assert_eq!(
            split_host_port("127.0.0.1:1").unwrap(),
            ("127.0.0.1".to_string(), 1)
        );
    }
}
