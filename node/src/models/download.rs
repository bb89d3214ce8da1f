//! One version's download as a state machine without I/O: it is told what happened (a peer
//! came or went, a manifest, an availability bitfield, a verified or written chunk) and, when
//! polled with the current time, says what to do next as `Step`s (ask a peer for the
//! manifest, its availability or a chunk; look up providers; sync; complete). The models
//! behaviour carries the steps out; the tests here drive it by hand, with explicit instants.
//!
//! Its timers: providers are looked up every `provider_refresh`; a peer that holds
//! availability requests (long polling, [`super::have_wait`]) is asked again as soon as it
//! answers, telling it how many chunks it last said it held, and any other peer's availability
//! is asked every `have_refresh`; the manifest is asked of one peer at a time, in rounds at
//! least `MANIFEST_RETRY` apart. Chunk requests come from the [`Picker`] (rarest first, at
//! most `max_requests_per_peer` per peer, endgame duplicates), and stop while
//! `MAX_PENDING_WRITES` verified chunks wait for the disk.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::PeerId;
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::manifest::VersionId;
use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::picker::Picker;
use super::report::{DownloadReport, DownloadState, FetchProgress};
use super::store::StoredVersion;
use super::ModelsConfig;

/// Verified chunks of one download waiting for the disk, at most; beyond it no new chunk is
/// requested until writes catch up, so memory stays bounded whatever the model's size.
pub(super) const MAX_PENDING_WRITES: usize = 32;

/// How long before peers that could not give a manifest are asked again.
pub(super) const MANIFEST_RETRY: Duration = Duration::from_secs(2);

/// What to ask a peer about the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    /// Its manifest.
    Manifest,
    /// Which chunks it holds; `known`: hold the answer until it holds another number of
    /// chunks (long polling), `None`: answer at once.
    Have {
        /// How many chunks the peer said it held in its last answer.
        known: Option<u32>,
    },
    /// One chunk.
    Chunk(u32),
}

/// What the download needs done next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Look up the version's providers in the DHT.
    FindProviders,
    /// Send a request to a peer.
    Ask(PeerId, Ask),
    /// Every chunk is written: make them durable.
    Sync,
    /// Every chunk is written and durable: the download is complete.
    Complete,
}

/// What the disk holds of the version, when the download is polled.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct OnDisk {
    /// Every chunk written.
    pub complete: bool,
    /// Every written chunk synced.
    pub durable: bool,
}

/// Where a finished download's result goes.
pub(super) type Waiter = oneshot::Sender<Result<DownloadReport, super::Error>>;

/// A download in progress.
pub(super) struct Download {
    /// Set once the manifest is held.
    picker: Option<Picker<PeerId>>,
    /// Peers to ask (connected peers, providers, the publisher).
    candidates: HashSet<PeerId>,
    /// Peers dropped for sending bad data; never asked again for this version.
    banned: HashSet<PeerId>,
    have_pending: HashSet<PeerId>,
    last_have: HashMap<PeerId, Instant>,
    /// Peers that hold availability requests (long polling), and how many chunks each said
    /// it held in its last answer. One is asked again as soon as it answers, also when the
    /// answer tells nothing new (a slot it freed, its wait over): a 50 ms pause after such
    /// answers took the 8-host testnet from 1.45-1.58x to 1.81-1.87x of the bound, since the
    /// publisher's answers are all of that kind. A peer that answers at once is so asked at
    /// its own answer rate (each ask costs it an answer), and a peer whose table is full says
    /// it does not hold, and is polled.
    holds: HashMap<PeerId, u32>,
    manifest_asked: HashSet<PeerId>,
    /// The peer asked for the manifest now, if any (one at a time).
    manifest_from: Option<PeerId>,
    manifest_round: Instant,
    last_provider_query: Option<Instant>,
    /// The peer that published the version, if known.
    pub publisher: Option<PeerId>,
    started: Instant,
    chunks_downloaded: u32,
    chunks_copied: u32,
    chunks_resumed: u32,
    senders: HashSet<PeerId>,
    writes_pending: usize,
    /// Who waits for the result.
    pub waiters: Vec<Waiter>,
    /// Peers known to hold the version: its publisher, Kademlia providers, peers that said
    /// they hold chunks of it.
    holders: HashSet<PeerId>,
    /// The last request of this download that failed, and why.
    pub last_failure: Option<String>,
    /// When the last chunk arrived from a peer.
    last_chunk: Option<Instant>,
    /// Where progress goes as the download moves.
    pub progress: Vec<watch::Sender<FetchProgress>>,
}

