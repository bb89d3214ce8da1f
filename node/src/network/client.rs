//! [`Client`]: a cloneable handle to the event loop. Each method sends a [`Command`] with a
//! oneshot reply channel; the event loop, which alone owns the swarm, answers it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use libp2p::{Multiaddr, PeerId};
use p2p_protocol::manifest::VersionId;
use p2p_protocol::messages::Announcement;
use p2p_protocol::training::RunAnnouncement;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::address_book::Source;
use crate::averaging::{self, AveragerStatus, PeerParams, RoundError, RunMembership, Snapshots};
use crate::history::SharedHistory;
use crate::models::disk::PublishFile;
use crate::models::{self, DownloadReport, DownloadState, FetchProgress, ModelInfo};
use crate::training::TrainingStatus;

/// Requests the event loop serves, by domain: the network's own, and those it passes to
/// the models and the averaging behaviours.
#[derive(Debug)]
pub enum Command {
    /// Current network status.
    Status(oneshot::Sender<NetworkStatus>),
    /// The address book.
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    /// Peer ids in the Kademlia routing table.
    RoutingTable(oneshot::Sender<Vec<PeerId>>),
    /// Reply once every requested listener has reported an address (or failed).
    WaitListening(oneshot::Sender<Vec<Multiaddr>>),
    /// Penalty points of peers that sent bad data.
    Penalties(oneshot::Sender<HashMap<PeerId, u32>>),
    /// Announce a training run on gossip.
    AnnounceRun(Box<RunAnnouncement>),
    /// Count a penalty against a peer whose parameters were refused; with `exclude`, leave it
    /// out of this run's averaging from now on.
    RefusePeer {
        /// The peer.
        peer: PeerId,
        /// Why.
        why: String,
        /// Whether to exclude it from the run.
        exclude: bool,
    },
    /// For the models behaviour.
    Models(models::Command),
    /// For the averaging behaviour.
    Averaging(averaging::Command),
}

/// Summary of the node's network state (`GET /status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkStatus {
    /// This node's peer id.
    pub peer_id: String,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<String>,
    /// Number of peers with a live connection.
    pub connected_peers: usize,
    /// Number of peers in the Kademlia routing table.
    pub routing_table_peers: usize,
    /// Number of peers in the address book.
    pub known_peers: usize,
    /// How joining the network went.
    pub join: JoinState,
    /// Connections refused since start (banned peers, or peers not on the allowlist).
    pub denied_connections: u64,
    /// Live connections by direction and path.
    pub connections: ConnectionCounts,
    /// Offences counted against peers since start (bad chunks, lies in averaging, ...).
    pub penalties: u64,
    /// Bans given since start.
    pub bans: u64,
    /// Peers banned now.
    pub banned_peers: usize,
    /// Chunk traffic since start.
    pub transfers: crate::models::TransferTotals,
    /// Whether peers can dial this node (`public` / `private` / `unknown`).
    pub reachability: super::reachability::Reachability,
    /// The addresses this node advertises: confirmed by AutoNAT dial-backs, by relays (its
    /// relayed addresses) or declared by the node itself (loopback, `--kad-mode server`).
    pub external_addrs: Vec<String>,
    /// Whether Kademlia answers DHT queries now (with `--kad-mode auto`: while public).
    pub kademlia_server: bool,
    /// AutoNAT probes of this node's addresses that succeeded since start.
    pub autonat_probes_ok: u64,
    /// AutoNAT probes that failed since start.
    pub autonat_probes_failed: u64,
    /// Relays: this node's reservations, its relay server, hole punching.
    pub relay: super::relays::RelayStatus,
    /// Training, when this node trains (`null` otherwise).
    pub training: Option<TrainingStatus>,
    /// The averaging protocol's view (merged into `training`).
    #[serde(skip)]
    pub averaging: AveragerStatus,
}

