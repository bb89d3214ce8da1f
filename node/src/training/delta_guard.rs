//! [`DeltaGuard`]: how much a peer's pseudo-gradient may move the outer parameters. Pure
//! bookkeeping, no I/O. Broken pieces (a wrong length, a NaN, a bad encoding) never get here:
//! the session refuses them as they arrive (`averaging::pieces`). What passes is finite and of
//! the model's length, and can still poison: scaled up, negated, noise. Two rules bound it:
//!
//! 1. **Opposition.** A pseudo-gradient whose cosine with ours is at most
//!    [`MIN_COSINE`] is refused; at most [`PENALIZED_COSINE`] with a penalty: honest peers'
//!    directions differ (by shard, by noise) but do not point straight back (the negation
//!    attack sends exactly that).
//! 2. **Clipping.** An accepted pseudo-gradient is scaled down to at most [`CLIP_FACTOR`] times
//!    the *reference* norm (centered clipping around zero, Karimireddy et al., ICML 2021), so
//!    one scaled up by any factor moves the model no more than an honest one. The reference is
//!    the larger of this node's own pseudo-gradient norm in the exchange and the median, over
//!    peers, of each peer's latest accepted norm (one peer, one vote), once [`WARMUP`] peers
//!    were accepted, and never more than [`MAX_REFERENCE_FACTOR`] times our own. Norms are
//!    recorded clipped, so a peer cannot ratchet the median up.
//!
//! A norm far from the reference is clipped, not refused: honest norms differ by a factor of
//! 70 within one run (measured on the testnet, eight by-label digits hosts: a peer's first
//! phase from the initial weights against a late phase under a decayed learning rate), and
//! refusing them at 3x (penalizing at 6x) had honest peers banned. Only a norm at
//! [`PENALIZE_FACTOR`] times the reference or more, once [`WARMUP`] peers were accepted, is
//! refused with a penalty: no honest peer is that far off, and a peer that sends such things
//! is cut off rather than used, clipped, every round.
//!
//! Each peer's pseudo-gradient counts once in a round's average, equally (see
//! `training::outer`), so one peer moves a round by at most `CLIP_FACTOR / (partners + 1)` of
//! an honest step at a learning rate of 1; in a round with few partners, one just inside the
//! opposition bound can still turn the round's average back (the price of accepting non-iid
//! peers whose honest pseudo-gradients point partly away from ours). A higher
//! `outer_learning_rate`, or `outer_extrapolation` (FedExP, whose factor grows as peers cancel
//! each other), scales that share up to the cap at the round's count: one peer that cancels
//! the honest pseudo-gradients then steers what is left, applied at their sum.

use std::collections::HashMap;

use libp2p::PeerId;
use p2p_models::params;

/// Peers whose latest accepted norm is remembered (beyond: an arbitrary one is forgotten).
pub const MAX_PEERS: usize = 1024;

/// Accepted peers needed before their median counts, and before an extreme norm costs a
/// penalty.
pub const WARMUP: usize = 5;

/// Norms at this multiple of the reference or beyond are refused with a penalty (once warm).
pub const PENALIZE_FACTOR: f64 = 1000.0;

/// Accepted pseudo-gradients are clipped to this multiple of the reference norm.
pub const CLIP_FACTOR: f64 = 1.5;

/// The reference is at most this multiple of our own norm.
pub const MAX_REFERENCE_FACTOR: f64 = 3.0;

/// A cosine with ours at or below this is refused. Honest pseudo-gradients of by-label shards
/// measured cosines down to -0.52 with each other (their output layers pull apart), so the
/// bound only stops what points almost straight back.
pub const MIN_COSINE: f64 = -0.9;

/// A cosine with ours at or below this is refused with a penalty.
pub const PENALIZED_COSINE: f64 = -0.98;

/// Smallest reference norm: pseudo-gradients of a node that stopped moving must not make every
/// peer an outlier.
const MIN_REFERENCE: f64 = 1e-8;

/// What to do with a peer's pseudo-gradient.
#[derive(Debug, Clone, PartialEq)]
pub enum DeltaVerdict {
    /// Use it, multiplied by `scale` (in (0, 1]; below 1 when clipped).
    Use {
        /// The factor.
        scale: f64,
    },
    /// Do not use it; `penalize` when no honest peer sends such a thing.
    Refuse {
        /// Why, in a few words.
        why: String,
        /// Whether the peer is penalized.
        penalize: bool,
    },
}

/// The norms seen, to bound the next.
#[derive(Debug, Default)]
pub struct DeltaGuard {
    /// Each peer's latest accepted norm, clipped.
    accepted: HashMap<PeerId, f64>,
}

