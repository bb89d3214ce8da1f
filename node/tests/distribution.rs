//! Swarm distribution in one process: real nodes on 127.0.0.1, real files, real chunk
//! transfers. Every wait is on a condition with a deadline.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{
    model_file, start_node, start_node_with, wait_for, wait_fully_discovered, TestNode,
    CONVERGE_TIMEOUT,
};
use p2p_node::models::Stage;
use p2p_node::models::{DownloadReport, ModelInfo};
use p2p_protocol::manifest::VersionId;

/// Generous: a debug build on a busy 2-core machine.
const FETCH_TIMEOUT: Duration = Duration::from_secs(240);

async fn fetch(node: &TestNode, id: VersionId) -> DownloadReport {
    tokio::time::timeout(FETCH_TIMEOUT, node.handle.client.fetch(id))
        .await
        .expect("fetch finished in time")
        .expect("fetch succeeded")
}

/// A node that published a fresh `mib` MiB model file (from `seed`, written in `files`) as
/// `model`: the file's bytes, the node and the version's id.
async fn publisher_of(
    files: &std::path::Path,
    mib: usize,
    seed: u64,
    model: &str,
) -> (Vec<u8>, TestNode, VersionId) {
    let (path, bytes) = model_file(files, "m.safetensors", mib, seed);
    let publisher = start_node(vec![]).await;
    let id = publisher
        .handle
        .client
        .publish(&path, model)
        .await
        .unwrap()
        .id;
    (bytes, publisher, id)
}

/// Exports `id` from `node` and checks the bytes.
async fn assert_holds(node: &TestNode, id: VersionId, expected: &[u8]) {
    let out = node.dir.path().join("exported.safetensors");
    node.handle.client.export(id, &out, true).await.unwrap();
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == expected,
        "node {} has different bytes",
        node.peer_id()
    );
}

