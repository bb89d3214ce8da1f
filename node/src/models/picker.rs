//! [`Picker`]: which chunk to ask of which peer, for one version being downloaded. Pure
//! scheduling, no I/O, generic over the peer type so property tests can drive it.
//!
//! * **Rarest first**: among chunks not held and not in flight, those held by the fewest known
//!   peers go first, in random order among equals, so that rare chunks spread before their
//!   holders leave and peers do not all ask for the same chunk.
//! * **Per-peer cap**: at most `max_per_peer` requests in flight to one peer; among peers that
//!   have a chunk, the least loaded is asked (random among equals).
//! * **Total cap**: at most `max_in_flight` requests in flight in all, so a fetcher's download
//!   link carries a few chunks at a time and each one arrives early enough to be passed on
//!   (dozens at once make every chunk late; see `testnet/RESULTS.md`).
//! * **Endgame**: once every missing chunk is in flight, a chunk may be asked of up to
//!   `endgame_copies` peers at once; the first answer wins and the others are cancelled.
//! * **Last resort**: peers marked so (the publisher) are asked only when no other holder of
//!   the chunk has a free slot.
//! * A failed or timed-out request puts its chunk back; a peer that leaves (or is dropped for
//!   sending bad data) gives back all its chunks.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use p2p_protocol::bitfield::Bitfield;
use rand::seq::SliceRandom;
use rand::Rng;

/// Chunk scheduling state of one download.
#[derive(Debug, Clone)]
pub struct Picker<P> {
    have: Bitfield,
    availability: HashMap<P, Bitfield>,
    /// How many known peers hold each chunk.
    holders: Vec<u32>,
    /// Peers asked for each chunk in flight.
    in_flight: HashMap<u32, Vec<P>>,
    /// Requests in flight per peer.
    load: HashMap<P, usize>,
    /// Requests in flight in all (the sum of `load`).
    total: usize,
    max_per_peer: usize,
    max_in_flight: usize,
    endgame_copies: usize,
    /// Peers asked only when no other holder has a free slot.
    last_resort: HashSet<P>,
}

impl<P: Clone + Eq + Hash + Ord> Picker<P> {
    /// A picker for a version of `have.len()` chunks, of which `have` are already held.
    pub fn new(have: Bitfield, max_per_peer: usize, endgame_copies: usize) -> Self {
        Self {
            holders: vec![0; have.len() as usize],
            have,
            availability: HashMap::new(),
            in_flight: HashMap::new(),
            load: HashMap::new(),
            total: 0,
            max_per_peer: max_per_peer.max(1),
            max_in_flight: usize::MAX,
            endgame_copies: endgame_copies.max(1),
            last_resort: HashSet::new(),
        }
    }

    /// At most `max` requests in flight in all (at least 1; unlimited by default).
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// Chunks held.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    /// Requests in flight to `peer`.
    pub fn load(&self, peer: &P) -> usize {
        self.load.get(peer).copied().unwrap_or(0)
    }

    /// Requests in flight in total.
    pub fn requests_in_flight(&self) -> usize {
        self.total
    }

    /// Peers whose availability is known.
    pub fn peers(&self) -> impl Iterator<Item = &P> {
        self.availability.keys()
    }

    /// Records (or replaces) what `peer` holds. A bitfield of the wrong length is ignored.
    pub fn set_availability(&mut self, peer: P, bitfield: Bitfield) {
        if bitfield.len() != self.have.len() {
            return;
        }
        if let Some(old) = self.availability.remove(&peer) {
            old.ones().for_each(|i| self.holders[i as usize] -= 1);
        }
        bitfield.ones().for_each(|i| self.holders[i as usize] += 1);
        self.availability.insert(peer, bitfield);
    }

    /// Forgets what `peer` holds (it does not serve the version, or did not answer), keeping
    /// its requests in flight; it is asked for nothing until its availability is set again.
    pub fn forget_availability(&mut self, peer: &P) {
        if let Some(old) = self.availability.remove(peer) {
            old.ones().for_each(|i| self.holders[i as usize] -= 1);
        }
    }

    /// `peer` said it does not hold chunk `index` after all (it answered "not found").
    pub fn peer_lacks(&mut self, peer: &P, index: u32) {
        self.release(peer, index);
        if let Some(bits) = self.availability.get_mut(peer) {
            if bits.get(index) {
                let mut cleared = Bitfield::new(bits.len());
                bits.ones()
                    .filter(|i| *i != index)
                    .for_each(|i| cleared.set(i));
                *bits = cleared;
                self.holders[index as usize] -= 1;
            }
        }
    }