impl DeltaGuard {
    /// Judges `peer`'s pseudo-gradient `theirs` against ours (same length, finite: checked
    /// before).
    pub fn judge(&mut self, peer: PeerId, ours: &[f32], theirs: &[f32]) -> DeltaVerdict {
        let own = params::l2_norm(ours);
        let norm = params::l2_norm(theirs);
        let reference = self.reference(own);
        if self.accepted.len() >= WARMUP && norm >= PENALIZE_FACTOR * reference {
            return DeltaVerdict::Refuse {
                why: format!(
                    "a pseudo-gradient of norm {norm:.3e}, {:.0} times the reference {reference:.3e}",
                    norm / reference
                ),
                penalize: true,
            };
        }
        if own > 0.0 && norm > 0.0 {
            let cosine = params::dot(ours, theirs) / (own * norm);
            if cosine <= MIN_COSINE {
                return DeltaVerdict::Refuse {
                    why: format!("a pseudo-gradient opposed to ours (cosine {cosine:.2})"),
                    penalize: cosine <= PENALIZED_COSINE,
                };
            }
        }
        let clipped = norm.min(CLIP_FACTOR * reference);
        if self.accepted.len() >= MAX_PEERS && !self.accepted.contains_key(&peer) {
            if let Some(any) = self.accepted.keys().next().copied() {
                self.accepted.remove(&any);
            }
        }
        self.accepted.insert(peer, clipped);
        let scale = if norm > clipped { clipped / norm } else { 1.0 };
        DeltaVerdict::Use { scale }
    }

    /// The larger of `own` and, once [`WARMUP`] peers were accepted, the median of their
    /// latest norms, at most [`MAX_REFERENCE_FACTOR`] times `own`.
    fn reference(&self, own: f64) -> f64 {
        let mut norms: Vec<f64> = self.accepted.values().copied().collect();
        norms.sort_by(f64::total_cmp);
        let median = if norms.len() >= WARMUP {
            norms[norms.len() / 2]
        } else {
            0.0
        };
        let capped = if own > 0.0 {
            median.min(MAX_REFERENCE_FACTOR * own)
        } else {
            median
        };
        own.max(capped).max(MIN_REFERENCE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn honest(i: usize) -> Vec<f32> {
        (0..100)
            .map(|j| ((i * 7 + j) as f32 * 0.3).sin() * 0.01 + 0.01)
            .collect()
    }

    #[test]
    fn honest_pseudo_gradients_are_used_whole() {
        let mut guard = DeltaGuard::default();
        for i in 0..10 {
            assert_eq!(
                guard.judge(PeerId::random(), &honest(0), &honest(i)),
                DeltaVerdict::Use { scale: 1.0 }
            );
        }
    }

    /// A peer sending ever larger pseudo-gradients holds one vote of its clipped norm: the
    /// reference, and with it what any peer's pseudo-gradient may move, does not climb.
    #[test]
    fn one_peer_cannot_ratchet_the_reference_up() {
        let mut guard = DeltaGuard::default();
        let ours = honest(0);
        for _ in 0..WARMUP {
            guard.judge(PeerId::random(), &ours, &honest(1));
        }
        let liar = PeerId::random();
        for i in 0..100 {
            let factor = 1.5f32.powi(i);
            let sent: Vec<f32> = honest(1).iter().map(|v| v * factor).collect();
            guard.judge(liar, &ours, &sent);
        }
        let honest_norm = params::l2_norm(&honest(1)).max(params::l2_norm(&ours));
        let reference = guard.reference(params::l2_norm(&ours));
        assert!(
            reference <= 1.01 * honest_norm,
            "{reference} vs {honest_norm}"
        );
    }

    #[test]
    fn scaled_ones_are_clipped_and_extreme_or_negated_ones_refused() {
        let mut guard = DeltaGuard::default();
        let ours = honest(0);
        for i in 1..=WARMUP {
            guard.judge(PeerId::random(), &ours, &honest(i));
        }
        let scaled = |f: f32| honest(1).iter().map(|v| v * f).collect::<Vec<f32>>();
        // Scaled by any factor an honest peer's could differ by: used, but clipped to 1.5
        // times the reference; far beyond: refused with a penalty.
        assert!(matches!(
            guard.judge(PeerId::random(), &ours, &scaled(1e4)),
            DeltaVerdict::Refuse { penalize: true, .. }
        ));
        for factor in [2.9, 100.0] {
            let DeltaVerdict::Use { scale } = guard.judge(PeerId::random(), &ours, &scaled(factor))
            else {
                panic!("refused");
            };
            let moved = scale * params::l2_norm(&scaled(factor));
            assert!(
                (moved / params::l2_norm(&ours) - 1.5).abs() < 0.1,
                "x{factor}: {moved}"
            );
        }
        let negated: Vec<f32> = ours.iter().map(|v| -v).collect();
        let DeltaVerdict::Refuse { why, penalize } = guard.judge(PeerId::random(), &ours, &negated)
        else {
            panic!("a negated pseudo-gradient was used");
        };
        assert!(penalize && why.contains("opposed"), "{why}");
    }
}
