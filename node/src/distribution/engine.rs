//! [`Engine`]: the `/p2p-ml/models/1.0.0` protocol and the swarm engine, as one libp2p
//! `NetworkBehaviour`. It wraps a request-response behaviour, tracks which peers are
//! connected, runs its own timer and its disk writer's completions, serves the versions in the
//! [`Store`], and drives downloads; it never sees the swarm or the other protocols. What it
//! needs from them it asks for as [`Event`]s (provider lookups and records in the DHT,
//! announcements on gossip), and what it learns from them comes back through
//! [`Engine::on_providers`] and [`Engine::on_gossip`].
//!
//! **Participants**: any node holding chunks of a version serves them; fetchers ask every
//! connected peer and every DHT provider. **Flow**: manifest from any peer, checked against the
//! id -> chunks already held locally copied -> every candidate asked which chunks it holds
//! (`Have`, refreshed every 200 ms) -> the [`Picker`] schedules chunk requests, rarest first,
//! at most 4 in flight per peer -> each chunk verified, written, served at once -> endgame:
//! the last chunks asked of two peers, the slower answer dropped -> complete: header checked
//! with the reference reader, provider record, waiters told. **Limits**: requests and
//! responses of at most [`MAX_REQUEST_BYTES`] / [`MAX_RESPONSE_BYTES`], 4 uploads at once
//! (more are answered "busy"), 32 verified chunks waiting for the disk per download, 4096
//! announcements remembered.
//!
//! A peer that sends a chunk or manifest that does not match its hash is dropped for that
//! version and reported ([`Event::Misbehaved`]); the node's reputation decides on penalties.
//! Failed and timed-out requests give their chunk back to the picker; new peers and providers
//! join the download at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Result};
use libp2p::request_response::{
    self, InboundRequestId, OutboundFailure, OutboundRequestId, ResponseChannel,
};
use libp2p::{PeerId, StreamProtocol};
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::codec::CborCodec;
use p2p_protocol::manifest::{Manifest, VersionId};
use p2p_protocol::messages::{
    Announcement, Request, Response, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, MAX_VERSIONS_LISTED,
    MODELS_PROTOCOL,
};
use p2p_protocol::training::TrainingMeta;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::picker::Picker;
use super::store::{ChunkWrite, ImportedFile, Store};
use super::{DistributionConfig, RateLimiter, Stage};
use crate::wire_behaviour::WrapsRequestResponse;

/// How often a follower asks its peers for versions of the models it follows (in case it
/// missed an announcement).
const FOLLOW_POLL: Duration = Duration::from_secs(5);

/// Verified chunks of one download waiting for the disk, at most; beyond it no new chunk is
/// requested until writes catch up.
const MAX_PENDING_WRITES: usize = 32;

/// How long before peers that could not give a manifest are asked again.
const MANIFEST_RETRY: Duration = Duration::from_secs(2);

/// How often downloads are driven and availability refreshed.
const TICK: Duration = Duration::from_millis(200);

/// Streams of the protocol open at once on one connection.
const MAX_CONCURRENT_STREAMS: usize = 512;

/// What the models behaviour asks of the rest of the node, or reports to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Look up the DHT's providers of this version; answer with [`Engine::on_providers`].
    FindProviders(VersionId),
    /// Put a provider record of this version in the DHT.
    Provide(VersionId),
    /// Withdraw this node's provider record of this version.
    StopProviding(VersionId),
    /// Publish these bytes (an encoded [`Announcement`]) on the announcements topic.
    Announce(Vec<u8>),
    /// A peer sent data that does not match its hash (a chunk or a manifest).
    Misbehaved {
        /// The peer.
        peer: PeerId,
        /// What it did.
        why: String,
    },
}

/// A version a peer asked for within this long is not pruned: the peer is still fetching it.
pub const IN_USE_WINDOW: Duration = Duration::from_secs(30);

/// How long a query for a model's versions waits for answers.
const VERSIONS_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// The outcome of a finished download.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadReport {
    /// Version id.
    pub id: String,
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// File size.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u32,
    /// Chunks received from peers in this run.
    pub chunks_downloaded: u32,
    /// Chunks copied from other local versions.
    pub chunks_copied_locally: u32,
    /// Chunks already verified on disk when the download (re)started.
    pub chunks_resumed: u32,
    /// Distinct peers that sent chunks.
    pub peers_used: usize,
    /// Seconds from start to completion.
    pub seconds: f64,
}

/// Where a download in progress stands, to explain why it does not finish.
#[derive(Debug, Clone, Default)]
pub struct DownloadState {
    /// Whether the manifest was obtained.
    pub manifest: bool,
    /// Chunks held and the version's chunk count (0 before the manifest).
    pub chunks_held: u32,
    /// Chunks in the version.
    pub chunks: u32,
    /// Peers known to hold the version (publisher, providers, peers with chunks).
    pub holders: usize,
    /// The last failed request of the download: `<peer id>: <error>`.
    pub last_failure: Option<String>,
    /// Seconds since a chunk last arrived from a peer (`None`: none arrived in this run).
    pub seconds_since_chunk: Option<f64>,
}

/// How far a download is, sent to watchers as it moves ([`Engine::fetch`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchProgress {
    /// Chunks held and verified.
    pub chunks_held: u32,
    /// Chunks in the version (0 until the manifest is known).
    pub chunks: u32,
    /// Bytes held (approximately: whole chunks).
    pub bytes_held: u64,
    /// Size of the version in bytes (0 until the manifest is known).
    pub size: u64,
    /// Peers known to hold chunks of it.
    pub peers: usize,
}

/// One version as listed by `GET /models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Version id.
    pub id: String,
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// Parent version id.
    pub parent: Option<String>,
    /// File size in bytes.
    pub size: u64,
    /// Chunks in the version.
    pub chunks: u32,
    /// Chunks held and verified.
    pub chunks_held: u32,
    /// Fraction held, 0 to 1.
    pub progress: f64,
    /// Whether every chunk is held.
    pub complete: bool,
    /// Whether this node published it.
    pub published: bool,
    /// Peers known to hold chunks of it (during a download).
    pub peers_serving: usize,
    /// Bytes of chunks this node sent to others.
    pub bytes_uploaded: u64,
    /// Bytes of chunks this node received from others.
    pub bytes_downloaded: u64,
    /// Peers dropped for sending bad data.
    pub bad_peers: Vec<String>,
    /// Path of the data file.
    pub path: String,
}

