//! [`Reputation`]: penalties and bans for peers that send bad data, in one place. Every
//! protocol reports misbehaviour as an event (a chunk that does not match its hash, a manifest
//! that does not match its id, parameters that are NaN or refused); the event loop feeds those
//! here, and disconnects the peer when this says so. Pure bookkeeping: no I/O, no swarm.

use std::collections::HashMap;

use libp2p::PeerId;

/// Offences after which a peer is disconnected.
pub const MAX_PENALTY: u32 = 3;

/// Most peers with a score remembered; beyond it the lowest score is forgotten first.
pub const MAX_SCORED_PEERS: usize = 4096;

/// What to do after an offence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Count it and go on.
    Warn,
    /// The peer reached [`MAX_PENALTY`]: disconnect it.
    Disconnect,
}

/// Penalty points per peer.
#[derive(Debug, Default)]
pub struct Reputation {
    scores: HashMap<PeerId, u32>,
}

impl Reputation {
    /// Counts one offence of `peer` (`why` is logged) and says what to do.
    pub fn penalize(&mut self, peer: PeerId, why: &str) -> Verdict {
        if !self.scores.contains_key(&peer) && self.scores.len() >= MAX_SCORED_PEERS {
            if let Some(forget) = self
                .scores
                .iter()
                .min_by_key(|(p, s)| (**s, **p))
                .map(|(p, _)| *p)
            {
                self.scores.remove(&forget);
            }
        }
        let score = self.scores.entry(peer).or_insert(0);
        *score = score.saturating_add(1);
        tracing::warn!(%peer, penalty = *score, "penalized peer: {why}");
        if *score >= MAX_PENALTY {
            tracing::warn!(%peer, "disconnecting a peer that keeps sending bad data");
            Verdict::Disconnect
        } else {
            Verdict::Warn
        }
    }

    /// Penalty points per peer.
    pub fn scores(&self) -> HashMap<PeerId, u32> {
        self.scores.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_disconnected_at_the_third_offence_and_others_are_unaffected() {
        let mut r = Reputation::default();
        let (bad, other) = (PeerId::random(), PeerId::random());
        assert_eq!(r.penalize(bad, "x"), Verdict::Warn);
        assert_eq!(r.penalize(other, "y"), Verdict::Warn);
        assert_eq!(r.penalize(bad, "x"), Verdict::Warn);
        assert_eq!(r.penalize(bad, "x"), Verdict::Disconnect);
        assert_eq!(r.scores()[&bad], 3);
        assert_eq!(r.scores()[&other], 1);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut r = Reputation::default();
        for _ in 0..MAX_SCORED_PEERS + 10 {
            r.penalize(PeerId::random(), "x");
        }
        assert_eq!(r.scores().len(), MAX_SCORED_PEERS);
    }
}
