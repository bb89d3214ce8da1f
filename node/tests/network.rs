//! Multi-node tests in one process: real libp2p over TCP/QUIC on 127.0.0.1, a temp dir per
//! node, `--no-mdns`. Every wait is on an observable condition with a deadline.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Instant;

use common::{start_node, wait_for, wait_fully_discovered, TestNode, CONVERGE_TIMEOUT};
use p2p_node::network::address_book::Source;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_ten_nodes_discovers_each_other_through_kademlia() {
    let started = Instant::now();
    let mut nodes: Vec<TestNode> = Vec::new();
    for i in 0..10 {
        // Each node is given exactly one other node: the previous one.
        let bootstrap = nodes
            .last()
            .map(|n: &TestNode| vec![n.bootstrap_addr()])
            .unwrap_or_default();
        nodes.push(start_node(bootstrap).await);
        assert!(i == 0 || nodes[i].handle.client.status().await.unwrap().known_peers >= 1);
    }
    wait_for(
        "every node to know at least 8 others",
        CONVERGE_TIMEOUT,
        || async {
            for node in &nodes {
                let table = node.handle.client.routing_table().await.ok()?;
                if table.len() < 8 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    eprintln!(
        "10-node chain converged (>= 8 peers each) in {:.1?}",
        started.elapsed()
    );

    // The last node was given one peer; the rest of its routing table came from the network
    // (Kademlia lookups, and peers that found it through Kademlia and connected).
    let last = nodes.last().unwrap();
    let learned = last
        .handle
        .client
        .peers()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.source != Source::Bootstrap && p.in_routing_table)
        .count();
    assert!(
        learned >= 7,
        "last node learned only {learned} peers from the network"
    );
    for node in nodes {
        node.handle.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_survives_the_loss_of_its_first_node_and_admits_newcomers() {
    let first = start_node(vec![]).await;
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(start_node(vec![first.bootstrap_addr()]).await);
    }
    let all: Vec<&TestNode> = std::iter::once(&first).chain(rest.iter()).collect();
    wait_fully_discovered("the 4-node network to form", &all).await;

    first.handle.stop().await.unwrap();

    // A newcomer joins through a member that is not the original bootstrap node.
    let newcomer = start_node(vec![rest[1].bootstrap_addr()]).await;
    let survivors: Vec<&TestNode> = rest.iter().chain(std::iter::once(&newcomer)).collect();
    wait_fully_discovered("full mutual discovery without the first node", &survivors).await;
    // The newcomer was told about one peer only; the others came from the network.
    let peers = newcomer.handle.client.peers().await.unwrap();
    assert!(peers
        .iter()
        .any(|p| p.peer_id == rest[0].peer_id().to_string() && p.source != Source::Bootstrap));
    for node in rest.into_iter().chain([newcomer]) {
        node.handle.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_rejoins_from_its_peer_cache_without_bootstrap() {
    let a = start_node(vec![]).await;
    let b = start_node(vec![a.bootstrap_addr()]).await;
    let c = start_node(vec![a.bootstrap_addr()]).await;
    let nodes = [&a, &b, &c];
    wait_fully_discovered("the 3-node network to form", &nodes).await;

    // Stop C (graceful: saves the cache), restart it from the same data dir, no bootstrap.
    let TestNode { handle, dir } = c;
    let c_id = handle.peer_id;
    handle.stop().await.unwrap();
    assert!(
        dir.path().join("peers.json").exists(),
        "cache saved at shutdown"
    );
    let handle = p2p_node::node::start(common::loopback_config(&dir, vec![]))
        .await
        .unwrap();
    assert_eq!(handle.peer_id, c_id, "same identity after restart");
    let c = TestNode { handle, dir };

    wait_for(
        "the restarted node to reconnect from its cache",
        CONVERGE_TIMEOUT,
        || async {
            let peers = c.handle.client.peers().await.ok()?;
            let connected_cached = peers
                .iter()
                .filter(|p| p.connected && p.source == Source::Cache)
                .count();
            (connected_cached >= 1).then_some(())
        },
    )
    .await;
    let nodes = [&a, &b, &c];
    wait_fully_discovered("full discovery after restart", &nodes).await;
    for node in [a, b, c] {
        node.handle.stop().await.unwrap();
    }
}
