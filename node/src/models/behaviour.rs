//! [`Behaviour`]: the `/p2p-ml/models/2.0.0` protocol as one libp2p `NetworkBehaviour` (see
//! the [module docs](super) for participants, flow and limits). It wraps a request-response
//! behaviour, tracks which peers are connected, runs its timer, answers requests by the rules
//! of `Uploads`, carries out the `Step`s of each `Download`, and hands disk work to
//! [`disk`]; it never sees the swarm or the other protocols. What it needs from them it asks
//! for as [`Event`]s (provider lookups and records in the DHT, announcements on gossip), and
//! what it learns from them comes back through [`Behaviour::on_providers`] and
//! [`Behaviour::on_gossip`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::request_response::{
    self, InboundRequestId, OutboundFailure, OutboundRequestId, ResponseChannel,
};
use libp2p::{PeerId, StreamProtocol};
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::codec::CborCodec;
use p2p_protocol::manifest::{Manifest, VersionId};
use p2p_protocol::messages::{
    AddressHint, Announcement, Request, Response, MAX_ADDRESS_HINTS_PER_PEER,
    MAX_ADDRESS_HINT_PEERS, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, MAX_VERSIONS_LISTED,
    MAX_VERSIONS_PER_PUBLISHER, MODELS_PROTOCOL,
};
use p2p_protocol::training::TrainingMeta;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::command::Scope;
use super::disk::{
    self, ChunkJob, ChunkRead, ChunkWriter, DecodedManifest, DiskEvent, Imported, PublishFile,
};
use super::download::{Ask, Download, OnDisk, Step, Waiter};
use super::error::Error;
use super::have_wait::{HaveWaits, Standing};
use super::picker::Picker;
use super::report::{DownloadReport, DownloadState, FetchProgress, ModelInfo, TransferTotals};
use super::store::{ImportedFile, Store, VersionClaims};
use super::trust::{Resolution, Trust};
use super::upload::{Decision, Holding, Uploads};
use super::{ModelsConfig, Stage};
use crate::wire_behaviour::WrapsRequestResponse;

/// How often a follower asks its peers for versions of the models it follows (in case it
/// missed an announcement).
const FOLLOW_POLL: Duration = Duration::from_secs(5);

/// How long a follower waits, from when it starts following a name not bound to a publisher yet,
/// before it takes the only publisher it knows (trust on first use): long enough for every
/// peer reachable at start to have answered, so that two publishers of the name are seen as
/// two, not as whichever answered first.
const FOLLOW_SETTLE: Duration = Duration::from_secs(10);

/// How often downloads are driven and availability refreshed.
const TICK: Duration = Duration::from_millis(200);

/// While serving, this node's newest versions are announced again this often, so that peers
/// that were not connected (or not subscribed) when they were published learn them, and can
/// answer others' `Versions` requests for them.
pub const REANNOUNCE_EVERY: Duration = Duration::from_secs(300);

/// When peers join the announcements topic, the newest versions are announced again at most
/// this often (a burst of joins makes one announcement).
pub const REANNOUNCE_MIN_GAP: Duration = Duration::from_secs(10);

/// Streams of the protocol open at once on one connection.
const MAX_CONCURRENT_STREAMS: usize = 512;

/// What the models behaviour asks of the rest of the node, or reports to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Look up the DHT's providers of this version; answer with [`Behaviour::on_providers`].
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
    /// A peer said where a publisher it listed can be reached: dial hints (checked by the
    /// handshake when dialled).
    PeerAddresses {
        /// The publisher.
        peer: PeerId,
        /// Its addresses.
        addrs: Vec<libp2p::Multiaddr>,
    },
}

/// Most announcements remembered (see [`Behaviour::remember_announcement`] for which go).
pub const MAX_ANNOUNCEMENTS: usize = 4096;

/// Most announcements remembered of one publisher.
pub const MAX_ANNOUNCEMENTS_PER_PUBLISHER: usize = 256;

/// Most (model, publisher) pairs whose versions were shown but not followed, remembered so each
/// is logged once.
const MAX_SHOWN: usize = 1024;

/// How long a query for a model's versions waits for answers.
const VERSIONS_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// How far [`Behaviour::forget_version`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forget {
    /// Only a partial download nobody waits for (a superseded one).
    Partial,
    /// Any version nobody waits for, complete or not (one a caller no longer wants).
    Unwanted,
    /// Whatever it is (a version refused for good).
    Refused,
}

/// What an outstanding request was for.
#[derive(Debug)]
enum Purpose {
    Manifest(VersionId),
    Have(VersionId),
    Chunk(VersionId, u32),
    /// A versions query, and the model it asked about.
    Versions(u64, String),
}

/// A chunk request waiting for an upload slot.
struct QueuedChunk {
    id: VersionId,
    index: u32,
    channel: ResponseChannel<Response>,
}

#[derive(Debug)]
struct Pending {
    peer: PeerId,
    purpose: Purpose,
    cancelled: bool,
}

struct VersionsQuery {
    model: String,
    /// Which versions the answer holds.
    scope: Scope,
    outstanding: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<Announcement>, Error>>,
}

/// The models protocol of one node: serving, downloading, following.
pub struct Behaviour {
    inner: request_response::Behaviour<CborCodec<Request, Response>>,
    /// Peers with at least one direct connection (relayed ones do not carry this protocol).
    connected: HashSet<PeerId>,
    events: VecDeque<Event>,
    tick: tokio::time::Interval,
    disk_events: mpsc::UnboundedReceiver<DiskEvent>,
    config: ModelsConfig,
    store: Store,
    local_peer: PeerId,
    /// Signs the versions this node publishes.
    key: Keypair,
    /// Which publisher each model name means.
    trust: Trust,
    /// Versions by publishers a followed name does not mean, already logged.
    shown: HashSet<(String, PeerId)>,
    /// Versions whose manifest is being decoded off the event loop.
    decoding: HashSet<VersionId>,
    /// Per version downloading, the older partial versions it superseded, whose files go once
    /// its manifest is held.
    superseded: HashMap<VersionId, Vec<VersionId>>,
    /// Versions refused for good (a checkpoint that failed its check): not taken in again.
    refused: HashSet<VersionId>,
    downloads: HashMap<VersionId, Download>,
    requests: HashMap<OutboundRequestId, Pending>,
    /// Chunk requests waiting for an upload slot (see `Decision::Queue`).
    queued: HashMap<InboundRequestId, QueuedChunk>,
    announcements: HashMap<VersionId, Announcement>,
    /// Bytes of chunks received, per version.
    downloaded: HashMap<VersionId, u64>,
    /// Chunk traffic since start, over every version.
    totals: TransferTotals,
    /// Listen addresses connected peers reported (identify), for address hints.
    peer_addrs: HashMap<PeerId, Vec<libp2p::Multiaddr>>,
    uploads: Uploads,
    /// Availability requests held until this node has news for them (long polling).
    have_waits: HaveWaits<ResponseChannel<Response>>,
    /// Models followed, and since when (a name not bound yet is taken only after
    /// [`FOLLOW_SETTLE`]).
    followed: HashMap<String, Instant>,
    versions_queries: HashMap<u64, VersionsQuery>,
    next_query: u64,
    last_sync: Instant,
    write_done: mpsc::UnboundedSender<DiskEvent>,
    chunk_writer: ChunkWriter,
    last_follow_poll: Option<Instant>,
    /// When this node's newest versions were last announced again (`None`: not yet).
    last_reannounce: Option<Instant>,
    /// Whether a peer joined the announcements topic since then, within the gap.
    reannounce_pending: bool,
    /// When the behaviour was made.
    started: Instant,
    rng: StdRng,
}