/// Disk work that finished on a blocking thread.
#[derive(Debug)]
pub enum DiskEvent {
    /// A verified chunk's bytes were written (or failed to be).
    ChunkWritten {
        /// The version.
        id: VersionId,
        /// The chunk.
        index: u32,
        /// Why the write failed, if it did.
        result: Result<(), String>,
    },
    /// A version's written chunks were made durable (or failed to be).
    Synced {
        /// The version.
        id: VersionId,
        /// Why the sync failed, if it did.
        result: Result<(), String>,
    },
}

/// One thread that writes verified chunks in arrival order, off the event loop. A single
/// writer keeps the file's lock uncontended (threads writing one file at once spin on it) and
/// costs no thread hand-off per chunk. Writes queued are bounded by the chunk requests in
/// flight.
struct ChunkWriter {
    jobs: std::sync::mpsc::Sender<(VersionId, u32, ChunkWrite)>,
    done: mpsc::UnboundedSender<DiskEvent>,
}

impl ChunkWriter {
    /// Starts the writer thread; it ends when the engine (the sender) is dropped.
    fn start(done: mpsc::UnboundedSender<DiskEvent>) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<(VersionId, u32, ChunkWrite)>();
        let thread_done = done.clone();
        let spawned = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || {
                for (id, index, write) in queue {
                    let result = write.run().map_err(|e| format!("{e:#}"));
                    let _ = thread_done.send(DiskEvent::ChunkWritten { id, index, result });
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the chunk writer thread; writing on the event loop");
        }
        Self { jobs, done }
    }

    /// Queues a write; its end comes back as [`DiskEvent::ChunkWritten`].
    fn write(&self, id: VersionId, index: u32, write: ChunkWrite) {
        if let Err(std::sync::mpsc::SendError((id, index, write))) =
            self.jobs.send((id, index, write))
        {
            // No writer thread: write here rather than lose the chunk.
            let result = write.run().map_err(|e| format!("{e:#}"));
            let _ = self
                .done
                .send(DiskEvent::ChunkWritten { id, index, result });
        }
    }
}

/// What an outstanding request was for.
#[derive(Debug)]
enum Purpose {
    Manifest(VersionId),
    Have(VersionId),
    Chunk(VersionId, u32),
    Versions(u64),
}

#[derive(Debug)]
struct Pending {
    peer: PeerId,
    purpose: Purpose,
    cancelled: bool,
}

#[derive(Debug, Default)]
struct Traffic {
    uploaded: u64,
    downloaded: u64,
}

/// A download in progress.
struct Download {
    picker: Option<Picker<PeerId>>,
    candidates: HashSet<PeerId>,
    banned: HashSet<PeerId>,
    have_pending: HashSet<PeerId>,
    last_have: HashMap<PeerId, Instant>,
    manifest_asked: HashSet<PeerId>,
    manifest_round: Instant,
    last_provider_query: Option<Instant>,
    publisher: Option<PeerId>,
    started: Instant,
    chunks_downloaded: u32,
    chunks_copied: u32,
    chunks_resumed: u32,
    senders: HashSet<PeerId>,
    writes_pending: usize,
    waiters: Vec<oneshot::Sender<Result<DownloadReport, String>>>,
    /// Peers known to hold the version: its publisher, Kademlia providers, peers that said
    /// they hold chunks of it.
    holders: HashSet<PeerId>,
    /// The last request of this download that failed, and why.
    last_failure: Option<String>,
    /// When the last chunk arrived from a peer.
    last_chunk: Option<Instant>,
    /// Where progress goes as the download moves.
    progress: Vec<watch::Sender<FetchProgress>>,
}

impl Download {
    fn new(publisher: Option<PeerId>) -> Self {
        Self {
            picker: None,
            candidates: HashSet::new(),
            banned: HashSet::new(),
            have_pending: HashSet::new(),
            last_have: HashMap::new(),
            manifest_asked: HashSet::new(),
            manifest_round: Instant::now(),
            last_provider_query: None,
            publisher,
            started: Instant::now(),
            chunks_downloaded: 0,
            chunks_copied: 0,
            chunks_resumed: 0,
            senders: HashSet::new(),
            writes_pending: 0,
            waiters: Vec::new(),
            holders: publisher.into_iter().collect(),
            last_failure: None,
            last_chunk: None,
            progress: Vec::new(),
        }
    }
}

struct VersionsQuery {
    model: String,
    outstanding: usize,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Announcement>>,
}

/// The distribution engine of one node.
pub struct Engine {
    inner: request_response::Behaviour<CborCodec<Request, Response>>,
    /// Peers with at least one connection.
    connected: HashSet<PeerId>,
    events: VecDeque<Event>,
    tick: tokio::time::Interval,
    disk_events: mpsc::UnboundedReceiver<DiskEvent>,
    config: DistributionConfig,
    store: Store,
    local_peer: PeerId,
    downloads: HashMap<VersionId, Download>,
    requests: HashMap<OutboundRequestId, Pending>,
    announcements: HashMap<VersionId, Announcement>,
    traffic: HashMap<VersionId, Traffic>,
    uploads: HashSet<InboundRequestId>,
    upload_limiter: Option<RateLimiter>,
    /// Per published version, how often each chunk was uploaded (for initial seeding).
    seeded: HashMap<VersionId, Vec<u32>>,
    /// When a peer last asked for a version's chunks or availability (pruning spares it).
    last_served: HashMap<VersionId, Instant>,
    followed: HashSet<String>,
    versions_queries: HashMap<u64, VersionsQuery>,
    next_query: u64,
    last_sync: Instant,
    write_done: mpsc::UnboundedSender<DiskEvent>,
    chunk_writer: ChunkWriter,
    last_follow_poll: Option<Instant>,
    rng: StdRng,
}

