//! Command-line interface: flags shared by every subcommand, and the subcommands.
//!
//! Parsing is strict: a malformed multiaddr or a bootstrap address without a peer id is a
//! usage error (exit code 2) with a one-line message, before any I/O happens.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Args, Parser, Subcommand};
use libp2p::Multiaddr;

pub use crate::config::{parse_multiaddr, BootstrapAddr};
use crate::config::{KadMode, NodeConfig};
pub use crate::logging::LogFormat;
use crate::models::Stage;
use p2p_models::device::DeviceChoice;
use p2p_protocol::manifest::VersionId;

/// `p2p-node`: a fully decentralized node for training machine-learning models together.
#[derive(Debug, Parser)]
#[command(name = "p2p-node", version, about, long_about = None)]
pub struct Cli {
    /// Flags every subcommand accepts, before or after it.
    #[command(flatten)]
    pub common: CommonArgs,

    /// What to do; without a subcommand the node runs.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node until Ctrl-C or SIGTERM (the default).
    Run,
    /// Print this node's peer id (creating the identity on first use) and exit.
    Id,
    /// Join, download a model version from the swarm, verify it and write it to a file.
    Fetch(FetchArgs),
    /// Train a model together with the network: create a run, or join (or resume) one.
    Train(TrainArgs),
    /// Make a new pre-shared key for a private network (see --swarm-key) and exit.
    SwarmKey(SwarmKeyArgs),
    /// Print the configuration in force (command line > environment > config file >
    /// defaults) as a config file.
    Config(ConfigArgs),
    /// Ask the node running on this data dir for its status and print it.
    Status(QueryArgs),
    /// Ask the node running on this data dir for its peers and print them as a table.
    Peers(QueryArgs),
    /// Ask the node running on this data dir for the model versions it holds.
    Models(QueryArgs),
}

/// `p2p-node config` arguments.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Print the configuration in force as TOML (usable as a --config file).
    #[arg(long, required = true)]
    pub dump: bool,
}

/// Arguments of the commands that ask a running node (`status`, `peers`, `models`).
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The node's API address [default: the one it wrote to DATA_DIR/api-addr].
    #[arg(long, value_name = "IP:PORT")]
    pub api: Option<SocketAddr>,
}

/// `p2p-node swarm-key` arguments.
#[derive(Debug, Clone, Args)]
pub struct SwarmKeyArgs {
    /// Where to write the key (readable by its owner only; an existing file is never
    /// replaced). Give the same file to every node of the network with --swarm-key.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `p2p-node train` arguments.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Create a new run from this spec file (TOML), publish its initial weights as version 0,
    /// announce it, and train it.
    #[arg(long, value_name = "SPEC")]
    pub create: Option<PathBuf>,
    /// Join this run (its id, 64 hex digits) [default: the run this node trained before a
    /// restart, else the one most connected peers train among those whose spec this node can
    /// use; ties go to the older run].
    #[arg(long, value_name = "RUN_ID", value_parser = parse_version_id)]
    pub run: Option<VersionId>,
    /// Read the run's kind of data set from here (an MNIST directory or a text file) instead of
    /// the path in the run's spec.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// This node's shard of the training data, I/N (e.g. 0/4) [default: chosen from the peer
    /// id among the run's shards].
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    pub shard: Option<Portion>,
    /// Where to train: auto, cpu, cuda or metal (GPU ones need a build with that feature).
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Train without averaging with peers (for comparison).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub no_averaging: bool,
    /// Exit once the local steps and final averaging rounds are done, instead of serving on.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub exit_when_done: bool,
    /// Log lines only, no progress bar, even on a terminal.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub no_progress: bool,
    /// Seconds to look for a run (and its newest version) before giving up.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub find_timeout: u64,
    /// With --create: start a new run even though this data dir trains another one (which is
    /// then abandoned by this node).
    #[arg(long, requires = "create", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub new_run: bool,
    /// Checkpoint versions of the run's model kept on disk: the newest N, plus any a peer is
    /// still fetching; older ones are deleted.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub keep_checkpoints: u64,
    /// Fault injection for testnets: send NaN instead of parameters to peers.
    #[arg(long, hide = true)]
    pub poison_averaging: bool,
    /// Fault injection for testnets: lie in averaging sessions (`nan`, `negate`, `scale=F`,
    /// `noise=D`, `oppose=C`, `claim=N`, `stall`).
    #[arg(long, hide = true, value_name = "ATTACK")]
    pub attack_averaging: Option<crate::averaging::Attack>,
}

