//! The event loop: the one task that owns the libp2p [`Swarm`]. It is glue: commands from
//! [`Client`]s go to the behaviour or component that serves them, and swarm and behaviour
//! events go to the component they concern ([`Discovery`] for joining and the address book,
//! the [`ModelsBehaviour`] for models, the averaging behaviour, [`Reputation`] for
//! misbehaving peers).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::metrics::Recorder;
use libp2p::swarm::{ConnectionId, DialError, ListenError, SwarmEvent};
use libp2p::{autonat, dcutr, gossipsub, identify, kad, mdns, relay, Multiaddr, PeerId, Swarm};
use p2p_protocol::manifest::VersionId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::address_book::AddressBook;
use super::behaviour::{announce_topic, runs_topic, Behaviour, BehaviourEvent};
use super::client::{Client, Command, ConnectionCounts, NetworkStatus};
use super::discovery::{Discovery, CACHE_SAVE_SOON};
use super::reachability::{Reachability, Tracker};
use super::relays::{self, Relays};
use super::reputation::{self, Reputation, Verdict};
use crate::averaging;
use crate::config::{KadMode, NodeConfig};
use crate::history::SharedHistory;
use crate::models::store::Store;
use crate::models::trust::Trust;
use crate::models::{self, Behaviour as ModelsBehaviour};

/// Capacity of the command channel: callers wait when the loop is this far behind.
const COMMAND_QUEUE: usize = 64;

/// Owns the swarm and everything only it may touch.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    maintenance_interval: Duration,
    peer_cache_save_interval: Duration,
    discovery: Discovery,
    pending_listeners: HashSet<ListenerId>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    listen_addrs: Vec<Multiaddr>,
    /// Provider lookups running for the models behaviour, by Kademlia query.
    provider_queries: HashMap<kad::QueryId, VersionId>,
    reputation: Reputation,
    /// Where the bans are saved.
    bans_path: PathBuf,
    /// Connections refused (banned peers, peers not on the allowlist), either way.
    denied_connections: u64,
    /// Live connections.
    connections: HashMap<ConnectionId, Connection>,
    /// Offences counted and bans given since start.
    penalties: u64,
    bans: u64,
    /// libp2p's own metrics (swarm, Kademlia, gossipsub, identify, ping).
    recorder: libp2p::metrics::Metrics,
    /// Training points and notable events, for the dashboard.
    history: SharedHistory,
    /// Whether peers can dial this node: the inputs, and the verdict last applied.
    reachability: Tracker,
    reachability_now: Reachability,
    /// The Kademlia mode asked for (`auto` follows `reachability`).
    kad_mode: KadMode,
    /// Relay reservations, relay server and hole-punch counts.
    relays: Relays,
    /// Listen addresses this node declared external itself (see `redeclare_external`).
    declared: HashSet<Multiaddr>,
    /// Whether the relay server relays now (it exists without `--no-relay-server`).
    relay_serving: bool,
    started: Instant,
}

/// A live connection.
#[derive(Debug, Clone)]
struct Connection {
    peer: PeerId,
    inbound: bool,
    relayed: bool,
    /// The address dialled (outbound) or the remote's (inbound).
    remote: Multiaddr,
    since: Instant,
}

/// A peer reachable only through relays this long (hole punching failed or never started)
/// has its queued requests failed, so that downloads turn to other holders.
const RELAYED_ONLY_GRACE: Duration = Duration::from_secs(30);

/// Relayed listen addresses kept at most (each relay's answer lists its addresses).
const MAX_RELAYED_LISTEN_ADDRS: usize = 16;

