//! Serving rules of the models protocol, in one place and free of I/O: which versions a node
//! serves in each [`Stage`], its upload slots, the upload rate cap, initial seeding, and which
//! versions peers are using (so pruning spares them). The node and the swarm simulator
//! ([`super::sim`]) both run these rules.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use libp2p::request_response::InboundRequestId;
use libp2p::PeerId;
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::manifest::{chunk_range, VersionId};
use tokio::time::Instant;

use super::store::StoredVersion;
use super::{ModelsConfig, RateLimiter, Stage};

/// A version a peer asked for within this long is not pruned: the peer is still fetching it.
pub const IN_USE_WINDOW: Duration = Duration::from_secs(30);

/// A chunk initial seeding declined to a peer is served if the same peer asks for it again
/// within this long: it found no one else to take it from.
const DECLINE_MEMORY: Duration = Duration::from_secs(60);

/// Most (peer, chunk) declines remembered; older ones are forgotten first.
const MAX_DECLINES: usize = 4096;

/// How a chunk request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Read the chunk and send it.
    Serve,
    /// "Not found": not held, not served in this stage, or declined by initial seeding (the
    /// fetcher turns to another chunk or peer at once).
    NotFound,
    /// "Busy": every upload slot is taken or the rate cap is reached; the fetcher backs off
    /// from this peer until its next availability refresh.
    Busy,
    /// Every slot is taken but the queue has room: the request waits (see
    /// [`Uploads::enqueue`]) and is served as soon as a slot frees, so the link does not
    /// idle for the round trip of a request sent again.
    Queue,
}

/// What a node holds of one version, as far as the serving rules need to know.
#[derive(Debug, Clone, Copy)]
pub(super) struct Holding<'a> {
    /// This node published the version.
    pub published: bool,
    /// Chunks held and verified.
    pub have: &'a Bitfield,
    /// The version's chunk size, bytes.
    pub chunk_size: u32,
    /// The version's size, bytes.
    pub total_size: u64,
}

impl<'a> Holding<'a> {
    /// What `v` holds.
    pub(super) fn of(v: &'a StoredVersion) -> Self {
        Self {
            published: v.published,
            have: &v.have,
            chunk_size: v.manifest.chunk_size,
            total_size: v.manifest.total_size,
        }
    }
}

/// The uploads of one node; `R` names a request being answered (libp2p's inbound request
/// id in the node, a plain number in the simulator).
#[derive(Debug)]
pub(super) struct Uploads<R = InboundRequestId> {
    stage: Stage,
    slots: usize,
    corrupt: bool,
    /// Chunk responses being sent (each holds a slot until sent or failed).
    in_flight: HashSet<R>,
    /// Requests waiting for a slot, oldest first, and their requesters.
    queue: VecDeque<(R, PeerId)>,
    /// Most requests waiting (0: none wait, "busy" at once).
    queue_len: usize,
    limiter: Option<RateLimiter>,
    /// Per published version, how often each chunk was uploaded (for initial seeding).
    seeded: HashMap<VersionId, Vec<u32>>,
    /// Chunks initial seeding declined, to whom, and when.
    declined: HashMap<(PeerId, VersionId, u32), Instant>,
    /// When a peer last asked for a version's chunks or availability.
    last_asked: HashMap<VersionId, Instant>,
    /// Bytes of chunks sent, per version.
    uploaded: HashMap<VersionId, u64>,
}

impl<R: Eq + Hash> Uploads<R> {
    /// The rules `config` sets.
    pub(super) fn new(config: &ModelsConfig) -> Self {
        Self {
            stage: config.stage,
            slots: config.upload_slots(),
            corrupt: config.corrupt_uploads,
            in_flight: HashSet::new(),
            queue: VecDeque::new(),
            queue_len: if config.max_upload_rate.is_some() {
                0 // a rate-capped uploader answers "busy" instead
            } else {
                config.upload_queue
            },
            limiter: config
                .max_upload_rate
                .map(|rate| RateLimiter::new(rate, u64::from(config.chunk_size))),
            seeded: HashMap::new(),
            declined: HashMap::new(),
            last_asked: HashMap::new(),
            uploaded: HashMap::new(),
        }
    }

