//! How much of peers' parameters one snapshot of ours may still take in: pure logic, shared by
//! the trainer, which spends it when it mixes, and the behaviour, which tells a peer before a
//! session whether to send its outer parameters at all (the protocol's `wants_outer`).

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use libp2p::PeerId;

/// The most weight all peers' parameters mixed against one snapshot may add up to: sessions
/// with several peers at once all exchange the same snapshot, and mixing each at its own
/// weight would leave none of ours (or overshoot). One peer's weight is bounded the same way
/// (see `training::guard`). With equal samples a peer's weight is 1/2, so a snapshot takes
/// in two peers' parameters (1/2, then the 1/6 left); the guard's clipping and drift limits
/// give smaller weights, and then three or more.
pub const MAX_WEIGHT_PER_SNAPSHOT: f64 = 2.0 / 3.0;

/// Below this much weight left a snapshot takes nothing more.
const MIN_WEIGHT: f64 = 1e-3;

/// Peers whose outer parameters one snapshot records as mixed; past it, no more are mixed
/// against that snapshot (its weight is spent long before: at most a few peers get any).
const MAX_OUTER_MIXES: usize = 256;

/// The weight one snapshot has given peers so far, and whose outer parameters it mixed. One
/// lives in each [`super::Snapshot`]: mixes against the same snapshot share it, and it goes
/// with the snapshot once no session holds that any more.
#[derive(Debug, Default)]
pub struct MixBudget {
    state: Mutex<Spent>,
}

#[derive(Debug, Default)]
struct Spent {
    weight: f64,
    outer_mixed: HashSet<PeerId>,
}

impl MixBudget {
    /// A poisoned lock (a panic elsewhere while holding it) still holds valid counts.
    fn spent(&self) -> MutexGuard<'_, Spent> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How much of `wanted` (a mixing weight, 0-1) may still be mixed; records it as spent.
    /// `None` (nothing spent) when that is less than 0.001.
    pub fn take(&self, wanted: f64) -> Option<f64> {
        let mut spent = self.spent();
        let weight = wanted.min(MAX_WEIGHT_PER_SNAPSHOT - spent.weight);
        if weight < MIN_WEIGHT {
            return None;
        }
        spent.weight += weight;
        Some(weight)
    }

    /// Whether `peer`'s outer parameters were not mixed against this snapshot yet; records
    /// them as mixed (so a peer cannot take a snapshot's whole weight with repeated sessions).
    pub fn first_outer_mix(&self, peer: PeerId) -> bool {
        let mut spent = self.spent();
        spent.outer_mixed.len() < MAX_OUTER_MIXES && spent.outer_mixed.insert(peer)
    }

    /// Whether this snapshot would still mix `peer`'s outer parameters: weight is left and
    /// none of that peer's were mixed yet. Asked when a session opens; other sessions may
    /// spend the weight before this one ends, in which case what it brought is not mixed.
    pub fn wants_outer(&self, peer: &PeerId) -> bool {
        let spent = self.spent();
        MAX_WEIGHT_PER_SNAPSHOT - spent.weight >= MIN_WEIGHT
            && spent.outer_mixed.len() < MAX_OUTER_MIXES
            && !spent.outer_mixed.contains(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_takes_two_equal_peers_and_then_wants_no_more_outer_parameters() {
        let budget = MixBudget::default();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(budget.wants_outer(&a) && budget.wants_outer(&b));
        assert!(budget.first_outer_mix(a));
        assert_eq!(budget.take(0.5), Some(0.5));
        assert!(!budget.wants_outer(&a), "a's were mixed");
        assert!(!budget.first_outer_mix(a));
        assert!(budget.wants_outer(&b), "1/6 of the weight is left");
        assert!(budget.first_outer_mix(b));
        let rest = budget.take(0.5).unwrap();
        assert!((rest - 1.0 / 6.0).abs() < 1e-12, "{rest}");
        assert!(!budget.wants_outer(&c), "the weight is spent");
        assert_eq!(budget.take(0.5), None);
    }

    #[test]
    fn the_outer_mixes_one_snapshot_records_are_bounded() {
        let budget = MixBudget::default();
        for _ in 0..MAX_OUTER_MIXES {
            assert!(budget.first_outer_mix(PeerId::random()));
        }
        let late = PeerId::random();
        assert!(!budget.wants_outer(&late));
        assert!(!budget.first_outer_mix(late));
    }
}
