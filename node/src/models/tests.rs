//! The models behaviour ([`Behaviour`]) alone, on in-memory swarms (`libp2p-swarm-test`): no
//! event loop, no DHT, no gossip. The test answers nothing the behaviour asks of the rest of
//! the node (provider lookups, announcements); peers find each other by being connected.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use libp2p::swarm::{Swarm, SwarmEvent};
use libp2p::PeerId;
use libp2p_swarm_test::SwarmExt;
use p2p_protocol::manifest::VersionId;
use p2p_protocol::messages::Announcement;
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::store::Store;
use super::trust::Trust;
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
    node_in(tempfile::tempdir().unwrap(), config)
}

/// A node whose store is `dir/models`.
fn node_in(dir: TempDir, config: ModelsConfig) -> Node {
    let store = Store::open(&dir.path().join("models")).unwrap();
    let swarm =
        Swarm::new_ephemeral_tokio(|key| Behaviour::new(config, store, key, Trust::new([])));
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
    connect_after(nodes, 0).await;
}

/// Connects the last node to every other one; the first `listening` are listening already.
async fn connect_after(nodes: &mut [Node], listening: usize) {
    for n in nodes.iter_mut().skip(listening) {
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
    let mut publisher = node(first);
    publisher.swarm.listen().with_memory_addr_external().await;
    let id = publish(&mut publisher, file);
    // The second holder holds the very same signed version: a copy of the publisher's store.
    let holder = node_with_store_of(second, &publisher);
    let mut nodes = vec![publisher, holder, node(fetcher)];
    connect_after(&mut nodes, 1).await;
    (nodes, id)
}

/// A node whose store starts as a copy of `other`'s.
fn node_with_store_of(config: ModelsConfig, other: &Node) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let from = other._dir.path().join("models");
    let to = dir.path().join("models");
    for entry in walk(&from) {
        let target = to.join(entry.strip_prefix(&from).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    node_in(dir, config)
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// What `node` reports of version `id`, if it holds it.
fn info(node: &Node, id: VersionId) -> Option<super::ModelInfo> {
    let hex = id.to_hex();
    node.swarm
        .behaviour()
        .models()
        .into_iter()
        .find(|m| m.id == hex)
}

/// Bytes of version `id` that `node` uploaded.
fn sent_by(node: &Node, id: VersionId) -> u64 {
    info(node, id).map_or(0, |m| m.bytes_uploaded)
}

/// Chunks of version `id` that `node` holds, verified.
fn held(node: &Node, id: VersionId) -> u32 {
    info(node, id).map_or(0, |m| m.chunks_held)
}

/// Runs every node until `done` holds of them (at most 60 s), collecting events.
async fn run_until(nodes: &mut [Node], done: impl Fn(&[Node]) -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done(nodes) {
            let polls = nodes.iter_mut().map(|n| {
                Box::pin(async move {
                    if let SwarmEvent::Behaviour(e) = n.swarm.next_swarm_event().await {
                        n.events.push(e);
                    }
                })
            });
            futures::future::select_all(polls).await;
        }
    })
    .await
    .expect("the nodes got there in time");
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

/// Long polling: with availability polled only once an hour, a fetcher still learns of
/// every chunk its only neighbour gets while both download, because the neighbour holds its
/// availability requests and answers each as a new chunk arrives. (With `availability_wait`
/// zero on the neighbour this fetch stalls after the first answer.)
#[tokio::test]
async fn a_held_availability_request_tells_a_fetcher_of_each_new_chunk() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 10 * CHUNK as usize - 100);
    // Chunks leave the publisher at 2 a second after a burst of 2: about 4 s in all.
    let slow = ModelsConfig {
        max_upload_rate: Some(2 * u64::from(CHUNK)),
        chunk_size: CHUNK,
        ..ModelsConfig::default()
    };
    let mut publisher = node(slow);
    publisher.swarm.listen().with_memory_addr_external().await;
    let id = publish(&mut publisher, &file);
    let mut middle = node(ModelsConfig::default());
    middle.swarm.listen().with_memory_addr_external().await;
    middle.swarm.connect(&mut publisher.swarm).await;
    let (tx, _middle_done) = oneshot::channel();
    middle.swarm.behaviour_mut().fetch(id, tx, None);
    let mut nodes = vec![publisher, middle];
    run_until(&mut nodes, |n| held(&n[1], id) >= 1).await;
    let before = held(&nodes[1], id);
    assert!(before < 10, "the neighbour is still downloading");
    let mut last = node(ModelsConfig {
        have_refresh: Duration::from_secs(3600),
        ..ModelsConfig::default()
    });
    last.swarm.connect(&mut nodes[1].swarm).await;
    nodes.push(last);
    let report = fetch(&mut nodes, id).await.unwrap();
    assert_eq!(report.chunks_downloaded, 10);
    assert_eq!(
        sent_by(&nodes[1], id),
        std::fs::metadata(&file).unwrap().len()
    );
}