    /// Whether a version is served at all in this stage: stages 1-2 serve only what this node
    /// published, stage 3 also complete copies, stages 4-5 every verified chunk.
    pub(super) fn serves(&self, published: bool, complete: bool) -> bool {
        match self.stage {
            Stage::Sequential | Stage::ParallelPush => published,
            Stage::HostAssisted => published || complete,
            Stage::Coordinated | Stage::Swarm => true,
        }
    }

    /// Whether `v` is served (its availability answered) in this stage.
    pub(super) fn serves_version(&self, v: &StoredVersion) -> bool {
        self.serves(v.published, v.is_complete())
    }

    /// Whether what `h` holds is served in this stage.
    fn serves_holding(&self, h: &Holding<'_>) -> bool {
        self.serves(h.published, h.have.is_complete())
    }

    /// A peer asked about `id` (its availability or a chunk) at `now`.
    pub(super) fn note_asked(&mut self, id: VersionId, now: Instant) {
        self.last_asked.insert(id, now);
    }

    /// Whether a peer asked about `id` within [`IN_USE_WINDOW`] of `now`.
    pub(super) fn in_use(&self, id: &VersionId, now: Instant) -> bool {
        self.last_asked
            .get(id)
            .is_some_and(|t| now.duration_since(*t) < IN_USE_WINDOW)
    }

    /// How to answer `peer`'s request at `now` for chunk `index` of `v` (`None`: not held).
    pub(super) fn decide(
        &mut self,
        peer: PeerId,
        id: &VersionId,
        v: Option<Holding<'_>>,
        index: u32,
        now: Instant,
    ) -> Decision {
        let Some(v) = v.filter(|v| self.serves_holding(v) && v.have.get(index)) else {
            return Decision::NotFound;
        };
        if self.seeding_declines(id, &v, index) && self.first_decline(peer, *id, index, now) {
            return Decision::NotFound;
        }
        if self.in_flight.len() >= self.slots {
            let waiting = self.queue.iter().any(|(_, p)| *p == peer);
            return if self.queue.len() < self.queue_len && !waiting {
                Decision::Queue
            } else {
                Decision::Busy
            };
        }
        let r = chunk_range(v.total_size, v.chunk_size, index);
        if let Some(limiter) = self.limiter.as_mut() {
            if !limiter.try_take(r.end - r.start) {
                return Decision::Busy;
            }
        }
        Decision::Serve
    }

    /// Initial seeding, in the swarm stage: the publisher of a version sends no chunk a second
    /// time while another chunk has been sent fewer times, so that its upload goes to new
    /// pieces and fetchers get repeats from each other (BitTorrent's super-seeding).
    fn seeding_declines(&mut self, id: &VersionId, v: &Holding<'_>, index: u32) -> bool {
        if self.stage != Stage::Swarm || !v.published {
            return false;
        }
        let counts = self
            .seeded
            .entry(*id)
            .or_insert_with(|| vec![0; v.have.len() as usize]);
        let min = counts.iter().copied().min().unwrap_or(0);
        counts.get(index as usize).is_some_and(|c| *c > min)
    }

    /// Whether initial seeding may decline chunk `index` of `id` to `peer` now: only once per
    /// [`DECLINE_MEMORY`]. A peer that asks again found no other holder (the others left, or
    /// it already holds every chunk sent less often), and is served, so a download can never
    /// stall on a publisher that holds every chunk.
    fn first_decline(&mut self, peer: PeerId, id: VersionId, index: u32, now: Instant) -> bool {
        let key = (peer, id, index);
        if let Some(at) = self.declined.get(&key) {
            if now.duration_since(*at) < DECLINE_MEMORY {
                self.declined.remove(&key);
                return false;
            }
        }
        if self.declined.len() >= MAX_DECLINES {
            self.declined
                .retain(|_, at| now.duration_since(*at) < DECLINE_MEMORY);
            if self.declined.len() >= MAX_DECLINES {
                self.declined.clear();
            }
        }
        self.declined.insert(key, now);
        true
    }

