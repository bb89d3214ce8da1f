//! The event loop: the one task that owns the libp2p [`Swarm`]. It reacts to swarm events,
//! answers [`Command`]s from [`Client`]s, keeps the address book, and keeps the node joined.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use libp2p::core::transport::{ListenerId, TransportError};
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{
    gossipsub, identify, kad, mdns, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::behaviour::{runs_topic, Behaviour, BehaviourEvent};
use super::client::{Client, Command, JoinState, NetworkStatus, PeerInfo};
use super::reputation::{Reputation, Verdict};
use crate::averaging;
use crate::config::NodeConfig;
use crate::distribution::engine::{self, DiskEvent, Engine};
use crate::distribution::store::Store;
use crate::peers::{self, AddressBook, Source};
use crate::training::TrainingStatus;

/// How often the distribution engine schedules requests and refreshes availability.
const ENGINE_TICK: Duration = Duration::from_millis(200);

/// A peer or address learned is written to the peer cache within this long.
const CACHE_SAVE_SOON: Duration = Duration::from_secs(1);

/// How long mDNS may take to find a LAN peer before joining counts as failed.
const MDNS_GRACE: Duration = Duration::from_secs(5);

/// Capacity of the command channel: callers wait when the loop is this far behind.
const COMMAND_QUEUE: usize = 64;

/// Owns the swarm and everything only it may touch.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    config: NodeConfig,
    book: AddressBook,
    bootstrap_peers: HashSet<PeerId>,
    pending_listeners: HashSet<ListenerId>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    listen_addrs: Vec<Multiaddr>,
    engine: Engine,
    disk_events: mpsc::UnboundedReceiver<DiskEvent>,
    training_status: Option<TrainingStatus>,
    reputation: Reputation,
    /// Peers dialled to join (bootstrap, cached, mDNS) whose dial has not ended yet.
    join_dials: HashSet<PeerId>,
    join: JoinState,
    started: std::time::Instant,
    last_cache_save: std::time::Instant,
}

impl EventLoop {
    /// Builds the swarm, starts listening and returns the loop with a client for it.
    ///
    /// Fails (with a one-line reason) if an address cannot be listened on.
    pub fn new(key: Keypair, config: NodeConfig, book: AddressBook) -> Result<(Self, Client)> {
        let behaviour = Behaviour::new(&key, &config)?;
        let store = Store::open(&config.models_dir())?;
        let (write_done, disk_events) = mpsc::unbounded_channel();
        let local_peer = key.public().to_peer_id();
        let mut engine = Engine::new(config.distribution.clone(), store, local_peer, write_done);
        for model in &config.follow {
            engine.follow(model.clone());
        }
        let idle_timeout = config.idle_connection_timeout;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .context("cannot set up the TCP transport")?
            .with_quic()
            .with_dns()
            .context("cannot set up DNS resolution")?
            .with_behaviour(|_| behaviour)
            .map_err(|e| anyhow!("cannot set up the network behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
            .build();

        let mut pending_listeners = HashSet::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| anyhow!("cannot listen on {addr}: {}", transport_error(&e)))?;
            pending_listeners.insert(id);
        }

        let (sender, commands) = mpsc::channel(COMMAND_QUEUE);
        let bootstrap_peers = config.bootstrap.iter().map(|b| b.peer_id).collect();
        let client = Client::new(sender, config.models_dir(), config.distribution.chunk_size);
        let event_loop = Self {
            swarm,
            commands,
            config,
            book,
            bootstrap_peers,
            pending_listeners,
            listen_waiters: Vec::new(),
            listen_addrs: Vec::new(),
            engine,
            disk_events,
            training_status: None,
            reputation: Reputation::default(),
            join_dials: HashSet::new(),
            join: JoinState::default(),
            started: std::time::Instant::now(),
            last_cache_save: std::time::Instant::now(),
        };
        Ok((event_loop, client))
    }