impl Download {
    /// A download started at `now`, of a version published by `publisher` if known.
    pub(super) fn new(publisher: Option<PeerId>, now: Instant) -> Self {
        Self {
            picker: None,
            candidates: HashSet::new(),
            banned: HashSet::new(),
            have_pending: HashSet::new(),
            last_have: HashMap::new(),
            holds: HashMap::new(),
            manifest_asked: HashSet::new(),
            manifest_from: None,
            manifest_round: now,
            last_provider_query: None,
            publisher,
            started: now,
            chunks_downloaded: 0,
            chunks_copied: 0,
            chunks_resumed: 0,
            senders: HashSet::new(),
            writes_pending: 0,
            waiters: Vec::new(),
            holders: publisher.into_iter().collect(),
            last_failure: None,
            last_chunk: None,
            progress: Vec::new(),
        }
    }

    /// The manifest is held: chunks are scheduled from `picker` (built on what is held now,
    /// of which `resumed` were on disk already and `copied` copied from other versions).
    pub(super) fn start(&mut self, picker: Picker<PeerId>, resumed: u32, copied: u32) {
        self.picker = Some(picker);
        self.chunks_resumed = resumed;
        self.chunks_copied = copied;
    }

    /// Whether the manifest is held.
    pub(super) fn has_manifest(&self) -> bool {
        self.picker.is_some()
    }

    /// The chunk scheduler, once the manifest is held.
    pub(super) fn picker_mut(&mut self) -> Option<&mut Picker<PeerId>> {
        self.picker.as_mut()
    }

    /// Peers the picker knows availability of.
    pub(super) fn peers_serving(&self) -> usize {
        self.picker.as_ref().map_or(0, |p| p.peers().count())
    }

    /// Peers dropped for bad data.
    pub(super) fn banned(&self) -> impl Iterator<Item = &PeerId> {
        self.banned.iter()
    }

    /// `peer` may hold the version (connected, or a candidate by other means).
    pub(super) fn add_candidate(&mut self, peer: PeerId) -> bool {
        !self.banned.contains(&peer) && self.candidates.insert(peer)
    }

    /// `peer` is known to hold the version (a DHT provider, its publisher): it is asked, and
    /// counted as a holder. Returns whether it is new.
    pub(super) fn add_holder(&mut self, peer: PeerId) -> bool {
        if self.banned.contains(&peer) {
            return false;
        }
        self.holders.insert(peer);
        self.candidates.insert(peer)
    }

