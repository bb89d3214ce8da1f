//! Assembles a node: data dir, identity, peer cache, network event loop and API, and runs them
//! until shut down. Everything here is callable from tests; `main.rs` only adds the CLI,
//! logging and signal handling.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{prepare_data_dir, NodeConfig};
use crate::network::address_book::{self, AddressBook};
use crate::network::discovery::{is_loopback, with_peer_id};
use crate::network::{Client, EventLoop};
use crate::{api, fsutil, identity};

/// How long start-up waits for the listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running node.
pub struct NodeHandle {
    /// This node's peer id.
    pub peer_id: PeerId,
    /// Handle to the network event loop.
    pub client: Client,
    /// Where the JSON API listens, if enabled.
    pub api_addr: Option<SocketAddr>,
    /// Addresses the node listens on (as first reported).
    pub listen_addrs: Vec<Multiaddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl NodeHandle {
    /// Addresses others can dial, each ending in `/p2p/<peer id>`; non-loopback TCP first.
    pub fn join_addrs(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self
            .listen_addrs
            .iter()
            .map(|a| with_peer_id(a, self.peer_id))
            .collect();
        addrs.sort_by_key(|a| {
            (
                !a.iter().any(|p| matches!(p, Protocol::Tcp(_))),
                is_loopback(a),
            )
        });
        addrs
    }

    /// Stops the node gracefully (saving its state) and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await.context("node task panicked")?
    }

    /// Waits until the node stops on its own (an internal error) or through [`Self::stop`].
    pub async fn stopped(&mut self) -> Result<()> {
        (&mut self.task).await.context("node task panicked")?
    }

    /// Starts shutting the node down without waiting.
    pub fn request_shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// Starts a node: prepares the data dir, loads or creates the identity, loads the peer cache,
/// starts listening and serving the API, and begins joining. Returns once it listens.
pub async fn start(config: NodeConfig) -> Result<NodeHandle> {
    prepare_data_dir(&config.data_dir)?;
    let lock = lock_data_dir(&config)?;
    let key = identity::load_or_create(&config.identity_path())?;
    let peer_id = key.public().to_peer_id();
    let book = load_address_book(&config);

    let (event_loop, client) = EventLoop::new(key, config.clone(), book)?;

    let api_listener = match config.api_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve the API on {addr}"))?,
        ),
        None => None,
    };
    let api_addr = api_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    if let Some(addr) = api_addr {
        fsutil::write_atomic(
            &config.api_addr_path(),
            format!("{addr}\n").as_bytes(),
            0o644,
        )?;
    }

    let shutdown = CancellationToken::new();
    let task = {
        let (shutdown, client, config) = (shutdown.clone(), client.clone(), config.clone());
        tokio::spawn(async move {
            let network = stop_all_on_exit(event_loop.run(shutdown.clone()), &shutdown);
            let api = stop_all_on_exit(
                async {
                    match api_listener {
                        Some(listener) => {
                            api::serve(listener, client, &config, shutdown.clone()).await
                        }
                        None => Ok(()),
                    }
                },
                &shutdown,
            );
            let (network, api) = tokio::join!(network, api);
            drop(lock); // held for as long as the node runs
            network.and(api)
        })
    };

    let listen_addrs = tokio::time::timeout(LISTEN_TIMEOUT, client.wait_listening())
        .await
        .context("the network did not start listening in time")??;
    tracing::info!(%peer_id, data_dir = %config.data_dir.display(), "node started");
    Ok(NodeHandle {
        peer_id,
        client,
        api_addr,
        listen_addrs,
        shutdown,
        task,
    })
}

/// Runs `task`; when it ends (for any reason) the whole node shuts down.
async fn stop_all_on_exit(
    task: impl std::future::Future<Output = Result<()>>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let result = task.await;
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "node component failed; shutting down");
    }
    shutdown.cancel();
    result
}

/// Takes an exclusive lock on the data dir, so that two nodes never share an identity and
/// overwrite each other's state. The lock file holds the owner's pid, for the error message;
/// the OS releases the lock when the process dies, even by `kill -9`.
fn lock_data_dir(config: &NodeConfig) -> Result<File> {
    let path = config.lock_path();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = owner.trim();
            bail!(
                "data dir {} is in use by another p2p-node{}; give each node its own --data-dir",
                config.data_dir.display(),
                if owner.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {owner})")
                }
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}

/// Loads the persisted peer cache; a corrupt one is reported and ignored.
fn load_address_book(config: &NodeConfig) -> AddressBook {
    let path = config.peer_cache_path();
    match address_book::load_cache(&path) {
        Ok(Some(file)) => {
            let (book, skipped) = AddressBook::from_file(file, config.peer_cache_capacity);
            if skipped > 0 {
                tracing::warn!(skipped, path = %path.display(), "ignored malformed peer cache entries");
            }
            tracing::info!(peers = book.len(), "loaded peer cache");
            book
        }
        Ok(None) => AddressBook::new(config.peer_cache_capacity),
        Err(e) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "ignoring the peer cache; joining through bootstrap peers and mDNS instead"
            );
            AddressBook::new(config.peer_cache_capacity)
        }
    }
}
