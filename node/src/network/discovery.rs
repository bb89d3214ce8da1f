//! [`Discovery`]: joining the network and staying joined. It owns the address book (and its
//! file, the peer cache), dials the bootstrap and cached peers at start, feeds what identify,
//! Kademlia and mDNS report into the book and the routing table, redials when the node has too
//! few connections, and keeps the [`JoinState`] that tells a fetch when every way in failed.
//!
//! The peer cache is written within [`CACHE_SAVE_SOON`] of learning a new peer or address (a
//! node killed right after its first contact still finds the network again) and every
//! `peer_cache_save_interval` for other changes.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::DialError;
use libp2p::{identify, kad, Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::watch;
use tokio::time::Instant;

use super::address_book::{self, AddressBook, Source};
use super::behaviour::Behaviour;
use super::client::{Connectivity, JoinState, PeerInfo};
use super::swarm::one_line;
use crate::config::NodeConfig;

/// A peer or address learned is written to the peer cache within this long.
pub const CACHE_SAVE_SOON: Duration = Duration::from_secs(1);

/// How long mDNS may take to find a LAN peer before joining counts as failed.
pub const MDNS_GRACE: Duration = Duration::from_secs(5);

/// Peers remembered as reported by mDNS (beyond: forgotten, and logged again when reported).
const MAX_MDNS_FOUND: usize = 4096;

/// Joining and staying joined.
pub struct Discovery {
    config: NodeConfig,
    book: AddressBook,
    bootstrap_peers: HashSet<PeerId>,
    /// Peers dialled to join (bootstrap, cached, mDNS) whose dial has not ended yet.
    join_dials: HashSet<PeerId>,
    join: JoinState,
    started: Instant,
    last_cache_save: Instant,
    /// Peers with at least one connection.
    connected: usize,
    connectivity: watch::Sender<Connectivity>,
    /// Peers mDNS reported (logged once each, even when already known from a connection).
    mdns_found: HashSet<PeerId>,
}

impl Discovery {
    /// Discovery for `config`, starting from the address book `book` (the loaded peer cache).
    pub fn new(config: NodeConfig, book: AddressBook) -> Self {
        Self {
            bootstrap_peers: config.bootstrap.iter().map(|b| b.peer_id).collect(),
            config,
            book,
            join_dials: HashSet::new(),
            join: JoinState::default(),
            started: Instant::now(),
            last_cache_save: Instant::now(),
            connected: 0,
            mdns_found: HashSet::new(),
            connectivity: watch::Sender::new(Connectivity::default()),
        }
    }

    /// The node's connections and join state, updated as they change.
    pub fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.connectivity.subscribe()
    }

    /// Sends the connectivity to its watchers if it changed.
    fn publish(&self) {
        let now = Connectivity {
            connected_peers: self.connected,
            join: self.join_state(),
        };
        self.connectivity
            .send_if_modified(|c| std::mem::replace(c, now.clone()) != now);
    }

    /// Peers in the address book.
    pub fn known_peers(&self) -> usize {
        self.book.len()
    }

    /// How joining went so far.
    pub fn join_state(&self) -> JoinState {
        JoinState {
            dials_pending: self.join_dials.len(),
            mdns_searching: self.config.mdns && self.started.elapsed() < MDNS_GRACE,
            ..self.join.clone()
        }
    }

    /// Dials the bootstrap peers and the best cached peers, and starts a Kademlia bootstrap.
    pub fn join(&mut self, swarm: &mut Swarm<Behaviour>) {
        for bootstrap in self.config.bootstrap.clone() {
            self.book.learn(
                bootstrap.peer_id,
                [bootstrap.addr.clone()],
                Source::Bootstrap,
            );
            tracing::info!(peer = %bootstrap.peer_id, addr = %bootstrap.addr, "joining through bootstrap peer");
        }
        let bootstrap_ids: Vec<PeerId> = self.bootstrap_peers.iter().copied().collect();
        for peer in bootstrap_ids {
            self.dial_known(swarm, peer);
        }
        let cached = self.book.best(self.config.peer_cache_dial);
        let cached_count = cached
            .iter()
            .filter(|(p, _)| !self.bootstrap_peers.contains(p))
            .count();
        for (peer, _) in cached {
            self.dial_known(swarm, peer);
        }
        if cached_count > 0 {
            tracing::info!(peers = cached_count, "rejoining through cached peers");
        }
        if self.config.bootstrap.is_empty() && cached_count == 0 {
            tracing::info!(
                mdns = self.config.mdns,
                "no bootstrap peer and no cached peers: starting a new network (LAN peers are found with mDNS when enabled)"
            );
        }
        kad_bootstrap(swarm);
        self.publish();
    }

    /// Adds the book's addresses for `peer` to Kademlia and dials it unless connected.
    ///
    /// The dial comes from a new (ephemeral) port, not the listen port. Two nodes often dial
    /// each other at the same instant: both find the other in one mDNS exchange, and nodes
    /// started together redial on the same schedule. Were both dials to come from their
    /// listen ports, the SYNs would cross and TCP would make one connection on which both
    /// ends act as dialer (a TCP simultaneous open): Noise then fails on both, and again at
    /// every redial. Reusing the listen port only matters for hole punching, whose dials
    /// DCUtR makes itself; identify maps the address peers observe for an ephemeral port onto
    /// the listen port. See libp2p/specs#389 ("Consider only reusing TCP port when hole
    /// punching") and go-libp2p#2925.
    fn dial_known(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        let Some(entry) = self.book.get(&peer) else {
            return;
        };
        let addrs = entry.addrs.clone();
        for addr in &addrs {
            swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer, addr.clone());
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .allocate_new_port()
            .build();
        match swarm.dial(opts) {
            Ok(()) => {
                self.join_dials.insert(peer);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "dial not started"),
        }
    }

    /// Periodic check. With no connection at all, redial every way we know to join (bootstrap
    /// peers included); with fewer than the target, dial more known peers.
    pub fn maintain(&mut self, swarm: &mut Swarm<Behaviour>) {
        let connected = swarm.connected_peers().count();
        if connected >= self.config.target_peers {
            return;
        }
        let wanted = self.config.target_peers - connected;
        let candidates: Vec<PeerId> = self
            .book
            .best(self.config.peer_cache_capacity)
            .into_iter()
            .map(|(peer, _)| peer)
            .filter(|peer| !swarm.is_connected(peer))
            .take(wanted)
            .collect();
        if connected > 0 {
            for peer in candidates {
                self.dial_known(swarm, peer);
            }
            return;
        }
        if candidates.is_empty() && self.bootstrap_peers.is_empty() {
            return; // a lone first node: nothing to dial; mDNS and inbound dials will come
        }
        tracing::warn!(
            candidates = candidates.len(),
            "no connected peers; redialling bootstrap and known peers"
        );
        let bootstrap: Vec<PeerId> = self.bootstrap_peers.iter().copied().collect();
        for peer in bootstrap.into_iter().chain(candidates) {
            self.dial_known(swarm, peer);
        }
        kad_bootstrap(swarm);
    }

    /// A connection to `peer` came up; `first` when it is the only one.
    pub fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint, first: bool) {
        if let ConnectedPoint::Dialer { address, .. } = endpoint {
            self.book.learn(peer, [address.clone()], Source::Kademlia);
        }
        self.join_dials.remove(&peer);
        self.join.ever_connected = true;
        if first {
            self.connected += 1;
            self.book.set_connected(peer, true, unix_now());
            tracing::debug!(%peer, addr = %endpoint.get_remote_address(), "connected");
            if self.bootstrap_peers.contains(&peer) {
                tracing::info!(%peer, "connected to bootstrap peer");
            }
        }
        self.publish();
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: PeerId) {
        self.book.set_connected(peer, false, unix_now());
        self.connected = self.connected.saturating_sub(1);
        tracing::debug!(%peer, "disconnected");
        self.publish();
    }

    /// A dial to `peer` failed.
    pub fn on_dial_failed(&mut self, peer: PeerId, error: &DialError) {
        if self.join_dials.remove(&peer) {
            self.join.dials_failed += 1;
        }
        self.join.last_dial_error = Some(format!("{peer}: {}", dial_error(error)));
        if self.bootstrap_peers.contains(&peer) {
            tracing::warn!(
                %peer, error = %one_line(error),
                "bootstrap peer unreachable; retrying later and joining through other known peers"
            );
        } else {
            tracing::debug!(%peer, error = %one_line(error), "dial failed");
        }
        self.publish();
    }

    /// Identify told us `peer`'s listen addresses.
    pub fn on_identify(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        mut info: identify::Info,
    ) {
        // A remote machine's loopback addresses lead back to ourselves: keep them only when
        // the peer reached us over loopback (a local testnet).
        if !is_loopback(&info.observed_addr) {
            info.listen_addrs.retain(|a| !is_loopback(a));
        }
        let kad_protocol = StreamProtocol::new(p2p_protocol::KADEMLIA_PROTOCOL);
        if info.protocols.contains(&kad_protocol) {
            for addr in &info.listen_addrs {
                swarm
                    .behaviour_mut()
                    .kademlia
                    .add_address(&peer, addr.clone());
            }
        }
        self.book.learn(peer, info.listen_addrs, Source::Inbound);
    }

    /// Kademlia put `peer` into (or updated it in) the routing table.
    pub fn on_routing_updated(
        &mut self,
        peer: PeerId,
        addresses: impl IntoIterator<Item = Multiaddr>,
        is_new: bool,
    ) {
        if is_new {
            tracing::debug!(%peer, "added to the routing table");
        }
        self.book.learn(peer, addresses, Source::Kademlia);
    }

    /// mDNS found peers on the local network: remember and dial them.
    pub fn on_mdns(&mut self, swarm: &mut Swarm<Behaviour>, found: Vec<(PeerId, Multiaddr)>) {
        for (peer, addr) in found {
            if self.mdns_found.len() >= MAX_MDNS_FOUND {
                self.mdns_found.clear();
            }
            // Logged the first time mDNS reports the peer, even when it connected to us first
            // (its own mDNS found us sooner).
            let new = self.mdns_found.insert(peer);
            self.book.learn(peer, [addr.clone()], Source::Mdns);
            swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer, addr.clone());
            if new {
                tracing::info!(%peer, %addr, "peer discovered via mDNS");
            }
            self.dial_known(swarm, peer);
        }
        self.publish();
    }

    /// The address book for `GET /peers`, sorted by peer id; `in_table` are the peers in the
    /// routing table.
    pub fn peer_infos(&self, in_table: &HashSet<PeerId>) -> Vec<PeerInfo> {
        let mut infos: Vec<PeerInfo> = self
            .book
            .iter()
            .map(|(peer, entry)| PeerInfo {
                peer_id: peer.to_string(),
                addrs: entry.addrs.iter().map(|a| a.to_string()).collect(),
                connected: entry.connected,
                source: entry.source,
                last_seen_unix: entry.last_seen_unix,
                in_routing_table: in_table.contains(peer),
                penalty: 0,
                banned_until_unix: None,
                path: None,
            })
            .collect();
        infos.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        infos
    }

    /// Saves the peer cache within [`CACHE_SAVE_SOON`] of learning a peer or an address, and
    /// other changes (last seen times) every `peer_cache_save_interval`.
    /// Also refreshes the connectivity `watch` (the mDNS grace period ends by the clock).
    pub fn save_cache_if_due(&mut self) {
        self.publish();
        let learned = self.book.take_learned();
        let due = learned || self.last_cache_save.elapsed() >= self.config.peer_cache_save_interval;
        if due && self.book.take_dirty() {
            self.last_cache_save = Instant::now();
            if let Err(e) = self.save_cache() {
                tracing::warn!(error = %format!("{e:#}"), "cannot save the peer cache");
            }
        }
    }

    /// Writes the peer cache now.
    pub fn save_cache(&mut self) -> Result<()> {
        address_book::save_cache(&self.config.peer_cache_path(), &self.book.to_file())
    }
}

fn kad_bootstrap(swarm: &mut Swarm<Behaviour>) {
    if let Err(kad::NoKnownPeers()) = swarm.behaviour_mut().kademlia.bootstrap() {
        tracing::debug!("kademlia bootstrap skipped: no known peers yet");
    }
}

/// `addr` with `/p2p/<peer>` appended, the form others pass to `--bootstrap`.
pub fn with_peer_id(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

/// Whether `addr` is on the loopback interface (127.0.0.0/8 or ::1).
pub fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// A dial error in short: each address tried with the innermost cause (e.g. `Connection
/// refused`), instead of libp2p's nested wrappers.
fn dial_error(e: &DialError) -> String {
    match e {
        DialError::Transport(errors) => errors
            .iter()
            .map(|(addr, e)| {
                let mut cause: &dyn std::error::Error = e;
                while let Some(inner) = cause.source() {
                    cause = inner;
                }
                format!("{addr}: {cause}")
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => one_line(other),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