/// Live connections by direction (who dialled) and path (`direct`, or `relayed` through a
/// circuit relay: an address with `/p2p-circuit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionCounts {
    /// Dialled by the peer, straight to this node.
    pub inbound_direct: usize,
    /// Dialled by the peer through a relay.
    pub inbound_relayed: usize,
    /// Dialled by this node, straight to the peer.
    pub outbound_direct: usize,
    /// Dialled by this node through a relay.
    pub outbound_relayed: usize,
}

impl ConnectionCounts {
    /// Counts one connection more.
    pub fn count(&mut self, inbound: bool, relayed: bool) {
        *match (inbound, relayed) {
            (true, false) => &mut self.inbound_direct,
            (true, true) => &mut self.inbound_relayed,
            (false, false) => &mut self.outbound_direct,
            (false, true) => &mut self.outbound_relayed,
        } += 1;
    }
}

/// The node's connections as they change: sent on a `watch` ([`Client::connectivity`]) every
/// time a peer connects or leaves, a dial fails or the mDNS grace period ends, so that
/// commands wait on it instead of polling `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connectivity {
    /// Peers with at least one connection.
    pub connected_peers: usize,
    /// How joining went.
    pub join: JoinState,
}

impl Connectivity {
    /// Why the node cannot join, once every way to join has failed ([`JoinState::failure`]).
    pub fn failure(&self) -> Option<String> {
        self.join.failure(self.connected_peers)
    }
}

/// How joining the network went (`GET /status` → `join`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JoinState {
    /// Whether a connection to any peer has come up since the node started.
    pub ever_connected: bool,
    /// Dials to bootstrap, cached or mDNS peers still in progress.
    pub dials_pending: usize,
    /// Dials to bootstrap, cached or mDNS peers that failed.
    pub dials_failed: u32,
    /// The last failed dial of any kind: `<peer id>: <error>`.
    pub last_dial_error: Option<String>,
    /// Whether mDNS may still find a LAN peer (it is on and the node started less than a few
    /// seconds ago).
    pub mdns_searching: bool,
}

impl JoinState {
    /// Why the node cannot join, once every way to join has failed: no connection ever came
    /// up, no dial is in progress, and mDNS (if on) had its few seconds. `None` while a way
    /// remains (or once joined).
    pub fn failure(&self, connected_peers: usize) -> Option<String> {
        if self.ever_connected
            || connected_peers > 0
            || self.dials_pending > 0
            || self.mdns_searching
        {
            return None;
        }
        if self.dials_failed == 0 {
            return Some(
                "no peer to join through: no --bootstrap address, no cached peers, and no LAN \
                 peer found by mDNS"
                    .to_string(),
            );
        }
        let last = self
            .last_dial_error
            .as_ref()
            .map_or(String::new(), |e| format!("; last: {e}"));
        Some(format!(
            "no peer could be reached ({} dial(s) failed{last})",
            self.dials_failed
        ))
    }
}

/// One peer of the address book (`GET /peers`).
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    /// The peer id.
    pub peer_id: String,
    /// Known dialable addresses, newest first.
    pub addrs: Vec<String>,
    /// Whether a connection is up now.
    pub connected: bool,
    /// How it was first found.
    pub source: Source,
    /// Unix seconds when a connection was last up (0: never).
    pub last_seen_unix: u64,
    /// Whether it is in the Kademlia routing table.
    pub in_routing_table: bool,
    /// Penalty points for bad data since its last ban (a ban comes at 3).
    pub penalty: u32,
    /// While it is banned: Unix seconds when the ban ends.
    pub banned_until_unix: Option<u64>,
    /// While connected: `direct` if any connection to it is direct, else `relayed`.
    pub path: Option<&'static str>,
}

/// A download in progress ([`Client::fetch_with_progress`]).
#[derive(Debug)]
pub struct Fetching {
    /// Chunks and bytes held so far; changes as chunks are verified.
    pub progress: watch::Receiver<FetchProgress>,
    done: oneshot::Receiver<Result<DownloadReport, models::Error>>,
}