impl Behaviour {
    /// The protocol serving `store`. Incomplete versions found in the store resume downloading.
    /// Finished disk work comes back through `write_done`, to be passed to
    /// [`Behaviour::on_disk_event`].
    pub fn new(config: ModelsConfig, store: Store, key: Keypair, trust: Trust) -> Self {
        let local_peer = key.public().to_peer_id();
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
        let mut behaviour = Self {
            inner,
            connected: HashSet::new(),
            events: VecDeque::new(),
            tick,
            disk_events,
            store,
            local_peer,
            key,
            trust,
            shown: HashSet::new(),
            decoding: HashSet::new(),
            superseded: HashMap::new(),
            refused: HashSet::new(),
            downloads: HashMap::new(),
            requests: HashMap::new(),
            queued: HashMap::new(),
            announcements: HashMap::new(),
            downloaded: HashMap::new(),
            totals: TransferTotals::default(),
            peer_addrs: HashMap::new(),
            uploads: Uploads::new(&config),
            have_waits: HaveWaits::new(config.availability_wait),
            followed: HashMap::new(),
            versions_queries: HashMap::new(),
            next_query: 0,
            last_sync: Instant::now(),
            chunk_writer: ChunkWriter::start(write_done.clone()),
            write_done,
            last_follow_poll: None,
            last_reannounce: None,
            reannounce_pending: false,
            started: Instant::now(),
            rng: StdRng::from_entropy(),
            config,
        };
        let held: Vec<Announcement> = behaviour
            .store
            .iter()
            .map(|(_, v)| v.manifest.announcement())
            .collect();
        for a in held {
            behaviour.announcements.insert(a.id, a);
        }
        let partial: Vec<VersionId> = behaviour
            .store
            .iter()
            .filter(|(_, v)| !v.is_complete())
            .map(|(id, _)| *id)
            .collect();
        for id in partial {
            let mut download = Download::new(None, Instant::now());
            behaviour.init_picker(&id, &mut download);
            tracing::info!(version = %id.short(), chunks_held = behaviour.store.get(&id).map_or(0, |v| v.have.count()), "resuming an interrupted download");
            behaviour.downloads.insert(id, download);
        }
        behaviour
    }

