//! Routing at scale, small enough for CI on two cores: 60 in-process routers (the real libp2p
//! router, three times the replication factor, so lookups need the DHT) on loopback,
//! bootstrapped from three live peers each. Asserts 100 % lookup success for live providers,
//! no leaver returned after a graceful leave, no crashed node returned once its (short) TTL has
//! passed, and every key still found after the first records expired (re-provided).
//! Bounded waits only, no timing thresholds. Every router runs in the test's process (no
//! worker processes).

use std::{collections::HashSet, time::Duration};

use bench::routing::{Sim, SimConfig};

/// The tests run one at a time: each cluster alone keeps both cores busy.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_routers() {
    let _serial = SERIAL.lock().await;
    const NODES: usize = 60;
    let mut config = SimConfig::bench(NODES);
    // Light key sets keep CI fast; the benchmark runs 300 keys per node. The TTL is short enough
    // to cross it twice, long enough that re-providing (at half of it) does not swamp 2 cores.
    config.images_per_node = 2;
    config.pool_images = 10;
    config.ttl = Duration::from_secs(30);
    let ttl = config.ttl;
    let mut sim = Sim::new(config).unwrap();
    for _ in 0..NODES {
        sim.add_node().await.unwrap();
    }
    let advertised = std::time::Instant::now();
    sim.wait_ready(Duration::from_secs(120)).await.unwrap();
    // Every key provided (on a loaded machine some provides time out and are retried).
    sim.wait_provided(Duration::from_secs(180)).await.unwrap();
    sim.converge(Duration::from_secs(120)).await.unwrap();

    // A fresh full round: every sampled key of a live provider is found.
    let (total, ok, stale, _) = sim.sample_round(5, Duration::ZERO).await.unwrap();
    assert!(total >= NODES * 5, "sampled {total}");
    assert_eq!(ok, total, "lookups of live providers' keys");
    assert_eq!(stale, 0);

    // Keys nobody has: every lookup ends, empty.
    let jobs = (0..sim.nodes.len())
        .map(|i| (i, format!("sha256:{:064x}", i + 1), 3))
        .collect();
    for (_, key, l) in sim.lookups(jobs, 8).await.unwrap() {
        assert!(l.providers.is_empty(), "{key} has no provider");
    }

    // Graceful leave: right after shutdown, nobody returns the leavers.
    let mut left = HashSet::new();
    let mut left_keys = vec![];
    for i in sim.pick(5) {
        left_keys.extend(sim.nodes[i].unique.iter().take(3).cloned());
        left.insert(sim.leave(i).await.unwrap());
    }
    let (n, stale) = sim.count_stale(&left_keys, &left, 5).await.unwrap();
    assert_eq!(n, left_keys.len() * 5);
    assert_eq!(stale, 0, "lookups returning a node that left");

    // Crash: once the TTL has passed, no lookup returns a crashed node.
    let mut crashed = HashSet::new();
    let mut crashed_keys = vec![];
    for i in sim.pick(5) {
        crashed_keys.extend(sim.nodes[i].unique.iter().take(3).cloned());
        crashed.insert(sim.crash(i).await.unwrap());
    }
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    let (n, stale) = sim.count_stale(&crashed_keys, &crashed, 5).await.unwrap();
    assert_eq!(n, crashed_keys.len() * 5);
    assert_eq!(stale, 0, "lookups returning a crashed node after its TTL");

    // The survivors still find each other's keys once every first record expired (only
    // re-provided records are left).
    if let Some(rest) = (ttl + ttl / 2).checked_sub(advertised.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let (total, ok, stale, _) = sim.sample_round(3, Duration::ZERO).await.unwrap();
    assert_eq!(ok, total, "lookups after leave and crash");
    assert_eq!(stale, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_cluster_answers_from_the_local_store() {
    let _serial = SERIAL.lock().await;
    let mut config = SimConfig::bench(12);
    config.images_per_node = 3;
    config.pool_images = 6;
    let mut sim = Sim::new(config).unwrap();
    for _ in 0..12 {
        sim.add_node().await.unwrap();
    }
    sim.wait_ready(Duration::from_secs(60)).await.unwrap();
    sim.converge(Duration::from_secs(60)).await.unwrap();
    // Every node holds every record once the full syncs are in: wait (bounded) until a round
    // of misses from every node runs no DHT query.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, queries) = sim.answer_counts().await.unwrap();
        let jobs = (0..sim.nodes.len())
            .map(|i| (i, format!("sha256:{:064x}", i + 1000), 3))
            .collect();
        let results = sim.lookups(jobs, 4).await.unwrap();
        assert!(results.iter().all(|(_, _, l)| l.providers.is_empty()));
        if sim.answer_counts().await.unwrap().1 == queries {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lookups still need the DHT"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Hits are answered locally too, and complete.
    let (local, queries) = sim.answer_counts().await.unwrap();
    let (total, ok, _, _) = sim.sample_round(5, Duration::ZERO).await.unwrap();
    assert_eq!(ok, total);
    let (local_after, queries_after) = sim.answer_counts().await.unwrap();
    assert_eq!(queries_after, queries, "no DHT query for hits");
    assert!(local_after > local);

    // A new advertisement reaches every node's store by notice: found without a DHT query.
    let key = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
    sim.advertise(0, vec![key.to_string()]).await.unwrap();
    let id = sim.nodes[0].id();
    for i in 1..sim.nodes.len() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let l = sim.lookup_from(i, key, 1).await.unwrap();
            if l.providers == vec![id.clone()] {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} never found it"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(sim.answer_counts().await.unwrap().1, queries_after);

    // Withdraw and leave still apply to local answers.
    sim.withdraw(0, vec![key.to_string()]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !sim
        .lookup_from(1, key, 1)
        .await
        .unwrap()
        .providers
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "withdrawn key still found"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unique = sim.nodes[2].unique[0].clone();
    let gone = sim.leave(2).await.unwrap();
    let (_, stale) = sim
        .count_stale(&[unique], &HashSet::from([gone]), 5)
        .await
        .unwrap();
    assert_eq!(stale, 0);
}
