//! Availability long polling, free of I/O: an availability request (`Have`) may say how many
//! chunks its requester already knows this node to hold, and is then held until the answer
//! would tell it something: this node holds a different number of chunks, an upload slot
//! freed after this node answered the requester "busy" for want of one (or, when the refusal
//! was its upload rate cap's, a retry interval passed), or [`ModelsConfig::availability_wait`]
//! passed. Fetchers so learn of a neighbour's new chunk (and of its free slot) one latency
//! after it happens instead of at their next poll (200 ms apart): in the swarm simulator
//! this took 1,000 fetchers from 1.9x to 1.54x of the fluid bound, and on the 16-host
//! testnet from 3.1-3.3x to 2.8x (`testnet/RESULTS.md`). BitTorrent pushes `HAVE` messages on its peer connections for the
//! same reason; over request-response a held request is the push (HTTP long polling).
//!
//! The node and the swarm simulator ([`super::sim`]) both run these rules; `R` is what
//! answers a held request (libp2p's response channel, or the simulator's request number).
//!
//! [`ModelsConfig::availability_wait`]: super::ModelsConfig::availability_wait

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;
use p2p_protocol::manifest::{Hash32, VersionId};
use tokio::time::Instant;

/// Most availability requests held at once by one node; while it holds this many, new ones
/// are answered at once and the answers say it does not hold requests (so their requesters
/// poll, as without long polling): a crowd of requesters cannot pin unbounded state.
pub const MAX_HELD: usize = 1024;

/// Most peers remembered as refused "busy" (each is woken by one freed slot).
const MAX_BUSY_MARKS: usize = 1024;

/// What a node can tell a requester when its availability request arrives.
#[derive(Debug, Clone, Copy)]
pub(super) struct Standing {
    /// Chunks of the version it holds.
    pub chunks: u32,
    /// Its upload slots not taken.
    pub free_slots: usize,
}

/// Why a peer was answered "busy", and so what wakes its held requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Busy {
    /// Every upload slot was taken (at this instant): the next freed slot.
    NoSlot(Instant),
    /// A slot was free but the upload rate cap refused: this instant.
    RetryAt(Instant),
}

/// An availability request being held.
#[derive(Debug)]
struct Held<R> {
    /// How many chunks the requester knows this node to hold.
    known: u32,
    since: Instant,
    answer: R,
}

/// The availability requests a node holds, and the peers it answered "busy".
#[derive(Debug)]
pub(super) struct HaveWaits<R> {
    /// The longest a request is held (zero: none is held).
    wait: Duration,
    /// At most one per (requester, version): a newer one replaces it. Ordered maps, so that
    /// the simulator's runs are the same for the same seed.
    held: BTreeMap<(PeerId, VersionId), Held<R>>,
    /// Peers answered "busy" since their last wake-up, and why.
    busy: BTreeMap<PeerId, Busy>,
}

impl<R> HaveWaits<R> {
    /// Requests are held for at most `wait` (zero: never held).
    pub(super) fn new(wait: Duration) -> Self {
        Self {
            wait,
            held: BTreeMap::new(),
            busy: BTreeMap::new(),
        }
    }

    /// Whether this node holds requests at all (and says so in its answers).
    pub(super) fn enabled(&self) -> bool {
        !self.wait.is_zero()
    }

    /// Whether a request arriving now could be held: answers say so (`holds`), and requesters
    /// that are told no poll every `have_refresh` instead of asking again at once.
    pub(super) fn accepting(&self) -> bool {
        self.enabled() && self.held.len() < MAX_HELD
    }

    /// Requests held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }

    /// `peer` asks at `now` which chunks of `id` this node holds, knowing `known` of them
    /// (`None`: it does not ask to wait); `standing` is what this node holds of it and its
    /// free upload slots. Returns the answers to send now: `answer` itself unless
    /// it is held, and the older request of the same peer for `id` that it replaces.
    pub(super) fn arrive(
        &mut self,
        peer: PeerId,
        id: VersionId,
        known: Option<u32>,
        answer: R,
        standing: Standing,
        now: Instant,
    ) -> Vec<R> {
        let (count, free_slots) = (standing.chunks, standing.free_slots);
        let mut now_out = Vec::new();
        if let Some(older) = self.held.remove(&(peer, id)) {
            now_out.push(older.answer);
        }
        let woken = match self.busy.get(&peer) {
            Some(Busy::NoSlot(_)) => free_slots > 0,
            Some(Busy::RetryAt(at)) => now >= *at,
            None => false,
        };
        let hold = self.enabled() && known == Some(count) && !woken && self.held.len() < MAX_HELD;
        if hold {
            self.held.insert(
                (peer, id),
                Held {
                    known: count,
                    since: now,
                    answer,
                },
            );
        } else {
            if woken {
                self.busy.remove(&peer);
            }
            now_out.push(answer);
        }
        now_out
    }