    /// The chunk's bytes as sent: flipped every 4 KiB with the fault-injection setting.
    pub(super) fn prepare(&self, data: &mut [u8]) {
        if self.corrupt {
            data.iter_mut().step_by(4096).for_each(|b| *b ^= 0xff);
        }
    }

    /// Chunk `index` of `id` is to be served as the answer to `request` (after
    /// [`Decision::Serve`]): it holds an upload slot from now (while it is read and sent)
    /// until [`Uploads::finished`], and counts for initial seeding.
    pub(super) fn reserve(&mut self, id: VersionId, index: u32, request: R) {
        self.count_seeded(id, index);
        self.in_flight.insert(request);
    }

    /// Chunk `index` of `id` goes out once more (initial seeding's count).
    fn count_seeded(&mut self, id: VersionId, index: u32) {
        if let Some(c) = self
            .seeded
            .get_mut(&id)
            .and_then(|counts| counts.get_mut(index as usize))
        {
            *c += 1;
        }
    }

    /// `bytes` of a chunk of `id` went into a response.
    pub(super) fn sent(&mut self, id: VersionId, bytes: u64) {
        *self.uploaded.entry(id).or_default() += bytes;
    }

    /// `peer`'s request waits for a slot (after [`Decision::Queue`]).
    pub(super) fn enqueue(&mut self, request: R, peer: PeerId) {
        self.queue.push_back((request, peer));
    }

    /// A response finished sending (or failed, or a waiting request was dropped): its slot,
    /// if it held one, is free. Returns the waiting request that now takes a free slot, if
    /// any: the caller serves it (and calls [`Uploads::reserve`] for it).
    pub(super) fn finished(&mut self, request: R) -> Option<R> {
        self.in_flight.remove(&request);
        self.queue.retain(|(r, _)| *r != request);
        if self.in_flight.len() < self.slots {
            self.queue.pop_front().map(|(r, _)| r)
        } else {
            None
        }
    }

    /// Whether `request` holds an upload slot (a chunk being read or sent).
    pub(super) fn is_uploading(&self, request: &R) -> bool {
        self.in_flight.contains(request)
    }

    /// Upload slots not taken.
    pub(super) fn free_slots(&self) -> usize {
        self.slots.saturating_sub(self.in_flight.len())
    }

    /// Bytes of chunks of `id` sent to peers.
    pub(super) fn uploaded(&self, id: &VersionId) -> u64 {
        self.uploaded.get(id).copied().unwrap_or(0)
    }