    /// Forgets `peer`; its requests in flight are returned, their chunks back in the pool.
    pub fn remove_peer(&mut self, peer: &P) -> Vec<u32> {
        if let Some(old) = self.availability.remove(peer) {
            old.ones().for_each(|i| self.holders[i as usize] -= 1);
        }
        let chunks: Vec<u32> = self
            .in_flight
            .iter()
            .filter(|(_, peers)| peers.contains(peer))
            .map(|(i, _)| *i)
            .collect();
        for i in &chunks {
            self.release(peer, *i);
        }
        if let Some(n) = self.load.remove(peer) {
            self.total -= n;
        }
        chunks
    }

    /// A request for chunk `index` to `peer` failed (timeout, error, busy): the chunk goes back.
    pub fn request_failed(&mut self, peer: &P, index: u32) {
        self.release(peer, index);
    }

    /// Chunk `index` arrived from `peer` and was verified. Returns the other peers that were
    /// asked for it (endgame losers): their requests are cancelled and their slots freed.
    pub fn chunk_received(&mut self, peer: &P, index: u32) -> Vec<P> {
        self.have.set(index);
        let asked = self.in_flight.remove(&index).unwrap_or_default();
        let mut losers = Vec::new();
        for p in asked {
            self.decrement_load(&p);
            if &p != peer {
                losers.push(p);
            }
        }
        losers
    }

    /// Chunk `index`, counted as received, could not be stored: it is wanted again.
    pub fn chunk_lost(&mut self, index: u32) {
        self.have.clear(index);
    }

    /// Chunk `index` was obtained without a request (copied from a local version).
    pub fn chunk_obtained_locally(&mut self, index: u32) -> Vec<P> {
        let asked = self.in_flight.remove(&index).unwrap_or_default();
        self.have.set(index);
        asked.iter().for_each(|p| self.decrement_load(p));
        asked
    }

    /// Chooses new requests to send, records them as in flight and returns them.
    pub fn next_requests(&mut self, rng: &mut impl Rng) -> Vec<(P, u32)> {
        let mut out = Vec::new();
        if !self.any_free_slot() {
            return out;
        }
        let mut candidates: Vec<u32> = (0..self.have.len())
            .filter(|i| !self.have.get(*i) && !self.in_flight.contains_key(i))
            .filter(|i| self.holders[*i as usize] > 0)
            .collect();
        candidates.shuffle(rng);
        candidates.sort_by_key(|i| self.holders[*i as usize]); // stable: random among equals
        for index in candidates {
            if let Some(peer) = self.least_loaded_holder(index, &[], rng) {
                self.assign(peer.clone(), index);
                out.push((peer, index));
                if !self.any_free_slot() {
                    return out;
                }
            }
        }
        if self.in_endgame() {
            let mut flying: Vec<u32> = self.in_flight.keys().copied().collect();
            flying.sort_unstable();
            flying.shuffle(rng);
            for index in flying {
                if self.total >= self.max_in_flight {
                    break;
                }
                let asked = self.in_flight.get(&index).cloned().unwrap_or_default();
                if asked.len() >= self.endgame_copies {
                    continue;
                }
                if let Some(peer) = self.least_loaded_holder(index, &asked, rng) {
                    self.assign(peer.clone(), index);
                    out.push((peer, index));
                }
            }
        }
        out
    }

    /// Whether every missing chunk is already in flight.
    pub fn in_endgame(&self) -> bool {
        let missing = self.have.len() - self.have.count();
        missing > 0 && self.in_flight.len() as u32 == missing
    }

    fn any_free_slot(&self) -> bool {
        self.total < self.max_in_flight
            && self
                .availability
                .keys()
                .any(|p| self.load(p) < self.per_peer_cap())
    }

    /// Requests allowed in flight to one peer now: the total budget spread over the peers in
    /// the version's swarm (those whose availability is known, holding chunks or not yet), so
    /// one peer alone gets the whole pipeline and many peers one request each, which sends
    /// each request to a different uploader; at most `max_per_peer`. Peers outside the swarm
    /// (they answered "not found" for the version) do not count.
    fn per_peer_cap(&self) -> usize {
        if self.max_in_flight == usize::MAX {
            return self.max_per_peer;
        }
        self.max_in_flight
            .div_ceil(self.availability.len().max(1))
            .clamp(1, self.max_per_peer)
    }

