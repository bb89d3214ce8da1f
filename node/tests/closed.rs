//! Closed networks, in one process with real TCP on 127.0.0.1: a swarm key (libp2p pnet)
//! keeps out every node without it; an allowlist keeps out every peer not on it; a banned
//! peer's connections are refused, and the ban survives a restart. Every wait is on a
//! condition with a deadline.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::{loopback_config, wait_for, TestNode};
use libp2p::pnet::PreSharedKey;
use libp2p::PeerId;
use p2p_node::config::{BootstrapAddr, NodeConfig};
use p2p_node::network::closed::new_swarm_key;
use p2p_node::node;

const WAIT: Duration = Duration::from_secs(60);

/// A loopback node in a fresh dir, TCP only, configured further by `tweak`.
async fn start(bootstrap: Vec<BootstrapAddr>, tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut config = loopback_config(&dir, bootstrap);
    config.listen.retain(|a| a.to_string().contains("/tcp/"));
    tweak(&mut config);
    let handle = node::start(config).await.unwrap();
    TestNode { handle, dir }
}

/// The peer id a node in `dir` will have (its identity created ahead).
fn identity_in(dir: &tempfile::TempDir) -> PeerId {
    let config = NodeConfig::loopback(dir.path());
    p2p_node::identity::load_or_create(&config.identity_path())
        .unwrap()
        .public()
        .to_peer_id()
}

async fn connected_to(node: &TestNode, peer: PeerId) -> bool {
    node.handle
        .client
        .peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.peer_id == peer.to_string() && p.connected)
}

/// Connections `node` refused so far.
async fn denied(node: &TestNode) -> u64 {
    node.handle
        .client
        .status()
        .await
        .unwrap()
        .denied_connections
}

/// Waits until `node` gave up joining (every dial failed); returns why.
async fn join_fails(node: &TestNode) -> String {
    wait_for("the join to fail", WAIT, || async {
        let status = node.handle.client.status().await.ok()?;
        status.join.failure(status.connected_peers)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_with_the_swarm_key_connect() {
    common::init_logs();
    let key = PreSharedKey::from_str(&new_swarm_key()).unwrap();
    let other_key = PreSharedKey::from_str(&new_swarm_key()).unwrap();
    let a = start(vec![], |c| c.swarm_key = Some(key)).await;
    let b = start(vec![a.bootstrap_addr()], |c| c.swarm_key = Some(key)).await;
    wait_for("b to connect to a", WAIT, || async {
        connected_to(&b, a.peer_id()).await.then_some(())
    })
    .await;

    let keyless = start(vec![a.bootstrap_addr()], |_| {}).await;
    let wrong_key = start(vec![a.bootstrap_addr()], |c| c.swarm_key = Some(other_key)).await;
    let why = join_fails(&keyless).await;
    eprintln!("without the key: {why}");
    let why = join_fails(&wrong_key).await;
    eprintln!("with another key: {why}");
    for outsider in [&keyless, &wrong_key] {
        assert!(!connected_to(&a, outsider.peer_id()).await);
    }
    // The members still talk.
    assert!(connected_to(&a, b.peer_id()).await);
    for n in [a, b, keyless, wrong_key] {
        n.handle.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_peers_connect() {
    common::init_logs();
    let b_dir = tempfile::tempdir().unwrap();
    let b_id = identity_in(&b_dir);
    let a = start(vec![], |c| c.allow_peers = vec![b_id]).await;
    let mut b_config = loopback_config(&b_dir, vec![a.bootstrap_addr()]);
    b_config.listen.retain(|x| x.to_string().contains("/tcp/"));
    let b = TestNode {
        handle: node::start(b_config).await.unwrap(),
        dir: b_dir,
    };
    wait_for("b to connect to a", WAIT, || async {
        connected_to(&a, b.peer_id()).await.then_some(())
    })
    .await;
    let stranger = start(vec![a.bootstrap_addr()], |_| {}).await;
    wait_for("a to refuse the stranger", WAIT, || async {
        (denied(&a).await >= 1).then_some(())
    })
    .await;
    assert!(!connected_to(&a, stranger.peer_id()).await);
    for n in [a, b, stranger] {
        n.handle.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_peer_is_cut_off_and_stays_banned_after_a_restart() {
    common::init_logs();
    let a = start(vec![], |_| {}).await;
    let liar = start(vec![a.bootstrap_addr()], |_| {}).await;
    // Connected, and identify told a its listen address: only then does the address book
    // (saved at shutdown) hold an entry to find after the restart.
    wait_for("the liar to connect and identify itself", WAIT, || async {
        let peers = a.handle.client.peers().await.ok()?;
        peers
            .iter()
            .any(|p| p.peer_id == liar.peer_id().to_string() && p.connected && !p.addrs.is_empty())
            .then_some(())
    })
    .await;
    for _ in 0..3 {
        a.handle
            .client
            .refuse_peer(liar.peer_id(), "a test offence".into(), false)
            .await
            .unwrap();
    }
    let banned = wait_for("the ban to show in /peers", WAIT, || async {
        let peers = a.handle.client.peers().await.ok()?;
        let me = peers
            .into_iter()
            .find(|p| p.peer_id == liar.peer_id().to_string())?;
        (!me.connected).then_some(me.banned_until_unix?)
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        banned > now + 500,
        "banned for about ten minutes: {banned} vs {now}"
    );
    // The liar keeps trying (its maintenance redials a), and is refused every time.
    let before = denied(&a).await;
    wait_for("a to refuse the liar's redials", WAIT, || async {
        (denied(&a).await >= before + 2).then_some(())
    })
    .await;
    assert!(!connected_to(&a, liar.peer_id()).await);

    // A restart does not forgive: the ban is read back from bans.json. The node comes back on
    // the same port, where the liar keeps redialling it.
    let listen = a.bootstrap_addr().addr.clone();
    let TestNode { handle, dir } = a;
    handle.stop().await.unwrap();
    assert!(dir.path().join("bans.json").exists());
    let mut config = NodeConfig::loopback(dir.path());
    config.listen = vec![listen
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()];
    let a = TestNode {
        handle: node::start(config).await.unwrap(),
        dir,
    };
    let peers = a.handle.client.peers().await.unwrap();
    let me = peers
        .iter()
        .find(|p| p.peer_id == liar.peer_id().to_string())
        .expect("the liar is still in the address book");
    assert_eq!(me.banned_until_unix, Some(banned));
    wait_for(
        "the restarted node to refuse the liar's redials",
        WAIT,
        || async { (denied(&a).await >= 1).then_some(()) },
    )
    .await;
    assert!(!connected_to(&a, liar.peer_id()).await);
    for n in [a, liar] {
        n.handle.stop().await.unwrap();
    }
}
