//! The node's resolved configuration: CLI flags merged with defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use libp2p::Multiaddr;

use crate::cli::{BootstrapAddr, CommonArgs, KadMode};
use crate::distribution::DistributionConfig;

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
    /// Model distribution settings.
    pub distribution: DistributionConfig,
    /// Models whose new versions are fetched as they appear.
    pub follow: Vec<String>,
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
            kad_mode: KadMode::Server,
            kad_bootstrap_interval: Duration::from_secs(60),
            maintenance_interval: Duration::from_secs(15),
            peer_cache_save_interval: Duration::from_secs(10),
            peer_cache_capacity: 512,
            peer_cache_dial: 16,
            target_peers: 8,
            max_connections: 256,
            gossip_heartbeat: Duration::from_secs(1),
            idle_connection_timeout: Duration::from_secs(120),
            distribution: DistributionConfig::default(),
            follow: Vec::new(),
        }
    }

    /// A loopback-only configuration for tests and local testnets: listens on 127.0.0.1 (TCP
    /// and QUIC, OS-chosen ports), no mDNS, and short maintenance intervals.
    pub fn loopback(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("static multiaddr"),
            ],
            mdns: false,
            kad_bootstrap_interval: Duration::from_secs(2),
            maintenance_interval: Duration::from_secs(2),
            peer_cache_save_interval: Duration::from_secs(1),
            ..Self::new(data_dir)
        }
    }

    /// Resolves the CLI flags: flag > environment (handled by clap) > platform default.
    pub fn from_args(args: &CommonArgs) -> Result<Self> {
        let data_dir = match &args.data_dir {
            Some(dir) => dir.clone(),
            None => default_data_dir()?,
        };
        let mut config = Self::new(data_dir);
        if !args.listen.is_empty() {
            config.listen = args.listen.clone();
        }
        config.bootstrap = args.bootstrap.clone();
        if let Some(api) = args.api_addr {
            config.api_addr = Some(api);
        }
        config.mdns = !args.no_mdns;
        config.kad_mode = args.kad_mode;
        config.distribution.stage = args.stage;
        if let Some(portion) = args.portion {
            config.distribution.portion = Some((portion.index, portion.count));
        }
        if let Some(kib) = args.chunk_size_kib {
            config.distribution.chunk_size = kib.saturating_mul(1024);
        }
        config.follow = args.follow.clone();
        config.distribution.max_upload_rate = args
            .max_upload_rate
            .map(|mib| (mib * 1024.0 * 1024.0) as u64);
        Ok(config)
    }

    /// Path of the identity key file.
    pub fn identity_path(&self) -> PathBuf {
        self.data_dir.join("identity.key")
    }

    /// Path of the persisted peer cache.
    pub fn peer_cache_path(&self) -> PathBuf {
        self.data_dir.join("peers.json")
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
