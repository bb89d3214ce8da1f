//! [`Pace`]: bounded staleness, as pure bookkeeping. A node may be at most `max_lead_steps`
//! batches ahead (in samples seen) of the slowest peer it averaged with recently; the trainer
//! averages instead of training while it is further ahead. A peer counts while its progress
//! keeps moving: one that says it finished its steps, or whose samples did not grow for
//! [`STALLED_AFTER`] (stuck, or finished without saying), no longer holds anyone back. Without that, a node that joined late from a
//! checkpoint (its samples inherited, so "ahead") waited 10 s per step for finished peers that
//! would never catch up, and the finished peers kept mixing its one-sided steps in: a run
//! measured losing 25 points of accuracy that way.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::PeerId;
use tokio::time::Instant;

/// A peer whose samples did not grow for this long no longer holds back the pace.
pub const STALLED_AFTER: Duration = Duration::from_secs(10);

/// Most peers tracked; the one that progressed longest ago is forgotten first.
const MAX_PEERS: usize = 1024;

/// Peers' progress, and the limit it sets.
#[derive(Debug, Default)]
pub struct Pace {
    /// Samples each peer had seen at its last round with us, and when they last grew.
    peers: HashMap<PeerId, (u64, Instant)>,
}

impl Pace {
    /// Records that `peer` has seen `samples` at `now`.
    pub fn note(&mut self, peer: PeerId, samples: u64, now: Instant) {
        if let Some((seen, grew)) = self.peers.get_mut(&peer) {
            if samples != *seen {
                *seen = samples;
                *grew = now;
            }
            return;
        }
        if self.peers.len() >= MAX_PEERS {
            if let Some(oldest) = self
                .peers
                .iter()
                .min_by_key(|(_, (_, g))| *g)
                .map(|(p, _)| *p)
            {
                self.peers.remove(&oldest);
            }
        }
        self.peers.insert(peer, (samples, now));
    }

    /// `peer` finished its steps: it will not progress, so it holds nobody back.
    pub fn finished(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// The samples seen beyond which this node waits: the slowest progressing peer's plus
    /// `lead_samples`; `u64::MAX` (no bound) when no peer is progressing or `lead_samples`
    /// is 0. A peer that stopped progressing stays remembered as such: answering another
    /// round at the same samples does not make it count again.
    pub fn limit(&self, now: Instant, lead_samples: u64) -> u64 {
        let progressing = self
            .peers
            .values()
            .filter(|(_, grew)| now.duration_since(*grew) < STALLED_AFTER);
        match progressing.map(|(s, _)| *s).min() {
            Some(slowest) if lead_samples > 0 => slowest.saturating_add(lead_samples),
            _ => u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_progressing_peer_sets_the_limit() {
        let mut pace = Pace::default();
        let t0 = Instant::now();
        let (slow, fast) = (PeerId::random(), PeerId::random());
        pace.note(slow, 1000, t0);
        pace.note(fast, 5000, t0);
        assert_eq!(pace.limit(t0, 320), 1320);
        assert_eq!(Pace::default().limit(t0, 320), u64::MAX);
        assert_eq!(pace.limit(t0, 0), u64::MAX);
    }

    #[test]
    fn a_finished_peer_stops_holding_back_even_while_it_still_answers() {
        let mut pace = Pace::default();
        let t0 = Instant::now();
        let (finished, training) = (PeerId::random(), PeerId::random());
        pace.note(finished, 19_200, t0);
        pace.note(training, 30_000, t0);
        // The finished peer answers every round, at the same samples.
        let mut t = t0;
        for i in 1..=20 {
            t = t0 + Duration::from_secs(i);
            pace.note(finished, 19_200, t);
            pace.note(training, 30_000 + 32 * i, t);
        }
        assert_eq!(pace.limit(t, 640), 30_000 + 32 * 20 + 640);
        // Another answer at the same samples does not bring it back.
        pace.note(finished, 19_200, t);
        assert_eq!(pace.limit(t, 640), 30_000 + 32 * 20 + 640);
    }
}