impl Engine {
    /// An engine serving `store`. Incomplete versions found in the store resume downloading.
    /// Finished disk work comes back through `write_done`, to be passed to
    /// [`Engine::on_disk_event`].
    pub fn new(config: DistributionConfig, store: Store, local_peer: PeerId) -> Self {
        let (write_done, disk_events) = mpsc::unbounded_channel();
        let inner = request_response::Behaviour::with_codec(
            CborCodec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES),
            [(
                StreamProtocol::new(MODELS_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS),
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut engine = Self {
            inner,
            connected: HashSet::new(),
            events: VecDeque::new(),
            tick,
            disk_events,
            store,
            local_peer,
            downloads: HashMap::new(),
            requests: HashMap::new(),
            announcements: HashMap::new(),
            traffic: HashMap::new(),
            uploads: HashSet::new(),
            seeded: HashMap::new(),
            last_served: HashMap::new(),
            upload_limiter: config
                .max_upload_rate
                .map(|rate| RateLimiter::new(rate, u64::from(config.chunk_size))),
            followed: HashSet::new(),
            versions_queries: HashMap::new(),
            next_query: 0,
            last_sync: Instant::now(),
            chunk_writer: ChunkWriter::start(write_done.clone()),
            write_done,
            last_follow_poll: None,
            rng: StdRng::from_entropy(),
            config,
        };
        let partial: Vec<VersionId> = engine
            .store
            .iter()
            .filter(|(_, v)| !v.is_complete())
            .map(|(id, _)| *id)
            .collect();
        for id in partial {
            let mut download = Download::new(None);
            engine.init_picker(&id, &mut download);
            tracing::info!(version = %id.short(), chunks_held = download.chunks_resumed, "resuming an interrupted download");
            engine.downloads.insert(id, download);
        }
        engine
    }

    /// Called once the swarm runs: provider records for held versions, pending downloads.
    pub fn start(&mut self) {
        let held: Vec<VersionId> = self
            .store
            .iter()
            .filter(|(_, v)| {
                self.serves_version(v.published, v.is_complete()) && v.have.count() > 0
            })
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            self.start_providing(&id);
        }
    }

    /// Makes every written chunk durable before the node stops.
    pub fn shutdown(&mut self) {
        if let Err(e) = self.store.sync_all() {
            tracing::error!(error = %format!("{e:#}"), "cannot make downloaded chunks durable");
        }
    }

    /// Follows `model`: every newer version announced or found is fetched.
    pub fn follow(&mut self, model: String) {
        self.followed.insert(model);
    }

    // ----- commands -----

    /// Adopts an imported file as the next version of `model`, announces it (with `training`
    /// metadata for a checkpoint) and serves it.
    pub fn publish(
        &mut self,
        imported: ImportedFile,
        model: &str,
        training: Option<TrainingMeta>,
    ) -> Result<Announcement> {
        let latest = self.newest_known(model);
        let version = latest.as_ref().map_or(0, |a| a.version + 1);
        let parent = latest.map(|a| a.id);
        let id = self.store.adopt(imported, model, version, parent)?;
        let v = self
            .store
            .get(&id)
            .ok_or_else(|| anyhow!("version vanished"))?;
        let announcement = Announcement {
            model: model.to_string(),
            version: v.manifest.version,
            id,
            size: v.manifest.total_size,
            publisher: self.local_peer.to_string(),
            training,
        };
        self.announcements.insert(id, announcement.clone());
        self.start_providing(&id);
        self.announce(&announcement);
        tracing::info!(model, version = announcement.version, id = %id, size = announcement.size, "published version");
        Ok(announcement)
    }

    /// Downloads `id` (or joins the download in progress); `reply` gets the report at the end
    /// and `progress` (if any) every change on the way.
    pub fn fetch(
        &mut self,
        id: VersionId,
        reply: oneshot::Sender<Result<DownloadReport, String>>,
        progress: Option<watch::Sender<FetchProgress>>,
    ) {
        if let Some(v) = self.store.get(&id) {
            if v.is_complete() {
                let report = DownloadReport {
                    id: id.to_hex(),
                    model: v.manifest.model.clone(),
                    version: v.manifest.version,
                    size: v.manifest.total_size,
                    chunks: v.manifest.chunk_count(),
                    chunks_downloaded: 0,
                    chunks_copied_locally: 0,
                    chunks_resumed: v.manifest.chunk_count(),
                    peers_used: 0,
                    seconds: 0.0,
                };
                let _ = reply.send(Ok(report));
                return;
            }
        }
        self.ensure_download(id);
        if let Some(d) = self.downloads.get_mut(&id) {
            d.waiters.push(reply);
            d.progress.extend(progress);
        }
        self.drive(&id);
    }

    /// Asks every connected peer which versions of `model` it knows; `reply` gets them merged
    /// with those known here, newest first.
    pub fn query_versions(&mut self, model: String, reply: oneshot::Sender<Vec<Announcement>>) {
        let qid = self.next_query;
        self.next_query += 1;
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for peer in &peers {
            let rid = self.inner.send_request(
                peer,
                Request::Versions {
                    model: model.clone(),
                },
            );
            self.requests.insert(
                rid,
                Pending {
                    peer: *peer,
                    purpose: Purpose::Versions(qid),
                    cancelled: false,
                },
            );
        }
        self.versions_queries.insert(
            qid,
            VersionsQuery {
                model,
                outstanding: peers.len(),
                deadline: Instant::now() + VERSIONS_QUERY_TIMEOUT,
                reply,
            },
        );
        self.finish_versions_query(qid, false);
    }

    /// The manifest and data file of a complete version, for export.
    pub fn complete_version(&self, id: &VersionId) -> Option<(Manifest, PathBuf)> {
        let v = self.store.get(id)?;
        v.is_complete().then(|| (v.manifest.clone(), v.data_path()))
    }

    /// Every version held, for `GET /models`, newest first within each model.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut out: Vec<ModelInfo> = self
            .store
            .iter()
            .map(|(id, v)| {
                let traffic = self.traffic.get(id);
                let download = self.downloads.get(id);
                let chunks = v.manifest.chunk_count();
                ModelInfo {
                    id: id.to_hex(),
                    model: v.manifest.model.clone(),
                    version: v.manifest.version,
                    parent: v.manifest.parent.map(|p| p.to_hex()),
                    size: v.manifest.total_size,
                    chunks,
                    chunks_held: v.have.count(),
                    progress: if chunks == 0 {
                        1.0
                    } else {
                        f64::from(v.have.count()) / f64::from(chunks)
                    },
                    complete: v.is_complete(),
                    published: v.published,
                    peers_serving: download
                        .and_then(|d| d.picker.as_ref())
                        .map_or(0, |p| p.peers().count()),
                    bytes_uploaded: traffic.map_or(0, |t| t.uploaded),
                    bytes_downloaded: traffic.map_or(0, |t| t.downloaded),
                    bad_peers: download
                        .map(|d| d.banned.iter().map(|p| p.to_string()).collect())
                        .unwrap_or_default(),
                    path: v.data_path().display().to_string(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.model, b.version).cmp(&(&b.model, a.version)));
        out
    }

    /// Where the download of `id` stands, if one is in progress.
    pub fn download_state(&self, id: &VersionId) -> Option<DownloadState> {
        let d = self.downloads.get(id)?;
        let v = self.store.get(id);
        Some(DownloadState {
            manifest: d.picker.is_some(),
            chunks_held: v.map_or(0, |v| v.have.count()),
            chunks: v.map_or(0, |v| v.manifest.chunk_count()),
            holders: d.holders.len(),
            last_failure: d.last_failure.clone(),
            seconds_since_chunk: d.last_chunk.map(|t| t.elapsed().as_secs_f64()),
        })
    }

    /// Deletes the complete versions of `model` beyond the newest `keep` (by version number),
    /// except any a peer asked for within [`IN_USE_WINDOW`] (it is still downloading from us)
    /// and any this node is downloading. Their provider records are withdrawn. Returns the ids
    /// deleted.
    pub fn prune(&mut self, model: &str, keep: usize) -> Vec<VersionId> {
        let mut held: Vec<(u64, VersionId)> = self
            .store
            .iter()
            .filter(|(id, v)| {
                v.manifest.model == model && v.is_complete() && !self.downloads.contains_key(id)
            })
            .map(|(id, v)| (v.manifest.version, *id))
            .collect();
        held.sort_by_key(|v| std::cmp::Reverse(*v));
        let mut removed = Vec::new();
        for (number, id) in held.into_iter().skip(keep) {
            if self
                .last_served
                .get(&id)
                .is_some_and(|t| t.elapsed() < IN_USE_WINDOW)
            {
                tracing::debug!(version = %id.short(), "not pruning a version peers are fetching");
                continue;
            }
            self.events.push_back(Event::StopProviding(id));
            if let Err(e) = self.store.remove(&id) {
                tracing::warn!(version = %id.short(), error = %format!("{e:#}"), "cannot prune a version");
                continue;
            }
            self.announcements.remove(&id);
            self.traffic.remove(&id);
            self.seeded.remove(&id);
            self.last_served.remove(&id);
            tracing::info!(model, version = number, id = %id.short(), "pruned an old version");
            removed.push(id);
        }
        removed
    }

    // ----- events -----

    /// Periodic work: durability, provider lookups, availability refresh, scheduling.
    pub fn tick(&mut self) {
        if self.last_sync.elapsed() >= Duration::from_secs(1) {
            self.last_sync = Instant::now();
            for id in self.store.unsynced() {
                self.start_sync(&id);
            }
        }
        let ids: Vec<VersionId> = self.downloads.keys().copied().collect();
        for id in ids {
            self.drive(&id);
        }
        let poll_due = self
            .last_follow_poll
            .is_none_or(|t| t.elapsed() >= FOLLOW_POLL);
        if poll_due && !self.connected.is_empty() {
            self.last_follow_poll = Some(Instant::now());
            for model in self.followed.clone() {
                let (reply, _) = oneshot::channel();
                self.query_versions(model, reply);
            }
        }
        let expired: Vec<u64> = self
            .versions_queries
            .iter()
            .filter(|(_, q)| q.deadline <= Instant::now())
            .map(|(qid, _)| *qid)
            .collect();
        for qid in expired {
            self.finish_versions_query(qid, true);
        }
    }

    /// A connection to `peer` came up: it may hold what we download.
    fn peer_joined(&mut self, peer: PeerId) {
        if self.connected.len() == 1 {
            // The first peer after a time alone (a restart, a lost network): provider records
            // put while nobody was there reached no one, so put them again.
            self.start();
        }
        let ids: Vec<VersionId> = self.downloads.keys().copied().collect();
        for id in ids {
            if let Some(d) = self.downloads.get_mut(&id) {
                if !d.banned.contains(&peer) {
                    d.candidates.insert(peer);
                }
            }
            self.drive(&id);
        }
    }

    /// The last connection to `peer` closed.
    fn peer_gone(&mut self, peer: PeerId) {
        for d in self.downloads.values_mut() {
            d.candidates.remove(&peer);
            d.have_pending.remove(&peer);
            d.manifest_asked.remove(&peer);
            if let Some(p) = d.picker.as_mut() {
                p.remove_peer(&peer);
            }
        }
    }

    /// The DHT named providers of version `id` (after [`Event::FindProviders`]).
    pub fn on_providers(&mut self, id: VersionId, providers: HashSet<PeerId>) {
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        let mut new = 0;
        for p in providers {
            if p != self.local_peer && !d.banned.contains(&p) {
                d.holders.insert(p);
                if d.candidates.insert(p) {
                    new += 1;
                }
            }
        }
        if new > 0 {
            tracing::debug!(version = %id.short(), new, "providers found");
            self.drive(&id);
        }
    }

    /// A gossip message on the announcements topic from `source` (the signed author). Returns
    /// the announcement if it was valid.
    pub fn on_gossip(&mut self, source: Option<PeerId>, data: &[u8]) -> Option<Announcement> {
        let announcement = match Announcement::decode(data) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(?source, error = %e, "ignoring a malformed announcement");
                return None;
            }
        };
        if source.map(|s| s.to_string()) != Some(announcement.publisher.clone()) {
            tracing::debug!(
                ?source,
                "ignoring an announcement not signed by its publisher"
            );
            return None;
        }
        tracing::info!(model = %announcement.model, version = announcement.version, id = %announcement.id.short(), from = %announcement.publisher, "version announced");
        self.learn_announcement(announcement.clone());
        Some(announcement)
    }