async fn info(node: &TestNode, id: VersionId) -> ModelInfo {
    let hex = id.to_hex();
    node.handle
        .client
        .models()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == hex)
        .expect("version listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_get_identical_bytes_and_the_swarm_carries_most_uploads() {
    let files = tempfile::tempdir().unwrap();
    let (path, bytes) = model_file(files.path(), "m.safetensors", 32, 1);
    let publisher = start_node(vec![]).await;
    let announcement = publisher
        .handle
        .client
        .publish(&path, "swarm-test")
        .await
        .unwrap();
    let mut fetchers = Vec::new();
    for _ in 0..7 {
        fetchers.push(start_node(vec![publisher.bootstrap_addr()]).await);
    }
    let mut all: Vec<&TestNode> = fetchers.iter().collect();
    all.push(&publisher);
    wait_fully_discovered("8 nodes to discover each other", &all).await;

    let started = Instant::now();
    let reports =
        futures::future::join_all(fetchers.iter().map(|n| fetch(n, announcement.id))).await;
    let elapsed = started.elapsed();
    for (node, report) in fetchers.iter().zip(&reports) {
        assert_eq!(report.chunks_downloaded, report.chunks, "{report:?}");
        assert_holds(node, announcement.id, &bytes).await;
    }
    let uploaded = info(&publisher, announcement.id).await.bytes_uploaded;
    let copies = uploaded as f64 / bytes.len() as f64;
    let peers_used: Vec<usize> = reports.iter().map(|r| r.peers_used).collect();
    eprintln!(
        "8 nodes, 32 MiB: all done in {elapsed:.1?}; publisher uploaded {copies:.2} copies; peers used per fetcher {peers_used:?}"
    );
    assert!(
        copies < 3.5,
        "the publisher uploaded {copies:.2} copies; the swarm should carry most of the 7"
    );
    assert!(
        reports.iter().any(|r| r.peers_used > 1),
        "fetchers should download from several peers at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupt_chunks_is_dropped_and_honest_nodes_finish() {
    let files = tempfile::tempdir().unwrap();
    let (bytes, publisher, id) = publisher_of(files.path(), 8, 2, "corrupt-test").await;
    // The liar first gets a good copy, then serves it with flipped bytes.
    let liar = start_node_with(vec![publisher.bootstrap_addr()], |c| {
        c.models.corrupt_uploads = true;
    })
    .await;
    fetch(&liar, id).await;
    let mut honest = Vec::new();
    for _ in 0..3 {
        honest.push(start_node(vec![publisher.bootstrap_addr()]).await);
    }
    let mut all: Vec<&TestNode> = honest.iter().collect();
    all.extend([&publisher, &liar]);
    wait_fully_discovered("5 nodes to discover each other", &all).await;

    futures::future::join_all(honest.iter().map(|n| fetch(n, id))).await;
    let mut penalized_by = 0;
    for node in &honest {
        assert_holds(node, id, &bytes).await;
        let penalties = node.handle.client.penalties().await.unwrap();
        assert!(
            !penalties.contains_key(&publisher.peer_id()),
            "an honest peer was penalized"
        );
        if penalties.get(&liar.peer_id()).copied().unwrap_or(0) > 0 {
            penalized_by += 1;
        }
    }
    assert!(
        penalized_by >= 1,
        "the liar was asked by someone and must have been penalized"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchers_finish_after_the_publisher_leaves() {
    let files = tempfile::tempdir().unwrap();
    let (bytes, publisher, id) = publisher_of(files.path(), 8, 3, "leave-test").await;
    let first = start_node(vec![publisher.bootstrap_addr()]).await;
    fetch(&first, id).await;
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(start_node(vec![publisher.bootstrap_addr()]).await);
    }
    let mut all: Vec<&TestNode> = rest.iter().collect();
    all.extend([&publisher, &first]);
    wait_fully_discovered("5 nodes to discover each other", &all).await;

    publisher.handle.stop().await.unwrap();
    futures::future::join_all(rest.iter().map(|n| fetch(n, id))).await;
    for node in &rest {
        assert_holds(node, id, &bytes).await;
    }
}

/// A one-shot export (not kept) moves the store's data file to the output: the bytes are
/// right, the store no longer lists the version and holds no second copy; a kept export
/// copies and the version stays served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_not_kept_moves_the_file_out_of_the_store() {
    let files = tempfile::tempdir().unwrap();
    let (bytes, publisher, id) = publisher_of(files.path(), 4, 7, "export-test").await;
    let fetcher = start_node(vec![publisher.bootstrap_addr()]).await;
    fetch(&fetcher, id).await;
    assert_holds(&fetcher, id, &bytes).await; // kept: a copy
    info(&fetcher, id).await;
    let store_dir = fetcher.dir.path().join("models").join(id.to_hex());
    assert!(
        store_dir.join("data").exists(),
        "the store holds the version"
    );
    let out = files.path().join("moved.safetensors");
    fetcher.handle.client.export(id, &out, false).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == bytes, "moved file differs");
    let hex = id.to_hex();
    let listed = fetcher.handle.client.models().await.unwrap();
    assert!(
        listed.iter().all(|m| m.id != hex),
        "the store still lists a version it gave away"
    );
    assert!(
        !store_dir.exists(),
        "the version's directory is left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_checks_the_file_and_identical_bytes_keep_their_id() {
    let files = tempfile::tempdir().unwrap();
    let (path, _) = model_file(files.path(), "m.safetensors", 2, 4);
    let node = start_node(vec![]).await;
    let first = node.handle.client.publish(&path, "same").await.unwrap();
    let again = node.handle.client.publish(&path, "same").await.unwrap();
    assert_eq!(first.id, again.id);
    assert_eq!(first.version, again.version);

    let text = files.path().join("notes.txt");
    std::fs::write(&text, "just some text, not a model").unwrap();
    let err = node.handle.client.publish(&text, "text").await.unwrap_err();
    assert!(format!("{err:#}").contains("safetensors"), "{err:#}");
    let err = node
        .handle
        .client
        .publish(&path, "bad name")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("model name"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_shared_with_a_held_version_are_copied_not_downloaded() {
    let files = tempfile::tempdir().unwrap();
    // Version 1 changes one 4 MiB tensor of eight; the rest is shared with version 0.
    let (v0_path, _) = model_file(files.path(), "v0.safetensors", 32, 10);
    let publisher = start_node(vec![]).await;
    let v0 = publisher
        .handle
        .client
        .publish(&v0_path, "ckpt")
        .await
        .unwrap();
    let fetcher = start_node(vec![publisher.bootstrap_addr()]).await;
    fetch(&fetcher, v0.id).await;

    let mut tensors: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                format!("layer{i}.weight"),
                common::pseudo_random(4 << 20, 10 + i as u64),
            )
        })
        .collect();
    tensors[7].1 = common::pseudo_random(4 << 20, 999);
    let refs: Vec<(&str, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    let v1_path = files.path().join("v1.safetensors");
    let v1_bytes = common::write_safetensors(&v1_path, &refs);
    let v1 = publisher
        .handle
        .client
        .publish(&v1_path, "ckpt")
        .await
        .unwrap();
    assert_eq!(v1.version, 1);

    let report = fetch(&fetcher, v1.id).await;
    assert_holds(&fetcher, v1.id, &v1_bytes).await;
    assert!(
        report.chunks_copied_locally >= 27,
        "most chunks are shared with version 0: {report:?}"
    );
    assert!(report.chunks_downloaded <= 5, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_fetches_each_new_version_as_it_is_announced() {
    let files = tempfile::tempdir().unwrap();
    let publisher = start_node(vec![]).await;
    let follower = start_node_with(vec![publisher.bootstrap_addr()], |c| {
        c.follow = vec!["followed".into()];
    })
    .await;
    wait_fully_discovered("2 nodes to meet", &[&publisher, &follower]).await;
    // If the gossip mesh is not formed yet the announcement can miss the follower; it then
    // finds the version by asking its peers, which a follower does periodically.
    let (path, bytes) = model_file(files.path(), "f.safetensors", 2, 20);
    let a = publisher
        .handle
        .client
        .publish(&path, "followed")
        .await
        .unwrap();
    let complete = wait_for(
        "the follower to fetch the announced version",
        CONVERGE_TIMEOUT,
        || async {
            let models = follower.handle.client.models().await.ok()?;
            models
                .into_iter()
                .find(|m| m.id == a.id.to_hex() && m.complete)
        },
    )
    .await;
    assert_eq!(complete.version, 0);
    assert_holds(&follower, a.id, &bytes).await;
}

/// Publishes 4 MiB on a node and has two fetchers get it, all under `stage`; returns the
/// publisher's upload in copies and the fetchers' uploads in bytes.
async fn run_stage(stage: Stage, portions: bool) -> (f64, Vec<u64>) {
    let files = tempfile::tempdir().unwrap();
    let (path, bytes) = model_file(files.path(), "m.safetensors", 4, 30);
    let publisher = start_node_with(vec![], |c| c.models.stage = stage).await;
    let a = publisher
        .handle
        .client
        .publish(&path, "stages")
        .await
        .unwrap();
    let mut fetchers = Vec::new();
    for i in 0..2u32 {
        fetchers.push(
            start_node_with(vec![publisher.bootstrap_addr()], |c| {
                c.models.stage = stage;
                if portions {
                    c.models.portion = Some((i, 2));
                }
            })
            .await,
        );
    }
    let mut all: Vec<&TestNode> = fetchers.iter().collect();
    all.push(&publisher);
    wait_fully_discovered("3 nodes to meet", &all).await;
    futures::future::join_all(fetchers.iter().map(|n| fetch(n, a.id))).await;
    let mut fetcher_uploads = Vec::new();
    for node in &fetchers {
        assert_holds(node, a.id, &bytes).await;
        fetcher_uploads.push(info(node, a.id).await.bytes_uploaded);
    }
    let copies = info(&publisher, a.id).await.bytes_uploaded as f64 / bytes.len() as f64;
    (copies, fetcher_uploads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_re_serving_the_publisher_uploads_every_copy() {
    for stage in [Stage::Sequential, Stage::ParallelPush] {
        let (copies, fetcher_uploads) = run_stage(stage, false).await;
        assert!((copies - 2.0).abs() < 1e-9, "{stage:?}: {copies} copies");
        assert_eq!(
            fetcher_uploads,
            vec![0, 0],
            "{stage:?}: fetchers must not serve"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_fetchers_take_their_portion_from_the_publisher_and_swap_the_rest() {
    let (copies, fetcher_uploads) = run_stage(Stage::Coordinated, true).await;
    assert!(
        (copies - 1.0).abs() < 1e-9,
        "publisher sent {copies} copies"
    );
    assert!(
        fetcher_uploads.iter().all(|b| *b > 0),
        "each fetcher served its portion to the other: {fetcher_uploads:?}"
    );
}

/// A version published while no peer was connected ("no peers to announce to yet") is
/// announced when peers join the announcements topic, so the rest of the network learns it
/// without asking the publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_published_before_any_peer_is_announced_when_peers_join() {
    common::init_logs();
    let publisher = common::start_node(vec![]).await;
    let files = tempfile::tempdir().unwrap();
    let (path, _) = common::model_file(files.path(), "early.safetensors", 1, 3);
    let published = publisher
        .handle
        .client
        .publish(&path, "early")
        .await
        .unwrap();
    let hub = common::start_node(vec![publisher.bootstrap_addr()]).await;
    let publisher_id = publisher.peer_id().to_string();
    common::wait_for(
        "the hub to hear the announcement",
        common::CONVERGE_TIMEOUT,
        || async {
            hub.handle
                .client
                .history()
                .body()
                .events
                .iter()
                .any(|e| {
                    e.kind == "version"
                        && e.peer.as_deref() == Some(publisher_id.as_str())
                        && e.text
                            .starts_with(&format!("early version {}", published.version))
                })
                .then_some(())
        },
    )
    .await;
}