    /// The local peer id.
    pub fn local_peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Runs until `shutdown` is cancelled, then saves the peer cache.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        self.join();
        self.engine.start(&mut self.swarm);
        let mut engine_tick = tokio::time::interval(ENGINE_TICK);
        engine_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut maintenance = tokio::time::interval(self.config.maintenance_interval);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        maintenance.tick().await; // the first tick fires at once; join() just ran
        let mut save =
            tokio::time::interval(self.config.peer_cache_save_interval.min(CACHE_SAVE_SOON));
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                _ = maintenance.tick() => self.maintain(),
                _ = save.tick() => self.save_cache_if_due(),
                _ = engine_tick.tick() => {
                    self.engine.tick(&mut self.swarm);
                }
                Some(done) = self.disk_events.recv() => {
                    self.engine.on_disk_event(&mut self.swarm, done)
                }
            }
            self.apply_misbehaviour();
        }
        self.engine.shutdown();
        self.save_cache()
            .context("cannot save the peer cache at shutdown")?;
        tracing::info!(
            known_peers = self.book.len(),
            "network stopped; peer cache saved"
        );
        Ok(())
    }

    /// Dials the bootstrap peers and the best cached peers, and starts a Kademlia bootstrap.
    fn join(&mut self) {
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
            self.dial_known(peer);
        }
        let cached = self.book.best(self.config.peer_cache_dial);
        let cached_count = cached
            .iter()
            .filter(|(p, _)| !self.bootstrap_peers.contains(p))
            .count();
        for (peer, _) in cached {
            self.dial_known(peer);
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
        self.kad_bootstrap();
    }

    /// Adds the book's addresses for `peer` to Kademlia and dials it unless connected.
    fn dial_known(&mut self, peer: PeerId) {
        let Some(entry) = self.book.get(&peer) else {
            return;
        };
        let addrs = entry.addrs.clone();
        for addr in &addrs {
            self.swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer, addr.clone());
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.join_dials.insert(peer);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "dial not started"),
        }
    }

    fn kad_bootstrap(&mut self) {
        if let Err(kad::NoKnownPeers()) = self.swarm.behaviour_mut().kademlia.bootstrap() {
            tracing::debug!("kademlia bootstrap skipped: no known peers yet");
        }
    }

    /// Periodic check. With no connection at all, redial every way we know to join (bootstrap
    /// peers included); with fewer than the target, dial more known peers.
    fn maintain(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected >= self.config.target_peers {
            return;
        }
        let wanted = self.config.target_peers - connected;
        let candidates: Vec<PeerId> = self
            .book
            .best(self.config.peer_cache_capacity)
            .into_iter()
            .map(|(peer, _)| peer)
            .filter(|peer| !self.swarm.is_connected(peer))
            .take(wanted)
            .collect();
        if connected > 0 {
            for peer in candidates {
                self.dial_known(peer);
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
            self.dial_known(peer);
        }
        self.kad_bootstrap();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peer_infos());
            }
            Command::RoutingTable(reply) => {
                let _ = reply.send(self.routing_table());
            }
            Command::Publish {
                imported,
                model,
                training,
                reply,
            } => {
                let result = self
                    .engine
                    .publish(&mut self.swarm, imported, &model, training)
                    .map_err(|e| format!("{e:#}"));
                let _ = reply.send(result);
            }
            Command::Fetch { id, reply } => self.engine.fetch(&mut self.swarm, id, reply),
            Command::QueryVersions { model, reply } => {
                self.engine.query_versions(&mut self.swarm, model, reply)
            }
            Command::Models(reply) => {
                let _ = reply.send(self.engine.models());
            }
            Command::CompleteVersion { id, reply } => {
                let _ = reply.send(self.engine.complete_version(&id));
            }
            Command::Penalties(reply) => {
                let _ = reply.send(self.reputation.scores());
            }
            Command::DownloadState { id, reply } => {
                let _ = reply.send(self.engine.download_state(&id));
            }
            Command::PruneVersions { model, keep, reply } => {
                let _ = reply.send(self.engine.prune(&mut self.swarm, &model, keep));
            }
            Command::AnnounceRun(announcement) => {
                let bytes = self.averaging().announce_run(announcement);
                self.publish_gossip(runs_topic(), bytes, "run");
            }
            Command::QueryRuns(reply) => self.averaging().query_runs(reply),
            Command::JoinRun {
                membership,
                subscriber,
            } => self.averaging().join(membership, subscriber),
            Command::SetSnapshot(snapshot) => self.averaging().set_snapshot(snapshot),
            Command::Average(reply) => self.averaging().average(reply),
            Command::RefusePeer { peer, why, exclude } => {
                if exclude {
                    self.averaging().refuse(peer);
                }
                self.penalize(peer, &why);
            }
            Command::SetTrainingStatus(status) => self.training_status = Some(*status),
            Command::RunPeers(reply) => {
                let _ = reply.send(self.averaging().status().run_peers);
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
            known_peers: self.book.len(),
            join: JoinState {
                dials_pending: self.join_dials.len(),
                mdns_searching: self.config.mdns && self.started.elapsed() < MDNS_GRACE,
                ..self.join.clone()
            },
            training: self.training_status.clone().map(|mut t| {
                let a = self.swarm.behaviour().averaging.status();
                t.run_peers = a.run_peers;
                t.refused_peers = a.refused_peers;
                t
            }),
        }
    }

    /// Counts an offence of `peer` and disconnects it when its reputation says so.
    fn penalize(&mut self, peer: PeerId, why: &str) {
        if self.reputation.penalize(peer, why) == Verdict::Disconnect {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Feeds the distribution engine's reports of bad data to the reputation.
    fn apply_misbehaviour(&mut self) {
        for (peer, why) in self.engine.take_misbehaved() {
            self.penalize(peer, &why);
        }
    }

    /// The averaging behaviour.
    fn averaging(&mut self) -> &mut averaging::Behaviour {
        &mut self.swarm.behaviour_mut().averaging
    }

    /// Publishes `bytes` on gossipsub `topic` (best effort: peers that miss it ask later).
    fn publish_gossip(&mut self, topic: libp2p::gossipsub::IdentTopic, bytes: Vec<u8>, what: &str) {
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                tracing::info!(
                    "no peers to announce the {what} to yet; they will find it when they ask"
                )
            }
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

    fn peer_infos(&mut self) -> Vec<PeerInfo> {
        let in_table: HashSet<PeerId> = self.routing_table().into_iter().collect();
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
            })
            .collect();
        infos.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        infos
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                self.listener_reported(listener_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if let Err(error) = reason {
                    tracing::warn!(?addresses, %error, "listener closed");
                }
                self.listen_addrs.retain(|a| !addresses.contains(a));
                self.listener_reported(listener_id);
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!(%error, "listener error");
                self.listener_reported(listener_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.book
                        .learn(peer_id, [address.clone()], Source::Kademlia);
                }
                self.join_dials.remove(&peer_id);
                self.join.ever_connected = true;
                if num_established.get() == 1 {
                    self.book.set_connected(peer_id, true, unix_now());
                    self.engine.on_peer_connected(&mut self.swarm, peer_id);
                    tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                    if self.bootstrap_peers.contains(&peer_id) {
                        tracing::info!(peer = %peer_id, "connected to bootstrap peer");
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.book.set_connected(peer_id, false, unix_now());
                self.engine.on_peer_disconnected(peer_id);
                tracing::debug!(peer = %peer_id, "disconnected");
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if self.join_dials.remove(&peer) {
                    self.join.dials_failed += 1;
                }
                self.join.last_dial_error = Some(format!("{peer}: {}", dial_error(&error)));
                if self.bootstrap_peers.contains(&peer) {
                    tracing::warn!(
                        %peer, error = %one_line(&error),
                        "bootstrap peer unreachable; retrying later and joining through other known peers"
                    );
                } else {
                    tracing::debug!(%peer, error = %one_line(&error), "dial failed");
                }
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id, mut info, ..
            }) => {
                // A remote machine's loopback addresses lead back to ourselves: keep them
                // only when the peer reached us over loopback (a local testnet).
                if !is_loopback(&info.observed_addr) {
                    info.listen_addrs.retain(|a| !is_loopback(a));
                }
                let kad_protocol = StreamProtocol::new(p2p_protocol::KADEMLIA_PROTOCOL);
                if info.protocols.contains(&kad_protocol) {
                    for addr in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kademlia
                            .add_address(&peer_id, addr.clone());
                    }
                }
                self.book.learn(peer_id, info.listen_addrs, Source::Inbound);
            }
            BehaviourEvent::Kademlia(kad::Event::RoutingUpdated {
                peer,
                addresses,
                is_new_peer,
                ..
            }) => {
                if is_new_peer {
                    tracing::debug!(%peer, "added to the routing table");
                }
                self.book
                    .learn(peer, addresses.iter().cloned(), Source::Kademlia);
            }
            BehaviourEvent::Kademlia(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::Bootstrap(result),
                step,
                ..
            }) if step.last => match result {
                Ok(_) => tracing::debug!(
                    routing_table_peers = self.routing_table().len(),
                    "kademlia bootstrap done"
                ),
                Err(e) => tracing::debug!(error = %e, "kademlia bootstrap timed out"),
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    let new = self.book.get(&peer).is_none();
                    self.book.learn(peer, [addr.clone()], Source::Mdns);
                    self.swarm
                        .behaviour_mut()
                        .kademlia
                        .add_address(&peer, addr.clone());
                    if new {
                        tracing::info!(%peer, %addr, "peer discovered via mDNS");
                    }
                    self.dial_known(peer);
                }
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
                self.engine
                    .on_providers(&mut self.swarm, id, providers, step.last);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            }) => {
                tracing::debug!(from = %propagation_source, topic = %message.topic, bytes = message.data.len(), "gossip message");
                if message.topic == runs_topic().hash() {
                    self.averaging().on_gossip(message.source, &message.data);
                } else if let Some(a) =
                    self.engine
                        .on_gossip(&mut self.swarm, message.source, &message.data)
                {
                    if let (Some(t), Ok(publisher)) = (&a.training, a.publisher.parse::<PeerId>()) {
                        self.averaging().note_member(&t.run, publisher);
                    }
                }
            }
            BehaviourEvent::Models(event) => {
                engine::on_models_event(&mut self.engine, &mut self.swarm, event);
            }
            BehaviourEvent::Averaging(averaging::Event::Misbehaved { peer, why }) => {
                self.penalize(peer, &why);
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

    /// Saves the peer cache within [`CACHE_SAVE_SOON`] of learning a peer or an address, and
    /// other changes (last seen times) every `peer_cache_save_interval`.
    fn save_cache_if_due(&mut self) {
        let learned = self.book.take_learned();
        let due = learned || self.last_cache_save.elapsed() >= self.config.peer_cache_save_interval;
        if due && self.book.take_dirty() {
            self.last_cache_save = std::time::Instant::now();
            if let Err(e) = self.save_cache() {
                tracing::warn!(error = %format!("{e:#}"), "cannot save the peer cache");
            }
        }
    }

    fn save_cache(&mut self) -> Result<()> {
        peers::save_cache(&self.config.peer_cache_path(), &self.book.to_file())
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

fn transport_error(e: &TransportError<std::io::Error>) -> String {
    match e {
        TransportError::MultiaddrNotSupported(addr) => format!("unsupported address {addr}"),
        TransportError::Other(io) => one_line(io),
    }
}

/// A dial error in short: each address tried with the innermost cause (e.g. `Connection
/// refused`), instead of libp2p's nested wrappers.
fn dial_error(e: &libp2p::swarm::DialError) -> String {
    match e {
        libp2p::swarm::DialError::Transport(errors) => errors
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

/// An error and its sources on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