    /// An inbound request.
    pub fn on_request(
        &mut self,
        peer: PeerId,
        request_id: InboundRequestId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) {
        let mut chunk_bytes = 0;
        if let Request::Have { id } | Request::Chunk { id, .. } = &request {
            if self.store.get(id).is_some() {
                self.last_served.insert(*id, Instant::now());
            }
        }
        let response = match request {
            Request::Manifest { id } => match self.store.get(&id) {
                Some(v) => Response::Manifest {
                    bytes: v.manifest_bytes.clone(),
                },
                None => Response::NotFound,
            },
            Request::Have { id } => match self.store.get(&id) {
                Some(v) if self.serves_version(v.published, v.is_complete()) => Response::Have {
                    bitfield: v.have.clone(),
                    publisher: v.published,
                },
                _ => Response::NotFound,
            },
            Request::Chunk { id, index } => {
                let serves = self.store.get(&id).is_some_and(|v| {
                    self.serves_version(v.published, v.is_complete()) && v.have.get(index)
                });
                if !serves || self.seeding_declines(&id, index) {
                    Response::NotFound
                } else if self.uploads.len() >= self.config.upload_slots()
                    || !self.take_upload_tokens(&id, index)
                {
                    Response::Busy
                } else {
                    match self.store.read_chunk(&id, index) {
                        Ok(mut data) => {
                            if self.config.corrupt_uploads {
                                data.iter_mut().step_by(4096).for_each(|b| *b ^= 0xff);
                            }
                            chunk_bytes = data.len() as u64;
                            if let Some(counts) = self.seeded.get_mut(&id) {
                                counts[index as usize] += 1;
                            }
                            self.traffic.entry(id).or_default().uploaded += chunk_bytes;
                            Response::Chunk { index, data }
                        }
                        Err(e) => {
                            tracing::error!(version = %id.short(), index, error = %format!("{e:#}"), "cannot read a chunk to serve");
                            Response::NotFound
                        }
                    }
                }
            }
            Request::Versions { model } => Response::Versions {
                versions: self.known_versions(&model),
            },
        };
        if self.inner.send_response(channel, response).is_ok() && chunk_bytes > 0 {
            self.uploads.insert(request_id);
        } else if chunk_bytes > 0 {
            tracing::debug!(%peer, "requester went away before the chunk was sent");
        }
    }