    /// Called once the swarm runs: provider records for held versions, pending downloads.
    pub fn start(&mut self) {
        let held: Vec<VersionId> = self
            .store
            .iter()
            .filter(|(_, v)| self.uploads.serves_version(v) && v.have.count() > 0)
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

    /// Follows `model`: every newer version of the publisher the name means ([`Trust`]) that
    /// is announced or found is fetched; only the newest is kept in progress.
    pub fn follow(&mut self, model: String) {
        // Of its interrupted downloads, only the newest of each publisher goes on: an older one
        // was superseded (and a stream of versions never served leaves one, not all).
        let mut partial: Vec<(PeerId, u64, VersionId)> = self
            .store
            .iter()
            .filter(|(_, v)| v.manifest.model == model && !v.is_complete())
            .map(|(id, v)| (v.manifest.publisher, v.manifest.version, *id))
            .collect();
        partial.sort_by_key(|(p, number, _)| (*p, std::cmp::Reverse(*number)));
        for pair in partial.windows(2) {
            if pair[0].0 == pair[1].0 {
                tracing::info!(version = %pair[1].2.short(), model, "removing an interrupted download superseded by a newer version");
                self.forget_version(&pair[1].2, "superseded by a newer version", Forget::Partial);
            }
        }
        if self.trust.remembered(&model).is_none() {
            let mut held: Vec<PeerId> = self
                .store
                .iter()
                .filter(|(_, v)| {
                    v.manifest.model == model && v.manifest.publisher != self.local_peer
                })
                .map(|(_, v)| v.manifest.publisher)
                .collect();
            held.sort();
            held.dedup();
            // Held versions of one publisher mean it was followed before, unless the user
            // trusts other publishers only.
            if let [only] = held[..] {
                if !self.trust.has_trusted_publishers() || self.trust.trusts(&only) {
                    self.trust.remember(&model, only);
                }
            }
        }
        self.followed.insert(model, Instant::now());
    }

    /// Decides what the followed `model` means now and fetches that publisher's newest version
    /// if it is neither held complete nor downloading; older downloads of it that nobody waits
    /// for are cancelled. A name not bound yet is taken (and remembered) only once it has been
    /// followed for [`FOLLOW_SETTLE`].
    fn refresh_follow(&mut self, model: &str) {
        let Some(since) = self.followed.get(model).copied() else {
            return;
        };
        let publishers: Vec<PeerId> = self
            .announcements
            .values()
            .filter(|a| a.model == model)
            .map(|a| a.publisher)
            .collect();
        let publisher = match self.trust.resolve(model, &publishers, self.local_peer) {
            Resolution::Publisher(p) => p,
            Resolution::Ambiguous(_) | Resolution::Unknown => return,
        };
        if !self.trust.is_bound(model) && publisher != self.local_peer {
            if since.elapsed() < FOLLOW_SETTLE {
                return; // other publishers of the name may still answer
            }
            self.trust.remember(model, publisher);
        }
        let Some((newest, number)) = self
            .announcements
            .values()
            .filter(|a| a.model == model && a.publisher == publisher)
            .max_by_key(|a| (a.version, a.id))
            .map(|a| (a.id, a.version))
        else {
            return;
        };
        if self.store.get(&newest).is_some_and(|v| v.is_complete())
            || self.downloads.contains_key(&newest)
        {
            return;
        }
        self.cancel_superseded(model, publisher, &newest, number);
        self.ensure_download(newest);
        self.drive(&newest);
    }

    // ----- commands -----

    /// Adopts an imported file as the next version of `model`, announces it (with `training`
    /// metadata for a checkpoint) and serves it.
    pub fn publish(
        &mut self,
        imported: ImportedFile,
        model: &str,
        training: Option<TrainingMeta>,
    ) -> Result<Announcement, Error> {
        p2p_protocol::manifest::validate_model_name(model)?;
        let parent = self.chain_head(model, training.as_ref());
        let version = match parent {
            None => 0,
            Some((_, number)) => number.checked_add(1).ok_or_else(|| {
                Error::Import(format!("the version numbers of model {model} are used up"))
            })?,
        };
        let claims = VersionClaims {
            model: model.to_string(),
            version,
            parent: parent.map(|(id, _)| id),
            training,
        };
        let id = self
            .store
            .adopt(imported, claims, &self.key)
            .map_err(|e| Error::Import(format!("{e:#}")))?;
        let Some(v) = self.store.get(&id) else {
            return Err(Error::Store {
                id: id.short(),
                reason: "it vanished from the store".into(),
            });
        };
        let announcement = v.manifest.announcement();
        self.announcements.insert(id, announcement.clone());
        self.start_providing(&id);
        self.announce(&announcement);
        tracing::info!(model, version = announcement.version, id = %id, size = announcement.size, "published version");
        Ok(announcement)
    }

    /// Publishes a file: imports it into the store off the event loop (an immutable snapshot,
    /// hashed as it is copied), then adopts it as [`Behaviour::publish`] does and answers
    /// `request.reply`.
    pub fn publish_file(&mut self, request: PublishFile) {
        if let Err(e) = p2p_protocol::manifest::validate_model_name(&request.model) {
            let _ = request.reply.send(Err(e.into()));
            return;
        }
        disk::spawn_import(
            self.store.root().to_path_buf(),
            self.config.chunk_size,
            request,
            self.write_done.clone(),
        );
    }

    fn on_imported(&mut self, imported: Imported) {
        let Imported { request, result } = imported;
        if request.reply.is_closed() {
            // The caller went away (an HTTP client that disconnected): nothing is published,
            // and dropping the import deletes its staging copy.
            tracing::info!(file = %request.file.display(), "publish abandoned by its caller; the import is discarded");
            return;
        }
        let result =
            result.and_then(|(file, training)| self.publish(file, &request.model, training));
        let _ = request.reply.send(result);
    }

    /// Writes the complete version `id` (every chunk verified on arrival) to `out` off the
    /// event loop; without `keep`, the store's data file moves there where it can (same file
    /// system) and the version is dropped: a one-shot fetch leaves no second copy behind.
    /// `reply` gets the outcome.
    pub fn export(
        &mut self,
        id: VersionId,
        out: PathBuf,
        keep: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        match self.complete_version(&id) {
            Some((manifest, data)) => {
                let done = self.write_done.clone();
                disk::spawn_export(id, manifest, data, out, !keep, reply, done);
            }
            None => {
                let _ = reply.send(Err(Error::NotHeld(id)));
            }
        }
    }

    /// Downloads `id` (or joins the download in progress); `reply` gets the report at the end
    /// and `progress` (if any) every change on the way.
    pub fn fetch(
        &mut self,
        id: VersionId,
        reply: Waiter,
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
    /// with those known here, newest first, in `scope`.
    pub fn query_versions(
        &mut self,
        model: String,
        scope: Scope,
        reply: oneshot::Sender<Result<Vec<Announcement>, Error>>,
    ) {
        let qid = self.next_query;
        self.next_query += 1;
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        // A name already bound to a publisher asks for that publisher's versions only.
        let publisher = if scope != Scope::All {
            match self.trust.resolve(&model, &[], self.local_peer) {
                Resolution::Publisher(p) => Some(p),
                _ => None,
            }
        } else {
            None
        };
        for peer in &peers {
            let rid = self.inner.send_request(
                peer,
                Request::Versions {
                    model: model.clone(),
                    publisher,
                },
            );
            self.requests.insert(
                rid,
                Pending {
                    peer: *peer,
                    purpose: Purpose::Versions(qid, model.clone()),
                    cancelled: false,
                },
            );
        }
        self.versions_queries.insert(
            qid,
            VersionsQuery {
                model,
                scope,
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

    /// Chunk traffic since start, over every version.
    pub fn transfer_totals(&self) -> TransferTotals {
        self.totals
    }

    /// Every version held, for `GET /models`, newest first within each model.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut out: Vec<ModelInfo> = self
            .store
            .iter()
            .map(|(id, v)| {
                let download = self.downloads.get(id);
                let chunks = v.manifest.chunk_count();
                ModelInfo {
                    id: id.to_hex(),
                    model: v.manifest.model.clone(),
                    publisher: v.manifest.publisher,
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
                    peers_serving: download.map_or(0, Download::peers_serving),
                    bytes_uploaded: self.uploads.uploaded(id),
                    bytes_downloaded: self.downloaded.get(id).copied().unwrap_or(0),
                    bad_peers: download
                        .map(|d| d.banned().copied().collect())
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
        Some(d.state(self.store.get(id), Instant::now()))
    }

    /// Deletes the complete versions of `model` beyond the newest `keep` (by version number),
    /// except any a peer asked for within [`super::IN_USE_WINDOW`] (it is still downloading
    /// from us)
    /// and any this node is downloading. Their provider records are withdrawn. Returns the ids
    /// deleted.
    pub fn prune(&mut self, model: &str, keep: usize) -> Vec<VersionId> {
        let mut held: Vec<(bool, u64, VersionId)> = self
            .store
            .iter()
            .filter(|(id, v)| {
                v.manifest.model == model && v.is_complete() && !self.downloads.contains_key(id)
            })
            .map(|(id, v)| {
                (
                    v.manifest.publisher == self.local_peer,
                    v.manifest.version,
                    *id,
                )
            })
            .collect();
        // Our own versions are kept first (they are what we publish), then the newest.
        held.sort_by_key(|v| std::cmp::Reverse(*v));
        let mut removed = Vec::new();
        for (_, number, id) in held.into_iter().skip(keep) {
            if self.uploads.in_use(&id, Instant::now()) {
                tracing::debug!(version = %id.short(), "not pruning a version peers are fetching");
                continue;
            }
            if !self.delete_version(&id) {
                continue;
            }
            tracing::info!(model, version = number, id = %id.short(), "pruned an old version");
            removed.push(id);
        }
        removed
    }

    // ----- events -----

    /// Periodic work: durability, provider lookups, availability refresh, scheduling.
    pub fn tick(&mut self) {
        // A peer joined the topic less than the gap after the last announcement: its turn
        // comes once the gap has passed.
        let since = self.last_reannounce.unwrap_or(self.started).elapsed();
        if (self.reannounce_pending && since >= REANNOUNCE_MIN_GAP)
            || (since >= REANNOUNCE_EVERY && !self.connected.is_empty())
        {
            self.reannounce();
        }
        if self.last_sync.elapsed() >= Duration::from_secs(1) {
            self.last_sync = Instant::now();
            for id in self.store.unsynced() {
                self.start_sync(&id);
            }
        }
        for (id, answer) in self.have_waits.expired(Instant::now()) {
            self.answer_have(&id, answer);
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
            let followed: Vec<String> = self.followed.keys().cloned().collect();
            for model in followed {
                self.refresh_follow(&model);
                let (reply, _) = oneshot::channel();
                self.query_versions(model, Scope::Trusted, reply);
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
                d.add_candidate(peer);
            }
            self.drive(&id);
        }
    }

    /// The last connection to `peer` closed.
    fn peer_gone(&mut self, peer: PeerId) {
        self.have_waits.peer_gone(&peer);
        for d in self.downloads.values_mut() {
            d.peer_gone(&peer);
        }
    }

    /// The DHT named providers of version `id` (after [`Event::FindProviders`]).
    pub fn on_providers(&mut self, id: VersionId, providers: HashSet<PeerId>) {
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        let new = providers
            .into_iter()
            .filter(|p| *p != self.local_peer && d.add_holder(*p))
            .count();
        if new > 0 {
            tracing::debug!(version = %id.short(), new, "providers found");
            self.drive(&id);
        }
    }

    /// A gossip message on the announcements topic from `source` (its author or a relay: the
    /// announcement's own signature is what is checked). Returns
    /// the announcement if it was valid.
    pub fn on_gossip(&mut self, source: Option<PeerId>, data: &[u8]) -> Option<Announcement> {
        let announcement = match Announcement::decode(data) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(?source, error = %e, "ignoring a malformed announcement");
                return None;
            }
        };
        tracing::info!(model = %announcement.model, version = announcement.version, id = %announcement.id.short(), publisher = %announcement.publisher, ?source, "version announced");
        if !self.learn_announcement(announcement.clone()) {
            return None;
        }
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
        if let Request::Have { id, .. } | Request::Chunk { id, .. } = &request {
            if self.store.get(id).is_some() {
                self.uploads.note_asked(*id, Instant::now());
            }
        }
        let response = match request {
            Request::Manifest { id } => match self.store.get(&id) {
                Some(v) => Response::Manifest {
                    bytes: v.manifest_bytes.clone(),
                },
                None => Response::NotFound,
            },
            Request::Have { id, known } => {
                let count = self
                    .store
                    .get(&id)
                    .filter(|v| self.uploads.serves_version(v))
                    .map(|v| v.have.count());
                let Some(count) = count else {
                    let _ = self.inner.send_response(channel, Response::NotFound);
                    return;
                };
                let standing = Standing {
                    chunks: count,
                    free_slots: self.uploads.free_slots(),
                };
                let now = Instant::now();
                for answer in self
                    .have_waits
                    .arrive(peer, id, known, channel, standing, now)
                {
                    self.answer_have(&id, answer);
                }
                return;
            }
            Request::Chunk { id, index } => {
                let now = Instant::now();
                match self.uploads.decide(
                    peer,
                    &id,
                    self.store.get(&id).map(Holding::of),
                    index,
                    now,
                ) {
                    Decision::NotFound => Response::NotFound,
                    Decision::Busy => {
                        let free = self.uploads.free_slots();
                        let retry = self.config.have_refresh;
                        self.have_waits.refused_busy(peer, free, retry, now);
                        Response::Busy
                    }
                    Decision::Queue => {
                        self.uploads.enqueue(request_id, peer);
                        self.queued
                            .insert(request_id, QueuedChunk { id, index, channel });
                        return;
                    }
                    Decision::Serve => match self.store.chunk_read(&id, index) {
                        Some(read) => {
                            // Read off the event loop; answered when the bytes are there.
                            self.uploads.reserve(id, index, request_id);
                            let done = self.write_done.clone();
                            disk::spawn_read(read, (id, index), request_id, channel, done);
                            return;
                        }
                        None => Response::NotFound,
                    },
                }
            }
            Request::Versions { model, publisher } => {
                let versions = self.listed_versions(&model, publisher);
                let addrs = self.address_hints(&versions, peer);
                Response::Versions { versions, addrs }
            }
        };
        if self.inner.send_response(channel, response).is_err() {
            tracing::debug!(%peer, "requester went away before the answer was sent");
        }
    }

    /// Answers an availability request about `id` with what this node holds of it now.
    fn answer_have(&mut self, id: &VersionId, channel: ResponseChannel<Response>) {
        let response = match self.store.get(id) {
            Some(v) if self.uploads.serves_version(v) => Response::Have {
                bitfield: v.have.clone(),
                publisher: v.published,
                holds: self.have_waits.accepting(),
            },
            _ => Response::NotFound,
        };
        if self.inner.send_response(channel, response).is_err() {
            tracing::debug!(version = %id.short(), "requester went away before the availability answer was sent");
        }
    }

    /// A chunk to serve was read: sends it (or "not found" if it could not be read).
    fn on_chunk_read(&mut self, read: ChunkRead) {
        let ChunkRead {
            id,
            index,
            request,
            channel,
            result,
        } = read;
        let response = match result {
            Ok(mut data) => {
                self.uploads.prepare(&mut data);
                self.uploads.sent(id, data.len() as u64);
                self.totals.chunks_served += 1;
                self.totals.bytes_served += data.len() as u64;
                Response::Chunk { index, data }
            }
            Err(e) => {
                tracing::error!(version = %id.short(), index, error = %e, "cannot read a chunk to serve");
                Response::NotFound
            }
        };
        if self.inner.send_response(channel, response).is_err() {
            // No ResponseSent will come: free the slot here.
            self.slot_freed(request);
        }
    }

    /// A response finished sending (or failed); frees its upload slot if it was a chunk.
    pub fn on_upload_done(&mut self, request_id: InboundRequestId) {
        self.slot_freed(request_id);
    }

    /// The answer to `request` is sent, failed or dropped: its upload slot (if it held one)
    /// goes to the chunk request that waited longest, read off the event loop as usual.
    fn slot_freed(&mut self, request: InboundRequestId) {
        self.queued.remove(&request);
        let was_upload = self.uploads.is_uploading(&request);
        let mut next = self.uploads.finished(request);
        while let Some(waiting) = next {
            let read = self
                .queued
                .remove(&waiting)
                .map(|q| (self.store.chunk_read(&q.id, q.index), q));
            match read {
                Some((Some(read), q)) => {
                    self.uploads.reserve(q.id, q.index, waiting);
                    let done = self.write_done.clone();
                    disk::spawn_read(read, (q.id, q.index), waiting, q.channel, done);
                    return;
                }
                Some((None, q)) => {
                    // Deleted while it waited.
                    let _ = self.inner.send_response(q.channel, Response::NotFound);
                }
                None => {}
            }
            next = self.uploads.finished(waiting);
        }
        // A chunk's slot freed and no request waited for it: the peer answered "busy" longest
        // ago learns that it is free (one per freed slot; other answers sent free none).
        if was_upload {
            for (id, answer) in self.have_waits.slot_freed() {
                self.answer_have(&id, answer);
            }
        }
    }

    /// A response to one of our requests.
    pub fn on_response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: Response) {
        let Some(pending) = self.requests.remove(&request_id) else {
            return;
        };
        if let Purpose::Manifest(id) = pending.purpose {
            if let Some(d) = self.downloads.get_mut(&id) {
                d.manifest_request_ended(&peer);
            }
        }
        if pending.cancelled {
            return;
        }
        match (pending.purpose, response) {
            (Purpose::Manifest(id), Response::Manifest { bytes }) => {
                self.on_manifest(peer, id, bytes)
            }
            (
                Purpose::Have(id),
                Response::Have {
                    bitfield,
                    publisher,
                    holds,
                },
            ) => {
                if publisher {
                    if let Some(d) = self.downloads.get_mut(&id) {
                        d.on_publisher(peer, self.config.stage == Stage::Swarm);
                    }
                }
                self.on_have(peer, id, Some(bitfield), holds);
                self.drive(&id);
            }
            (Purpose::Chunk(id, index), Response::Chunk { index: got, data }) => {
                self.on_chunk(peer, id, index, got, data)
            }
            (Purpose::Versions(qid, asked), Response::Versions { versions, addrs }) => {
                // Only the model asked about (a late answer too); oldest first, so that a
                // parent is known before its child is checked.
                let mut versions: Vec<Announcement> = versions
                    .into_iter()
                    .take(MAX_VERSIONS_LISTED)
                    .filter(|a| a.model == asked)
                    .collect();
                versions.sort_by_key(|a| a.version);
                // Publishers of listed versions that verified: hints are taken for them only.
                let mut verified: Vec<PeerId> = Vec::new();
                for a in versions {
                    if self.announcements.get(&a.id) == Some(&a) {
                        verified.push(a.publisher);
                        continue; // known and verified already
                    }
                    if let Err(e) = a.verify() {
                        // A peer relays only what it verified: this one lied or forged.
                        self.events.push_back(Event::Misbehaved {
                            peer,
                            why: format!("listed a version that does not verify: {e}"),
                        });
                        verified.clear();
                        break;
                    }
                    verified.push(a.publisher);
                    self.learn_announcement(a);
                }
                self.take_address_hints(&verified, addrs);
                self.answered_versions_query(qid);
            }
            (Purpose::Versions(qid, _), _) => self.answered_versions_query(qid),
            (Purpose::Manifest(id), _) => self.drive(&id),
            (Purpose::Have(id), _) => {
                self.on_have(peer, id, None, false);
            }
            (Purpose::Chunk(id, index), Response::NotFound) => {
                if let Some(d) = self.downloads.get_mut(&id) {
                    d.chunk_not_found(&peer, index);
                }
                self.drive(&id);
            }
            (Purpose::Chunk(id, index), Response::Busy) => {
                if let Some(d) = self.downloads.get_mut(&id) {
                    d.chunk_busy(peer, index);
                }
                // The chunk goes to another holder with a free slot at once, if there is one
                // (the busy one is not asked until its availability comes again).
                self.drive(&id);
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
                if matches!(pending.purpose, Purpose::Manifest(_)) {
                    d.manifest_request_ended(&peer);
                }
            }
        }
        match pending.purpose {
            Purpose::Versions(qid, _) => self.answered_versions_query(qid),
            Purpose::Manifest(id) => self.drive(&id),
            Purpose::Have(id) => {
                if !pending.cancelled {
                    self.on_have(peer, id, None, false);
                }
            }
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

    /// The version a new one of `model` by this node derives from, with its number: for a
    /// checkpoint, the newest version of its run held here (its initial weights, a checkpoint
    /// it started from, or its own); else the newest this node published of `model`. Only held
    /// versions count, so another peer's announcement can never renumber ours.
    fn chain_head(&self, model: &str, training: Option<&TrainingMeta>) -> Option<(VersionId, u64)> {
        // A run's version 0 is its id, held or not: a volunteer that started from the initial
        // weights drawn from the seed never fetched it.
        let run_start = training.map(|t| (t.run, 0));
        // Our own signed versions that peers still announce count too (a store lost or
        // pruned): only we can sign them.
        let own_announced: Vec<(VersionId, u64)> = match training {
            None => self
                .announcements
                .values()
                .filter(|a| a.model == model && a.publisher == self.local_peer)
                .map(|a| (a.id, a.version))
                .collect(),
            Some(_) => Vec::new(),
        };
        self.store
            .iter()
            .filter(|(id, v)| {
                v.manifest.model == model
                    && v.is_complete()
                    && match training {
                        Some(t) => {
                            **id == t.run
                                || v.manifest.training.as_ref().is_some_and(|m| m.run == t.run)
                                    && v.manifest.version
                                        <= p2p_protocol::training::MAX_PLAUSIBLE_CHECKPOINT_VERSION
                        }
                        None => v.manifest.publisher == self.local_peer,
                    }
            })
            .map(|(id, v)| (*id, v.manifest.version))
            .chain(run_start)
            .chain(own_announced)
            .max_by_key(|(id, number)| (*number, *id))
    }

    /// Every verified version of `model` known here (held or announced), newest first, with no
    /// wire limit: for this node's own use (a newcomer filters a run's checkpoints from it).
    fn all_versions(&self, model: &str) -> Vec<Announcement> {
        let mut list: Vec<Announcement> = self
            .announcements
            .values()
            .filter(|a| a.model == model)
            .cloned()
            .collect();
        list.sort_by_key(|a| std::cmp::Reverse((a.version, a.id)));
        list
    }

    /// The verified versions of `model` to list (at most [`MAX_VERSIONS_LISTED`]): with
    /// `publisher`, its newest; else the newest [`MAX_VERSIONS_PER_PUBLISHER`] of each
    /// publisher, the one this node trusts for the name first, then this node's own, then
    /// publishers of versions held here, then the others in random order. One publisher's many
    /// or highly numbered versions never push the others out of an answer.
    pub(super) fn listed_versions(
        &self,
        model: &str,
        publisher: Option<PeerId>,
    ) -> Vec<Announcement> {
        let mut by_publisher: HashMap<PeerId, Vec<Announcement>> = HashMap::new();
        for a in self
            .announcements
            .values()
            .filter(|a| a.model == model && publisher.is_none_or(|p| a.publisher == p))
        {
            by_publisher.entry(a.publisher).or_default().push(a.clone());
        }
        let publishers: Vec<PeerId> = by_publisher.keys().copied().collect();
        let preferred = match self.trust.resolve(model, &publishers, self.local_peer) {
            Resolution::Publisher(p) => Some(p),
            _ => None,
        };
        let share = if publisher.is_some() {
            MAX_VERSIONS_LISTED
        } else {
            MAX_VERSIONS_PER_PUBLISHER
        };
        let mut groups: Vec<(PeerId, Vec<Announcement>)> = by_publisher
            .into_iter()
            .map(|(p, mut list)| {
                list.sort_by_key(|a| std::cmp::Reverse((a.version, a.id)));
                list.truncate(share);
                (p, list)
            })
            .collect();
        // Trusted, then our own, then publishers of versions held here; the rest in random
        // order, so that no publisher can buy its way up (with more versions, or a number).
        let held: HashSet<PeerId> = self
            .store
            .iter()
            .map(|(_, v)| v.manifest.publisher)
            .collect();
        groups.shuffle(&mut rand::thread_rng());
        groups.sort_by_key(|(p, _)| {
            (
                Some(*p) != preferred,
                *p != self.local_peer,
                !held.contains(p),
            )
        });
        let mut out: Vec<Announcement> = groups.into_iter().flat_map(|(_, l)| l).collect();
        out.truncate(MAX_VERSIONS_LISTED);
        out
    }

    /// The versions of `model` by the publisher the name means, newest first; with `remember`,
    /// that publisher is remembered (trust on first use). Ambiguous: an error naming the
    /// publishers.
    fn trusted_versions(
        &mut self,
        model: &str,
        remember: bool,
    ) -> Result<Vec<Announcement>, Error> {
        let all: Vec<Announcement> = self
            .announcements
            .values()
            .filter(|a| a.model == model)
            .cloned()
            .collect();
        let publishers: Vec<PeerId> = all.iter().map(|a| a.publisher).collect();
        match self.trust.resolve(model, &publishers, self.local_peer) {
            Resolution::Publisher(p) => {
                if remember && p != self.local_peer && publishers.contains(&p) {
                    self.trust.remember(model, p);
                }
                let mut list: Vec<Announcement> =
                    all.into_iter().filter(|a| a.publisher == p).collect();
                list.sort_by_key(|a| std::cmp::Reverse((a.version, a.id)));
                list.truncate(MAX_VERSIONS_LISTED);
                Ok(list)
            }
            Resolution::Ambiguous(publishers) => Err(Error::AmbiguousModel {
                model: model.to_string(),
                publishers,
            }),
            Resolution::Unknown => Ok(Vec::new()),
        }
    }

    /// Why `a` breaks the chain of its model, if it does: its number must be its parent's plus
    /// one, when the parent is known here (held or announced). The signature is checked
    /// already.
    fn chain_error(&self, a: &Announcement) -> Option<String> {
        let parent = self.announcements.get(&a.parent?)?;
        if parent.model != a.model {
            return Some(format!(
                "version {} of {} names a parent of model {}",
                a.version, a.model, parent.model
            ));
        }
        (parent.version.checked_add(1) != Some(a.version)).then(|| {
            format!(
                "version {} of {} follows version {}, not the one before it",
                a.version, a.model, parent.version
            )
        })
    }

    /// Takes in a verified announcement (signature checked by the caller): refused if it breaks
    /// its model's chain; remembered (bounded); fetched if its model is followed, it is by the
    /// publisher the name means and it is newer than every version of that publisher known.
    /// Returns whether it was accepted.
    fn learn_announcement(&mut self, a: Announcement) -> bool {
        if self.refused.contains(&a.id) {
            return false;
        }
        if let Some(why) = self.chain_error(&a) {
            tracing::warn!(publisher = %a.publisher, id = %a.id.short(), "refusing a version: {why}");
            return false;
        }
        let id = a.id;
        let model = a.model.clone();
        let publisher = a.publisher;
        self.remember_announcement(a);
        if self.followed.contains_key(&model) {
            self.refresh_follow(&model);
            let resolved = self.trust.resolve(&model, &[], self.local_peer);
            if resolved != Resolution::Publisher(publisher)
                && publisher != self.local_peer
                && self.trust.is_bound(&model)
                && self.shown.len() < MAX_SHOWN
                && self.shown.insert((model.clone(), publisher))
            {
                let follows = match resolved {
                    Resolution::Publisher(p) => p.to_base58(),
                    _ => "-".into(),
                };
                tracing::warn!(%model, %publisher, follows, "not following another publisher's versions of a followed model");
            }
        }
        if let Some(d) = self.downloads.get_mut(&id) {
            if publisher != self.local_peer {
                d.publisher.get_or_insert(publisher);
                d.add_holder(publisher);
            }
            self.drive(&id);
        }
        true
    }

    /// Keeps `a` in the bounded table of known versions. A publisher has at most
    /// [`MAX_ANNOUNCEMENTS_PER_PUBLISHER`] there and all together at most [`MAX_ANNOUNCEMENTS`].
    /// Beyond either, the lowest-numbered evictable version of that publisher (or of the
    /// publisher with the most evictable ones) is forgotten, if it is older than `a`. Versions
    /// held or downloading are never evicted; ours and those of the publisher a name is bound
    /// to here are not evicted for others' (only beyond their own share). So one peer's flood
    /// of its own versions (or of many identities') never pushes out a followed publisher's.
    fn remember_announcement(&mut self, a: Announcement) {
        let keep_anyway = self.store.get(&a.id).is_some() || self.downloads.contains_key(&a.id);
        if !self.announcements.contains_key(&a.id) {
            let evictable = |k: &Announcement| {
                self.store.get(&k.id).is_none()
                    && !self.downloads.contains_key(&k.id)
                    && k.publisher != self.local_peer
                    && self.trust.remembered(&k.model) != Some(k.publisher)
            };
            let own = self
                .announcements
                .values()
                .filter(|k| k.publisher == a.publisher)
                .count();
            let crowded = if own >= MAX_ANNOUNCEMENTS_PER_PUBLISHER {
                Some(a.publisher)
            } else if self.announcements.len() >= MAX_ANNOUNCEMENTS {
                // The publisher with the most entries that may go.
                let mut evictable_of: HashMap<PeerId, usize> = HashMap::new();
                for k in self.announcements.values().filter(|k| evictable(k)) {
                    *evictable_of.entry(k.publisher).or_default() += 1;
                }
                evictable_of
                    .into_iter()
                    .max_by_key(|(p, n)| (*n, *p))
                    .map(|(p, _)| p)
            } else {
                None
            };
            if let Some(crowded) = crowded {
                // Over its own share, a publisher's oldest entry goes even if it is one we
                // follow (else its table freezes); only held and downloading ones stay.
                let own_share = crowded == a.publisher && own >= MAX_ANNOUNCEMENTS_PER_PUBLISHER;
                let evict = self
                    .announcements
                    .values()
                    .filter(|k| {
                        k.publisher == crowded
                            && if own_share {
                                self.store.get(&k.id).is_none()
                                    && !self.downloads.contains_key(&k.id)
                            } else {
                                evictable(k)
                            }
                    })
                    .min_by_key(|k| (k.version, k.id))
                    .map(|k| (k.id, k.version));
                match evict {
                    Some((old, number))
                        if keep_anyway || crowded != a.publisher || number < a.version =>
                    {
                        self.announcements.remove(&old);
                    }
                    _ if keep_anyway => {}
                    _ => return,
                }
            }
        }
        self.announcements.insert(a.id, a);
    }

    /// Stops the downloads of older versions of `model` by `publisher` that nobody waits for
    /// any more (a follower's superseded versions). Their files go once the newest one's
    /// manifest is held, so that the chunks they share are copied first.
    fn cancel_superseded(
        &mut self,
        model: &str,
        publisher: PeerId,
        newest: &VersionId,
        number: u64,
    ) {
        let superseded: Vec<VersionId> = self
            .downloads
            .iter()
            .filter(|(id, d)| *id != newest && d.waiters.iter().all(|w| w.is_closed()))
            .filter(|(id, _)| {
                self.announcements.get(id).is_some_and(|a| {
                    a.model == model && a.publisher == publisher && a.version < number
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in superseded {
            self.stop_download(&id);
            let mut pending = self.superseded.remove(&id).unwrap_or_default();
            pending.push(id);
            self.superseded.entry(*newest).or_default().extend(pending);
            tracing::info!(version = %id.short(), model, "download cancelled: a newer version superseded it");
        }
    }

    /// Ends the download of `id` (if any): its requests are cancelled and its waiters told.
    fn stop_download(&mut self, id: &VersionId) {
        if let Some(d) = self.downloads.remove(id) {
            for waiter in d.waiters {
                let _ = waiter.send(Err(Error::Cancelled(id.short())));
            }
        }
        self.decoding.remove(id);
        for pending in self.requests.values_mut() {
            if matches!(pending.purpose, Purpose::Manifest(v) | Purpose::Chunk(v, _) | Purpose::Have(v) if v == *id)
            {
                pending.cancelled = true;
            }
        }
    }

    /// Forgets version `id` unless someone waits for it (a `fetch` of it): its download ends,
    /// its files are removed, its provider record is withdrawn and it is listed no more. For a
    /// version a caller no longer wants (a checkpoint not chosen to start from, or not fetched
    /// in time).
    pub fn forget(&mut self, id: &VersionId, why: &str) {
        self.forget_version(id, why, Forget::Unwanted);
    }

    /// [`Self::forget`], as far as `mode` allows.
    fn forget_version(&mut self, id: &VersionId, why: &str, mode: Forget) {
        let wanted = self
            .downloads
            .get(id)
            .is_some_and(|d| d.waiters.iter().any(|w| !w.is_closed()));
        let complete = self.store.get(id).is_some_and(|v| v.is_complete());
        let keep = match mode {
            Forget::Partial => wanted || complete,
            Forget::Unwanted => wanted,
            Forget::Refused => false,
        };
        if keep {
            tracing::debug!(version = %id.short(), "not forgetting a version in use: {why}");
            return;
        }
        self.stop_download(id);
        self.delete_version(id);
        if let Some(older) = self.superseded.remove(id) {
            for old in older {
                self.forget_version(&old, why, Forget::Partial);
            }
        }
        tracing::info!(version = %id.short(), "version forgotten: {why}");
    }

    /// Deletes version `id` if held (its provider record withdrawn) and forgets what is known
    /// of it: its announcement and traffic figures. False, with everything kept, if its files
    /// could not be deleted.
    fn delete_version(&mut self, id: &VersionId) -> bool {
        if self.store.get(id).is_some() {
            self.events.push_back(Event::StopProviding(*id));
            if let Err(e) = self.store.remove(id) {
                tracing::warn!(version = %id.short(), error = %format!("{e:#}"), "cannot delete a version");
                return false;
            }
        }
        self.announcements.remove(id);
        self.downloaded.remove(id);
        self.uploads.forget(id);
        for answer in self.have_waits.forget_version(id) {
            let _ = self.inner.send_response(answer, Response::NotFound);
        }
        true
    }

    /// Refuses version `id` for good: forgotten (see [`Self::forget`]) and never taken in
    /// again from an announcement or a listing.
    pub fn refuse(&mut self, id: &VersionId, why: &str) {
        if self.refused.len() >= MAX_ANNOUNCEMENTS {
            self.refused.clear();
        }
        self.refused.insert(*id);
        self.forget_version(id, why, Forget::Refused);
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
                let answer = match q.scope {
                    Scope::All => Ok(self.all_versions(&q.model)),
                    Scope::Trusted => self.trusted_versions(&q.model, false),
                    Scope::Resolve => self.trusted_versions(&q.model, true),
                };
                let _ = q.reply.send(answer);
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
            .map(|a| a.publisher)
            .filter(|p| *p != self.local_peer);
        let mut d = Download::new(publisher, Instant::now());
        for peer in self.connected.iter().chain(publisher.iter()) {
            d.add_candidate(*peer);
        }
        if self.store.get(&id).is_some() {
            self.init_picker(&id, &mut d);
        }
        tracing::info!(version = %id.short(), "download started");
        self.downloads.insert(id, d);
    }

    /// Sets up the picker once the manifest is held, copying chunks other versions share.
    fn init_picker(&mut self, id: &VersionId, d: &mut Download) {
        let Some(resumed) = self.store.get(id).map(|v| v.have.count()) else {
            return;
        };
        let copied = match self.store.copy_local_chunks(id) {
            Ok(copied) => {
                if !copied.is_empty() {
                    tracing::info!(version = %id.short(), chunks = copied.len(), "copied chunks shared with local versions");
                }
                copied.len() as u32
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot copy local chunks");
                0
            }
        };
        if copied > 0 {
            let count = self.store.get(id).map_or(0, |v| v.have.count());
            for answer in self.have_waits.chunks_changed(id, count) {
                self.answer_have(id, answer);
            }
        }
        if let Some(v) = self.store.get(id) {
            let picker = Picker::new(
                v.have.clone(),
                self.config.max_requests_per_peer,
                self.config.endgame_copies,
            )
            .with_max_in_flight(self.config.max_requests_in_flight);
            d.start(picker, resumed, copied);
        }
        // The versions this one superseded gave what they share: their files can go now.
        for old in self.superseded.remove(id).unwrap_or_default() {
            self.forget_version(&old, "superseded by a newer version", Forget::Partial);
        }
    }

    fn picker_mut(&mut self, id: &VersionId) -> Option<&mut Picker<PeerId>> {
        self.downloads.get_mut(id)?.picker_mut()
    }

    /// Moves a download forward: carries out the steps it asks for (requests, provider
    /// lookups, sync, completion) and tells its watchers how far it is.
    fn drive(&mut self, id: &VersionId) {
        let Some(mut d) = self.downloads.remove(id) else {
            return;
        };
        let disk = self.store.get(id).map_or(OnDisk::default(), |v| OnDisk {
            complete: v.is_complete(),
            durable: v.is_durable(),
        });
        for step in d.poll(Instant::now(), &self.config, disk, &mut self.rng) {
            match step {
                Step::FindProviders => self.events.push_back(Event::FindProviders(*id)),
                Step::Ask(peer, Ask::Manifest) => {
                    self.send(peer, Request::Manifest { id: *id }, Purpose::Manifest(*id));
                }
                Step::Ask(peer, Ask::Have { known }) => {
                    self.send(peer, Request::Have { id: *id, known }, Purpose::Have(*id));
                }
                Step::Ask(peer, Ask::Chunk(index)) => self.send(
                    peer,
                    Request::Chunk { id: *id, index },
                    Purpose::Chunk(*id, index),
                ),
                Step::Sync => self.start_sync(id),
                Step::Complete => {
                    self.complete(id, d);
                    return;
                }
            }
        }
        d.report_progress(self.store.get(id));
        self.downloads.insert(*id, d);
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

    /// A manifest arrived: decoded and verified off the event loop (one at a time per version),
    /// then [`Self::on_manifest_decoded`].
    fn on_manifest(&mut self, peer: PeerId, id: VersionId, bytes: Vec<u8>) {
        if self.downloads.get(&id).is_none_or(Download::has_manifest) || !self.decoding.insert(id) {
            return;
        }
        disk::spawn_decode(id, peer, bytes, self.write_done.clone());
    }

    fn on_manifest_decoded(&mut self, decoded: DecodedManifest) {
        let DecodedManifest {
            id,
            peer,
            bytes,
            result,
        } = decoded;
        self.decoding.remove(&id);
        if self.downloads.get(&id).is_none_or(Download::has_manifest) {
            return; // cancelled, or another copy was taken meanwhile
        }
        let (manifest, announcement) = match result {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::warn!(%peer, version = %id.short(), error = %e, "peer sent a bad manifest");
                self.punish(peer, id, "sent a manifest that does not match its id");
                return;
            }
        };
        if let Some(d) = self.downloads.get_mut(&id) {
            // The signed publisher, whatever a peer's `Have` claimed.
            d.publisher = Some(manifest.publisher).filter(|p| *p != self.local_peer);
        }
        if let Some(why) = self.chain_error(&announcement) {
            // Signed by its publisher, so the publisher broke its own chain: nothing of it is
            // fetched.
            self.fail_download(&id, Error::BrokenChain(why));
            return;
        }
        self.remember_announcement(announcement);
        if let Err(e) = self.store.begin(id, manifest, &bytes) {
            self.fail_download(&id, Error::store(&id, &e));
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

    fn on_have(&mut self, peer: PeerId, id: VersionId, bitfield: Option<Bitfield>, holds: bool) {
        let portion = self
            .config
            .portion
            .filter(|_| self.config.stage == Stage::Coordinated);
        if let Some(d) = self.downloads.get_mut(&id) {
            d.on_have(peer, bitfield, holds, portion);
        }
    }

    fn on_chunk(&mut self, peer: PeerId, id: VersionId, index: u32, got: u32, data: Vec<u8>) {
        if got != index {
            self.punish(peer, id, "sent a different chunk than asked");
            return;
        }
        let Some(v) = self.store.get(&id) else {
            return;
        };
        let obtained =
            v.have.get(index) || self.downloads.get(&id).is_some_and(|d| d.has_chunk(index));
        if obtained {
            // An endgame duplicate that was not cancelled in time.
            if let Some(p) = self.picker_mut(&id) {
                p.chunk_received(&peer, index);
            }
            return;
        }
        let write = match self.store.chunk_write(&id, index, data) {
            Ok(w) => w,
            Err(e) => {
                self.fail_download(&id, Error::Disk(format!("{e:#}")));
                return;
            }
        };
        if let Some(d) = self.downloads.get_mut(&id) {
            // Endgame: the same chunk asked of slower peers; their answers are dropped.
            for loser in d.chunk_arrived(peer, index) {
                for pending in self.requests.values_mut() {
                    if pending.peer == loser
                        && matches!(pending.purpose, Purpose::Chunk(v, i) if v == id && i == index)
                    {
                        pending.cancelled = true;
                    }
                }
            }
        }
        // Hashing and writing run off the event loop, which goes on serving and scheduling.
        self.chunk_writer.write(ChunkJob {
            id,
            index,
            peer,
            write,
        });
        self.drive(&id);
    }

    /// Disk work finished on a blocking thread.
    pub fn on_disk_event(&mut self, event: DiskEvent) {
        match event {
            DiskEvent::ChunkWritten {
                id,
                index,
                peer,
                bytes,
                result,
            } => self.on_chunk_written(id, index, peer, bytes, result),
            DiskEvent::ChunkRead(read) => self.on_chunk_read(*read),
            DiskEvent::ManifestDecoded(decoded) => self.on_manifest_decoded(*decoded),
            DiskEvent::Imported(imported) => self.on_imported(*imported),
            DiskEvent::Exported { id, result, reply } => {
                if result == Ok(true) {
                    self.forget_version(
                        &id,
                        "moved out of the store by an export",
                        Forget::Refused,
                    );
                }
                let _ = reply.send(result.map(|_| ()));
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
        if let Some(job) = self.store.sync_job(id) {
            disk::spawn_sync(job, self.write_done.clone());
        }
    }

    /// A received chunk was verified and written (it is served from now on), did not match
    /// its hash (its sender is dropped), or could not be written (the download fails).
    fn on_chunk_written(
        &mut self,
        id: VersionId,
        index: u32,
        peer: PeerId,
        bytes: u64,
        result: Result<bool, Error>,
    ) {
        let result = result.and_then(|matched| {
            if matched {
                self.store
                    .mark_written(&id, index)
                    .map_err(|e| Error::Disk(format!("{e:#}")))?;
            }
            Ok(matched)
        });
        if let Some(d) = self.downloads.get_mut(&id) {
            d.chunk_written(index, peer, result == Ok(true), Instant::now());
        }
        match result {
            Ok(true) => {
                let count = self.store.get(&id).map_or(0, |v| v.have.count());
                for answer in self.have_waits.chunks_changed(&id, count) {
                    self.answer_have(&id, answer);
                }
                *self.downloaded.entry(id).or_default() += bytes;
                self.totals.chunks_fetched += 1;
                self.totals.bytes_fetched += bytes;
            }
            Ok(false) => {
                self.totals.bad_chunks += 1;
                // Chunks it sent before the first was checked come here too: one penalty.
                if !self.downloads.get(&id).is_some_and(|d| d.is_banned(&peer)) {
                    self.punish(peer, id, "sent a chunk that does not match its hash");
                }
                self.drive(&id);
                return;
            }
            Err(e) => {
                self.fail_download(&id, e);
                return;
            }
        }
        let first = self.store.get(&id).is_some_and(|v| v.have.count() == 1);
        if first && self.uploads.serves(false, false) {
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
            d.ban(peer);
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
            let why = Error::NotSafetensors {
                id: id.short(),
                reason: format!("{e:#}"),
            };
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
        let report = d.report(id, v, Instant::now());
        tracing::info!(
            version = %id.short(), model = %report.model, number = report.version,
            size = report.size, downloaded = report.chunks_downloaded, copied = report.chunks_copied_locally,
            resumed = report.chunks_resumed, peers = report.peers_used, seconds = report.seconds,
            "download complete"
        );
        if !self.announcements.contains_key(id) {
            let announcement = v.manifest.announcement();
            self.remember_announcement(announcement);
        }
        if self.uploads.serves(false, true) {
            self.start_providing(id);
        }
        for waiter in d.waiters {
            let _ = waiter.send(Ok(report.clone()));
        }
    }

    fn fail_download(&mut self, id: &VersionId, error: Error) {
        tracing::error!(version = %id.short(), error = %error, "download failed");
        if let Some(d) = self.downloads.remove(id) {
            for waiter in d.waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        // The older partial versions it superseded go too: nothing resumes them.
        for old in self.superseded.remove(id).unwrap_or_default() {
            self.forget_version(&old, "superseded by a version that failed", Forget::Partial);
        }
    }

    /// Asks for `announcement` to be published on the announcements topic.
    fn announce(&mut self, announcement: &Announcement) {
        self.events
            .push_back(Event::Announce(announcement.encode()));
    }

    /// A connected peer's listen addresses (from identify), kept while it is connected and
    /// given as hints to peers that ask for the versions it published.
    pub fn note_peer_addresses(&mut self, peer: PeerId, addrs: Vec<libp2p::Multiaddr>) {
        if self.connected.contains(&peer) {
            let addrs = addrs.into_iter().take(MAX_ADDRESS_HINTS_PER_PEER).collect();
            self.peer_addrs.insert(peer, addrs);
        }
    }

    /// Addresses of the publishers of `versions` this node knows, for `asker`.
    fn address_hints(&self, versions: &[Announcement], asker: PeerId) -> Vec<AddressHint> {
        let mut hints: Vec<AddressHint> = Vec::new();
        for a in versions {
            let peer = a.publisher;
            if peer == asker || peer == self.local_peer || hints.iter().any(|h| h.peer == peer) {
                continue;
            }
            if let Some(addrs) = self.peer_addrs.get(&peer).filter(|a| !a.is_empty()) {
                hints.push(AddressHint {
                    peer,
                    addrs: addrs.clone(),
                });
            }
            if hints.len() == MAX_ADDRESS_HINT_PEERS {
                break;
            }
        }
        hints
    }

    /// Passes on the address hints of a `Versions` answer, for `publishers` only (those of
    /// the versions of the asked model that verified), and only IP addresses that can be
    /// dialled (no unspecified address or name; through one relay at most).
    fn take_address_hints(&mut self, publishers: &[PeerId], hints: Vec<AddressHint>) {
        for hint in hints.into_iter().take(MAX_ADDRESS_HINT_PEERS) {
            let listed = publishers.contains(&hint.peer);
            if !listed || hint.peer == self.local_peer || self.connected.contains(&hint.peer) {
                continue;
            }
            let addrs: Vec<libp2p::Multiaddr> = hint
                .addrs
                .into_iter()
                .take(MAX_ADDRESS_HINTS_PER_PEER)
                .filter(dialable_hint)
                .collect();
            if addrs.is_empty() {
                continue;
            }
            tracing::debug!(peer = %hint.peer, ?addrs, "address hints for a publisher");
            self.events.push_back(Event::PeerAddresses {
                peer: hint.peer,
                addrs,
            });
        }
    }

    /// A peer joined the announcements topic: announces this node's newest versions again,
    /// now, or once [`REANNOUNCE_MIN_GAP`] has passed since the last time.
    pub fn on_topic_joined(&mut self) {
        if self
            .last_reannounce
            .is_none_or(|t| t.elapsed() >= REANNOUNCE_MIN_GAP)
        {
            self.reannounce();
        } else {
            self.reannounce_pending = true;
        }
    }

    /// Announces again the newest complete version of each model this node published.
    fn reannounce(&mut self) {
        self.last_reannounce = Some(Instant::now());
        self.reannounce_pending = false;
        let mut newest: HashMap<&str, &Manifest> = HashMap::new();
        for (_, v) in self.store.iter() {
            if !v.published || !v.is_complete() {
                continue;
            }
            let m = &v.manifest;
            let slot = newest.entry(m.model.as_str()).or_insert(m);
            if m.version > slot.version {
                *slot = m;
            }
        }
        let announcements: Vec<Announcement> = newest.values().map(|m| m.announcement()).collect();
        for a in &announcements {
            tracing::debug!(model = %a.model, version = a.version, "announcing again");
            self.announce(a);
        }
    }

    /// Asks for a provider record of `id` to be put in the DHT.
    fn start_providing(&mut self, id: &VersionId) {
        self.events.push_back(Event::Provide(*id));
    }
}

/// Whether an address hint is worth dialling: it starts with an IP that is not unspecified
/// (names would make this node resolve what a peer chose), and goes through at most one
/// relay (a private publisher's relayed address, over which hole punching gives a direct
/// connection; our protocols never run on the relayed one).
fn dialable_hint(addr: &libp2p::Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    let direct_ip = match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified() && !ip.is_broadcast(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        _ => false,
    };
    direct_ip
        && addr
            .iter()
            .filter(|p| matches!(p, Protocol::P2pCircuit))
            .count()
            <= 1
}

impl WrapsRequestResponse for Behaviour {
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
        self.peer_addrs.remove(&peer);
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

crate::impl_wire_behaviour!(Behaviour);

#[cfg(test)]
mod hint_tests {
    use super::dialable_hint;

    #[test]
    fn only_ip_addresses_through_at_most_one_relay_are_taken_as_hints() {
        for ok in [
            "/ip4/192.0.2.7/tcp/4001",
            "/ip4/127.0.0.1/udp/4001/quic-v1",
            "/ip6/2001:db8::1/tcp/4001",
            "/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWHFrmLWTTDD4NodngtRMEVYgxrsDHNK2KjVgXM12L6eGt/p2p-circuit",
        ] {
            assert!(dialable_hint(&ok.parse().expect("multiaddr")), "{ok}");
        }
        for bad in [
            "/ip4/0.0.0.0/tcp/4001",
            "/ip6/::/tcp/4001",
            "/dns4/example.com/tcp/4001",
            "/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWHFrmLWTTDD4NodngtRMEVYgxrsDHNK2KjVgXM12L6eGt/p2p-circuit/p2p/12D3KooWHFrmLWTTDD4NodngtRMEVYgxrsDHNK2KjVgXM12L6eGt/p2p-circuit",
        ] {
            assert!(!dialable_hint(&bad.parse().expect("multiaddr")), "{bad}");
        }
    }
}