    /// This node now holds `count` chunks of `id`: the requests that knew another number are
    /// answered.
    pub(super) fn chunks_changed(&mut self, id: &VersionId, count: u32) -> Vec<R> {
        self.take(|(_, v), h| v == id && h.known != count)
            .into_iter()
            .map(|(_, answer)| answer)
            .collect()
    }

    /// `peer` was answered "busy" at `now`, with `free_slots` upload slots free: none free,
    /// the next freed slot wakes it; else the refusal was the upload rate cap's, and its held
    /// requests are answered `retry` later (as a peer that polls would ask again).
    pub(super) fn refused_busy(
        &mut self,
        peer: PeerId,
        free_slots: usize,
        retry: Duration,
        now: Instant,
    ) {
        if !self.enabled() {
            return;
        }
        if self.busy.len() >= MAX_BUSY_MARKS && !self.busy.contains_key(&peer) {
            // Forget the oldest mark: its peer's request is answered within `wait` anyway.
            if let Some(oldest) = self.busy.iter().min_by_key(|(_, b)| **b).map(|(p, _)| *p) {
                self.busy.remove(&oldest);
            }
        }
        let mark = if free_slots == 0 {
            Busy::NoSlot(now)
        } else {
            Busy::RetryAt(now + retry)
        };
        self.busy.insert(peer, mark);
    }

    /// An upload slot freed: the peer answered "busy" for want of a slot longest ago that has
    /// a request held is answered, with every version it asked about.
    pub(super) fn slot_freed(&mut self) -> Vec<(VersionId, R)> {
        let longest = self
            .busy
            .iter()
            .filter(|(p, _)| self.holds_any(p))
            .filter_map(|(p, b)| match b {
                Busy::NoSlot(t) => Some((*t, *p)),
                Busy::RetryAt(_) => None,
            })
            .min();
        let Some((_, peer)) = longest else {
            return Vec::new();
        };
        self.busy.remove(&peer);
        self.take_peer(peer)
    }

    /// Whether a request of `peer` is held (a range lookup: the map is ordered by peer).
    fn holds_any(&self, peer: &PeerId) -> bool {
        let first = (*peer, Hash32([0; 32]));
        self.held
            .range(first..)
            .next()
            .is_some_and(|((p, _), _)| p == peer)
    }

    /// Removes and returns `peer`'s held requests.
    fn take_peer(&mut self, peer: PeerId) -> Vec<(VersionId, R)> {
        self.take(|(p, _), _| *p == peer)
            .into_iter()
            .map(|((_, id), answer)| (id, answer))
            .collect()
    }