    /// Forgets a deleted version.
    pub(super) fn forget(&mut self, id: &VersionId) {
        self.seeded.remove(id);
        self.declined.retain(|(_, v, _), _| v != id);
        self.last_asked.remove(id);
        self.uploaded.remove(id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;
    use crate::models::store::Store;

    /// A store holding one published version of 4 chunks of 4 KiB.
    fn published() -> (tempfile::TempDir, Store, VersionId) {
        let dir = tempfile::tempdir().unwrap();
        let len = 4 * 4096 - 64;
        let header =
            format!(r#"{{"w":{{"dtype":"U8","shape":[{len}],"data_offsets":[0,{len}]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + len, 7);
        let file = dir.path().join("m.safetensors");
        std::fs::write(&file, bytes).unwrap();
        let root = dir.path().join("models");
        let mut store = Store::open(&root).unwrap();
        let imported = Store::import_file(&root, &file, 4096).unwrap();
        let id = store
            .adopt(
                imported,
                crate::models::store::VersionClaims::first("m"),
                &libp2p::identity::Keypair::generate_ed25519(),
            )
            .unwrap();
        (dir, store, id)
    }

    /// Initial seeding declines a chunk already sent more often than another, but only once
    /// per peer: a peer that asks again (nobody else has it for it) is served, so a download
    /// cannot stall on a publisher holding every chunk.
    #[test]
    fn a_declined_chunk_is_served_when_the_same_peer_asks_again() {
        let (_dir, store, id) = published();
        let mut uploads: Uploads = Uploads::new(&ModelsConfig::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        let v = store.get(&id).map(Holding::of);
        assert_eq!(uploads.decide(a, &id, v, 0, now), Decision::Serve);
        uploads.count_seeded(id, 0);
        assert_eq!(
            uploads.decide(b, &id, v, 0, now),
            Decision::NotFound,
            "chunk 0 was sent once, others never: seeding declines it"
        );
        assert_eq!(uploads.decide(b, &id, v, 1, now), Decision::Serve);
        assert_eq!(
            uploads.decide(b, &id, v, 0, now),
            Decision::Serve,
            "asked again by the same peer"
        );
        let later = now + DECLINE_MEMORY;
        assert_eq!(uploads.decide(a, &id, v, 0, later), Decision::NotFound);
    }

    /// With a queue, a request beyond the slots waits (one per peer, as many as the queue
    /// holds) and takes the first slot that frees; without one it is answered "busy".
    #[test]
    fn a_queued_request_takes_the_next_free_slot() {
        let (_dir, store, id) = published();
        let config = ModelsConfig {
            max_uploads: 1,
            upload_queue: 1,
            ..ModelsConfig::default()
        };
        let mut uploads: Uploads<u32> = Uploads::new(&config);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let now = Instant::now();
        let v = store.get(&id).map(Holding::of);
        assert_eq!(uploads.decide(a, &id, v, 0, now), Decision::Serve);
        uploads.reserve(id, 0, 1);
        assert_eq!(uploads.decide(b, &id, v, 1, now), Decision::Queue);
        uploads.enqueue(2, b);
        assert_eq!(
            uploads.decide(b, &id, v, 2, now),
            Decision::Busy,
            "one per peer"
        );
        assert_eq!(
            uploads.decide(c, &id, v, 3, now),
            Decision::Busy,
            "queue full"
        );
        assert_eq!(
            uploads.finished(1),
            Some(2),
            "the waiting request goes next"
        );
        uploads.reserve(id, 1, 2);
        assert_eq!(uploads.finished(2), None);
        let mut unqueued: Uploads<u32> = Uploads::new(&ModelsConfig {
            max_uploads: 1,
            ..ModelsConfig::default()
        });
        uploads = Uploads::new(&config);
        uploads.reserve(id, 0, 1);
        uploads.enqueue(2, b);
        assert_eq!(
            uploads.finished(2),
            None,
            "a dropped waiting request leaves the queue"
        );
        assert_eq!(uploads.finished(1), None);
        unqueued.reserve(id, 0, 1);
        assert_eq!(unqueued.decide(b, &id, v, 1, now), Decision::Busy);
    }

    #[test]
    fn stages_serve_what_the_seed_design_says() {
        let rules = |stage| {
            let u: Uploads = Uploads::new(&ModelsConfig {
                stage,
                ..ModelsConfig::default()
            });
            [(true, false), (false, true), (false, false)].map(|(p, c)| u.serves(p, c))
        };
        assert_eq!(rules(Stage::Sequential), [true, false, false]);
        assert_eq!(rules(Stage::ParallelPush), [true, false, false]);
        assert_eq!(rules(Stage::HostAssisted), [true, true, false]);
        assert_eq!(rules(Stage::Coordinated), [true, true, true]);
        assert_eq!(rules(Stage::Swarm), [true, true, true]);
    }
}
