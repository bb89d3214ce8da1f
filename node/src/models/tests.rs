//! The models behaviour ([`Behaviour`]) alone, on in-memory swarms (`libp2p-swarm-test`): no
//! event loop, no DHT, no gossip. The test answers nothing the behaviour asks of the rest of
//! the node (provider lookups, announcements); peers find each other by being connected.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use libp2p::swarm::{Swarm, SwarmEvent};
use libp2p::PeerId;
use libp2p_swarm_test::SwarmExt;
use p2p_protocol::manifest::VersionId;
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::store::Store;
use super::ModelsConfig;
use super::{Behaviour, DownloadReport, Event};

const CHUNK: u32 = 64 * 1024;

/// A node's models behaviour with its store in a temp dir.
struct Node {
    swarm: Swarm<Behaviour>,
    _dir: TempDir,
    events: Vec<Event>,
}

fn node(config: ModelsConfig) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("models")).unwrap();
    let swarm =
        Swarm::new_ephemeral_tokio(|key| Behaviour::new(config, store, key.public().to_peer_id()));
    Node {
        swarm,
        _dir: dir,
        events: Vec::new(),
    }
}

/// A safetensors file of one U8 tensor of `len` bytes in `dir`.
fn model_file(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{len}],"data_offsets":[0,{len}]}}}}"#);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..len).map(|i| (i * 7 % 251) as u8));
    let path = dir.join("m.safetensors");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Publishes the same 10-chunk file on `node`; returns the version id.
fn publish(node: &mut Node, file: &std::path::Path) -> VersionId {
    let root = node._dir.path().join("models");
    let imported = Store::import_file(&root, file, CHUNK).unwrap();
    node.swarm
        .behaviour_mut()
        .publish(imported, "m", None)
        .unwrap()
        .id
}

/// Runs every node until `fetcher` (the last) has `id` (or failed), collecting events.
async fn fetch(nodes: &mut [Node], id: VersionId) -> Result<DownloadReport, super::Error> {
    let (tx, mut rx) = oneshot::channel();
    let last = nodes.len() - 1;
    nodes[last].swarm.behaviour_mut().fetch(id, tx, None);
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let polls = nodes.iter_mut().map(|n| {
                Box::pin(async move {
                    if let SwarmEvent::Behaviour(e) = n.swarm.next_swarm_event().await {
                        n.events.push(e);
                    }
                })
            });
            tokio::select! {
                result = &mut rx => return result.unwrap(),
                _ = futures::future::select_all(polls) => {}
            }
        }
    })
    .await
    .expect("the fetch ended in time")
}

async fn connect(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.swarm.listen().with_memory_addr_external().await;
    }
    let last = nodes.len() - 1;
    let (holders, fetcher) = nodes.split_at_mut(last);
    for h in holders {
        fetcher[0].swarm.connect(&mut h.swarm).await;
    }
}

/// Two holders of the same version of `file` (configured `first` and `second`) and a
/// fetcher (`fetcher`), connected; returns them (holders first) and the version id.
async fn two_holders_and_a_fetcher(
    file: &std::path::Path,
    first: ModelsConfig,
    second: ModelsConfig,
    fetcher: ModelsConfig,
) -> (Vec<Node>, VersionId) {
    let mut nodes = vec![node(first), node(second), node(fetcher)];
    connect(&mut nodes).await;
    let id = publish(&mut nodes[0], file);
    assert_eq!(publish(&mut nodes[1], file), id, "same bytes, same version");
    (nodes, id)
}

/// Bytes of version `id` that `node` uploaded.
fn sent_by(node: &Node, id: VersionId) -> u64 {
    node.swarm
        .behaviour()
        .models()
        .iter()
        .find(|m| m.id == id.to_hex())
        .map_or(0, |m| m.bytes_uploaded)
}

fn misbehaved(node: &Node) -> Vec<PeerId> {
    node.events
        .iter()
        .filter_map(|e| match e {
            Event::Misbehaved { peer, .. } => Some(*peer),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_version_moves_between_two_behaviours_and_is_verified() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 10 * CHUNK as usize - 100);
    let mut nodes = vec![node(ModelsConfig::default()), node(ModelsConfig::default())];
    connect(&mut nodes).await;
    let id = publish(&mut nodes[0], &file);
    let report = fetch(&mut nodes, id).await.unwrap();
    assert_eq!(report.chunks, 10);
    assert_eq!(report.chunks_downloaded, 10);
    let (manifest, data) = nodes[1].swarm.behaviour().complete_version(&id).unwrap();
    assert_eq!(manifest.total_size, std::fs::metadata(&file).unwrap().len());
    assert!(std::fs::read(data).unwrap() == std::fs::read(&file).unwrap());
    assert!(misbehaved(&nodes[1]).is_empty());
    // The holder asked for its provider record; the fetcher for providers.
    assert!(nodes[0].events.contains(&Event::Provide(id)));
    assert!(nodes[1].events.contains(&Event::FindProviders(id)));
}

#[tokio::test]
async fn a_peer_that_sends_a_bad_chunk_is_reported_and_the_good_one_serves_the_version() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 10 * CHUNK as usize - 100);
    let liar_config = ModelsConfig {
        corrupt_uploads: true,
        ..ModelsConfig::default()
    };
    let (mut nodes, id) = two_holders_and_a_fetcher(
        &file,
        liar_config,
        ModelsConfig::default(),
        ModelsConfig::default(),
    )
    .await;
    let liar = *nodes[0].swarm.local_peer_id();
    let report = fetch(&mut nodes, id).await.unwrap();
    assert_eq!(report.chunks_downloaded, 10);
    let (_, data) = nodes[2].swarm.behaviour().complete_version(&id).unwrap();
    assert!(std::fs::read(data).unwrap() == std::fs::read(&file).unwrap());
    // The liar was asked (each holder gets a share of the first requests) and reported.
    assert_eq!(misbehaved(&nodes[2]), vec![liar], "{:?}", nodes[2].events);
}