    /// The last connection to `peer` closed.
    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
        self.candidates.remove(peer);
        self.have_pending.remove(peer);
        self.holds.remove(peer);
        self.manifest_asked.remove(peer);
        if let Some(p) = self.picker.as_mut() {
            p.remove_peer(peer);
        }
    }

    /// The manifest request to `peer` ended (answered, refused, failed or cancelled). A peer
    /// that had no manifest stays a candidate: it may be downloading the version too, and is
    /// asked for its chunks once this node has the manifest.
    pub(super) fn manifest_request_ended(&mut self, peer: &PeerId) {
        if self.manifest_from == Some(*peer) {
            self.manifest_from = None;
        }
    }

    /// `peer` holds `bitfield` of the version (`None`: it did not say, or not sensibly; then
    /// it is not asked for chunks until it does), and `holds` availability requests (long
    /// polling: it is asked again at once) or not (asked every `have_refresh`).
    /// `portion` is stage 4's `(index, count)`: from the publisher, only chunks
    /// `i % count == index` are taken.
    pub(super) fn on_have(
        &mut self,
        peer: PeerId,
        bitfield: Option<Bitfield>,
        holds: bool,
        portion: Option<(u32, u32)>,
    ) {
        self.have_pending.remove(&peer);
        self.holds.remove(&peer);
        if self.banned.contains(&peer) || !self.candidates.contains(&peer) {
            return; // dropped, or gone while the answer was on its way
        }
        let Some(picker) = self.picker.as_mut() else {
            return;
        };
        let len = picker.have().len();
        let Some(mut bits) = bitfield.filter(|b| b.is_well_formed() && b.len() == len) else {
            // Not in this version's swarm (or no sensible answer): not counted among the
            // peers the requests are spread over.
            picker.forget_availability(&peer);
            return;
        };
        if holds {
            self.holds.insert(peer, bits.count());
        }
        if bits.count() > 0 {
            self.holders.insert(peer);
        }
        if let (Some((index, count)), Some(publisher)) = (portion, self.publisher) {
            if publisher == peer && count > 0 {
                let mut mine = Bitfield::new(len);
                bits.ones()
                    .filter(|i| i % count == index)
                    .for_each(|i| mine.set(i));
                bits = mine;
            }
        }
        picker.set_availability(peer, bits);
    }

    /// `peer` said it published the version; in the swarm stage (`last_resort`) it is asked
    /// for a chunk only when no other holder has a free slot.
    pub(super) fn on_publisher(&mut self, peer: PeerId, last_resort: bool) {
        self.publisher.get_or_insert(peer);
        if let (true, Some(p)) = (last_resort, self.picker.as_mut()) {
            p.set_last_resort(peer);
        }
    }

    /// `peer` answered "not found" for chunk `index`: it is not asked for it again until its
    /// next availability says it holds it.
    pub(super) fn chunk_not_found(&mut self, peer: &PeerId, index: u32) {
        if let Some(p) = self.picker.as_mut() {
            p.peer_lacks(peer, index);
        }
    }

    /// `peer` answered "busy" for chunk `index`: the chunk goes back, and the peer is not asked
    /// for anything until its next availability refresh.
    pub(super) fn chunk_busy(&mut self, peer: PeerId, index: u32) {
        if let Some(p) = self.picker.as_mut() {
            p.request_failed(&peer, index);
            let len = p.have().len();
            p.set_availability(peer, Bitfield::new(len));
        }
    }

    /// Whether chunk `index` is held or on its way to the disk.
    pub(super) fn has_chunk(&self, index: u32) -> bool {
        self.picker.as_ref().is_some_and(|p| p.have().get(index))
    }

    /// Chunk `index` arrived from `peer` and goes to the disk writer, which verifies it.
    /// Returns the peers also asked for it (endgame), whose answers are to be dropped.
    pub(super) fn chunk_arrived(&mut self, peer: PeerId, index: u32) -> Vec<PeerId> {
        self.writes_pending += 1;
        self.picker
            .as_mut()
            .map(|p| p.chunk_received(&peer, index))
            .unwrap_or_default()
    }

    /// Chunk `index` from `peer` was verified and written at `now` (`ok`), or did not match
    /// its hash or could not be written: then it is asked for again.
    pub(super) fn chunk_written(&mut self, index: u32, peer: PeerId, ok: bool, now: Instant) {
        self.writes_pending = self.writes_pending.saturating_sub(1);
        if ok {
            self.chunks_downloaded += 1;
            self.last_chunk = Some(now);
            self.senders.insert(peer);
        } else if let Some(p) = self.picker.as_mut() {
            p.chunk_lost(index);
        }
    }

    /// Whether `peer` was dropped for bad data.
    pub(super) fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains(peer)
    }

    /// Drops `peer` for this version: it sent data that does not match its hash.
    pub(super) fn ban(&mut self, peer: PeerId) {
        self.banned.insert(peer);
        self.candidates.remove(&peer);
        self.holds.remove(&peer);
        if let Some(p) = self.picker.as_mut() {
            p.remove_peer(&peer);
        }
    }

    /// What to do next, at `now`, with the disk as `disk` says.
    pub(super) fn poll(
        &mut self,
        now: Instant,
        config: &ModelsConfig,
        disk: OnDisk,
        rng: &mut impl Rng,
    ) -> Vec<Step> {
        let mut steps = Vec::new();
        if self
            .last_provider_query
            .is_none_or(|t| now.duration_since(t) >= config.provider_refresh)
        {
            self.last_provider_query = Some(now);
            steps.push(Step::FindProviders);
        }
        let Some(picker) = self.picker.as_mut() else {
            // Ask one new peer at a time for the manifest: the publisher first, then other
            // known holders, then any candidate.
            if self.manifest_from.is_none() {
                let mut fresh: Vec<PeerId> = self
                    .candidates
                    .iter()
                    .filter(|p| !self.manifest_asked.contains(p) && !self.banned.contains(p))
                    .copied()
                    .collect();
                fresh.sort_by_key(|p| (self.publisher != Some(*p), !self.holders.contains(p), *p));
                let next = fresh.first().copied();
                if next.is_none() && now.duration_since(self.manifest_round) >= MANIFEST_RETRY {
                    // Every candidate was asked and none answered: start a new round, since
                    // peers that had no copy or were unreachable may have one now.
                    self.manifest_asked.clear();
                    self.manifest_round = now;
                }
                if let Some(peer) = next {
                    self.manifest_asked.insert(peer);
                    self.manifest_from = Some(peer);
                    steps.push(Step::Ask(peer, Ask::Manifest));
                }
            }
            return steps;
        };
        let long_poll = !config.availability_wait.is_zero();
        let mut due: Vec<(PeerId, Option<u32>)> = self
            .candidates
            .iter()
            .filter(|p| !self.have_pending.contains(p) && !self.banned.contains(p))
            .filter_map(|p| match self.holds.get(p) {
                Some(known) if long_poll => Some((*p, Some(*known))),
                _ => self
                    .last_have
                    .get(p)
                    .is_none_or(|t| now.duration_since(*t) >= config.have_refresh)
                    .then_some((*p, None)),
            })
            .collect();
        due.sort();
        for (peer, known) in due {
            self.have_pending.insert(peer);
            self.last_have.insert(peer, now);
            steps.push(Step::Ask(peer, Ask::Have { known }));
        }
        if self.writes_pending < MAX_PENDING_WRITES {
            for (peer, index) in picker.next_requests(rng) {
                steps.push(Step::Ask(peer, Ask::Chunk(index)));
            }
        }
        if self.writes_pending == 0 && disk.complete && picker.is_complete() {
            // Complete means durable: the last sync runs off the event loop, and its end
            // polls the download again.
            steps.push(if disk.durable {
                Step::Complete
            } else {
                Step::Sync
            });
        }
        steps
    }

    /// How far the download is, with `v` the stored version (`None`: no manifest yet).
    pub(super) fn progress(&self, v: Option<&StoredVersion>) -> FetchProgress {
        let Some(v) = v else {
            return FetchProgress::default();
        };
        let (held, chunks) = (v.have.count(), v.manifest.chunk_count());
        FetchProgress {
            chunks_held: held,
            chunks,
            bytes_held: (u64::from(held) * u64::from(v.manifest.chunk_size))
                .min(v.manifest.total_size),
            size: v.manifest.total_size,
            peers: self.peers_serving(),
        }
    }

    /// Sends the progress to its watchers (those still listening), if it changed.
    pub(super) fn report_progress(&mut self, v: Option<&StoredVersion>) {
        if self.progress.is_empty() {
            return;
        }
        let progress = self.progress(v);
        self.progress.retain(|tx| !tx.is_closed());
        for tx in &self.progress {
            tx.send_if_modified(|p| std::mem::replace(p, progress) != progress);
        }
    }

    /// Where the download stands at `now`, to explain why it does not finish.
    pub(super) fn state(&self, v: Option<&StoredVersion>, now: Instant) -> DownloadState {
        DownloadState {
            manifest: self.picker.is_some(),
            chunks_held: v.map_or(0, |v| v.have.count()),
            chunks: v.map_or(0, |v| v.manifest.chunk_count()),
            holders: self.holders.len(),
            last_failure: self.last_failure.clone(),
            seconds_since_chunk: self.last_chunk.map(|t| now.duration_since(t).as_secs_f64()),
        }
    }

    /// The report of the finished download of `id` (stored as `v`) at `now`.
    pub(super) fn report(&self, id: &VersionId, v: &StoredVersion, now: Instant) -> DownloadReport {
        DownloadReport {
            id: id.to_hex(),
            model: v.manifest.model.clone(),
            version: v.manifest.version,
            size: v.manifest.total_size,
            chunks: v.manifest.chunk_count(),
            chunks_downloaded: self.chunks_downloaded,
            chunks_copied_locally: self.chunks_copied,
            chunks_resumed: self.chunks_resumed,
            peers_used: self.senders.len(),
            seconds: now.duration_since(self.started).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn peers(n: usize) -> Vec<PeerId> {
        let mut p: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        p.sort();
        p
    }

    fn poll(d: &mut Download, now: Instant, disk: OnDisk) -> Vec<Step> {
        d.poll(
            now,
            &ModelsConfig::default(),
            disk,
            &mut StdRng::seed_from_u64(1),
        )
    }

    fn asks(steps: &[Step], what: fn(&Ask) -> bool) -> Vec<PeerId> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Ask(p, a) if what(a) => Some(*p),
                _ => None,
            })
            .collect()
    }

    /// `d` with `peers` added as candidates, nothing heard from them yet.
    fn with_candidates(mut d: Download, peers: &[PeerId]) -> Download {
        for p in peers {
            d.add_candidate(*p);
        }
        d
    }

    /// A download of `chunks` chunks whose manifest is held, with `peers` candidates each
    /// holding every chunk.
    fn started(chunks: u32, peers: &[PeerId], now: Instant) -> Download {
        let mut d = Download::new(None, now);
        d.start(Picker::new(Bitfield::new(chunks), 4, 2), 0, 0);
        for p in peers {
            d.add_candidate(*p);
            let mut all = Bitfield::new(chunks);
            (0..chunks).for_each(|i| all.set(i));
            d.on_have(*p, Some(all), false, None);
        }
        d
    }

    #[test]
    fn the_manifest_is_asked_of_one_peer_at_a_time_and_again_after_a_pause() {
        let t0 = Instant::now();
        let p = peers(2);
        let mut d = with_candidates(Download::new(None, t0), &p);
        let first = poll(&mut d, t0, OnDisk::default());
        assert_eq!(first[0], Step::FindProviders);
        assert_eq!(asks(&first, |a| *a == Ask::Manifest), vec![p[0]]);
        assert!(asks(&poll(&mut d, t0, OnDisk::default()), |_| true).is_empty());
        d.manifest_request_ended(&p[0]);
        assert_eq!(
            asks(&poll(&mut d, t0, OnDisk::default()), |a| *a
                == Ask::Manifest),
            vec![p[1]]
        );
        d.manifest_request_ended(&p[1]);
        // Both asked: nobody until the round is over, then the first again.
        assert!(asks(&poll(&mut d, t0, OnDisk::default()), |_| true).is_empty());
        let later = t0 + MANIFEST_RETRY;
        assert!(asks(&poll(&mut d, later, OnDisk::default()), |_| true).is_empty());
        assert_eq!(
            asks(&poll(&mut d, later, OnDisk::default()), |a| *a
                == Ask::Manifest),
            vec![p[0]]
        );
    }

    /// The publisher is asked for the manifest before any other peer; a peer that had none
    /// (it is downloading too) stays a candidate and is asked for its chunks later.
    #[test]
    fn the_publisher_is_asked_first_and_a_peer_without_the_manifest_stays_a_candidate() {
        let t0 = Instant::now();
        let p = peers(3);
        let publisher = p[2];
        let mut d = with_candidates(Download::new(Some(publisher), t0), &p);
        let manifest = |a: &Ask| *a == Ask::Manifest;
        assert_eq!(
            asks(&poll(&mut d, t0, OnDisk::default()), manifest),
            vec![publisher]
        );
        d.manifest_request_ended(&publisher);
        assert_eq!(
            asks(&poll(&mut d, t0, OnDisk::default()), manifest),
            vec![p[0]]
        );
        // p[0] answered "not found"; then the manifest came from p[1].
        d.manifest_request_ended(&p[0]);
        d.start(Picker::new(Bitfield::new(4), 4, 2), 0, 0);
        let mut asked = asks(&poll(&mut d, t0, OnDisk::default()), |a| {
            matches!(a, Ask::Have { .. })
        });
        asked.sort();
        assert_eq!(
            asked, p,
            "every candidate is asked for its chunks, p[0] included"
        );
    }

    #[test]
    fn providers_are_looked_up_again_only_after_the_refresh_interval() {
        let t0 = Instant::now();
        let mut d = Download::new(None, t0);
        let refresh = ModelsConfig::default().provider_refresh;
        assert!(poll(&mut d, t0, OnDisk::default()).contains(&Step::FindProviders));
        let soon = t0 + refresh / 2;
        assert!(!poll(&mut d, soon, OnDisk::default()).contains(&Step::FindProviders));
        assert!(poll(&mut d, t0 + refresh, OnDisk::default()).contains(&Step::FindProviders));
    }

    #[test]
    fn availability_is_refreshed_per_peer_and_never_asked_of_a_banned_peer() {
        let t0 = Instant::now();
        let p = peers(2);
        let mut d = with_candidates(started(8, &[], t0), &p);
        assert_eq!(
            asks(&poll(&mut d, t0, OnDisk::default()), |a| matches!(
                a,
                Ask::Have { .. }
            )),
            p
        );
        // Answers pending: not asked again, even after the refresh interval.
        let refresh = ModelsConfig::default().have_refresh;
        assert!(asks(
            &poll(&mut d, t0 + refresh, OnDisk::default()),
            |a| matches!(a, Ask::Have { .. })
        )
        .is_empty());
        d.on_have(p[0], None, false, None);
        d.on_have(p[1], None, false, None);
        d.ban(p[1]);
        assert!(asks(&poll(&mut d, t0, OnDisk::default()), |a| matches!(
            a,
            Ask::Have { .. }
        ))
        .is_empty());
        assert_eq!(
            asks(
                &poll(&mut d, t0 + refresh, OnDisk::default()),
                |a| matches!(a, Ask::Have { .. })
            ),
            vec![p[0]]
        );
        assert!(!d.add_candidate(p[1]), "a banned peer came back");
    }

    /// A peer that holds availability requests is asked again as soon as it answers, with or
    /// without news, carrying the number of chunks it said it held; a peer that does not hold,
    /// or a node that does not long poll, waits for the refresh interval.
    #[test]
    fn a_peer_that_holds_requests_is_asked_again_at_once_with_what_it_said() {
        let t0 = Instant::now();
        let p = peers(2);
        let mut d = with_candidates(started(8, &[], t0), &p);
        let have = |d: &mut Download, at: Instant, config: &ModelsConfig| {
            d.poll(at, config, OnDisk::default(), &mut StdRng::seed_from_u64(1))
                .into_iter()
                .filter_map(|s| match s {
                    Step::Ask(p, Ask::Have { known }) => Some((p, known)),
                    _ => None,
                })
                .collect::<Vec<(PeerId, Option<u32>)>>()
        };
        let config = ModelsConfig::default();
        let soon = t0 + config.have_refresh / 2;
        assert_eq!(have(&mut d, t0, &config), vec![(p[0], None), (p[1], None)]);
        let bits = |n: u32| {
            let mut b = Bitfield::new(8);
            (0..n).for_each(|i| b.set(i));
            b
        };
        d.on_have(p[0], Some(bits(3)), true, None);
        d.on_have(p[1], Some(bits(3)), false, None);
        assert_eq!(have(&mut d, t0, &config), vec![(p[0], Some(3))]);
        d.on_have(p[0], Some(bits(4)), true, None);
        assert_eq!(have(&mut d, t0, &config), vec![(p[0], Some(4))], "news");
        d.on_have(p[0], Some(bits(4)), true, None);
        assert_eq!(
            have(&mut d, t0, &config),
            vec![(p[0], Some(4))],
            "nothing new (a freed slot): asked again at once too"
        );
        d.on_have(p[0], None, true, None);
        assert!(
            have(&mut d, soon, &config).is_empty(),
            "no sensible answer: polled"
        );
        d.on_have(p[0], Some(bits(3)), true, None);
        let polling = ModelsConfig {
            availability_wait: Duration::ZERO,
            ..ModelsConfig::default()
        };
        assert!(have(&mut d, soon, &polling).is_empty());
        d.peer_gone(&p[0]);
        d.add_candidate(p[0]);
        assert!(
            have(&mut d, soon, &config).is_empty(),
            "forgotten, asked at the refresh"
        );
        assert_eq!(
            have(&mut d, t0 + config.have_refresh, &config),
            vec![(p[0], None), (p[1], None)],
            "both polled at the refresh"
        );
    }

    #[test]
    fn no_chunk_is_asked_while_the_disk_is_behind() {
        let t0 = Instant::now();
        let p = peers(1);
        let mut d = started(100, &p, t0);
        for i in 0..MAX_PENDING_WRITES as u32 {
            d.chunk_arrived(p[0], i);
        }
        let chunk = |a: &Ask| matches!(a, Ask::Chunk(_));
        assert!(asks(&poll(&mut d, t0, OnDisk::default()), chunk).is_empty());
        d.chunk_written(0, p[0], true, t0);
        assert!(!asks(&poll(&mut d, t0, OnDisk::default()), chunk).is_empty());
    }

    #[test]
    fn a_complete_download_is_synced_before_it_completes() {
        let t0 = Instant::now();
        let p = peers(1);
        let mut d = started(2, &p, t0);
        for i in 0..2 {
            d.chunk_arrived(p[0], i);
        }
        let written = OnDisk {
            complete: true,
            durable: false,
        };
        assert!(
            !poll(&mut d, t0, written).contains(&Step::Sync),
            "writes still pending"
        );
        d.chunk_written(0, p[0], true, t0);
        d.chunk_written(1, p[0], true, t0);
        assert!(poll(&mut d, t0, written).contains(&Step::Sync));
        let durable = OnDisk {
            complete: true,
            durable: true,
        };
        assert!(poll(&mut d, t0, durable).contains(&Step::Complete));
    }

    #[test]
    fn a_failed_write_asks_for_the_chunk_again() {
        let t0 = Instant::now();
        let p = peers(1);
        let mut d = started(1, &p, t0);
        d.chunk_arrived(p[0], 0);
        assert!(d.has_chunk(0));
        d.chunk_written(0, p[0], false, t0);
        assert!(!d.has_chunk(0));
        assert!(
            asks(&poll(&mut d, t0, OnDisk::default()), |a| *a
                == Ask::Chunk(0))
                == p
        );
    }

    /// Peers outside the version's swarm ("not found" for the version) do not count among
    /// those the requests in flight are spread over, and a late answer of a peer that is gone
    /// does not bring it back.
    #[test]
    fn peers_without_the_version_do_not_narrow_the_pipeline_to_the_holder() {
        let t0 = Instant::now();
        let p = peers(5);
        let mut d = with_candidates(Download::new(Some(p[0]), t0), &p);
        d.start(
            Picker::new(Bitfield::new(16), 4, 1).with_max_in_flight(4),
            0,
            0,
        );
        d.on_have(p[0], Some(Bitfield::full(16)), false, None);
        for other in &p[1..] {
            d.on_have(*other, None, false, None);
        }
        d.peer_gone(&p[4]);
        d.on_have(p[4], Some(Bitfield::new(16)), false, None);
        let chunk = |a: &Ask| matches!(a, Ask::Chunk(_));
        assert_eq!(
            asks(&poll(&mut d, t0, OnDisk::default()), chunk),
            vec![p[0]; 4],
            "the only holder gets the whole pipeline"
        );
    }

    #[test]
    fn in_the_coordinated_stage_only_the_own_portion_is_taken_from_the_publisher() {
        let t0 = Instant::now();
        let p = peers(1);
        let mut d = Download::new(Some(p[0]), t0);
        d.add_candidate(p[0]);
        d.start(Picker::new(Bitfield::new(6), 8, 1), 0, 0);
        let mut all = Bitfield::new(6);
        (0..6).for_each(|i| all.set(i));
        d.on_have(p[0], Some(all), false, Some((1, 3)));
        let mut asked: Vec<u32> = poll(&mut d, t0, OnDisk::default())
            .iter()
            .filter_map(|s| match s {
                Step::Ask(_, Ask::Chunk(i)) => Some(*i),
                _ => None,
            })
            .collect();
        asked.sort();
        assert_eq!(asked, vec![1, 4]);
    }
}
