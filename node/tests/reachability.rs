//! Reachability: AutoNAT v2 decides whether a node can be dialled, and Kademlia's mode
//! follows it (`--kad-mode auto`, the default): a node on loopback only is private and a DHT
//! client; two hosts on a real network confirm each other's addresses and become public DHT
//! servers.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::netns::TwoHosts;
use common::process::Stream;
use common::{start_node, start_node_with, wait_for, CONVERGE_TIMEOUT};
use p2p_node::config::KadMode;
use p2p_node::network::reachability::Reachability;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_loopback_only_is_private_and_stays_out_of_routing_tables() {
    common::init_logs();
    let server = start_node(vec![]).await;
    let auto = start_node_with(vec![server.bootstrap_addr()], |c| {
        c.kad_mode = KadMode::Auto;
    })
    .await;
    let status = wait_for(
        "the loopback node to call itself private",
        CONVERGE_TIMEOUT,
        || async {
            let s = auto.handle.client.status().await.unwrap();
            (s.reachability == Reachability::Private && s.connected_peers > 0).then_some(s)
        },
    )
    .await;
    assert!(!status.kademlia_server, "a private node is a DHT client");
    // The server identified it (so it would have added a DHT server by now), and did not add it.
    wait_for(
        "the server to see the private node",
        CONVERGE_TIMEOUT,
        || async {
            let peers = server.handle.client.peers().await.unwrap();
            peers
                .iter()
                .any(|p| p.peer_id == auto.peer_id().to_string() && p.connected)
                .then_some(())
        },
    )
    .await;
    let table = server.handle.client.routing_table().await.unwrap();
    assert!(!table.contains(&auto.peer_id()), "{table:?}");
    // An explicit --kad-mode keeps its mode whatever the reachability.
    let explicit = server.handle.client.status().await.unwrap();
    assert!(explicit.kademlia_server);
    assert_eq!(explicit.reachability, Reachability::Private);
}

#[test]
fn two_hosts_on_a_network_confirm_each_other_public_and_become_dht_servers() {
    let hosts = match TwoHosts::create() {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "SKIPPED two_hosts_on_a_network_confirm_each_other_public_and_become_dht_servers: \
                 cannot create network namespaces ({e}); run as root with iproute2"
            );
            return;
        }
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = hosts.node(0, dir_a.path(), &["--no-mdns"]);
    let join = a.join_addr();
    let mut b = hosts.node(1, dir_b.path(), &["--no-mdns", "--bootstrap", &join]);
    // AutoNAT probes every 5 s; generous for a busy machine.
    let timeout = Duration::from_secs(90);
    for node in [&mut a, &mut b] {
        let line = node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains("reachability changed") && l.contains("public")
        });
        assert!(line.contains("kademlia_server=true"), "{line}");
        assert!(
            line.contains(&hosts.addrs[0]) || line.contains(&hosts.addrs[1]),
            "{line}"
        );
    }
    let (code_a, _) = a.terminate(timeout);
    let (code_b, _) = b.terminate(timeout);
    assert_eq!((code_a, code_b), (0, 0));
}