impl Fetching {
    /// Waits for the download to end: the report, or why it failed.
    pub async fn finished(self) -> Result<DownloadReport> {
        self.done
            .await
            .map_err(|_| anyhow!("the node has stopped"))?
            .map_err(|e| anyhow!(e))
    }
}

/// Cloneable handle to a running node's network.
#[derive(Debug, Clone)]
pub struct Client {
    sender: mpsc::Sender<Command>,
    connectivity: watch::Receiver<Connectivity>,
    /// The training coordinator's status, once one runs (shared by every clone).
    training: Arc<std::sync::Mutex<Option<watch::Receiver<TrainingStatus>>>>,
    /// The node's identity, to sign the runs it creates.
    key: Arc<libp2p::identity::Keypair>,
    /// libp2p's metrics (filled by the event loop), for `GET /metrics`.
    registry: Arc<prometheus_client::registry::Registry>,
    /// Training points and events, for the dashboard.
    history: SharedHistory,
}

impl Client {
    /// Wraps the command channel of an event loop, its connectivity `watch` and the node's
    /// identity.
    pub fn new(
        sender: mpsc::Sender<Command>,
        connectivity: watch::Receiver<Connectivity>,
        key: libp2p::identity::Keypair,
    ) -> Self {
        Self {
            sender,
            connectivity,
            training: Arc::default(),
            key: Arc::new(key),
            registry: Arc::default(),
            history: SharedHistory::default(),
        }
    }

    /// The same client, reading libp2p's metrics from `registry` and the dashboard's record
    /// from `history` (both filled by the event loop).
    pub fn with_observers(
        mut self,
        registry: Arc<prometheus_client::registry::Registry>,
        history: SharedHistory,
    ) -> Self {
        self.registry = registry;
        self.history = history;
        self
    }

    /// libp2p's metrics registry.
    pub fn metrics_registry(&self) -> &prometheus_client::registry::Registry {
        &self.registry
    }

    /// Training points and events recorded so far.
    pub fn history(&self) -> &SharedHistory {
        &self.history
    }

    /// Signs `run` as its creator: this node.
    pub fn sign_run(&self, run: &mut RunAnnouncement) {
        run.sign(&self.key);
    }