    /// A response finished sending (or failed); frees its upload slot if it was a chunk.
    pub fn on_upload_done(&mut self, request_id: InboundRequestId) {
        self.uploads.remove(&request_id);
    }

    /// A response to one of our requests.
    pub fn on_response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: Response) {
        let Some(pending) = self.requests.remove(&request_id) else {
            return;
        };
        if pending.cancelled {
            return;
        }
        match (pending.purpose, response) {
            (Purpose::Manifest(id), Response::Manifest { bytes }) => {
                self.on_manifest(peer, id, &bytes)
            }
            (
                Purpose::Have(id),
                Response::Have {
                    bitfield,
                    publisher,
                },
            ) => {
                if publisher {
                    if let Some(d) = self.downloads.get_mut(&id) {
                        d.publisher.get_or_insert(peer);
                        if self.config.stage == Stage::Swarm {
                            if let Some(p) = d.picker.as_mut() {
                                p.set_last_resort(peer);
                            }
                        }
                    }
                }
                self.on_have(peer, id, Some(bitfield));
                self.drive(&id);
            }
            (Purpose::Chunk(id, index), Response::Chunk { index: got, data }) => {
                self.on_chunk(peer, id, index, got, data)
            }
            (Purpose::Versions(qid), Response::Versions { versions }) => {
                for a in versions.into_iter().take(MAX_VERSIONS_LISTED) {
                    if p2p_protocol::manifest::validate_model_name(&a.model).is_ok() {
                        self.learn_announcement(a);
                    }
                }
                self.answered_versions_query(qid);
            }
            (Purpose::Versions(qid), _) => self.answered_versions_query(qid),
            (Purpose::Manifest(id), _) => {
                if let Some(d) = self.downloads.get_mut(&id) {
                    d.candidates.remove(&peer);
                }
                self.drive(&id);
            }
            (Purpose::Have(id), _) => {
                self.on_have(peer, id, None);
            }
            (Purpose::Chunk(id, index), Response::NotFound) => {
                if let Some(p) = self.picker_mut(&id) {
                    p.peer_lacks(&peer, index);
                }
                self.drive(&id);
            }
            (Purpose::Chunk(id, index), Response::Busy) => {
                // Back off from this peer until its next availability refresh.
                if let Some(d) = self.downloads.get_mut(&id) {
                    if let Some(p) = d.picker.as_mut() {
                        p.request_failed(&peer, index);
                        let len = p.have().len();
                        p.set_availability(peer, Bitfield::new(len));
                    }
                }
            }
            (Purpose::Chunk(id, _), _) => {
                self.punish(peer, id, "answered a chunk request with something else")
            }
        }
    }

    /// A request of ours failed (timeout, connection lost, protocol not supported).
    pub fn on_outbound_failure(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        error: &OutboundFailure,
    ) {
        let Some(pending) = self.requests.remove(&request_id) else {
            return;
        };
        tracing::debug!(%peer, error = %error, purpose = ?pending.purpose, "request failed");
        if let Purpose::Manifest(id) | Purpose::Have(id) | Purpose::Chunk(id, _) = &pending.purpose
        {
            if let Some(d) = self.downloads.get_mut(id) {
                d.last_failure = Some(format!("{peer}: {error}"));
            }
        }
        match pending.purpose {
            Purpose::Versions(qid) => self.answered_versions_query(qid),
            Purpose::Manifest(id) => self.drive(&id),
            Purpose::Have(id) => self.on_have(peer, id, None),
            Purpose::Chunk(id, index) => {
                if pending.cancelled {
                    return;
                }
                if let Some(p) = self.picker_mut(&id) {
                    p.request_failed(&peer, index);
                    if matches!(
                        error,
                        OutboundFailure::DialFailure | OutboundFailure::UnsupportedProtocols
                    ) {
                        p.remove_peer(&peer);
                    }
                }
                self.drive(&id);
            }
        }
    }

    // ----- internals -----

    fn serves_version(&self, published: bool, complete: bool) -> bool {
        match self.config.stage {
            Stage::Sequential | Stage::ParallelPush => published,
            Stage::HostAssisted => published || complete,
            Stage::Coordinated | Stage::Swarm => true,
        }
    }

    /// Initial seeding, in the swarm stage: the publisher of a version sends no chunk a second
    /// time while another chunk has been sent fewer times, so that its upload goes to new
    /// pieces and fetchers get repeats from each other. A declined request is answered "not
    /// found", and the fetcher turns to another chunk or peer at once.
    fn seeding_declines(&mut self, id: &VersionId, index: u32) -> bool {
        if self.config.stage != Stage::Swarm {
            return false;
        }
        let Some(v) = self.store.get(id).filter(|v| v.published) else {
            return false;
        };
        let counts = self
            .seeded
            .entry(*id)
            .or_insert_with(|| vec![0; v.manifest.chunk_count() as usize]);
        let min = counts.iter().copied().min().unwrap_or(0);
        counts.get(index as usize).is_some_and(|c| *c > min)
    }

    /// Whether the upload cap lets chunk `index` of `id` go now.
    fn take_upload_tokens(&mut self, id: &VersionId, index: u32) -> bool {
        let Some(limiter) = self.upload_limiter.as_mut() else {
            return true;
        };
        let len = self.store.get(id).map_or(0, |v| {
            let r = v.manifest.chunk_range(index);
            r.end - r.start
        });
        limiter.try_take(len)
    }

    fn newest_known(&self, model: &str) -> Option<Announcement> {
        self.known_versions(model).into_iter().next()
    }

    /// Versions of `model` known here (held or announced), newest first.
    fn known_versions(&self, model: &str) -> Vec<Announcement> {
        let mut all: HashMap<VersionId, Announcement> = self
            .announcements
            .iter()
            .filter(|(_, a)| a.model == model)
            .map(|(id, a)| (*id, a.clone()))
            .collect();
        for (id, v) in self.store.iter() {
            if v.manifest.model == model && v.is_complete() {
                all.entry(*id).or_insert_with(|| Announcement {
                    model: model.to_string(),
                    version: v.manifest.version,
                    id: *id,
                    size: v.manifest.total_size,
                    publisher: self.local_peer.to_string(),
                    training: None,
                });
            }
        }
        let mut list: Vec<Announcement> = all.into_values().collect();
        list.sort_by_key(|a| std::cmp::Reverse((a.version, a.id)));
        list.truncate(MAX_VERSIONS_LISTED);
        list
    }

    fn learn_announcement(&mut self, a: Announcement) {
        let id = a.id;
        let publisher = a.publisher.parse::<PeerId>().ok();
        let newer = self
            .newest_known(&a.model)
            .is_none_or(|n| a.version > n.version);
        let followed = self.followed.contains(&a.model);
        if self.announcements.len() < 4096 || self.announcements.contains_key(&id) {
            self.announcements.insert(id, a);
        }
        if let (Some(d), Some(p)) = (self.downloads.get_mut(&id), publisher) {
            d.publisher.get_or_insert(p);
            if p != self.local_peer {
                d.candidates.insert(p);
                d.holders.insert(p);
            }
        }
        if followed && newer && self.store.get(&id).is_none() {
            self.ensure_download(id);
            if let (Some(d), Some(p)) = (self.downloads.get_mut(&id), publisher) {
                d.publisher = Some(p);
                d.candidates.insert(p);
            }
            self.drive(&id);
        }
    }

    fn answered_versions_query(&mut self, qid: u64) {
        if let Some(q) = self.versions_queries.get_mut(&qid) {
            q.outstanding = q.outstanding.saturating_sub(1);
        }
        self.finish_versions_query(qid, false);
    }

    fn finish_versions_query(&mut self, qid: u64, force: bool) {
        let done = self
            .versions_queries
            .get(&qid)
            .is_some_and(|q| force || q.outstanding == 0);
        if done {
            if let Some(q) = self.versions_queries.remove(&qid) {
                let _ = q.reply.send(self.known_versions(&q.model));
            }
        }
    }

    fn ensure_download(&mut self, id: VersionId) {
        if self.downloads.contains_key(&id) {
            return;
        }
        let publisher = self
            .announcements
            .get(&id)
            .and_then(|a| a.publisher.parse::<PeerId>().ok());
        let mut d = Download::new(publisher);
        d.candidates.extend(
            self.connected
                .iter()
                .copied()
                .filter(|p| *p != self.local_peer),
        );
        if let Some(p) = publisher.filter(|p| *p != self.local_peer) {
            d.candidates.insert(p);
        }
        if self.store.get(&id).is_some() {
            self.init_picker(&id, &mut d);
        }
        tracing::info!(version = %id.short(), peers = d.candidates.len(), "download started");
        self.downloads.insert(id, d);
    }

    /// Sets up the picker once the manifest is held, copying chunks other versions share.
    fn init_picker(&mut self, id: &VersionId, d: &mut Download) {
        let Some(v) = self.store.get(id) else {
            return;
        };
        d.chunks_resumed = v.have.count();
        match self.store.copy_local_chunks(id) {
            Ok(copied) => {
                d.chunks_copied = copied.len() as u32;
                if !copied.is_empty() {
                    tracing::info!(version = %id.short(), chunks = copied.len(), "copied chunks shared with local versions");
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot copy local chunks"),
        }
        if let Some(v) = self.store.get(id) {
            d.picker = Some(Picker::new(
                v.have.clone(),
                self.config.max_requests_per_peer,
                self.config.endgame_copies,
            ));
        }
    }

    fn picker_mut(&mut self, id: &VersionId) -> Option<&mut Picker<PeerId>> {
        self.downloads.get_mut(id)?.picker.as_mut()
    }

    /// Moves a download forward: manifest, availability, providers, chunk requests, completion.
    fn drive(&mut self, id: &VersionId) {
        let Some(mut d) = self.downloads.remove(id) else {
            return;
        };
        let now = Instant::now();
        if d.last_provider_query
            .is_none_or(|t| now.duration_since(t) >= self.config.provider_refresh)
        {
            d.last_provider_query = Some(now);
            self.events.push_back(Event::FindProviders(*id));
        }
        if d.picker.is_none() {
            // Ask one new peer at a time for the manifest.
            let in_flight = self
                .requests
                .values()
                .any(|p| matches!(p.purpose, Purpose::Manifest(m) if m == *id));
            if !in_flight {
                let next = d
                    .candidates
                    .iter()
                    .find(|p| !d.manifest_asked.contains(p) && !d.banned.contains(p))
                    .copied();
                if next.is_none() && d.manifest_round.elapsed() >= MANIFEST_RETRY {
                    // Every candidate was asked and none answered: start a new round, since
                    // peers that had no copy or were unreachable may have one now.
                    d.manifest_asked.clear();
                    d.manifest_round = Instant::now();
                }
                if let Some(peer) = next {
                    d.manifest_asked.insert(peer);
                    self.send(peer, Request::Manifest { id: *id }, Purpose::Manifest(*id));
                }
            }
            self.downloads.insert(*id, d);
            return;
        }
        for peer in d.candidates.clone() {
            let due = d
                .last_have
                .get(&peer)
                .is_none_or(|t| now.duration_since(*t) >= self.config.have_refresh);
            if due && !d.have_pending.contains(&peer) && !d.banned.contains(&peer) {
                d.have_pending.insert(peer);
                d.last_have.insert(peer, now);
                self.send(peer, Request::Have { id: *id }, Purpose::Have(*id));
            }
        }
        // Backpressure: while the disk is behind, ask for nothing more, so that chunks waiting
        // to be written (each held in memory) stay bounded whatever the model's size.
        let requests = match d.picker.as_mut() {
            Some(p) if d.writes_pending < MAX_PENDING_WRITES => p.next_requests(&mut self.rng),
            _ => Vec::new(),
        };
        for (peer, index) in requests {
            self.send(
                peer,
                Request::Chunk { id: *id, index },
                Purpose::Chunk(*id, index),
            );
        }
        let written = d.writes_pending == 0 && self.store.get(id).is_some_and(|v| v.is_complete());
        if written && d.picker.as_ref().is_some_and(|p| p.is_complete()) {
            // Complete means durable: the last sync runs off the event loop, and its end
            // drives the download again.
            if self.store.get(id).is_some_and(|v| v.is_durable()) {
                self.complete(id, d);
                return;
            }
            self.start_sync(id);
        }
        self.report_progress(id, &mut d);
        self.downloads.insert(*id, d);
    }

    /// Sends the download's progress to its watchers (those still listening).
    fn report_progress(&self, id: &VersionId, d: &mut Download) {
        if d.progress.is_empty() {
            return;
        }
        let progress = match self.store.get(id) {
            Some(v) => {
                let (held, chunks) = (v.have.count(), v.manifest.chunk_count());
                FetchProgress {
                    chunks_held: held,
                    chunks,
                    bytes_held: (u64::from(held) * u64::from(v.manifest.chunk_size))
                        .min(v.manifest.total_size),
                    size: v.manifest.total_size,
                    peers: d.picker.as_ref().map_or(0, |p| p.peers().count()),
                }
            }
            None => FetchProgress::default(),
        };
        d.progress.retain(|tx| !tx.is_closed());
        for tx in &d.progress {
            tx.send_if_modified(|p| std::mem::replace(p, progress) != progress);
        }
    }

    fn send(&mut self, peer: PeerId, request: Request, purpose: Purpose) {
        let rid = self.inner.send_request(&peer, request);
        self.requests.insert(
            rid,
            Pending {
                peer,
                purpose,
                cancelled: false,
            },
        );
    }

    fn on_manifest(&mut self, peer: PeerId, id: VersionId, bytes: &[u8]) {
        if self.downloads.get(&id).is_none_or(|d| d.picker.is_some()) {
            return;
        }
        if let Err(e) = Manifest::decode_verified(bytes, &id) {
            tracing::warn!(%peer, version = %id.short(), error = %e, "peer sent a bad manifest");
            self.punish(peer, id, "sent a manifest that does not match its id");
            return;
        }
        if let Err(e) = self.store.begin(id, bytes) {
            self.fail_download(&id, format!("cannot store version {}: {e:#}", id.short()));
            return;
        }
        let Some(mut d) = self.downloads.remove(&id) else {
            return;
        };
        self.init_picker(&id, &mut d);
        if let Some(v) = self.store.get(&id) {
            tracing::info!(version = %id.short(), model = %v.manifest.model, number = v.manifest.version, size = v.manifest.total_size, chunks = v.manifest.chunk_count(), "manifest verified");
        }
        self.downloads.insert(id, d);
        self.drive(&id);
    }

    fn on_have(&mut self, peer: PeerId, id: VersionId, bitfield: Option<Bitfield>) {
        let portion = self
            .config
            .portion
            .filter(|_| self.config.stage == Stage::Coordinated);
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        d.have_pending.remove(&peer);
        if d.banned.contains(&peer) {
            return;
        }
        let Some(picker) = d.picker.as_mut() else {
            return;
        };
        let len = picker.have().len();
        let mut bits = bitfield
            .filter(|b| b.is_well_formed() && b.len() == len)
            .unwrap_or_else(|| Bitfield::new(len));
        if bits.count() > 0 {
            d.holders.insert(peer);
        }
        if let (Some((index, count)), Some(publisher)) = (portion, d.publisher) {
            if publisher == peer && count > 0 {
                let mut mine = Bitfield::new(len);
                bits.ones()
                    .filter(|i| i % count == index)
                    .for_each(|i| mine.set(i));
                bits = mine;
            }
        }
        picker.set_availability(peer, bits);
    }

    fn on_chunk(&mut self, peer: PeerId, id: VersionId, index: u32, got: u32, data: Vec<u8>) {
        if got != index {
            self.punish(peer, id, "sent a different chunk than asked");
            return;
        }
        let Some(v) = self.store.get(&id) else {
            return;
        };
        let obtained = v.have.get(index)
            || self
                .downloads
                .get(&id)
                .and_then(|d| d.picker.as_ref())
                .is_some_and(|p| p.have().get(index));
        if obtained {
            // An endgame duplicate that was not cancelled in time.
            if let Some(p) = self.picker_mut(&id) {
                p.chunk_received(&peer, index);
            }
            return;
        }
        if !v.manifest.verify_chunk(index, &data) {
            self.punish(peer, id, "sent a chunk that does not match its hash");
            return;
        }
        let len = data.len() as u64;
        let write = match self.store.chunk_write(&id, index, data) {
            Ok(w) => w,
            Err(e) => {
                self.fail_download(&id, format!("{e:#}"));
                return;
            }
        };
        self.traffic.entry(id).or_default().downloaded += len;
        if let Some(d) = self.downloads.get_mut(&id) {
            d.chunks_downloaded += 1;
            d.last_chunk = Some(Instant::now());
            d.senders.insert(peer);
            d.writes_pending += 1;
            if let Some(p) = d.picker.as_mut() {
                for loser in p.chunk_received(&peer, index) {
                    for pending in self.requests.values_mut() {
                        if pending.peer == loser
                            && matches!(pending.purpose, Purpose::Chunk(v, i) if v == id && i == index)
                        {
                            pending.cancelled = true;
                        }
                    }
                }
            }
        }
        // Disk writes run off the event loop, which goes on serving and scheduling.
        self.chunk_writer.write(id, index, write);
        self.drive(&id);
    }

    /// Disk work finished on a blocking thread.
    pub fn on_disk_event(&mut self, event: DiskEvent) {
        match event {
            DiskEvent::ChunkWritten { id, index, result } => {
                self.on_chunk_written(id, index, result)
            }
            DiskEvent::Synced { id, result } => {
                self.store.sync_finished(&id, result.is_ok());
                if let Err(e) = result {
                    tracing::error!(version = %id.short(), error = %e, "cannot make downloaded chunks durable");
                    if self.downloads.contains_key(&id) {
                        self.fail_download(&id, e);
                    }
                    return;
                }
                self.drive(&id);
            }
        }
    }

    /// Makes the chunks written to `id` durable on a blocking thread, unless a sync of it is
    /// running or nothing changed.
    fn start_sync(&mut self, id: &VersionId) {
        let Some(job) = self.store.sync_job(id) else {
            return;
        };
        let done = self.write_done.clone();
        tokio::task::spawn_blocking(move || {
            let result = job.run().map_err(|e| format!("{e:#}"));
            let _ = done.send(DiskEvent::Synced { id: job.id, result });
        });
    }

    /// A verified chunk reached the disk (or failed to): it is served from now on.
    fn on_chunk_written(&mut self, id: VersionId, index: u32, result: Result<(), String>) {
        if let Some(d) = self.downloads.get_mut(&id) {
            d.writes_pending = d.writes_pending.saturating_sub(1);
        }
        let result = result.and_then(|()| {
            self.store
                .mark_written(&id, index)
                .map_err(|e| format!("{e:#}"))
        });
        if let Err(e) = result {
            if let Some(p) = self.picker_mut(&id) {
                p.chunk_lost(index);
            }
            self.fail_download(&id, e);
            return;
        }
        let first = self.store.get(&id).is_some_and(|v| v.have.count() == 1);
        if first && self.serves_version(false, false) {
            self.start_providing(&id);
        }
        self.drive(&id);
    }

    /// Drops `peer` from the download of `id` and counts a penalty.
    fn punish(&mut self, peer: PeerId, id: VersionId, why: &str) {
        tracing::warn!(%peer, version = %id.short(), "dropping peer from the download: {why}");
        self.events.push_back(Event::Misbehaved {
            peer,
            why: why.to_string(),
        });
        if let Some(d) = self.downloads.get_mut(&id) {
            d.banned.insert(peer);
            d.candidates.remove(&peer);
            if let Some(p) = d.picker.as_mut() {
                p.remove_peer(&peer);
            }
        }
        for pending in self.requests.values_mut() {
            if pending.peer == peer {
                pending.cancelled = true;
            }
        }
        self.drive(&id);
    }

    fn complete(&mut self, id: &VersionId, d: Download) {
        for pending in self.requests.values_mut() {
            if matches!(pending.purpose, Purpose::Chunk(v, _) | Purpose::Have(v) if v == *id) {
                pending.cancelled = true;
            }
        }
        if let Err(e) = self.store.check_header(id) {
            // Every chunk matched its hash, so the manifest itself describes a file that is
            // not a model: nothing of it is kept or served.
            let why = format!(
                "version {} is not a safetensors file the reference reader opens: {e:#}",
                id.short()
            );
            tracing::error!(version = %id.short(), error = %why, "download refused");
            if let Err(e) = self.store.remove(id) {
                tracing::warn!(error = %format!("{e:#}"), "cannot delete a refused version");
            }
            for waiter in d.waiters {
                let _ = waiter.send(Err(why.clone()));
            }
            return;
        }
        let Some(v) = self.store.get(id) else {
            return;
        };
        let report = DownloadReport {
            id: id.to_hex(),
            model: v.manifest.model.clone(),
            version: v.manifest.version,
            size: v.manifest.total_size,
            chunks: v.manifest.chunk_count(),
            chunks_downloaded: d.chunks_downloaded,
            chunks_copied_locally: d.chunks_copied,
            chunks_resumed: d.chunks_resumed,
            peers_used: d.senders.len(),
            seconds: d.started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            version = %id.short(), model = %report.model, number = report.version,
            size = report.size, downloaded = report.chunks_downloaded, copied = report.chunks_copied_locally,
            resumed = report.chunks_resumed, peers = report.peers_used, seconds = report.seconds,
            "download complete"
        );
        if !self.announcements.contains_key(id) {
            self.announcements.insert(
                *id,
                Announcement {
                    model: report.model.clone(),
                    version: report.version,
                    id: *id,
                    size: report.size,
                    publisher: d.publisher.unwrap_or(self.local_peer).to_string(),
                    training: None,
                },
            );
        }
        if self.serves_version(false, true) {
            self.start_providing(id);
        }
        for waiter in d.waiters {
            let _ = waiter.send(Ok(report.clone()));
        }
    }

    fn fail_download(&mut self, id: &VersionId, error: String) {
        tracing::error!(version = %id.short(), error = %error, "download failed");
        if let Some(d) = self.downloads.remove(id) {
            for waiter in d.waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }

    /// Asks for `announcement` to be published on the announcements topic.
    fn announce(&mut self, announcement: &Announcement) {
        self.events
            .push_back(Event::Announce(announcement.encode()));
    }

    /// Asks for a provider record of `id` to be put in the DHT.
    fn start_providing(&mut self, id: &VersionId) {
        self.events.push_back(Event::Provide(*id));
    }
}

impl WrapsRequestResponse for Engine {
    type Codec = CborCodec<Request, Response>;
    type Event = Event;

    fn inner(&mut self) -> &mut request_response::Behaviour<Self::Codec> {
        &mut self.inner
    }

    fn on_peer_connected(&mut self, peer: PeerId) {
        self.connected.insert(peer);
        self.peer_joined(peer);
    }

    fn on_peer_disconnected(&mut self, peer: PeerId) {
        self.connected.remove(&peer);
        self.peer_gone(peer);
    }

    /// An event of the wrapped request-response behaviour.
    fn on_inner_event(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request_id,
                    request,
                    channel,
                } => self.on_request(peer, request_id, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => self.on_outbound_failure(peer, request_id, &error),
            request_response::Event::InboundFailure { request_id, .. }
            | request_response::Event::ResponseSent { request_id, .. } => {
                self.on_upload_done(request_id)
            }
        }
    }

    fn poll_due(&mut self, cx: &mut Context<'_>) {
        while self.tick.poll_tick(cx).is_ready() {
            self.tick();
        }
        while let Poll::Ready(Some(done)) = self.disk_events.poll_recv(cx) {
            self.on_disk_event(done);
        }
    }

    fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

crate::impl_wire_behaviour!(Engine);