/// `p2p-node fetch` arguments.
#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// A model name (the newest announced version is fetched) or a version id (64 hex digits).
    #[arg(value_parser = parse_target)]
    pub target: String,
    /// Where to write the file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Keep running as a full node (serving the version) after the download.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub seed: bool,
    /// Log progress lines instead of drawing a progress bar, even on a terminal.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub no_progress: bool,
    /// Give up after this many seconds without finishing.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub timeout: u64,
}

/// Flags accepted by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// A config file (TOML) with a key for any of these flags, and [train] / [fetch]
    /// sections for theirs; the command line and the environment beat it (see
    /// `p2p-node config --dump`).
    #[arg(long, global = true, env = "P2P_NODE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where the identity, peer cache and models live
    /// [default: the platform data dir, e.g. ~/.local/share/p2p-node].
    #[arg(long, global = true, env = "P2P_NODE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address to listen on (repeatable)
    /// [default: /ip4/0.0.0.0/tcp/0 and /ip4/0.0.0.0/udp/0/quic-v1].
    #[arg(long, global = true, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub listen: Vec<Multiaddr>,

    /// A peer to join the network through (repeatable), e.g.
    /// /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW...; needed once: known peers are remembered.
    #[arg(long, global = true, value_name = "MULTIADDR", value_parser = parse_bootstrap)]
    pub bootstrap: Vec<BootstrapAddr>,

    /// Address of the local JSON API [default: 127.0.0.1 with an OS-chosen port].
    #[arg(long, global = true, value_name = "IP:PORT")]
    pub api_addr: Option<SocketAddr>,

    /// Do not look for peers on the local network with mDNS (`--no-mdns=false` turns off
    /// a `no_mdns = true` of the config file).
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub no_mdns: bool,

    /// Kademlia mode: `server` answers DHT queries (for reachable nodes), `client` only asks,
    /// `auto` is a client until AutoNAT confirms the node is reachable, a server after.
    #[arg(long, global = true, default_value = "auto",
          value_parser = PossibleValuesParser::new(KadMode::NAMES).map(|s| s.parse::<KadMode>().unwrap_or_default()))]
    pub kad_mode: KadMode,

    /// Do not relay circuits for peers behind NAT, even while this node is publicly
    /// reachable (`--no-relay-server=false` turns off a `no_relay_server = true` of the config
    /// file). Limits of the relay: see the README.
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub no_relay_server: bool,

    /// Publish a safetensors file as the next version of a model (repeatable): the running
    /// node imports it, announces it and serves it.
    #[arg(long, global = true, value_name = "FILE")]
    pub publish: Vec<PathBuf>,

    /// Model name for --publish [default: the file name without extension].
    #[arg(long, global = true, value_name = "NAME", value_parser = parse_model_name)]
    pub model: Option<String>,

    /// Fetch every new version of this model as it is announced (repeatable), from the
    /// publisher the name means (see --trust).
    #[arg(long, global = true, value_name = "MODEL", value_parser = parse_model_name)]
    pub follow: Vec<String>,

    /// Which publisher a model name means (repeatable): `PEER_ID` trusts a publisher for
    /// names not yet bound (then nobody else is taken on first use); `NAME=PEER_ID` binds a
    /// name. Without it, a name means the publisher followed or fetched before, or the only
    /// one known (remembered in DATA_DIR/trust.json).
    #[arg(long, global = true, value_name = "PEER_ID|NAME=PEER_ID")]
    pub trust: Vec<crate::models::trust::TrustArg>,

    /// Distribution stage (1-4 exist for measurement; `swarm` is stage 5, the default).
    #[arg(long, global = true, default_value = "swarm",
          value_parser = PossibleValuesParser::new(Stage::NAMES).map(|s| s.parse::<Stage>().unwrap_or_default()))]
    pub stage: Stage,

    /// Stage `coordinated` only: this fetcher's portion I/N of the chunks taken from the
    /// publisher (e.g. 0/4).
    #[arg(long, global = true, value_name = "I/N", value_parser = parse_portion)]
    pub portion: Option<Portion>,

    /// Chunk size in KiB for versions this node publishes [default: 1024].
    #[arg(long, global = true, value_name = "KIB", value_parser = clap::value_parser!(u32).range(4..=8192))]
    pub chunk_size_kib: Option<u32>,

    /// Longest this node holds a peer's availability request until it has a new chunk or,
    /// after answering that peer "busy", a free upload slot (long polling), in ms; 0: answers
    /// at once, and this node polls its peers every 200 ms instead of asking them to hold.
    #[arg(long, global = true, value_name = "MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub availability_wait_ms: u64,

    /// Cap on upload bandwidth for model chunks, in MiB/s [default: unlimited].
    #[arg(long, global = true, value_name = "MIB_PER_S", value_parser = parse_rate)]
    pub max_upload_rate: Option<f64>,

    /// Private network: only nodes given the same pre-shared key file can connect (libp2p
    /// pnet; TCP only, QUIC is off). Make one with `p2p-node swarm-key --out FILE`.
    #[arg(long, global = true, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,

    /// Closed network: only this peer may connect, either way (repeatable; the list is the
    /// union with --allow-peers-file). Bootstrap peers must be on it.
    #[arg(long, global = true, value_name = "PEER_ID")]
    pub allow_peer: Vec<libp2p::PeerId>,

    /// Closed network: a file of peer ids allowed to connect, one per line (# comments).
    #[arg(long, global = true, value_name = "FILE")]
    pub allow_peers_file: Option<PathBuf>,

    /// Log line format on stderr; the level is set with RUST_LOG (e.g. RUST_LOG=debug).
    #[arg(long, global = true, default_value = "text",
          value_parser = PossibleValuesParser::new(LogFormat::NAMES).map(|s| s.parse::<LogFormat>().unwrap_or_default()))]
    pub log_format: LogFormat,
}

