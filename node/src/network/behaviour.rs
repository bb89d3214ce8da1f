//! The libp2p behaviours a node runs, combined into one [`Behaviour`].

use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::{anyhow, Result};
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, ping,
    relay, StreamProtocol,
};
use p2p_protocol as proto;
use p2p_protocol::training;

use super::direct_only::DirectOnly;
use crate::averaging;
use crate::config::{KadMode, NodeConfig};
use crate::models::Behaviour as ModelsBehaviour;

/// Every protocol a node speaks. Field order is the order in which behaviours are polled and
/// asked about new connections, so the connection limits come first.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Peers banned for misbehaving: their connections are refused and closed.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// In a closed network (`--allow-peer`): only these peers may connect.
    pub allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    /// Caps on pending and established connections, in total and per peer.
    pub limits: connection_limits::Behaviour,
    /// Peer routing over the private Kademlia DHT.
    pub kademlia: kad::Behaviour<kad::store::MemoryStore>,
    /// Exchanges listen addresses and supported protocols; feeds Kademlia.
    pub identify: identify::Behaviour,
    /// Liveness and round-trip time of each connection.
    pub ping: ping::Behaviour,
    /// AutoNAT v2, asking side: has peers dial this node's candidate addresses back, and
    /// confirms those that work as external addresses.
    pub autonat_client: DirectOnly<autonat::v2::client::Behaviour>,
    /// AutoNAT v2, answering side: dials back the addresses peers ask about.
    pub autonat_server: DirectOnly<autonat::v2::server::Behaviour>,
    /// Circuit relay v2, client side: reservations on relays while this node is private,
    /// and relayed connections both ways.
    pub relay_client: relay::client::Behaviour,
    /// Circuit relay v2, server side (off with `--no-relay-server`): relays for private
    /// peers while this node is public (limits: [`super::relays`]).
    pub relay_server: Toggle<DirectOnly<relay::Behaviour>>,
    /// Direct Connection Upgrade through Relay: hole punching over relayed connections.
    pub dcutr: dcutr::Behaviour,
    /// Signed announcements on [`proto::ANNOUNCE_TOPIC`].
    pub gossipsub: gossipsub::Behaviour,
    /// Local-network discovery; off with `--no-mdns`.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// The models protocol: manifests, bitfields and chunks, served and downloaded (direct
    /// connections only: no bulk over relays).
    pub models: DirectOnly<ModelsBehaviour>,
    /// Training: gossip averaging sessions and run discovery (direct connections only).
    pub averaging: DirectOnly<averaging::Behaviour>,
}

impl Behaviour {
    /// Builds the behaviours for `key` as configured, around the models behaviour `models`
    /// and the relay client the swarm builder made with its transport.
    pub fn new(
        key: &Keypair,
        config: &NodeConfig,
        models: ModelsBehaviour,
        relay_client: relay::client::Behaviour,
    ) -> Result<Self> {
        let peer_id = key.public().to_peer_id();

        let allowed = (!config.allow_peers.is_empty()).then(|| {
            let mut allowed =
                allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
            for peer in &config.allow_peers {
                allowed.allow_peer(*peer);
            }
            allowed
        });
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(64))
                .with_max_pending_outgoing(Some(64))
                .with_max_established(Some(config.max_connections))
                .with_max_established_incoming(Some(config.max_connections * 3 / 4))
                // Four, not one: simultaneous dials (and TCP plus QUIC) are normal, and an
                // AutoNAT dial-back opens one more to a peer already connected.
                .with_max_established_per_peer(Some(4)),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new(proto::KADEMLIA_PROTOCOL));
        kad_config
            .set_max_packet_size(proto::MAX_KADEMLIA_PACKET_BYTES)
            .set_query_timeout(Duration::from_secs(30))
            .set_periodic_bootstrap_interval(Some(config.kad_bootstrap_interval))
            .set_replication_factor(NonZeroUsize::new(20).expect("non-zero"));
        let mut kademlia =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // `auto` starts as a client: the event loop makes it a server once reachable.
        kademlia.set_mode(Some(match config.kad_mode {
            KadMode::Server => kad::Mode::Server,
            KadMode::Client | KadMode::Auto => kad::Mode::Client,
        }));

        let identify = identify::Behaviour::new(
            identify::Config::new(proto::IDENTIFY_PROTOCOL_VERSION.to_string(), key.public())
                .with_agent_version(format!("p2p-node/{}", env!("CARGO_PKG_VERSION")))
                .with_push_listen_addr_updates(true)
                // Only external addresses are advertised: those AutoNAT or a relay confirmed,
                // and those the event loop declares (loopback ones, and every listen address
                // with `--kad-mode server`). A listen address behind NAT would only send peers
                // to dial what they cannot reach.
                .with_hide_listen_addrs(true),
        );

        let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15)));

        let gossip_config = gossipsub::ConfigBuilder::default()
            .protocol_id_prefix(proto::GOSSIPSUB_PROTOCOL_PREFIX)
            .heartbeat_interval(config.gossip_heartbeat)
            .validation_mode(gossipsub::ValidationMode::Strict)
            .max_transmit_size(proto::MAX_GOSSIP_MESSAGE_BYTES)
            .build()
            .map_err(|e| anyhow!("invalid gossipsub config: {e}"))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| anyhow!("cannot start gossipsub: {e}"))?;
        gossipsub
            .subscribe(&announce_topic())
            .map_err(|e| anyhow!("cannot join the announcements topic: {e}"))?;
        gossipsub
            .subscribe(&runs_topic())
            .map_err(|e| anyhow!("cannot join the training runs topic: {e}"))?;

        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| anyhow!("cannot start mDNS: {e}"))?,
            )
        } else {
            None
        };

        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            allowed: allowed.into(),
            limits,
            kademlia,
            identify,
            ping,
            autonat_client: DirectOnly::new(autonat::v2::client::Behaviour::default()),
            autonat_server: DirectOnly::new(autonat::v2::server::Behaviour::default()),
            relay_client,
            relay_server: config
                .relay_server
                .then(|| {
                    let mut server = relay::Behaviour::new(peer_id, super::relays::server_config());
                    // The event loop turns it on while AutoNAT confirms the node public.
                    server.set_status(Some(relay::Status::Disable));
                    DirectOnly::new(server)
                })
                .into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            gossipsub,
            mdns: mdns.into(),
            models: DirectOnly::new(models),
            averaging: DirectOnly::new(averaging::Behaviour::new(peer_id)),
        })
    }
}

/// The announcements topic every node joins.
pub fn announce_topic() -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(proto::ANNOUNCE_TOPIC)
}

/// The topic on which training runs are announced.
pub fn runs_topic() -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(training::RUNS_TOPIC)
}