    fn least_loaded_holder(&self, index: u32, exclude: &[P], rng: &mut impl Rng) -> Option<P> {
        let cap = self.per_peer_cap();
        let mut holders: Vec<&P> = self
            .availability
            .iter()
            .filter(|(p, bits)| bits.get(index) && !exclude.contains(p))
            .map(|(p, _)| p)
            .filter(|p| self.load(p) < cap)
            .collect();
        holders.sort(); // HashMap order is not stable; sort first so the shuffle alone decides
        holders.shuffle(rng);
        holders
            .into_iter()
            .min_by_key(|p| (self.last_resort.contains(*p), self.load(p)))
            .cloned()
    }

    /// Asks `peer` only when no other holder of a chunk has a free slot (used for the
    /// publisher, whose upload is the scarcest resource of a swarm).
    pub fn set_last_resort(&mut self, peer: P) {
        self.last_resort.insert(peer);
    }

    fn assign(&mut self, peer: P, index: u32) {
        *self.load.entry(peer.clone()).or_insert(0) += 1;
        self.total += 1;
        self.in_flight.entry(index).or_default().push(peer);
    }

    fn release(&mut self, peer: &P, index: u32) {
        let Some(asked) = self.in_flight.get_mut(&index) else {
            return;
        };
        let Some(pos) = asked.iter().position(|p| p == peer) else {
            return;
        };
        asked.swap_remove(pos);
        if asked.is_empty() {
            self.in_flight.remove(&index);
        }
        self.decrement_load(peer);
    }

