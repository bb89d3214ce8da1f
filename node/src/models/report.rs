//! What the models behaviour reports about versions and downloads: to `fetch`, `/models`
//! and `/status`.

use serde::Serialize;

/// The outcome of a finished download.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadReport {
    /// Version id.
    pub id: String,
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// File size.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u32,
    /// Chunks received from peers in this run.
    pub chunks_downloaded: u32,
    /// Chunks copied from other local versions.
    pub chunks_copied_locally: u32,
    /// Chunks already verified on disk when the download (re)started.
    pub chunks_resumed: u32,
    /// Distinct peers that sent chunks.
    pub peers_used: usize,
    /// Seconds from start to completion.
    pub seconds: f64,
}

/// Where a download in progress stands, to explain why it does not finish.
#[derive(Debug, Clone, Default)]
pub struct DownloadState {
    /// Whether the manifest was obtained.
    pub manifest: bool,
    /// Chunks held and the version's chunk count (0 before the manifest).
    pub chunks_held: u32,
    /// Chunks in the version.
    pub chunks: u32,
    /// Peers known to hold the version (publisher, providers, peers with chunks).
    pub holders: usize,
    /// The last failed request of the download: `<peer id>: <error>`.
    pub last_failure: Option<String>,
    /// Seconds since a chunk last arrived from a peer (`None`: none arrived in this run).
    pub seconds_since_chunk: Option<f64>,
}

/// How far a download is, sent to watchers as it moves ([`super::Behaviour::fetch`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchProgress {
    /// Chunks held and verified.
    pub chunks_held: u32,
    /// Chunks in the version (0 until the manifest is known).
    pub chunks: u32,
    /// Bytes held (approximately: whole chunks).
    pub bytes_held: u64,
    /// Size of the version in bytes (0 until the manifest is known).
    pub size: u64,
    /// Peers known to hold chunks of it.
    pub peers: usize,
}

/// Chunk traffic since the node started, over every version (`GET /status` → `transfers`,
/// and the `p2p_node_chunks_*` / `p2p_node_*_bytes_total` metrics). Counters: they only grow,
/// also when a version is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TransferTotals {
    /// Chunks sent to peers.
    pub chunks_served: u64,
    /// Bytes of chunks sent to peers.
    pub bytes_served: u64,
    /// Chunks received from peers that matched their hash.
    pub chunks_fetched: u64,
    /// Bytes of chunks received from peers that matched their hash.
    pub bytes_fetched: u64,
    /// Chunks received that did not match their hash (each one dropped, its sender penalized).
    pub bad_chunks: u64,
}

/// One version as listed by `GET /models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Version id.
    pub id: String,
    /// Model name.
    pub model: String,
    /// The publisher, who signed it.
    pub publisher: libp2p::PeerId,
    /// Version number.
    pub version: u64,
    /// Parent version id.
    pub parent: Option<String>,
    /// File size in bytes.
    pub size: u64,
    /// Chunks in the version.
    pub chunks: u32,
    /// Chunks held and verified.
    pub chunks_held: u32,
    /// Fraction held, 0 to 1.
    pub progress: f64,
    /// Whether every chunk is held.
    pub complete: bool,
    /// Whether this node published it.
    pub published: bool,
    /// Peers known to hold chunks of it (during a download).
    pub peers_serving: usize,
    /// Bytes of chunks this node sent to others.
    pub bytes_uploaded: u64,
    /// Bytes of chunks this node received from others.
    pub bytes_downloaded: u64,
    /// Peers dropped for sending bad data.
    pub bad_peers: Vec<libp2p::PeerId>,
    /// Path of the data file.
    pub path: String,
}