impl CommonArgs {
    /// Checks what clap cannot see in one value: a name bound twice with `--trust` to two
    /// publishers.
    pub fn validate(&self) -> Result<(), clap::Error> {
        let mut bound = std::collections::BTreeMap::new();
        for arg in &self.trust {
            if let crate::models::trust::TrustArg::Name(name, peer) = arg {
                if bound.insert(name, peer).is_some_and(|other| other != peer) {
                    return Err(clap::Error::raw(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!("--trust binds '{name}' to two publishers; give one\n"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves the CLI flags: flag > environment (handled by clap) > platform default.
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let data_dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => crate::config::default_data_dir()?,
        };
        let mut config = NodeConfig::new(data_dir);
        if !self.listen.is_empty() {
            config.listen = self.listen.clone();
        }
        config.bootstrap = self.bootstrap.clone();
        if let Some(api) = self.api_addr {
            config.api_addr = Some(api);
        }
        config.mdns = !self.no_mdns;
        config.kad_mode = self.kad_mode;
        config.relay_server = !self.no_relay_server;
        config.models.stage = self.stage;
        if let Some(portion) = self.portion {
            config.models.portion = Some((portion.index, portion.count));
        }
        if let Some(kib) = self.chunk_size_kib {
            config.models.chunk_size = kib.saturating_mul(1024);
        }
        config.models.availability_wait =
            std::time::Duration::from_millis(self.availability_wait_ms);
        config.follow = self.follow.clone();
        config.trust = self.trust.clone();
        config.allow_peers = self.allow_peer.clone();
        if let Some(path) = &self.allow_peers_file {
            config
                .allow_peers
                .extend(crate::network::closed::read_allow_list(path)?);
        }
        if let Some(path) = &self.swarm_key {
            config.swarm_key = Some(crate::network::closed::read_swarm_key(path)?);
            // QUIC cannot carry the pre-shared key's encryption: listen on TCP only.
            config.listen.retain(|a| {
                !a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
            });
            anyhow::ensure!(
                !config.listen.is_empty(),
                "--swarm-key needs a TCP listen address (QUIC is off in a private network)"
            );
        }
        config.models.max_upload_rate = self
            .max_upload_rate
            .map(|mib| (mib * 1024.0 * 1024.0) as u64);
        Ok(config)
    }
}

/// A fetcher's share in the coordinated stage: chunk `i` is its own if `i % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Portion {
    /// Which share, from 0.
    pub index: u32,
    /// Number of shares.
    pub count: u32,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r < 1e6 => Ok(r),
        _ => Err(format!(
            "rate '{s}' must be a positive number of MiB/s, e.g. 12.5"
        )),
    }
}

fn parse_portion(s: &str) -> Result<Portion, String> {
    parse_share(s, "portion")
}

fn parse_shard(s: &str) -> Result<Portion, String> {
    parse_share(s, "shard")
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

fn parse_version_id(s: &str) -> Result<VersionId, String> {
    s.parse::<VersionId>()
        .map_err(|_| format!("'{s}' is not a run id (64 hex digits)"))
}

/// Parses `I/N` with `0 <= I < N <= 1024`.
fn parse_share(s: &str, what: &str) -> Result<Portion, String> {
    let err = || format!("{what} '{s}' must be I/N with 0 <= I < N <= 1024, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(err)?;
    let index: u32 = i.trim().parse().map_err(|_| err())?;
    let count: u32 = n.trim().parse().map_err(|_| err())?;
    if index >= count || count > 1024 {
        return Err(err());
    }
    Ok(Portion { index, count })
}

fn parse_bootstrap(s: &str) -> Result<BootstrapAddr, String> {
    s.parse()
}

/// A model name by the protocol's rules.
fn parse_model_name(s: &str) -> Result<String, String> {
    p2p_protocol::manifest::validate_model_name(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("'{s}' is not a model name: {e}"))
}

/// A version id (64 hex digits) or a model name.
fn parse_target(s: &str) -> Result<String, String> {
    if s.parse::<p2p_protocol::manifest::VersionId>().is_ok() {
        return Ok(s.to_string());
    }
    parse_model_name(s).map_err(|e| format!("{e} (nor a version id of 64 hex digits)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    #[test]
    fn bootstrap_requires_peer_id() {
        let err = "/ip4/127.0.0.1/tcp/4001"
            .parse::<BootstrapAddr>()
            .unwrap_err();
        assert!(err.contains("/p2p/"), "{err}");
        let id = PeerId::random();
        let ok: BootstrapAddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}").parse().unwrap();
        assert_eq!(ok.peer_id, id);
    }

    #[test]
    fn malformed_multiaddr_is_named() {
        let err = parse_multiaddr("not-an-addr").unwrap_err();
        assert!(
            err.contains("not-an-addr") && err.contains("multiaddr"),
            "{err}"
        );
    }

    #[test]
    fn common_flags_go_before_or_after_the_subcommand() {
        let before =
            Cli::try_parse_from(["p2p-node", "--data-dir", "/x", "--no-mdns", "id"]).unwrap();
        let after =
            Cli::try_parse_from(["p2p-node", "id", "--data-dir", "/x", "--no-mdns"]).unwrap();
        for cli in [before, after] {
            assert!(matches!(cli.command, Some(Command::Id)));
            assert_eq!(
                cli.common.data_dir.as_deref(),
                Some(std::path::Path::new("/x"))
            );
            assert!(cli.common.no_mdns);
        }
    }
}