/// Nodes that do not hold availability requests (long polling off, like older nodes) and
/// nodes that do work together: a fetcher that long polls completes from holders of both
/// kinds, and a fetcher that polls completes from holders that would hold its requests.
#[tokio::test]
async fn a_fetch_completes_whether_or_not_its_peers_hold_availability_requests() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 10 * CHUNK as usize - 100);
    let polling = ModelsConfig {
        availability_wait: Duration::ZERO,
        max_uploads: 1,
        chunk_size: CHUNK,
        ..ModelsConfig::default()
    };
    let holding = ModelsConfig {
        availability_wait: ModelsConfig::default().availability_wait,
        ..polling.clone()
    };
    for (first, second, fetcher) in [
        (polling.clone(), holding.clone(), holding.clone()),
        (holding.clone(), holding.clone(), polling.clone()),
    ] {
        let (mut nodes, id) = two_holders_and_a_fetcher(&file, first, second, fetcher).await;
        let report = fetch(&mut nodes, id).await.unwrap();
        assert_eq!(report.chunks_downloaded, 10);
        let sent = sent_by(&nodes[0], id) + sent_by(&nodes[1], id);
        assert!(sent >= std::fs::metadata(&file).unwrap().len());
        assert!(misbehaved(&nodes[2]).is_empty());
    }
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

/// A fresh identity.
fn key() -> libp2p::identity::Keypair {
    libp2p::identity::Keypair::generate_ed25519()
}

/// A models behaviour outside a swarm, with its store under `dir`.
fn bare(dir: &std::path::Path, key: &libp2p::identity::Keypair) -> Behaviour {
    let store = Store::open(&dir.join("models")).unwrap();
    Behaviour::new(ModelsConfig::default(), store, key.clone(), Trust::new([]))
}

/// Publishes `file` as the next version of model `m` on `b`.
fn publish_bare(b: &mut Behaviour, dir: &std::path::Path, file: &std::path::Path) -> Announcement {
    let imported = Store::import_file(&dir.join("models"), file, CHUNK).unwrap();
    b.publish(imported, "m", None).unwrap()
}