    /// The node's connections, updated as they change.
    pub fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.connectivity.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.sender
            .send(make(tx))
            .await
            .map_err(|_| anyhow!("the node has stopped"))?;
        rx.await.map_err(|_| anyhow!("the node has stopped"))
    }

    /// Current network status, with the training status when this node trains.
    pub async fn status(&self) -> Result<NetworkStatus> {
        let mut status = self.ask(Command::Status).await?;
        status.training = self.training_status().map(|mut t| {
            t.run_peers = status.averaging.run_peers;
            t.refused_peers = status.averaging.refused_peers.clone();
            t
        });
        Ok(status)
    }

    /// Shows `status` (the coordinator's watch) in [`Client::status`] from now on, and
    /// records its progress in the history (a task that ends with the watch).
    pub fn watch_training(&self, status: watch::Receiver<TrainingStatus>) {
        if let Ok(mut slot) = self.training.lock() {
            *slot = Some(status.clone());
        }
        let (history, peer) = (self.history.clone(), self.key.public().to_peer_id());
        let mut status = status;
        tokio::spawn(async move {
            let (peer, mut last) = (peer.to_string(), (0, None));
            loop {
                last = history.own_progress(&peer, &status.borrow_and_update(), last);
                if status.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// The latest training status, if this node trains.
    pub fn training_status(&self) -> Option<TrainingStatus> {
        let slot = self.training.lock().ok()?;
        slot.as_ref().map(|rx| rx.borrow().clone())
    }

    /// The address book, sorted by peer id.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.ask(Command::Peers).await
    }

    /// Peer ids in the Kademlia routing table.
    pub async fn routing_table(&self) -> Result<Vec<PeerId>> {
        self.ask(Command::RoutingTable).await
    }

    /// Waits until every listener has reported its first address; returns all addresses.
    pub async fn wait_listening(&self) -> Result<Vec<Multiaddr>> {
        self.ask(Command::WaitListening).await
    }

    /// Publishes `file` as the next version of `model`: the models behaviour takes an
    /// immutable snapshot of it into the store (off the event loop), then announces and
    /// serves it. Identical bytes give the same version id again.
    pub async fn publish(&self, file: &Path, model: &str) -> Result<Announcement> {
        self.publish_file(file, model, false).await
    }

    /// Publishes a checkpoint file: like [`Client::publish`], with the training metadata
    /// (run, step, samples, loss, accuracy) read from the stored snapshot's own
    /// `p2p-node` metadata key, so that the announcement describes exactly the bytes
    /// published. Fails if the file has no such metadata.
    pub async fn publish_checkpoint(&self, file: &Path, model: &str) -> Result<Announcement> {
        self.publish_file(file, model, true).await
    }

    async fn publish_file(
        &self,
        file: &Path,
        model: &str,
        checkpoint: bool,
    ) -> Result<Announcement> {
        let (file, model) = (file.to_path_buf(), model.to_string());
        self.ask(|reply| {
            Command::Models(models::Command::Publish(PublishFile {
                file,
                model,
                checkpoint,
                reply,
            }))
        })
        .await?
        .map_err(|e| anyhow!(e))
    }

    /// Deletes the complete versions of `model` beyond the newest `keep`, sparing those peers
    /// are still fetching; returns the ids deleted.
    pub async fn prune_versions(&self, model: &str, keep: usize) -> Result<Vec<VersionId>> {
        let model = model.to_string();
        self.ask(|reply| Command::Models(models::Command::Prune { model, keep, reply }))
            .await
    }

    /// Downloads version `id` from the swarm; returns when it is complete and verified.
    pub async fn fetch(&self, id: VersionId) -> Result<DownloadReport> {
        self.ask(|reply| {
            Command::Models(models::Command::Fetch {
                id,
                reply,
                progress: None,
            })
        })
        .await?
        .map_err(|e| anyhow!(e))
    }

    /// Starts downloading version `id`: progress arrives on the returned watch as the
    /// download moves, and [`Fetching::finished`] gives the report.
    pub async fn fetch_with_progress(&self, id: VersionId) -> Result<Fetching> {
        let (reply, done) = oneshot::channel();
        let (tx, progress) = watch::channel(FetchProgress::default());
        self.sender
            .send(Command::Models(models::Command::Fetch {
                id,
                reply,
                progress: Some(tx),
            }))
            .await
            .map_err(|_| anyhow!("the node has stopped"))?;
        Ok(Fetching { progress, done })
    }

    /// Where the download of `id` stands, if one is in progress.
    pub async fn download_state(&self, id: VersionId) -> Result<Option<DownloadState>> {
        self.ask(|reply| Command::Models(models::Command::DownloadState { id, reply }))
            .await
    }

    /// Versions of `model` known to this node and its connected peers, newest first, by the
    /// publisher the name means (see [`models::trust`]; an error if it is ambiguous). Nothing
    /// is remembered.
    pub async fn query_versions(&self, model: &str) -> Result<Vec<Announcement>> {
        self.query(model, models::command::Scope::Trusted).await
    }

    /// As [`Self::query_versions`], and the publisher found is remembered for the name (trust
    /// on first use): for a fetch by name once its dials have settled.
    pub async fn resolve_versions(&self, model: &str) -> Result<Vec<Announcement>> {
        self.query(model, models::command::Scope::Resolve).await
    }

    /// Every verified version of `model` known to this node and its connected peers, whoever
    /// published it, newest first (a run's checkpoints come from all its members).
    pub async fn query_all_versions(&self, model: &str) -> Result<Vec<Announcement>> {
        self.query(model, models::command::Scope::All).await
    }

    async fn query(&self, model: &str, scope: models::command::Scope) -> Result<Vec<Announcement>> {
        let model = model.to_string();
        self.ask(|reply| {
            Command::Models(models::Command::QueryVersions {
                model,
                scope,
                reply,
            })
        })
        .await?
        .map_err(|e| anyhow!(e))
    }

    /// Versions held, with progress and traffic.
    pub async fn models(&self) -> Result<Vec<ModelInfo>> {
        self.ask(|reply| Command::Models(models::Command::Models(reply)))
            .await
    }

    /// Penalty points of peers that sent bad data.
    pub async fn penalties(&self) -> Result<HashMap<PeerId, u32>> {
        self.ask(Command::Penalties).await
    }

    /// Announces a training run on gossip.
    pub async fn announce_run(&self, announcement: RunAnnouncement) -> Result<()> {
        self.sender
            .send(Command::AnnounceRun(Box::new(announcement)))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Runs known to this node and its connected peers, newest first.
    pub async fn query_runs(&self) -> Result<averaging::KnownRuns> {
        self.ask(|reply| Command::Averaging(averaging::Command::QueryRuns(reply)))
            .await
    }

    /// Takes part in a run's averaging: peers' sessions are answered by the network side
    /// alone from the latest value of `snapshots` (which the trainer keeps fresh); their
    /// parameters end up in `served`.
    pub async fn join_run(
        &self,
        membership: RunMembership,
        snapshots: Snapshots,
        served: mpsc::Sender<PeerParams>,
    ) -> Result<()> {
        self.sender
            .send(Command::Averaging(averaging::Command::JoinRun {
                membership: Box::new(membership),
                snapshots,
                served,
            }))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Forgets version `id`: its download ends, its files go and it is listed no more; with
    /// `for_good`, it is never taken in again (a checkpoint that failed its check).
    pub async fn forget_version(&self, id: VersionId, for_good: bool, why: String) -> Result<()> {
        self.sender
            .send(Command::Models(models::Command::Forget {
                id,
                for_good,
                why,
            }))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Stops taking part in the run's averaging (training stopped).
    pub async fn leave_run(&self) -> Result<()> {
        self.sender
            .send(Command::Averaging(averaging::Command::LeaveRun))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Averages with a random peer of the run: returns its parameters (finite, checked for
    /// length) once both sides have exchanged theirs, or why the round found no partner.
    /// The outer error means the node has stopped.
    pub async fn average(&self) -> Result<std::result::Result<PeerParams, RoundError>> {
        self.ask(|reply| Command::Averaging(averaging::Command::Average(reply)))
            .await
    }

    /// Records that the trainer took `peer`'s pseudo-gradient of outer step `round`, so that
    /// sessions with it do not move it again.
    pub async fn note_held(&self, peer: PeerId, round: u64) -> Result<()> {
        self.sender
            .send(Command::Averaging(averaging::Command::Held { peer, round }))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Counts a penalty against `peer`, whose parameters were refused; with `exclude` it is
    /// left out of this run's averaging from now on.
    pub async fn refuse_peer(&self, peer: PeerId, why: String, exclude: bool) -> Result<()> {
        self.sender
            .send(Command::RefusePeer { peer, why, exclude })
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Peers known to train this node's run.
    pub async fn run_peers(&self) -> Result<Vec<PeerId>> {
        self.ask(|reply| Command::Averaging(averaging::Command::RunPeers(reply)))
            .await
    }

    /// Writes the complete version `id` to `out` (atomically). With `keep`, the store keeps
    /// its copy and goes on serving it; without, the store's data file moves to `out` where it
    /// can (same file system) and the version is dropped from the store, so nothing is copied.
    pub async fn export(&self, id: VersionId, out: &Path, keep: bool) -> Result<()> {
        let out = out.to_path_buf();
        self.ask(|reply| {
            Command::Models(models::Command::Export {
                id,
                out,
                keep,
                reply,
            })
        })
        .await?
        .map_err(|e| anyhow!(e))
    }
}
