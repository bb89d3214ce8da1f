//! The node's resolved configuration: CLI flags merged with defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use std::str::FromStr;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::models::ModelsConfig;

/// Everything a node needs to start. Tests build one with [`NodeConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Directory holding the identity, the peer cache and (later) models.
    pub data_dir: PathBuf,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through.
    pub bootstrap: Vec<BootstrapAddr>,
    /// Where the JSON API listens; `None` disables it.
    pub api_addr: Option<SocketAddr>,
    /// Whether mDNS discovery runs.
    pub mdns: bool,
    /// Kademlia server or client mode.
    pub kad_mode: KadMode,
    /// Whether this node relays circuits for private peers while it is publicly reachable
    /// (circuit-relay v2 server; limits in [`crate::network::relays`]).
    pub relay_server: bool,
    /// How often the node refreshes its routing table with a Kademlia bootstrap query.
    pub kad_bootstrap_interval: Duration,
    /// How often the node checks that it has enough peers, and dials known ones if not.
    pub maintenance_interval: Duration,
    /// How often a changed peer cache is written to disk.
    pub peer_cache_save_interval: Duration,
    /// Maximum number of peers kept in the address book (and its file).
    pub peer_cache_capacity: usize,
    /// How many cached peers are dialled when (re)joining.
    pub peer_cache_dial: usize,
    /// Maintenance dials known peers while fewer than this many are connected, so that
    /// gossip meshes have enough members and one departure does not isolate the node.
    pub target_peers: usize,
    /// Maximum established connections in total.
    pub max_connections: u32,
    /// Gossipsub heartbeat (mesh maintenance) interval.
    pub gossip_heartbeat: Duration,
    /// Idle connections are closed after this long.
    pub idle_connection_timeout: Duration,
    /// Settings of the models protocol (stage, chunk size, uploads).
    pub models: ModelsConfig,
    /// Models whose new versions are fetched as they appear.
    pub follow: Vec<String>,
    /// Publishers whose versions a bare model name means (`--trust`; see
    /// [`crate::models::trust`]).
    pub trust: Vec<crate::models::trust::TrustArg>,
    /// With any: only these peers may connect, either way (a closed network).
    pub allow_peers: Vec<libp2p::PeerId>,
    /// A private network's pre-shared key: only nodes with the same key can connect (TCP
    /// only; QUIC is off).
    pub swarm_key: Option<libp2p::pnet::PreSharedKey>,
}

impl NodeConfig {
    /// A configuration with defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: default_listen_addrs(),
            bootstrap: Vec::new(),
            api_addr: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            mdns: true,
            kad_mode: KadMode::Auto,
            relay_server: true,
            kad_bootstrap_interval: Duration::from_secs(60),
            maintenance_interval: Duration::from_secs(15),
            peer_cache_save_interval: Duration::from_secs(10),
            peer_cache_capacity: 512,
            peer_cache_dial: 16,
            target_peers: 8,
            max_connections: 256,
            gossip_heartbeat: Duration::from_secs(1),
            idle_connection_timeout: Duration::from_secs(120),
            models: ModelsConfig::default(),
            follow: Vec::new(),
            trust: Vec::new(),
            allow_peers: Vec::new(),
            swarm_key: None,
        }
    }

    /// A loopback-only configuration for tests and local testnets: listens on 127.0.0.1 (TCP
    /// and QUIC, OS-chosen ports), no mDNS, Kademlia in server mode (a loopback node is not
    /// reachable from other machines, so `auto` would make it a client), and short
    /// maintenance intervals.
    pub fn loopback(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("static multiaddr"),
            ],
            mdns: false,
            kad_mode: KadMode::Server,
            kad_bootstrap_interval: Duration::from_secs(2),
            maintenance_interval: Duration::from_secs(2),
            peer_cache_save_interval: Duration::from_secs(1),
            ..Self::new(data_dir)
        }
    }

    /// Path of the identity key file.
    pub fn identity_path(&self) -> PathBuf {
        self.data_dir.join("identity.key")
    }

    /// Path of the persisted peer cache.
    pub fn peer_cache_path(&self) -> PathBuf {
        self.data_dir.join("peers.json")
    }

    /// Path of the list of banned peers.
    pub fn bans_path(&self) -> PathBuf {
        self.data_dir.join("bans.json")
    }

    /// The publisher remembered per model name (see [`crate::models::trust`]).
    pub fn trust_path(&self) -> PathBuf {
        self.data_dir.join("trust.json")
    }

    /// Path of the lock file that keeps two nodes off one data dir.
    pub fn lock_path(&self) -> PathBuf {
        self.data_dir.join("lock")
    }

    /// Directory of the model store.
    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }

    /// Path of the file where a running node writes its API address (for scripts).
    pub fn api_addr_path(&self) -> PathBuf {
        self.data_dir.join("api-addr")
    }
}

/// A bootstrap peer: its address and the peer id the address must end with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapAddr {
    /// The peer's id, from the address's `/p2p/` component.
    pub peer_id: PeerId,
    /// The full address, `/p2p/<id>` included.
    pub addr: Multiaddr,
}

impl FromStr for BootstrapAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr = parse_multiaddr(s)?;
        match addr.iter().last() {
            Some(Protocol::P2p(peer_id)) => Ok(Self { peer_id, addr }),
            _ => Err(format!(
                "bootstrap address '{s}' has no /p2p/<peer id> at the end \
                 (the joining command printed by a running node has it)"
            )),
        }
    }
}

impl std::fmt::Display for BootstrapAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// Parses a multiaddr with an error message that names the bad input.
pub fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    Multiaddr::from_str(s.trim()).map_err(|e| {
        format!("'{s}' is not a valid multiaddr ({e}); expected e.g. /ip4/192.0.2.7/tcp/4001")
    })
}

/// Whether this node serves the DHT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KadMode {
    /// Follow reachability: a client until AutoNAT confirms a (non-loopback) external
    /// address, a server while one is confirmed.
    #[default]
    Auto,
    /// Answer DHT queries: other nodes put this node into their routing tables.
    Server,
    /// Only issue queries (for nodes others cannot dial).
    Client,
}

impl KadMode {
    /// The names `FromStr` accepts.
    pub const NAMES: [&'static str; 3] = ["auto", "server", "client"];
}

impl std::str::FromStr for KadMode {
    type Err = crate::names::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::names::parse(
            "Kademlia mode",
            &Self::NAMES,
            &[Self::Auto, Self::Server, Self::Client],
            s,
        )
    }
}

/// Listen on all IPv4 interfaces, TCP and QUIC, with OS-chosen ports.
pub fn default_listen_addrs() -> Vec<Multiaddr> {
    vec![
        "/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr"),
        "/ip4/0.0.0.0/udp/0/quic-v1"
            .parse()
            .expect("static multiaddr"),
    ]
}

/// The platform's per-user data directory plus `p2p-node`.
pub fn default_data_dir() -> Result<PathBuf> {
    dirs::data_local_dir().map(|d| d.join("p2p-node")).context(
        "no platform data directory (HOME unset?); pass --data-dir or set P2P_NODE_DATA_DIR",
    )
}

/// Creates the data directory if needed and checks it is a writable directory.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("data dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
