//! [`Client`]: a cloneable handle to the event loop. Each method sends a [`Command`] with a
//! oneshot reply channel; the event loop, which alone owns the swarm, answers it.

use anyhow::{anyhow, Result};
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::peers::Source;

/// Requests the event loop serves.
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
}

/// Summary of the node's network state (`GET /status`).
#[derive(Debug, Clone, Serialize)]
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
}

/// Cloneable handle to a running node's network.
#[derive(Debug, Clone)]
pub struct Client {
    sender: mpsc::Sender<Command>,
}

impl Client {
    /// Wraps the command channel of an event loop.
    pub fn new(sender: mpsc::Sender<Command>) -> Self {
        Self { sender }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.sender
            .send(make(tx))
            .await
            .map_err(|_| anyhow!("the node has stopped"))?;
        rx.await.map_err(|_| anyhow!("the node has stopped"))
    }

    /// Current network status.
    pub async fn status(&self) -> Result<NetworkStatus> {
        self.ask(Command::Status).await
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
}