/// The adversarial peer's fake newest version: its own signed "m" at u64::MAX. Neither the
/// publisher's numbering nor a follower's downloads move; a renumbered copy of the real one
/// does not even decode. The follower keeps only the newest real version in progress.
#[tokio::test]
async fn a_fake_newest_version_moves_nothing_and_a_follower_keeps_only_the_newest_in_progress() {
    let files = tempfile::tempdir().unwrap();
    let first = model_file(&files.path().join(""), 3 * CHUNK as usize);
    let second_dir = files.path().join("2");
    std::fs::create_dir_all(&second_dir).unwrap();
    let second = model_file(&second_dir, 4 * CHUNK as usize);
    let keys: Vec<libp2p::identity::Keypair> = (0..3).map(|_| key()).collect();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut publisher = bare(dirs[0].path(), &keys[0]);
    let v0 = publish_bare(&mut publisher, dirs[0].path(), &first);

    // The liar signs its own "m" numbered u64::MAX (it cannot sign the publisher's).
    let (mut fake, _) = publisher.complete_version(&v0.id).unwrap();
    fake.version = u64::MAX;
    fake.parent = Some(VersionId::of(b"a parent nobody has"));
    fake.sign(&keys[1]);
    let fake = fake.announcement();
    assert!(
        publisher.on_gossip(None, &fake.encode()).is_some(),
        "valid, but the liar's"
    );
    let v1 = publish_bare(&mut publisher, dirs[0].path(), &second);
    assert_eq!(
        (v1.version, v1.parent),
        (1, Some(v0.id)),
        "numbered from its own chain"
    );
    let mut renumbered = v1.clone();
    renumbered.version = u64::MAX;
    assert!(publisher.on_gossip(None, &renumbered.encode()).is_none());

    // A follower that was fetching v0 when it stopped.
    {
        let mut store = Store::open(&dirs[2].path().join("models")).unwrap();
        let (m, _) = publisher.complete_version(&v0.id).unwrap();
        store.begin(v0.id, m.clone(), &m.encode()).unwrap();
    }
    let mut follower = bare(dirs[2].path(), &keys[2]);
    follower.follow("m".into());
    assert!(follower.download_state(&v0.id).is_some(), "resumed");
    follower.on_gossip(None, &fake.encode());
    assert!(
        follower.download_state(&fake.id).is_none(),
        "another publisher's version"
    );
    follower.on_gossip(None, &v1.encode());
    assert!(
        follower.download_state(&v1.id).is_some(),
        "the publisher's newer version"
    );
    assert!(
        follower.download_state(&v0.id).is_none(),
        "the older one is cancelled"
    );
    let v0_dir = dirs[2].path().join("models").join(v0.id.to_hex());
    assert!(
        v0_dir.exists(),
        "its files stay until v1's manifest is held"
    );
    drop(follower);

    // Restarted with both interrupted: following the name keeps only the newest going.
    {
        let mut store = Store::open(&dirs[2].path().join("models")).unwrap();
        let (m, _) = publisher.complete_version(&v1.id).unwrap();
        store.begin(v1.id, m.clone(), &m.encode()).unwrap();
    }
    let mut follower = bare(dirs[2].path(), &keys[2]);
    follower.follow("m".into());
    assert!(follower.download_state(&v1.id).is_some());
    assert!(follower.download_state(&v0.id).is_none());
    assert!(!v0_dir.exists(), "the superseded one's files are removed");
}

/// Interrupted downloads of a model nobody follows (a `fetch ID` killed, twice) all resume:
/// only following a name keeps just the newest.
#[tokio::test]
async fn interrupted_fetches_by_id_all_resume_when_the_name_is_not_followed() {
    let files = tempfile::tempdir().unwrap();
    let first = model_file(files.path(), 3 * CHUNK as usize);
    let second_dir = files.path().join("2");
    std::fs::create_dir_all(&second_dir).unwrap();
    let second = model_file(&second_dir, 4 * CHUNK as usize);
    let (pd, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut publisher = bare(pd.path(), &key());
    let v0 = publish_bare(&mut publisher, pd.path(), &first);
    let v1 = publish_bare(&mut publisher, pd.path(), &second);
    {
        let mut store = Store::open(&fd.path().join("models")).unwrap();
        for id in [v0.id, v1.id] {
            let (m, _) = publisher.complete_version(&id).unwrap();
            store.begin(id, m.clone(), &m.encode()).unwrap();
        }
    }
    let fetcher = bare(fd.path(), &key());
    assert!(fetcher.download_state(&v0.id).is_some());
    assert!(fetcher.download_state(&v1.id).is_some());
}

/// A version whose number is not its parent's plus one is refused, even signed.
#[tokio::test]
async fn a_version_that_breaks_its_chain_is_refused() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 2 * CHUNK as usize);
    let key = key();
    let dir = tempfile::tempdir().unwrap();
    let mut publisher = bare(dir.path(), &key);
    let v0 = publish_bare(&mut publisher, dir.path(), &file);
    let (mut skip, _) = publisher.complete_version(&v0.id).unwrap();
    skip.version = 5;
    skip.parent = Some(v0.id);
    skip.sign(&key);
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = bare(
        other_dir.path(),
        &libp2p::identity::Keypair::generate_ed25519(),
    );
    assert!(other.on_gossip(None, &v0.encode()).is_some());
    assert!(other
        .on_gossip(None, &skip.announcement().encode())
        .is_none());
}