impl EventLoop {
    /// Builds the swarm, starts listening and returns the loop with a client for it.
    ///
    /// Fails (with a one-line reason) if an address cannot be listened on.
    pub fn new(key: Keypair, config: NodeConfig, book: AddressBook) -> Result<(Self, Client)> {
        let mut registry = prometheus_client::registry::Registry::default();
        let recorder = libp2p::metrics::Metrics::new(&mut registry);
        let store = Store::open(&config.models_dir())?;
        let trust = Trust::load(&config.trust_path(), config.trust.iter().cloned());
        let mut models = ModelsBehaviour::new(config.models.clone(), store, key.clone(), trust);
        for model in &config.follow {
            models.follow(model.clone());
        }
        let (mut swarm, pending_listeners) =
            super::swarm::build(key.clone(), &config, models, &mut registry)?;
        let bans_path = config.bans_path();
        let saved = reputation::load_bans(&bans_path).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "ignoring the ban list");
            reputation::BansFile::default()
        });
        let reputation = Reputation::restore(saved, SystemTime::now());
        for (peer, _) in reputation.bans(SystemTime::now()) {
            swarm.behaviour_mut().blocked.block_peer(peer);
        }
        let (sender, commands) = mpsc::channel(COMMAND_QUEUE);
        let (maintenance_interval, peer_cache_save_interval) =
            (config.maintenance_interval, config.peer_cache_save_interval);
        let kad_mode = config.kad_mode;
        let discovery = Discovery::new(config, book);
        let history = SharedHistory::default();
        let client = Client::new(sender, discovery.connectivity(), key.clone())
            .with_observers(std::sync::Arc::new(registry), history.clone());
        let event_loop = Self {
            swarm,
            commands,
            maintenance_interval,
            peer_cache_save_interval,
            discovery,
            pending_listeners,
            listen_waiters: Vec::new(),
            listen_addrs: Vec::new(),
            provider_queries: HashMap::new(),
            reputation,
            bans_path,
            denied_connections: 0,
            connections: HashMap::new(),
            penalties: 0,
            bans: 0,
            recorder,
            history,
            reachability: Tracker::default(),
            reachability_now: Reachability::Unknown,
            kad_mode,
            relays: Relays::default(),
            declared: HashSet::new(),
            relay_serving: false,
            started: Instant::now(),
        };
        Ok((event_loop, client))
    }

    /// The local peer id.
    pub fn local_peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Runs until `shutdown` is cancelled, then saves the peer cache.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        self.discovery.join(&mut self.swarm);
        self.models().start();
        let mut maintenance = interval(self.maintenance_interval);
        maintenance.tick().await; // the first tick fires at once; join() just ran
        let mut save = interval(self.peer_cache_save_interval.min(CACHE_SAVE_SOON));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                _ = maintenance.tick() => {
                    self.expire_bans();
                    self.discovery.maintain(&mut self.swarm);
                    self.update_relays();
                    self.give_up_on_relayed_only_peers();
                }
                _ = save.tick() => self.discovery.save_cache_if_due(),
            }
        }
        self.models().shutdown();
        self.discovery
            .save_cache()
            .context("cannot save the peer cache at shutdown")?;
        tracing::info!(
            known_peers = self.discovery.known_peers(),
            "network stopped; peer cache saved"
        );
        Ok(())
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let in_table = self.routing_table().into_iter().collect();
                let mut infos = self.discovery.peer_infos(&in_table);
                let now = SystemTime::now();
                for info in &mut infos {
                    if let Ok(peer) = info.peer_id.parse::<PeerId>() {
                        (info.penalty, info.banned_until_unix) =
                            self.reputation.standing(&peer, now);
                        info.path = self.connection_path(&peer);
                    }
                }
                let _ = reply.send(infos);
            }
            Command::RoutingTable(reply) => {
                let _ = reply.send(self.routing_table());
            }
            Command::Models(command) => self.models().handle(command),
            Command::Averaging(command) => self.averaging().handle(command),
            Command::Penalties(reply) => {
                let _ = reply.send(self.reputation.scores());
            }
            Command::AnnounceRun(announcement) => {
                let bytes = self.averaging().announce_run(*announcement);
                self.publish_gossip(runs_topic(), bytes, "run");
            }
            Command::RefusePeer { peer, why, exclude } => {
                if exclude {
                    self.averaging().refuse(peer);
                }
                self.penalize(peer, &why);
            }
            Command::WaitListening(reply) => {
                if self.pending_listeners.is_empty() {
                    let _ = reply.send(self.listen_addrs.clone());
                } else {
                    self.listen_waiters.push(reply);
                }
            }
        }
    }

    fn status(&mut self) -> NetworkStatus {
        NetworkStatus {
            peer_id: self.local_peer_id().to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: self.swarm.connected_peers().count(),
            routing_table_peers: self.routing_table().len(),
            known_peers: self.discovery.known_peers(),
            join: self.discovery.join_state(),
            denied_connections: self.denied_connections,
            connections: self.connection_counts(),
            penalties: self.penalties,
            bans: self.bans,
            banned_peers: self.reputation.bans(SystemTime::now()).len(),
            transfers: self.swarm.behaviour().models.transfer_totals(),
            reachability: self.reachability_now,
            external_addrs: self
                .swarm
                .external_addresses()
                .map(|a| a.to_string())
                .collect(),
            kademlia_server: self.kademlia_server(),
            autonat_probes_ok: self.reachability.probes_ok,
            autonat_probes_failed: self.reachability.probes_failed,
            relay: self.relays.status(
                self.swarm.behaviour().relay_server.is_enabled(),
                self.relay_serving,
            ),
            training: None, // filled in by the client from the coordinator's watch
            averaging: self.swarm.behaviour().averaging.status(),
        }
    }

    /// Counts an offence of `peer`, and bans it (its connections closed and refused, the
    /// ban saved) when its reputation says so.
    fn penalize(&mut self, peer: PeerId, why: &str) {
        self.penalties += 1;
        let verdict = self.reputation.penalize(peer, why, SystemTime::now());
        let banned = matches!(verdict, Verdict::Ban { .. });
        self.history.event(
            if banned { "ban" } else { "penalty" },
            Some(peer),
            why.to_string(),
        );
        if banned {
            self.bans += 1;
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            self.save_bans();
        }
    }

    /// Whether Kademlia answers queries now.
    fn kademlia_server(&self) -> bool {
        match self.kad_mode {
            KadMode::Server => true,
            KadMode::Client => false,
            KadMode::Auto => self.reachability_now == Reachability::Public,
        }
    }

    /// Applies a reachability input (`change`, after any change of the listen addresses):
    /// logs a change of the verdict, and with `--kad-mode auto` makes Kademlia a server while
    /// the node is public and a client otherwise.
    fn on_reachability(&mut self, change: impl FnOnce(&mut Tracker)) {
        change(&mut self.reachability);
        let now = self.reachability.state(&self.listen_addrs);
        let before = std::mem::replace(&mut self.reachability_now, now);
        if now == before {
            return;
        }
        self.update_relays();
        let external: Vec<String> = self
            .reachability
            .confirmed()
            .map(|a| a.to_string())
            .collect();
        let kademlia_server = self.kademlia_server();
        tracing::info!(
            reachability = now.as_str(),
            kademlia_server,
            ?external,
            "reachability changed"
        );
        self.history.event(
            "reachability",
            None,
            format!("{} -> {}", before.as_str(), now.as_str()),
        );
        if self.kad_mode == KadMode::Auto {
            let kademlia = &mut self.swarm.behaviour_mut().kademlia;
            if kademlia_server {
                kademlia.set_mode(Some(kad::Mode::Server));
                // Peers met while this node was a client did not add it to their routing
                // tables: a bootstrap query now makes them (and it learns theirs) at once,
                // not at the next periodic bootstrap.
                if let Err(e) = kademlia.bootstrap() {
                    tracing::debug!(error = %e, "no Kademlia bootstrap: no known peer");
                }
            } else {
                kademlia.set_mode(Some(kad::Mode::Client));
            }
        }
    }

    /// Live connections by direction and path.
    fn connection_counts(&self) -> ConnectionCounts {
        let mut counts = ConnectionCounts::default();
        for c in self.connections.values() {
            counts.count(c.inbound, c.relayed);
        }
        counts
    }

    /// How this node reaches `peer` now: `direct` if any connection is, `relayed` if all go
    /// through a relay, `None` if not connected.
    fn connection_path(&self, peer: &PeerId) -> Option<&'static str> {
        let mut relayed = self
            .connections
            .values()
            .filter(|c| c.peer == *peer)
            .map(|c| c.relayed)
            .peekable();
        relayed.peek()?;
        Some(if relayed.all(|r| r) {
            "relayed"
        } else {
            "direct"
        })
    }

    /// Applies what reachability means for relays: a private node reserves slots on relays
    /// (and gives them up once public), and a public one relays for others unless
    /// `--no-relay-server`.
    fn update_relays(&mut self) {
        let serving = self.swarm.behaviour().relay_server.is_enabled()
            && self.reachability_now == Reachability::Public;
        if serving != self.relay_serving {
            self.relay_serving = serving;
            if let Some(server) = self.swarm.behaviour_mut().relay_server.as_mut() {
                server.set_status(Some(if serving {
                    relay::Status::Enable
                } else {
                    relay::Status::Disable
                }));
            }
            tracing::info!(serving, "relay server");
        }
        let wanted = Relays::wants_reservations(self.reachability_now, self.started.elapsed());
        for relay_peer in self.relays.release(wanted) {
            // Disconnecting drops the reservation with its connection (see Relays::release).
            tracing::info!(relay = %relay_peer, "public now: giving up the relay reservation");
            let _ = self.swarm.disconnect_peer_id(relay_peer);
        }
        let reserve = self
            .relays
            .to_reserve(wanted, Instant::now(), &mut rand::thread_rng());
        for (relay_peer, addr) in reserve {
            match self.swarm.listen_on(addr.clone()) {
                Ok(listener) => {
                    tracing::info!(relay = %relay_peer, %addr, "asking a relay for a reservation");
                    self.relays.reserving(listener, relay_peer);
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot listen through a relay"),
            }
        }
    }

    /// After a change of the listen addresses: the addresses this node declares external
    /// itself (identify advertises external addresses only) are its loopback ones while it
    /// listens on loopback only (a local testnet: they reach this machine only, where they
    /// are right), else every direct non-loopback one with `--kad-mode server` (the operator
    /// says the node is reachable: it counts as public, and AutoNAT does not test declared
    /// addresses), else none (AutoNAT confirms them; relays confirm relayed ones). Then the
    /// reachability verdict is updated.
    fn redeclare_external(&mut self) {
        use super::discovery::is_loopback;
        use crate::network::direct_only::is_relayed;
        use libp2p::swarm::{behaviour::NewExternalAddrCandidate, FromSwarm, NetworkBehaviour};
        let direct = self.listen_addrs.iter().filter(|a| !is_relayed(a));
        let all_loopback =
            self.listen_addrs.iter().any(|a| !is_relayed(a)) && direct.clone().all(is_loopback);
        let wanted: HashSet<Multiaddr> = direct
            .filter(|a| all_loopback || (self.kad_mode == KadMode::Server && !is_loopback(a)))
            .cloned()
            .collect();
        let gone: Vec<Multiaddr> = self.declared.difference(&wanted).cloned().collect();
        let new: Vec<Multiaddr> = wanted.difference(&self.declared).cloned().collect();
        for address in &gone {
            self.swarm.remove_external_address(address);
        }
        for address in &new {
            self.swarm.add_external_address(address.clone());
            // DCUtR offers its peers the address candidates identify reports, and identify
            // does not report addresses already external: tell DCUtR of a declared one, or a
            // private peer that this node reaches through a relay gets no address to dial.
            self.swarm
                .behaviour_mut()
                .dcutr
                .on_swarm_event(FromSwarm::NewExternalAddrCandidate(
                    NewExternalAddrCandidate { addr: address },
                ));
        }
        self.declared = wanted;
        self.on_reachability(|r| {
            for address in gone {
                r.external(address, false);
            }
            for address in new {
                r.external(address, true);
            }
        });
    }

    /// Whether any connection to `peer` is direct.
    fn has_direct_connection(&self, peer: &PeerId) -> bool {
        self.connections
            .values()
            .any(|c| c.peer == *peer && !c.relayed)
    }

    /// Peers reachable through relays only for [`RELAYED_ONLY_GRACE`]: their queued requests
    /// fail, so downloads turn to other holders.
    fn give_up_on_relayed_only_peers(&mut self) {
        let mut relayed_since: HashMap<PeerId, Instant> = HashMap::new();
        for c in self.connections.values().filter(|c| c.relayed) {
            let at = relayed_since.entry(c.peer).or_insert(c.since);
            *at = (*at).min(c.since);
        }
        for (peer, since) in relayed_since {
            if since.elapsed() >= RELAYED_ONLY_GRACE && !self.has_direct_connection(&peer) {
                self.fail_requests_awaiting(peer);
            }
        }
    }

    /// Fails the requests to `peer` queued until a direct connection comes.
    fn fail_requests_awaiting(&mut self, peer: PeerId) {
        let behaviour = self.swarm.behaviour_mut();
        behaviour.models.fail_requests_awaiting_connection(peer);
        behaviour.averaging.fail_requests_awaiting_connection(peer);
    }

    /// Lifts the bans that are over.
    fn expire_bans(&mut self) {
        let over = self.reputation.expire(SystemTime::now());
        for peer in &over {
            tracing::info!(%peer, "ban over");
            self.swarm.behaviour_mut().blocked.unblock_peer(*peer);
        }
        if !over.is_empty() {
            self.save_bans();
        }
    }

    fn save_bans(&self) {
        let file = self.reputation.to_file(SystemTime::now());
        if let Err(e) = reputation::save_bans(&self.bans_path, &file) {
            tracing::warn!(error = %format!("{e:#}"), "cannot save the ban list");
        }
    }

    /// The models behaviour.
    fn models(&mut self) -> &mut ModelsBehaviour {
        &mut self.swarm.behaviour_mut().models
    }

    /// What the models behaviour asks of the DHT and gossip, or reports.
    fn on_models_event(&mut self, event: models::Event) {
        let kademlia = &mut self.swarm.behaviour_mut().kademlia;
        match event {
            models::Event::FindProviders(id) => {
                let query = kademlia.get_providers(kad::RecordKey::new(&id.0));
                self.provider_queries.insert(query, id);
            }
            models::Event::Provide(id) => {
                if let Err(e) = kademlia.start_providing(kad::RecordKey::new(&id.0)) {
                    tracing::warn!(error = %e, "cannot store the provider record");
                }
            }
            models::Event::StopProviding(id) => {
                kademlia.stop_providing(&kad::RecordKey::new(&id.0))
            }
            models::Event::Announce(bytes) => {
                if let Ok(a) = p2p_protocol::messages::Announcement::decode(&bytes) {
                    let text = format!("published {} version {}", a.model, a.version);
                    self.history.event("version", Some(a.publisher), text);
                }
                self.publish_gossip(announce_topic(), bytes, "version")
            }
            models::Event::Misbehaved { peer, why } => self.penalize(peer, &why),
            models::Event::PeerAddresses { peer, addrs } => {
                if self
                    .reputation
                    .standing(&peer, SystemTime::now())
                    .1
                    .is_none()
                {
                    for addr in addrs {
                        self.swarm.add_peer_address(peer, addr);
                    }
                }
            }
        }
    }

    /// The averaging behaviour.
    fn averaging(&mut self) -> &mut averaging::Behaviour {
        &mut self.swarm.behaviour_mut().averaging
    }

    /// Publishes `bytes` on gossipsub `topic` (best effort: peers that miss it ask later).
    fn publish_gossip(&mut self, topic: gossipsub::IdentTopic, bytes: Vec<u8>, what: &str) {
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => tracing::info!(
                "no peers to announce the {what} to yet; they will find it when they ask"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot announce the {what}"),
        }
    }

    fn routing_table(&mut self) -> Vec<PeerId> {
        let mut peers = Vec::new();
        for bucket in self.swarm.behaviour_mut().kademlia.kbuckets() {
            peers.extend(bucket.iter().map(|e| *e.node.key.preimage()));
        }
        peers
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.recorder.record(&event);
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                // A relay's reservation answer lists its addresses, and every renewal reports
                // them again: keep each once, and a bounded number through relays.
                let relayed = crate::network::direct_only::is_relayed(&address);
                let relayed_held = self
                    .listen_addrs
                    .iter()
                    .filter(|a| crate::network::direct_only::is_relayed(a))
                    .count();
                if !self.listen_addrs.contains(&address)
                    && (!relayed || relayed_held < MAX_RELAYED_LISTEN_ADDRS)
                {
                    tracing::info!(%address, "listening");
                    self.listen_addrs.push(address);
                    self.redeclare_external();
                }
                self.listener_reported(listener_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.redeclare_external();
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.on_reachability(|r| r.external(address, true));
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.on_reachability(|r| r.external(address, false));
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if let Some(relay_peer) = self.relays.closed(listener_id, Instant::now()) {
                    match &reason {
                        Ok(()) => tracing::info!(relay = %relay_peer, "relay reservation ended"),
                        Err(error) => {
                            tracing::warn!(relay = %relay_peer, %error, "relay reservation failed or ended; another relay will be asked")
                        }
                    }
                } else if let Err(error) = reason {
                    tracing::warn!(?addresses, %error, "listener closed");
                }
                self.listen_addrs.retain(|a| !addresses.contains(a));
                self.redeclare_external();
                self.listener_reported(listener_id);
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!(%error, "listener error");
                self.listener_reported(listener_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.connections.insert(
                    connection_id,
                    Connection {
                        peer: peer_id,
                        inbound: endpoint.is_listener(),
                        relayed: endpoint.is_relayed(),
                        remote: endpoint.get_remote_address().clone(),
                        since: Instant::now(),
                    },
                );
                if endpoint.is_relayed() {
                    tracing::info!(peer = %peer_id, inbound = endpoint.is_listener(), "relayed connection: control messages only until hole punching gives a direct one");
                }
                let first = num_established.get() == 1;
                self.discovery.on_connected(peer_id, &endpoint, first);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                let closed = self.connections.remove(&connection_id);
                if num_established == 0 {
                    self.discovery.on_disconnected(peer_id);
                    self.relays.forget(&peer_id);
                }
                if closed.is_some_and(|c| c.relayed) && !self.has_direct_connection(&peer_id) {
                    self.fail_requests_awaiting(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                error: DialError::Denied { .. },
                ..
            }
            | SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { .. },
                ..
            } => {
                self.denied_connections += 1;
                tracing::debug!("connection refused: a banned peer, or one not on the allowlist");
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if self.swarm.is_connected(&peer) {
                    // An extra connection failed (a hole punch's dial, one of simultaneous
                    // dials): the peer is still reachable.
                    tracing::debug!(%peer, error = %super::swarm::one_line(&error), "a dial to a connected peer failed");
                } else {
                    self.discovery.on_dial_failed(peer, &error)
                }
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match &event {
            BehaviourEvent::Identify(e) => self.recorder.record(e),
            BehaviourEvent::Kademlia(e) => self.recorder.record(e),
            BehaviourEvent::Gossipsub(e) => self.recorder.record(e),
            BehaviourEvent::Ping(e) => self.recorder.record(e),
            _ => {}
        }
        let swarm = &mut self.swarm;
        match event {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
            }) => {
                // A relay is reached at the address this node dialled it on (a direct one).
                let dialled = self
                    .connections
                    .get(&connection_id)
                    .filter(|c| !c.inbound && !c.relayed)
                    .map(|c| c.remote.clone());
                let speaks_hop = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                self.relays.candidate(peer_id, dialled, speaks_hop);
                swarm
                    .behaviour_mut()
                    .models
                    .note_peer_addresses(peer_id, info.listen_addrs.clone());
                self.discovery.on_identify(swarm, peer_id, info)
            }
            BehaviourEvent::Kademlia(kad::Event::RoutingUpdated {
                peer,
                addresses,
                is_new_peer,
                ..
            }) => self
                .discovery
                .on_routing_updated(peer, addresses.iter().cloned(), is_new_peer),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                self.discovery.on_mdns(swarm, found)
            }
            BehaviourEvent::Kademlia(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                let providers = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    _ => Default::default(),
                };
                let version = if step.last {
                    self.provider_queries.remove(&id)
                } else {
                    self.provider_queries.get(&id).copied()
                };
                if let Some(version) = version {
                    self.models().on_providers(version, providers);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if topic == announce_topic().hash() =>
            {
                self.models().on_topic_joined()
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                if message.topic == runs_topic().hash() {
                    self.averaging().on_gossip(message.source, &message.data);
                } else if let Some(a) = self.models().on_gossip(message.source, &message.data) {
                    self.history.announced(&a);
                    // A checkpoint's publisher trains its run.
                    if let Some(t) = &a.training {
                        self.averaging().note_member(&t.run, a.publisher);
                    }
                }
            }
            BehaviourEvent::AutonatClient(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => {
                match &result {
                    Ok(()) => tracing::debug!(%tested_addr, %server, "AutoNAT: reachable"),
                    Err(e) => {
                        tracing::debug!(%tested_addr, %server, error = %e, "AutoNAT: not reachable")
                    }
                }
                // A relayed address answers through its relay: it says nothing of whether
                // this node can be dialled directly.
                if !crate::network::direct_only::is_relayed(&tested_addr) {
                    self.on_reachability(|r| r.probe(result.is_ok()));
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                limit,
            }) => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, limit_seconds = ?limit.as_ref().and_then(|l| l.duration()).map(|d| d.as_secs()), limit_bytes = ?limit.as_ref().and_then(|l| l.data_in_bytes()), "relay reservation accepted: reachable through the relay");
                    self.history.event(
                        "relay",
                        Some(relay_peer_id),
                        "reservation accepted".to_string(),
                    );
                }
                self.relays.accepted(relay_peer_id);
            }
            BehaviourEvent::RelayServer(event) => {
                tracing::debug!(?event, "relay server");
                self.relays.on_server_event(&event);
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(connection) => {
                    let transport = self
                        .connections
                        .get(&connection)
                        .map_or("other", |c| relays::transport_of(&c.remote));
                    tracing::info!(peer = %remote_peer_id, transport, "hole punched: direct connection");
                    self.relays.hole_punched(Ok(transport));
                    self.history.event(
                        "hole-punch",
                        Some(remote_peer_id),
                        format!("direct over {transport}"),
                    );
                }
                Err(e) => {
                    let reason = relays::hole_punch_failure_reason(&e.to_string());
                    self.relays.hole_punched(Err(reason));
                    tracing::warn!(peer = %remote_peer_id, error = %e, "hole punching failed: this peer stays reachable through a relay only, which carries no chunks or averaging; they come from other holders");
                    self.history.event(
                        "hole-punch",
                        Some(remote_peer_id),
                        format!("failed: {reason}"),
                    );
                    if !self.has_direct_connection(&remote_peer_id) {
                        self.fail_requests_awaiting(remote_peer_id);
                    }
                }
            },
            BehaviourEvent::Models(event) => self.on_models_event(event),
            BehaviourEvent::Averaging(averaging::Event::Misbehaved { peer, why }) => {
                self.penalize(peer, &why)
            }
            _ => {}
        }
    }

    fn listener_reported(&mut self, listener: ListenerId) {
        self.pending_listeners.remove(&listener);
        if self.pending_listeners.is_empty() {
            for waiter in self.listen_waiters.drain(..) {
                let _ = waiter.send(self.listen_addrs.clone());
            }
        }
    }
}

/// A timer whose missed ticks are delayed, not bunched.
fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}