    fn decrement_load(&mut self, peer: &P) {
        if let Some(n) = self.load.get_mut(peer) {
            if *n > 0 {
                *n -= 1;
                self.total -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn bits(len: u32, set: impl IntoIterator<Item = u32>) -> Bitfield {
        let mut b = Bitfield::new(len);
        set.into_iter().for_each(|i| b.set(i));
        b
    }

    #[test]
    fn the_rarest_chunk_goes_first() {
        let mut picker = Picker::new(Bitfield::new(3), 1, 2);
        picker.set_availability(1u32, bits(3, [0, 1, 2]));
        picker.set_availability(2u32, bits(3, [0, 1]));
        picker.set_availability(3u32, bits(3, [0]));
        let mut rng = StdRng::seed_from_u64(1);
        let first = picker.next_requests(&mut rng);
        // Chunk 2 (one holder) first, then chunk 1 (two holders), then chunk 0.
        assert_eq!(first[0], (1, 2));
        assert_eq!(first[1], (2, 1));
        assert_eq!(first[2], (3, 0));
    }

    #[test]
    fn a_last_resort_peer_is_asked_only_when_others_are_full() {
        let mut picker = Picker::new(Bitfield::new(4), 1, 1);
        picker.set_availability('p', bits(4, [0, 1, 2, 3]));
        picker.set_availability('f', bits(4, [0, 1, 2, 3]));
        picker.set_last_resort('p');
        let mut rng = StdRng::seed_from_u64(5);
        let requests = picker.next_requests(&mut rng);
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].0, 'f', "the other holder goes first");
        assert_eq!(requests[1].0, 'p', "the last resort takes what is left");
    }

    #[test]
    fn endgame_asks_a_second_peer_and_cancels_the_loser() {
        let mut picker = Picker::new(bits(2, [0]), 4, 2);
        picker.set_availability('a', bits(2, [0, 1]));
        picker.set_availability('b', bits(2, [0, 1]));
        let mut rng = StdRng::seed_from_u64(7);
        let requests = picker.next_requests(&mut rng);
        assert_eq!(requests.len(), 2, "one normal request and one endgame copy");
        assert!(requests.iter().all(|(_, i)| *i == 1));
        let winner = requests[0].0;
        let losers = picker.chunk_received(&winner, 1);
        assert_eq!(losers, vec![requests[1].0]);
        assert!(picker.is_complete());
        assert_eq!(picker.requests_in_flight(), 0);
    }

    #[test]
    fn a_removed_peer_gives_its_chunks_to_others() {
        let mut picker = Picker::new(Bitfield::new(4), 4, 1);
        picker.set_availability(1u8, bits(4, [0, 1, 2, 3]));
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(picker.next_requests(&mut rng).len(), 4);
        picker.set_availability(2u8, bits(4, [0, 1, 2, 3]));
        let returned = picker.remove_peer(&1);
        assert_eq!(returned.len(), 4);
        let again = picker.next_requests(&mut rng);
        assert_eq!(again.len(), 4);
        assert!(again.iter().all(|(p, _)| *p == 2));
    }

    #[test]
    fn the_total_cap_spreads_requests_over_the_peers() {
        let mut picker = Picker::new(Bitfield::new(16), 4, 1).with_max_in_flight(4);
        for p in 0..4u8 {
            picker.set_availability(p, bits(16, 0..16));
        }
        let mut rng = StdRng::seed_from_u64(9);
        let first = picker.next_requests(&mut rng);
        assert_eq!(first.len(), 4, "4 in all");
        let mut peers: Vec<u8> = first.iter().map(|(p, _)| *p).collect();
        peers.sort_unstable();
        assert_eq!(peers, vec![0, 1, 2, 3], "one request to each peer");
        assert!(
            picker.next_requests(&mut rng).is_empty(),
            "the budget is spent"
        );
        picker.chunk_received(&first[0].0, first[0].1);
        assert_eq!(picker.next_requests(&mut rng).len(), 1);
    }

    #[test]
    fn one_peer_alone_gets_the_whole_pipeline() {
        let mut picker = Picker::new(Bitfield::new(16), 4, 1).with_max_in_flight(4);
        picker.set_availability(7u8, bits(16, 0..16));
        let mut rng = StdRng::seed_from_u64(2);
        assert_eq!(picker.next_requests(&mut rng).len(), 4);
        assert_eq!(picker.load(&7), 4);
    }

    /// Drives a picker to completion with peers that answer in a random order, some failing.
    fn simulate(
        chunks: u32,
        peers: Vec<Vec<bool>>,
        held: Vec<bool>,
        cap: usize,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let have = bits(chunks, (0..chunks).filter(|i| held[*i as usize]));
        let total = 1 + (seed % 6) as usize;
        let mut picker = Picker::new(have.clone(), cap, 2).with_max_in_flight(total);
        let mut union = have.clone();
        for (p, avail) in peers.iter().enumerate() {
            let b = bits(chunks, (0..chunks).filter(|i| avail[*i as usize]));
            b.ones().for_each(|i| union.set(i));
            picker.set_availability(p as u32, b);
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut flying: Vec<(u32, u32)> = Vec::new();
        for _round in 0..(chunks as usize * 10 + 10) {
            let rarest_free = (0..chunks)
                .filter(|i| !picker.have().get(*i) && !flying.iter().any(|(_, c)| c == i))
                .filter(|i| {
                    (0..peers.len() as u32).any(|p| {
                        peers[p as usize][*i as usize] && picker.load(&p) < picker.per_peer_cap()
                    })
                })
                .map(|i| picker.holders[i as usize])
                .min();
            let new = picker.next_requests(&mut rng);
            if let (Some(min), Some((_, first))) = (rarest_free, new.first()) {
                prop_assert_eq!(picker.holders[*first as usize], min, "rarest first");
            }
            for (peer, index) in &new {
                prop_assert!(!have.get(*index), "asked for a chunk held from the start");
                prop_assert!(!picker.have().get(*index), "asked for a chunk already held");
                prop_assert!(
                    peers[*peer as usize][*index as usize],
                    "asked a peer without it"
                );
            }
            flying.extend(new);
            for p in 0..peers.len() as u32 {
                prop_assert!(picker.load(&p) <= cap, "per-peer cap exceeded");
            }
            prop_assert!(picker.requests_in_flight() <= total, "total cap exceeded");
            prop_assert_eq!(picker.requests_in_flight(), flying.len());
            if flying.is_empty() {
                break;
            }
            let (peer, index) = flying.swap_remove(rng.gen_range(0..flying.len()));
            if rng.gen_bool(0.2) {
                picker.request_failed(&peer, index);
            } else if !picker.have().get(index) {
                for loser in picker.chunk_received(&peer, index) {
                    flying.retain(|f| *f != (loser, index));
                }
            }
        }
        prop_assert_eq!(picker.have(), &union, "ends holding every available chunk");
        prop_assert_eq!(picker.requests_in_flight(), 0);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn picker_properties_hold(
            chunks in 1u32..40,
            peer_count in 1usize..6,
            cap in 1usize..4,
            seed in any::<u64>(),
            raw in proptest::collection::vec(any::<bool>(), 6 * 40 + 40),
        ) {
            let peers: Vec<Vec<bool>> = (0..peer_count)
                .map(|p| (0..chunks as usize).map(|i| raw[p * 40 + i]).collect())
                .collect();
            let held: Vec<bool> = (0..chunks as usize).map(|i| raw[240 + i] && i % 3 == 0).collect();
            simulate(chunks, peers, held, cap, seed)?;
        }
    }
}
