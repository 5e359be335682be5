//! In-process libp2p routers on loopback: advertise, lookup, withdraw, expiry, leave, scale,
//! and every bootstrap kind.

use std::{sync::Arc, time::Duration};

use spegel::routing::{Bootstrapper, P2pConfig, P2pRouter, Peer, Router, serve_http_bootstrap};
use tokio::sync::watch;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    router: P2pRouter,
    task: tokio::task::JoinHandle<()>,
    port: u16,
    registry_port: u16,
}

async fn start(
    ip: &str,
    port: u16,
    registry_port: u16,
    ttl: Duration,
    bootstrap: Option<Bootstrapper>,
) -> Node {
    let (router, task) = P2pRouter::start(P2pConfig {
        router_addr: format!("{ip}:{port}"),
        registry_port,
        data_dir: String::new(),
        advertise_ttl: ttl,
        bootstrap,
        idle_connection_timeout: spegel::routing::IDLE_CONNECTION_TIMEOUT,
    })
    .await
    .unwrap();
    Node {
        router,
        task,
        port,
        registry_port,
    }
}

fn static_to(node: &Node) -> Option<Bootstrapper> {
    let addr = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        node.port,
        node.router.local_peer_id()
    );
    Some(Bootstrapper::Static(vec![addr.parse().unwrap()]))
}

