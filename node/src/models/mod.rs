//! The `/p2p-ml/models/2.0.0` protocol: model versions held on disk, served to peers and
//! downloaded from many peers at once, as one libp2p behaviour ([`Behaviour`]) that imports
//! neither the rest of the network nor the averaging protocol.
//!
//! **Participants**: any node holding chunks of a version serves them; fetchers ask every
//! connected peer and every DHT provider.
//!
//! **Flow**: manifest from the publisher (else a known holder, else any peer), checked against
//! the id -> chunks already held locally copied -> every candidate asked which chunks it holds
//! (`Have`, long polled: held by the peer until it has a new chunk or a free slot, see
//! [`have_wait`]; peers that do not hold are asked every 200 ms) -> the [`picker`] schedules chunk requests, rarest first,
//! at most 4 in flight in all -> each chunk verified and written in one call on the writer
//! thread, then served at once (reads for peers run on blocking threads) -> endgame: the last
//! chunks asked of two peers, the slower answer dropped -> complete: written chunks synced, header checked with the reference
//! reader, provider record, waiters told. A peer that sends a chunk or manifest that does not
//! match its hash is dropped for that version and reported ([`Event::Misbehaved`]); the
//! node's reputation decides on penalties. Failed and timed-out requests give their chunk back
//! to the picker; new peers and providers join the download at once.
//!
//! **Limits**: requests and responses of at most
//! [`p2p_protocol::messages::MAX_REQUEST_BYTES`] / [`p2p_protocol::messages::MAX_RESPONSE_BYTES`];
//! 4 uploads at once (more are answered "busy"); an optional upload rate cap; 32 verified
//! chunks waiting for the disk per download; 4096 announcements and 512 streams per connection.
//!
//! **Parts**: [`behaviour`] (the `NetworkBehaviour`: requests in and out, events),
//! [`download`] (one version's download as a state machine without I/O), [`upload`] (serving
//! rules: stages, slots, rate, initial seeding), [`have_wait`] (availability long polling), [`picker`] (which chunk from whom),
//! [`disk`] (writes and syncs off the event loop), [`store`] (versions on disk), [`report`]
//! (what `fetch`, `/models` and `/status` show).

use std::time::Duration;

use serde::Serialize;

pub mod behaviour;
pub mod command;
pub mod disk;
pub mod download;
pub mod error;
pub mod have_wait;
pub mod picker;
pub mod report;
pub mod sim;
pub mod store;
pub mod trust;
pub mod upload;

pub use behaviour::{Behaviour, Event};
pub use command::Command;
pub use error::Error;
pub use report::{DownloadReport, DownloadState, FetchProgress, ModelInfo, TransferTotals};
pub use upload::IN_USE_WINDOW;

/// The five distribution stages of the seed design. The protocol is one; stages 1-4 are
/// settings that restrict it, kept for measurement against the full swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Stage 1: only publishers serve, one upload at a time.
    Sequential,
    /// Stage 2: only publishers serve, many uploads at once.
    ParallelPush,
    /// Stage 3: nodes re-serve versions once they hold them completely (no overlap).
    HostAssisted,
    /// Stage 4: each fetcher takes a fixed portion (`--portion I/N`) from the publisher, and
    /// fetchers exchange portions among themselves.
    Coordinated,
    /// Stage 5: every verified chunk is served at once to anyone; rarest first; endgame.
    #[default]
    Swarm,
}

impl Stage {
    /// The names `FromStr` accepts, in stage order.
    pub const NAMES: [&'static str; 5] = [
        "sequential",
        "parallel-push",
        "host-assisted",
        "coordinated",
        "swarm",
    ];
}

impl std::str::FromStr for Stage {
    type Err = crate::names::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::names::parse(
            "stage",
            &Self::NAMES,
            &[
                Self::Sequential,
                Self::ParallelPush,
                Self::HostAssisted,
                Self::Coordinated,
                Self::Swarm,
            ],
            s,
        )
    }
}

/// Tunables of the models protocol.
#[derive(Debug, Clone)]
pub struct ModelsConfig {
    /// Which stage's rules apply.
    pub stage: Stage,
    /// Chunk size for versions this node publishes.
    pub chunk_size: u32,
    /// Chunk requests in flight to one peer.
    pub max_requests_per_peer: usize,
    /// Chunk requests in flight in all, per download (spread over the peers: see
    /// `picker::Picker::with_max_in_flight`). In the swarm simulator, 4 in all instead of 4
    /// per peer took 16 hosts from 2.4x to 1.5x of the fluid bound (`testnet/RESULTS.md`).
    pub max_requests_in_flight: usize,
    /// Chunk requests that wait for an upload slot instead of being answered "busy".
    pub upload_queue: usize,
    /// Chunk uploads being sent at once; more requests are answered "busy".
    pub max_uploads: usize,
    /// In endgame, how many peers may be asked for the same chunk.
    pub endgame_copies: usize,
    /// Stage 4: this fetcher's portion `(index, count)`: chunk `i` is taken from the publisher
    /// only if `i % count == index`.
    pub portion: Option<(u32, u32)>,
    /// How often each peer is asked which chunks it holds during a download, if it does not
    /// hold availability requests (long polling, see `availability_wait`).
    pub have_refresh: Duration,
    /// Long polling of availability: the longest this node holds a peer's availability
    /// request until it has something new to say (a new chunk, a free upload slot after a
    /// "busy"); zero: requests are answered at once, and this node polls its peers every
    /// `have_refresh` instead of asking them to hold. See `have_wait`.
    pub availability_wait: Duration,
    /// How often Kademlia is asked for more providers during a download.
    pub provider_refresh: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Upload bandwidth cap in bytes per second (`None`: unlimited). Requests beyond it are
    /// answered "busy", so the requester turns to other peers.
    pub max_upload_rate: Option<u64>,
    /// Fault injection for tests and testnets: serve chunks with flipped bytes.
    pub corrupt_uploads: bool,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Swarm,
            chunk_size: p2p_protocol::manifest::DEFAULT_CHUNK_SIZE,
            max_requests_per_peer: 4,
            max_requests_in_flight: 4,
            upload_queue: 0,
            max_uploads: 4,
            endgame_copies: 2,
            portion: None,
            have_refresh: Duration::from_millis(200),
            availability_wait: Duration::from_secs(2),
            provider_refresh: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_upload_rate: None,
            corrupt_uploads: false,
        }
    }
}

impl ModelsConfig {
    /// Upload slots the stage allows.
    pub fn upload_slots(&self) -> usize {
        match self.stage {
            Stage::Sequential => 1,
            _ => self.max_uploads.max(1),
        }
    }
}

/// A token bucket for the upload bandwidth cap: holds up to one second of tokens (at least one
/// chunk), refilled continuously.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RateLimiter {
    /// A full bucket for `bytes_per_s`, able to pass messages of `largest` bytes.
    pub fn new(bytes_per_s: u64, largest: u64) -> Self {
        let capacity = (bytes_per_s as f64).max(largest as f64);
        Self {
            rate: bytes_per_s.max(1) as f64,
            capacity,
            tokens: capacity,
            last: std::time::Instant::now(),
        }
    }

    /// Takes `bytes` tokens if there are enough.
    pub fn try_take(&mut self, bytes: u64) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.last = now;
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;
