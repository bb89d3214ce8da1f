//! Helpers shared by the multi-node tests: start nodes on loopback, wait on conditions with a
//! deadline (never fixed sleeps), and talk to the JSON API over plain HTTP/1.1.

#![allow(dead_code, missing_docs)]

pub mod netns;
pub mod process;
pub mod training;

use std::future::Future;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use p2p_node::cli::BootstrapAddr;
use p2p_node::config::NodeConfig;
use p2p_node::node::{self, NodeHandle};
use tempfile::TempDir;

/// Generous: the suite runs on busy 2-core machines.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Log to the test's output, filtered by `RUST_LOG` (nothing without it): `cargo test` shows
/// the lines of failing tests only.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A node plus the temp dir that holds its data.
pub struct TestNode {
    pub handle: NodeHandle,
    pub dir: TempDir,
}

impl TestNode {
    /// The TCP address (with `/p2p/`) others can bootstrap from.
    pub fn bootstrap_addr(&self) -> BootstrapAddr {
        let addr = self
            .handle
            .join_addrs()
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .expect("node listens on TCP");
        addr.to_string().parse().expect("join address parses")
    }

    pub fn peer_id(&self) -> PeerId {
        self.handle.peer_id
    }
}

/// Loopback config in `dir` joining through `bootstrap`.
pub fn loopback_config(dir: &TempDir, bootstrap: Vec<BootstrapAddr>) -> NodeConfig {
    let mut config = NodeConfig::loopback(dir.path());
    config.bootstrap = bootstrap;
    config
}

/// Starts a node in a fresh temp dir.
pub async fn start_node(bootstrap: Vec<BootstrapAddr>) -> TestNode {
    let dir = tempfile::tempdir().expect("temp dir");
    let handle = node::start(loopback_config(&dir, bootstrap))
        .await
        .expect("node starts");
    TestNode { handle, dir }
}

/// Polls `check` until it returns `Some` or `timeout` passes; panics with `what` on timeout.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether every node's routing table holds every other node of `nodes`.
pub async fn fully_discovered(nodes: &[&TestNode]) -> bool {
    for node in nodes {
        let Ok(table) = node.handle.client.routing_table().await else {
            return false;
        };
        for other in nodes {
            if other.peer_id() != node.peer_id() && !table.contains(&other.peer_id()) {
                return false;
            }
        }
    }
    true
}

/// A minimal HTTP/1.1 GET; returns (status code, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A minimal HTTP/1.1 POST of a JSON body; returns (status code, body).
pub fn http_post_json(
    addr: std::net::SocketAddr,
    path: &str,
    json: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Strips a trailing `/p2p/` from a multiaddr.
pub fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(
        addr.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(_))
    ) {
        addr.pop();
    }
    addr
}

/// Waits until every node's routing table holds every other node.
pub async fn wait_fully_discovered(what: &str, nodes: &[&TestNode]) {
    wait_for(what, CONVERGE_TIMEOUT, || async {
        fully_discovered(nodes).await.then_some(())
    })
    .await
}

/// Starts a node in a fresh temp dir with `adjust` applied to its loopback config.
pub async fn start_node_with(
    bootstrap: Vec<BootstrapAddr>,
    adjust: impl FnOnce(&mut NodeConfig),
) -> TestNode {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = loopback_config(&dir, bootstrap);
    adjust(&mut config);
    let handle = node::start(config).await.expect("node starts");
    TestNode { handle, dir }
}

/// Pseudo-random bytes from `seed` (xorshift; deterministic, incompressible enough).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a safetensors file of `tensors` (name, bytes) as U8 tensors; returns its bytes.
pub fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "U8", "shape": [data.len()], "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let header = serde_json::to_vec(&header).expect("json");
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    for (_, data) in tensors {
        file.extend_from_slice(data);
    }
    std::fs::write(path, &file).expect("write safetensors");
    file
}

/// A safetensors file of about `mib` MiB in `dir`, in tensors of 4 MiB; returns path and bytes.
pub fn model_file(
    dir: &std::path::Path,
    name: &str,
    mib: usize,
    seed: u64,
) -> (std::path::PathBuf, Vec<u8>) {
    let tensors: Vec<(String, Vec<u8>)> = (0..mib.div_ceil(4))
        .map(|i| {
            let len = (4.min(mib - 4 * i)) << 20;
            (
                format!("layer{i}.weight"),
                pseudo_random(len, seed + i as u64),
            )
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    let path = dir.join(name);
    let bytes = write_safetensors(&path, &refs);
    (path, bytes)
}