/// Two publishers of one name and no trust: a fetch by name is refused with both named;
/// `--trust` picks one.
#[tokio::test]
async fn an_ambiguous_name_is_refused_until_a_publisher_is_trusted() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 2 * CHUNK as usize);
    let (ka, kb) = (key(), key());
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = publish_bare(&mut bare(da.path(), &ka), da.path(), &file);
    let b = publish_bare(&mut bare(db.path(), &kb), db.path(), &file);
    assert_ne!(a.id, b.id, "same bytes, two publishers, two versions");
    for (trusting_b, trust) in [
        (false, Trust::new([])),
        (
            true,
            Trust::new([super::trust::TrustArg::Publisher(kb.public().to_peer_id())]),
        ),
    ] {
        let store = Store::open(&dc.path().join("models")).unwrap();
        let mut c = Behaviour::new(ModelsConfig::default(), store, key(), trust);
        c.on_gossip(None, &a.encode());
        c.on_gossip(None, &b.encode());
        let (tx, rx) = oneshot::channel();
        c.query_versions("m".into(), super::command::Scope::Trusted, tx);
        let answer = rx.await.unwrap();
        if !trusting_b {
            let err = answer.unwrap_err().to_string();
            assert!(
                err.contains("--trust") && err.contains(&a.publisher.to_base58()),
                "{err}"
            );
        } else {
            assert_eq!(answer.unwrap()[0].id, b.id);
        }
    }
}

/// A peer flooding its own signed versions fills only its share of the table: another
/// publisher's versions are still known and listed.
#[tokio::test]
async fn a_flood_of_one_publishers_versions_does_not_push_out_anothers() {
    let files = tempfile::tempdir().unwrap();
    let file = model_file(files.path(), 2 * CHUNK as usize);
    let (honest_key, liar_key) = (key(), key());
    let (hd, nd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut honest = bare(hd.path(), &honest_key);
    let real = publish_bare(&mut honest, hd.path(), &file);
    let (template, _) = honest.complete_version(&real.id).unwrap();
    let mut node = bare(nd.path(), &key());
    assert!(node.on_gossip(None, &real.encode()).is_some());
    // The liar's own "m", numbered far above the real one, more than the table holds.
    for n in 1..=(super::behaviour::MAX_ANNOUNCEMENTS_PER_PUBLISHER as u64 + 10) {
        let mut fake = template.clone();
        fake.version = u64::MAX - n;
        fake.parent = Some(VersionId::of(&n.to_le_bytes()));
        fake.sign(&liar_key);
        node.on_gossip(None, &fake.announcement().encode());
    }
    // Kept: the liar's newest 256 (its share), and the real one.
    let (tx, rx) = oneshot::channel();
    node.query_versions("m".into(), super::command::Scope::All, tx);
    let known = rx.await.unwrap().unwrap();
    assert_eq!(
        known.len(),
        super::behaviour::MAX_ANNOUNCEMENTS_PER_PUBLISHER + 1
    );
    assert!(known.iter().any(|a| a.id == real.id));
    // Listed to others: a few of each publisher, the real one among them.
    let listed = node.listed_versions("m", None);
    let liars = listed
        .iter()
        .filter(|a| a.publisher != real.publisher)
        .count();
    assert_eq!(liars, p2p_protocol::messages::MAX_VERSIONS_PER_PUBLISHER);
    assert!(listed.iter().any(|a| a.id == real.id), "{listed:?}");
    assert!(
        listed
            .iter()
            .filter(|a| a.publisher != real.publisher)
            .all(|a| a.version > u64::MAX - 20),
        "the liar's newest, its oldest evicted"
    );
    // Two publishers of "m" and no trust: ambiguous, not the liar's by its numbers.
    let (tx, rx) = oneshot::channel();
    node.query_versions("m".into(), super::command::Scope::Trusted, tx);
    assert!(rx.await.unwrap().is_err());
}