    /// The requests to answer at `now` as they stand: those held for [`Self::new`]'s `wait`,
    /// and those of peers refused by the rate cap whose retry time came. Marks of peers
    /// refused for want of a slot that `wait` ago are dropped.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<(VersionId, R)> {
        let wait = self.wait;
        let retry: Vec<PeerId> = self
            .busy
            .iter()
            .filter(|(_, b)| matches!(b, Busy::RetryAt(at) if now >= *at))
            .map(|(p, _)| *p)
            .collect();
        let mut out = Vec::new();
        for peer in retry {
            self.busy.remove(&peer);
            out.extend(self.take_peer(peer));
        }
        self.busy.retain(|_, b| match b {
            Busy::NoSlot(t) => now.duration_since(*t) < wait,
            Busy::RetryAt(_) => true,
        });
        out.extend(
            self.take(|_, h| now.duration_since(h.since) >= wait)
                .into_iter()
                .map(|((_, id), answer)| (id, answer)),
        );
        out
    }

    /// Every request held about `id` (the version was deleted).
    pub(super) fn forget_version(&mut self, id: &VersionId) -> Vec<R> {
        self.take(|(_, v), _| v == id)
            .into_iter()
            .map(|(_, answer)| answer)
            .collect()
    }

    /// Every request held (this node goes away).
    pub(super) fn drain(&mut self) -> Vec<R> {
        std::mem::take(&mut self.held)
            .into_values()
            .map(|h| h.answer)
            .collect()
    }

    /// `peer`'s connections closed: its held requests are dropped unanswered.
    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
        self.busy.remove(peer);
        self.held.retain(|(p, _), _| p != peer);
    }

    /// Removes and returns the held requests that `which` selects.
    fn take(
        &mut self,
        which: impl Fn(&(PeerId, VersionId), &Held<R>) -> bool,
    ) -> Vec<((PeerId, VersionId), R)> {
        let keys: Vec<(PeerId, VersionId)> = self
            .held
            .iter()
            .filter(|(k, h)| which(k, h))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.held.remove(&k).map(|h| (k, h.answer)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);
    const RETRY: Duration = Duration::from_millis(200);

    fn st(chunks: u32, free_slots: usize) -> Standing {
        Standing { chunks, free_slots }
    }

    fn setup() -> (HaveWaits<u32>, PeerId, PeerId, VersionId, Instant) {
        (
            HaveWaits::new(WAIT),
            PeerId::random(),
            PeerId::random(),
            Hash32([1; 32]),
            Instant::now(),
        )
    }

    /// A request that knows what this node holds waits for a new chunk; one that knows
    /// another number, or does not ask to wait, is answered at once.
    #[test]
    fn a_request_waits_until_the_node_holds_a_new_chunk() {
        let (mut w, a, b, id, now) = setup();
        assert_eq!(
            w.arrive(a, id, Some(3), 1, st(3, 0), now),
            Vec::<u32>::new()
        );
        assert_eq!(w.arrive(b, id, Some(2), 2, st(3, 0), now), vec![2], "stale");
        assert_eq!(w.arrive(b, id, None, 3, st(3, 0), now), vec![3], "no wait");
        assert_eq!(w.len(), 1);
        assert!(w.chunks_changed(&Hash32([2; 32]), 4).is_empty(), "other id");
        assert_eq!(w.chunks_changed(&id, 4), vec![1]);
        assert_eq!(w.len(), 0);
    }

    /// A second request of the same peer for the same version replaces the first, which is
    /// answered; no request is held for longer than the wait.
    #[test]
    fn requests_are_replaced_and_expire() {
        let (mut w, a, b, id, now) = setup();
        w.arrive(a, id, Some(0), 1, st(0, 0), now);
        assert_eq!(w.arrive(a, id, Some(0), 2, st(0, 0), now), vec![1]);
        w.arrive(b, id, Some(0), 3, st(0, 0), now + WAIT / 2);
        assert!(w.expired(now + WAIT / 2).is_empty());
        assert_eq!(w.expired(now + WAIT), vec![(id, 2)]);
        assert_eq!(w.expired(now + WAIT + WAIT / 2), vec![(id, 3)]);
    }

    /// A freed slot wakes only peers that were answered "busy", longest ago first and one per
    /// free slot; a busy peer whose request arrives while a slot is free is answered at once.
    #[test]
    fn a_freed_slot_wakes_the_peer_refused_longest_ago() {
        let (mut w, a, b, id, now) = setup();
        let c = PeerId::random();
        for (peer, answer) in [(a, 1), (b, 2), (c, 3)] {
            w.arrive(peer, id, Some(5), answer, st(5, 0), now);
        }
        w.refused_busy(b, 0, RETRY, now);
        w.refused_busy(a, 0, RETRY, now + Duration::from_millis(1));
        assert_eq!(w.slot_freed(), vec![(id, 2)]);
        assert_eq!(w.slot_freed(), vec![(id, 1)]);
        assert!(w.slot_freed().is_empty(), "c was never refused");
        w.refused_busy(a, 0, RETRY, now);
        assert_eq!(w.arrive(a, id, Some(5), 4, st(5, 1), now), vec![4]);
        assert_eq!(
            w.arrive(a, id, Some(5), 5, st(5, 1), now),
            Vec::<u32>::new()
        );
    }

    /// A refusal by the rate cap (a slot was free) is not ended by a freed slot but by the
    /// retry interval, so a rate-capped uploader is not asked again at every response it
    /// sends.
    #[test]
    fn a_rate_cap_refusal_wakes_the_peer_after_the_retry_interval() {
        let (mut w, a, _, id, now) = setup();
        w.arrive(a, id, Some(5), 1, st(5, 2), now);
        w.refused_busy(a, 2, RETRY, now);
        assert!(w.slot_freed().is_empty());
        assert!(w.expired(now + RETRY / 2).is_empty());
        assert_eq!(w.expired(now + RETRY), vec![(id, 1)]);
        w.refused_busy(a, 2, RETRY, now);
        assert_eq!(
            w.arrive(a, id, Some(5), 2, st(5, 2), now),
            Vec::<u32>::new()
        );
        assert_eq!(
            w.arrive(a, id, Some(5), 3, st(5, 2), now + RETRY),
            vec![2, 3]
        );
    }

    /// With no wait configured nothing is held, and the number held is bounded.
    #[test]
    fn holding_is_off_at_zero_and_bounded() {
        let (_, a, _, id, now) = setup();
        let mut off: HaveWaits<u32> = HaveWaits::new(Duration::ZERO);
        assert!(!off.accepting());
        assert_eq!(off.arrive(a, id, Some(1), 1, st(1, 0), now), vec![1]);
        let mut w: HaveWaits<usize> = HaveWaits::new(WAIT);
        w.arrive(a, id, Some(0), 0, st(0, 0), now);
        for i in 1..MAX_HELD {
            assert!(w
                .arrive(PeerId::random(), id, Some(0), i, st(0, 0), now)
                .is_empty());
        }
        assert!(!w.accepting(), "full: answers say so, and requesters poll");
        let over = w.arrive(PeerId::random(), id, Some(0), MAX_HELD, st(0, 0), now);
        assert_eq!(over, vec![MAX_HELD], "answered at once");
        assert_eq!(w.len(), MAX_HELD);
        w.peer_gone(&a);
        assert_eq!(w.len(), MAX_HELD - 1);
        assert!(w.accepting());
        assert_eq!(w.forget_version(&id).len(), MAX_HELD - 1);
    }
}