#[tokio::test]
async fn a_busy_holder_is_left_for_another_one() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 10 * CHUNK as usize - 100);
    // One chunk's worth of burst, then 1 byte/s: every further request is answered "busy".
    let busy_config = ModelsConfig {
        max_upload_rate: Some(1),
        chunk_size: CHUNK,
        ..ModelsConfig::default()
    };
    let (mut nodes, id) = two_holders_and_a_fetcher(
        &file,
        busy_config,
        ModelsConfig::default(),
        ModelsConfig::default(),
    )
    .await;
    let report = fetch(&mut nodes, id).await.unwrap();
    assert_eq!(report.chunks_downloaded, 10);
    let (busy, other) = (sent_by(&nodes[0], id), sent_by(&nodes[1], id));
    assert!(busy <= u64::from(CHUNK), "the busy holder sent {busy}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        other >= size - u64::from(CHUNK),
        "the other holder sent {other} of {size}"
    );
    assert!(misbehaved(&nodes[2]).is_empty(), "busy is not misbehaviour");
}

/// Endgame: the last chunk is asked of both holders; the first answer is written, the slower
/// duplicate is dropped (not written, not counted as downloaded, not blamed on its sender).
#[tokio::test]
async fn endgame_asks_two_holders_and_drops_the_slower_duplicate() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), CHUNK as usize - 100);
    // Holders in the coordinated stage serve every request (no initial-seeding declines).
    let holder = || ModelsConfig {
        stage: super::Stage::Coordinated,
        ..ModelsConfig::default()
    };
    let fetcher = ModelsConfig {
        endgame_copies: 2,
        ..ModelsConfig::default()
    };
    let (mut nodes, id) = two_holders_and_a_fetcher(&file, holder(), holder(), fetcher).await;
    let report = fetch(&mut nodes, id).await.unwrap();
    // Let the slower holder's answer arrive and be dropped.
    let sent = |nodes: &[Node]| -> Vec<u64> { nodes[..2].iter().map(|n| sent_by(n, id)).collect() };
    let size = std::fs::metadata(&file).unwrap().len();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while sent(&nodes).iter().sum::<u64>() < 2 * size {
            let polls = nodes
                .iter_mut()
                .map(|n| Box::pin(n.swarm.next_swarm_event()));
            futures::future::select_all(polls).await;
        }
    })
    .await;
    assert_eq!(
        sent(&nodes),
        vec![size, size],
        "both holders were asked for the chunk"
    );
    assert_eq!((report.chunks, report.chunks_downloaded), (1, 1));
    let info = nodes[2].swarm.behaviour().models();
    let got = info.iter().find(|m| m.id == id.to_hex()).unwrap();
    assert_eq!(got.bytes_downloaded, size, "the duplicate was not counted");
    let (_, data) = nodes[2].swarm.behaviour().complete_version(&id).unwrap();
    assert!(std::fs::read(data).unwrap() == std::fs::read(&file).unwrap());
    assert!(
        misbehaved(&nodes[2]).is_empty(),
        "a late duplicate is not misbehaviour"
    );
}

/// A publish whose caller went away before the import finished (an HTTP client that
/// disconnected) publishes nothing and leaves no staging copy.
#[tokio::test]
async fn an_import_whose_caller_went_away_is_not_published() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 3 * CHUNK as usize);
    let mut n = node(ModelsConfig::default());
    let root = n._dir.path().join("models");
    let imported = Store::import_file(&root, &file, CHUNK).unwrap();
    let staging = imported.staging.clone();
    assert!(staging.exists());
    let (reply, gone) = oneshot::channel();
    drop(gone);
    let request = super::disk::PublishFile {
        file: file.clone(),
        model: "m".into(),
        checkpoint: false,
        reply,
    };
    n.swarm
        .behaviour_mut()
        .on_disk_event(super::disk::DiskEvent::Imported(Box::new(
            super::disk::Imported {
                request,
                result: Ok((imported, None)),
            },
        )));
    assert!(n.swarm.behaviour().models().is_empty(), "nothing published");
    assert!(!staging.exists(), "the staging copy is deleted");
}