async fn cluster(n: usize, ttl: Duration) -> Vec<Node> {
    let first = start("127.0.0.1", free_port(), 7000, ttl, None).await;
    let mut nodes = vec![];
    let bootstrap = static_to(&first);
    nodes.push(first);
    for i in 1..n {
        nodes.push(
            start(
                "127.0.0.1",
                free_port(),
                7000 + i as u16,
                ttl,
                bootstrap.clone(),
            )
            .await,
        );
    }
    wait_until("all routers ready", Duration::from_secs(30), || {
        let ready = nodes.iter().all(|n| n.router.ready());
        async move { ready }
    })
    .await;
    nodes
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every provider a lookup yields before its channel closes (bounded).
async fn providers(router: &P2pRouter, key: &str) -> Vec<Peer> {
    let mut rx = router.lookup(key, 10).await.unwrap();
    let mut out = vec![];
    let collect = async {
        while let Some(p) = rx.recv().await {
            out.push(p);
        }
    };
    tokio::time::timeout(Duration::from_secs(15), collect)
        .await
        .expect("lookup must finish");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertise_lookup_withdraw_leave() {
    let nodes = cluster(5, Duration::from_secs(600)).await;
    let key = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
    nodes[0]
        .router
        .advertise(vec![key.to_string()])
        .await
        .unwrap();
    for n in &nodes[1..] {
        let found = providers(&n.router, key).await;
        assert_eq!(found.len(), 1, "one provider");
        assert_eq!(found[0].id, nodes[0].router.local_peer_id());
        assert_eq!(
            found[0].addrs,
            vec![
                format!("127.0.0.1:{}", nodes[0].registry_port)
                    .parse()
                    .unwrap()
            ]
        );
    }
    // Self is never returned.
    assert!(providers(&nodes[0].router, key).await.is_empty());
    // A key nobody has: the lookup finishes, empty.
    assert!(
        providers(&nodes[2].router, "docker.io/library/none:1")
            .await
            .is_empty()
    );

    // Two providers of a tag.
    let tag = "docker.io/library/app:1";
    nodes[1]
        .router
        .advertise(vec![tag.to_string()])
        .await
        .unwrap();
    nodes[2]
        .router
        .advertise(vec![tag.to_string()])
        .await
        .unwrap();
    wait_until(
        "both providers visible",
        Duration::from_secs(15),
        || async { providers(&nodes[4].router, tag).await.len() == 2 },
    )
    .await;

    // Withdraw: peers are told, so the record goes long before its 10 minute TTL.
    nodes[0]
        .router
        .withdraw(vec![key.to_string()])
        .await
        .unwrap();
    wait_until("withdrawn key gone", Duration::from_secs(15), || async {
        providers(&nodes[3].router, key).await.is_empty()
    })
    .await;

    // Graceful leave: the others stop returning the leaver at once.
    nodes[1].router.shutdown().await;
    wait_until("leaver gone", Duration::from_secs(15), || async {
        let found = providers(&nodes[4].router, tag).await;
        found.len() == 1 && found[0].id == nodes[2].router.local_peer_id()
    })
    .await;
    assert!(
        nodes[1].task.is_finished()
            || tokio::time::timeout(Duration::from_secs(5), async {
                while !nodes[1].task.is_finished() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_without_reprovide() {
    let nodes = cluster(2, Duration::from_secs(2)).await;
    let key = "sha256:00000000000000000000000000000000000000000000000000000000000000ee";
    nodes[0]
        .router
        .advertise(vec![key.to_string()])
        .await
        .unwrap();
    wait_until("provider visible", Duration::from_secs(10), || async {
        providers(&nodes[1].router, key).await.len() == 1
    })
    .await;
    // A crash: no leave notice, no more re-provides. The stored record must expire by itself.
    nodes[0].task.abort();
    wait_until("record expired", Duration::from_secs(20), || async {
        providers(&nodes[1].router, key).await.is_empty()
    })
    .await;
}

/// The first node of a cluster advertises before anyone else is up, so its provide queries
/// reach nobody. Once a peer joins, its keys are provided again: the joiner holds the record
/// itself, and still finds the provider after it crashed (no longer reachable to ask).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_advertised_while_alone_are_provided_once_a_peer_joins() {
    let ttl = Duration::from_secs(600);
    let first = start("127.0.0.1", free_port(), 7200, ttl, None).await;
    let key = "sha256:00000000000000000000000000000000000000000000000000000000000000ab";
    first.router.advertise(vec![key.to_string()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.router.ready(),
        "alone, so its provide reached nobody"
    );
    let second = start("127.0.0.1", free_port(), 7201, ttl, static_to(&first)).await;
    wait_until("both ready", Duration::from_secs(30), || {
        let ready = first.router.ready() && second.router.ready();
        async move { ready }
    })
    .await;
    wait_until("provider visible", Duration::from_secs(10), || async {
        providers(&second.router, key).await.len() == 1
    })
    .await;
    // Slack for the repeated provide query to land (milliseconds on loopback); the next
    // re-provide would only come at half the TTL, five minutes away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.task.abort();
    let id = first.router.local_peer_id();
    wait_until(
        "the joiner answering from its own record",
        Duration::from_secs(10),
        || async {
            providers(&second.router, key)
                .await
                .iter()
                .any(|p| p.id == id)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_keys() {
    let nodes = cluster(2, Duration::from_secs(600)).await;
    let keys: Vec<String> = (0..50_000).map(|i| format!("sha256:{i:064x}")).collect();
    nodes[0].router.advertise(keys.clone()).await.unwrap();
    for i in [0usize, 1, 777, 12_345, 25_000, 49_998, 49_999] {
        let key = keys[i].clone();
        wait_until(&format!("key {i}"), Duration::from_secs(60), || async {
            providers(&nodes[1].router, &key).await.len() == 1
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_router_is_not_ready_but_works_locally() {
    let node = start(
        "127.0.0.1",
        free_port(),
        7100,
        Duration::from_secs(600),
        None,
    )
    .await;
    node.router.advertise(vec!["k".into()]).await.unwrap();
    assert!(providers(&node.router, "k").await.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!node.router.ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_and_http_bootstrap() {
    let port = free_port();
    let first = start("127.0.0.1", port, 7200, Duration::from_secs(600), None).await;
    // DNS: "localhost" resolves to 127.0.0.1; the router port is assumed equal to ours.
    let dns = start(
        "127.0.0.2",
        port,
        7201,
        Duration::from_secs(600),
        Some(Bootstrapper::Dns {
            domain: "localhost".into(),
            port,
        }),
    )
    .await;
    wait_until("dns bootstrap", Duration::from_secs(30), || {
        let r = dns.router.ready() && first.router.ready();
        async move { r }
    })
    .await;

    // HTTP: the first node serves /id.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/id", listener.local_addr().unwrap());
    let (_stop, rx) = watch::channel(false);
    let handle = first.router.clone();
    let info = Arc::new(move || (handle.local_peer_id(), handle.listen_addrs()));
    tokio::spawn(serve_http_bootstrap(listener, info, rx));
    let http = start(
        "127.0.0.3",
        free_port(),
        7202,
        Duration::from_secs(600),
        Some(Bootstrapper::Http { url }),
    )
    .await;
    wait_until("http bootstrap", Duration::from_secs(30), || {
        let r = http.router.ready();
        async move { r }
    })
    .await;
    http.router.advertise(vec!["x".into()]).await.unwrap();
    wait_until("lookup across", Duration::from_secs(15), || async {
        providers(&dns.router, "x")
            .await
            .first()
            .is_some_and(|p| p.addrs[0].port() == 7202)
    })
    .await;
}
