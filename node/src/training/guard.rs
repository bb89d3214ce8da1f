//! [`MixGuard`]: how far, and how much, a peer's parameters may move the local model. Pure
//! bookkeeping, no I/O: the coordinator asks it for the distance bound before checking a peer's
//! parameters, then for the weight to mix them at.
//!
//! A hostile peer that sends finite parameters of the right shape can still poison a model:
//! negated or scaled parameters, noise, or a huge claimed sample count that makes its weight
//! close to 1. Four rules bound what one peer can do, whatever it sends:
//!
//! 1. **Adaptive distance bound.** The *reference* distance is the median, across peers, of
//!    each peer's largest relative distance among the last [`WINDOW`] measured: one peer, one
//!    vote, however often it mixes, and a vote that describes a peer that has drifted for a
//!    while rather than one just averaged with (the next session with a partner just mixed
//!    measures close to 0). Refused distances count too. Both choices come from runs of the
//!    digits demo in which a median of accepted distances collapsed to 0.002 while honest
//!    peers sat at 0.4, refusing and then disconnecting all of them. Repeated sessions with a
//!    peer at one local step (a node waiting for slower peers averages again and again) count
//!    once, and the reference never falls below this node's own movement per averaging
//!    period (its parameters' relative change between rounds, scaled to `average_every`
//!    steps): a peer that trained as long as we did since we last mixed is about that far,
//!    and no peer can change how far we move on our own. Until [`WARMUP`]
//!    distances were measured there is no reference and the run's `max_param_distance`
//!    alone applies. Parameters at [`REFUSE_FACTOR`] times the reference or more are refused,
//!    and so are any at the run's bound or more (the bound is inclusive).
//! 2. **Centered clipping.** Within the bound, the peer's delta (its parameters minus ours) is
//!    clipped to [`CLIP_FACTOR`] times the reference: mixing at weight `w` a delta of relative
//!    norm `d > τ` is done at weight `w·τ/d`. This is the centered clipping rule of Karimireddy,
//!    He & Jaggi, "Learning from History for Byzantine Robust Optimization" (ICML 2021), with
//!    the local model as the center; it applies to one peer at a time, which is what gossip
//!    averaging combines.
//! 3. **Bounded weight.** A peer's samples count as at most [`MAX_WEIGHT_RATIO`] times ours
//!    ([`params::bounded_peer_weight`]): at most 2/3 of a mix, whatever it claims.
//! 4. **Bounded drift per peer.** The movement each peer caused (weight × distance) is summed
//!    with a decay of [`DRIFT_DECAY`] per mix; a mix that would take one peer's sum past
//!    [`DRIFT_FACTOR`] times the reference is scaled down to fit, or skipped.
//!
//! Refusals come in two kinds: *far* (at [`PENALIZE_FACTOR`] times the reference or the run's
//! bound: no honest peer of the run is that far off; the peer is penalized, and after
//! [`FAR_STRIKES`] of them excluded from the run) and *outlier* (between: a stale or
//! restarted honest peer can be, so the round is skipped without penalty). Until a reference
//! is known, deltas are clipped to [`WARMUP_CLIP`] of the run's bound. In a run's first
//! [`GRACE_ROUNDS`] averaging periods (our own step), and with a peer further from us in steps
//! than bounded staleness allows honest peers, no refusal costs a penalty or a strike: nodes
//! that start a fraction of a second apart, or one that started late, are then legitimately
//! far apart (relative distances of 2 to 8 and norm ratios past 2 were measured between honest
//! nodes of the digits demo), and what is refused is not mixed in anyway. A liar that claims a
//! far-off step to avoid strikes is still refused.
//!
//! With outer steps the guard judges peers' *outer* parameters, whose honest spread is wider
//! and uneven (each node's are moved by a different set of pseudo-gradients, at an outer
//! learning rate of up to 3): they are refused by the adaptive bound as above, but cost a
//! penalty only at the run's own bound ([`MixGuard::cost`]).

use std::collections::{HashMap, VecDeque};

use libp2p::PeerId;
use p2p_models::params;

/// Measured distances the median is taken over.
pub const WINDOW: usize = 32;

/// Measured distances needed before the median is the reference.
pub const WARMUP: usize = 5;

/// Distances at this multiple of the reference or beyond are refused.
pub const REFUSE_FACTOR: f64 = 3.0;

/// Distances at this multiple of the reference or beyond are refused with a penalty.
pub const PENALIZE_FACTOR: f64 = 6.0;

/// A peer's delta is clipped to this multiple of the reference.
pub const CLIP_FACTOR: f64 = 1.5;

/// A peer's samples count as at most this many times ours.
pub const MAX_WEIGHT_RATIO: f64 = 2.0;

/// One peer's summed movement may reach this multiple of the reference.
pub const DRIFT_FACTOR: f64 = 6.0;

/// Each mix multiplies every peer's summed movement by this.
pub const DRIFT_DECAY: f64 = 0.9;

/// Averaging periods at the start of a run in which refusals cost nothing.
pub const GRACE_ROUNDS: u64 = 5;

/// Far refusals after which a peer is excluded from the run.
pub const FAR_STRIKES: u32 = 3;

/// Before a reference is known, deltas are clipped to this fraction of the run's bound.
pub const WARMUP_CLIP: f64 = 0.5;

/// Mixes at a smaller weight than this are skipped.
pub const MIN_WEIGHT: f64 = 1e-3;

/// Peers whose drift is remembered; the smallest is forgotten first.
pub const MAX_TRACKED_PEERS: usize = 1024;

/// Smallest reference: parameters that all agree must not make every peer an outlier.
const MIN_REFERENCE: f64 = 1e-4;

/// Weight of the newest own movement in its moving average.
const OWN_ALPHA: f64 = 0.3;

/// What to do with a peer's parameters that passed the bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Mix them in at `weight`.
    Mix {
        /// The weight to mix at (clipped and drift-limited), in (0, 2/3].
        weight: f64,
        /// Whether clipping lowered it.
        clipped: bool,
        /// Whether the peer's drift budget lowered it.
        drift_limited: bool,
    },
    /// The peer used up its drift budget: nothing is mixed this time (no penalty).
    Skip,
}

/// How bad a refused distance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Farther than any honest peer of the run: refuse and penalize.
    Far,
    /// An outlier that an honest but stale peer could be: skip the round only.
    Outlier,
}

/// What refusing a peer's parameters costs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Nothing: what an honest peer can send (an outlier, or the run's first rounds).
    Free,
    /// A penalty and a strike ([`MixGuard::strike`]): no honest peer of the run sends it.
    Penalty,
    /// Exclusion from the run: broken values (NaN, a wrong length).
    Exclusion,
}

/// The adaptive bounds of one training run on one node.
#[derive(Debug)]
pub struct MixGuard {
    static_bound: f64,
    grace_steps: u64,
    sync_steps: u64,
    measured: VecDeque<(PeerId, u64, f64)>,
    own_movement: Option<f64>,
    drift: HashMap<PeerId, f64>,
    strikes: HashMap<PeerId, u32>,
}

impl MixGuard {
    /// A guard for a run whose spec bounds distances by `max_param_distance`, averages every
    /// `average_every` steps and lets a node lead by at most `max_lead_steps`.
    pub fn new(max_param_distance: f64, average_every: u64, max_lead_steps: u64) -> Self {
        Self {
            static_bound: max_param_distance,
            grace_steps: GRACE_ROUNDS.saturating_mul(average_every),
            sync_steps: max_lead_steps.saturating_add(average_every.saturating_mul(2)),
            measured: VecDeque::with_capacity(WINDOW),
            own_movement: None,
            drift: HashMap::new(),
            strikes: HashMap::new(),
        }
    }

    /// The typical distance to an honest peer now (see the module docs), if known.
    pub fn reference(&self) -> Option<f64> {
        if self.measured.len() < WARMUP {
            return None;
        }
        let mut largest: HashMap<PeerId, f64> = HashMap::new();
        for (peer, _, d) in &self.measured {
            let m = largest.entry(*peer).or_insert(0.0);
            *m = m.max(*d);
        }
        let floor = self.own_movement.unwrap_or(0.0).max(MIN_REFERENCE);
        Some(median(largest.into_values()).max(floor))
    }

    /// Relative distance at which (or beyond which) parameters are refused.
    pub fn bound(&self) -> f64 {
        match self.reference() {
            Some(r) => (REFUSE_FACTOR * r).min(self.static_bound),
            None => self.static_bound,
        }
    }

    /// How bad a distance that reached [`Self::bound`] is.
    fn severity(&self, distance: f64) -> Severity {
        let far = match self.reference() {
            Some(r) => (PENALIZE_FACTOR * r).min(self.static_bound),
            None => self.static_bound,
        };
        if distance.is_nan() || distance >= far {
            Severity::Far
        } else {
            Severity::Outlier
        }
    }

    /// Records the relative distance measured to `peer`'s parameters against our snapshot of
    /// local `step` (whether they were refused or not); a second measurement with the same
    /// peer at the same step only raises the first. Call it after [`Self::judge`], so a
    /// peer's own value does not loosen the bound it is judged by.
    pub fn observe(&mut self, peer: PeerId, step: u64, distance: f64) {
        if !distance.is_finite() {
            return;
        }
        if let Some(entry) = self
            .measured
            .iter_mut()
            .find(|(p, s, _)| *p == peer && *s == step)
        {
            entry.2 = entry.2.max(distance);
            return;
        }
        if self.measured.len() == WINDOW {
            self.measured.pop_front();
        }
        self.measured.push_back((peer, step, distance));
    }

    /// Records how far our own parameters moved (relative distance) over one averaging period.
    pub fn note_own_movement(&mut self, moved: f64) {
        if !moved.is_finite() || moved <= 0.0 {
            return;
        }
        self.own_movement = Some(match self.own_movement {
            Some(m) => (1.0 - OWN_ALPHA) * m + OWN_ALPHA * moved,
            None => moved,
        });
    }

    /// The weight to mix `peer`'s parameters at, which are at relative `distance` (below
    /// [`Self::bound`]) from ours; `local_samples` and `peer_samples` are the two sides'
    /// claimed training samples. Updates the peer's drift.
    pub fn judge(
        &mut self,
        peer: PeerId,
        distance: f64,
        local_samples: u64,
        peer_samples: u64,
    ) -> Decision {
        let reference = self.reference();

        let mut weight = params::bounded_peer_weight(local_samples, peer_samples, MAX_WEIGHT_RATIO);
        let mut clipped = false;
        let tau = reference.map_or(WARMUP_CLIP * self.static_bound, |r| CLIP_FACTOR * r);
        if distance > tau {
            weight *= tau / distance;
            clipped = true;
        }
        for d in self.drift.values_mut() {
            *d *= DRIFT_DECAY;
        }
        let budget = reference.map_or(self.static_bound, |r| DRIFT_FACTOR * r);
        let spent = self.drift.get(&peer).copied().unwrap_or(0.0);
        let mut drift_limited = false;
        if spent + weight * distance > budget {
            weight = ((budget - spent) / distance.max(f64::MIN_POSITIVE)).max(0.0);
            drift_limited = true;
        }
        if weight < MIN_WEIGHT {
            return Decision::Skip;
        }
        self.forget_if_full(peer);
        *self.drift.entry(peer).or_insert(0.0) += weight * distance;
        Decision::Mix {
            weight,
            clipped,
            drift_limited,
        }
    }

    /// Whether refusing parameters exchanged at our local `step` with a peer at `peer_step`
    /// is free: in the run's first [`GRACE_ROUNDS`] periods, or when the two are further apart
    /// in steps than bounded staleness keeps honest peers (a node that started late, or
    /// restarted from an old checkpoint, is honestly far off until it catches up).
    fn free_refusal(&self, step: u64, peer_step: u64) -> bool {
        step < self.grace_steps || step.abs_diff(peer_step) > self.sync_steps
    }

    /// What refusing a peer's parameters for `refusal` costs it, exchanged at our local `step`
    /// with the peer at `peer_step` (see the module docs). With `outer`, they are outer
    /// parameters ([`params::check_outer_params`]): only a distance at the run's own bound
    /// costs a penalty (negated ones measure exactly 2.0, the default bound), never one
    /// beyond the adaptive bound alone. At a high outer learning rate honest nodes' outer
    /// parameters spread widely and unevenly, and the outlier can be our own: on the testnet
    /// (8 by-label digits hosts, outer lr 3) one node's outer parameters outran the others'
    /// early, and the parameter-averaging rules had honest nodes penalize it, and each other,
    /// up to bans. What is refused is not mixed in either way, and a peer's pseudo-gradient,
    /// which is what moves the model, is judged and penalized on its own
    /// (`super::delta_guard`).
    pub fn cost(
        &self,
        refusal: &params::Refusal,
        outer: bool,
        (step, peer_step): (u64, u64),
    ) -> Cost {
        let grace = self.free_refusal(step, peer_step);
        match *refusal {
            params::Refusal::WrongLength { .. } | params::Refusal::NonFinite(_) => Cost::Exclusion,
            _ if grace => Cost::Free,
            params::Refusal::TooFar { distance, .. } => {
                let far = if outer {
                    distance.is_nan() || distance >= self.static_bound
                } else {
                    self.severity(distance) == Severity::Far
                };
                if far {
                    Cost::Penalty
                } else {
                    Cost::Free
                }
            }
            // No honest peer of the run sends these (past the first rounds) as its parameters.
            params::Refusal::Opposed { .. } | params::Refusal::NormRatio { .. } if !outer => {
                Cost::Penalty
            }
            params::Refusal::Opposed { .. } | params::Refusal::NormRatio { .. } => Cost::Free,
        }
    }

    /// Counts a far refusal of `peer`; `true` once it reached [`FAR_STRIKES`] (exclude it).
    pub fn strike(&mut self, peer: PeerId) -> bool {
        if self.strikes.len() >= MAX_TRACKED_PEERS && !self.strikes.contains_key(&peer) {
            if let Some(least) = self
                .strikes
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(p, _)| *p)
            {
                self.strikes.remove(&least);
            }
        }
        let n = self.strikes.entry(peer).or_insert(0);
        *n += 1;
        *n >= FAR_STRIKES
    }

    fn forget_if_full(&mut self, peer: PeerId) {
        if self.drift.len() >= MAX_TRACKED_PEERS && !self.drift.contains_key(&peer) {
            if let Some(smallest) = self
                .drift
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(p, _)| *p)
            {
                self.drift.remove(&smallest);
            }
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warmed(distances: &[f64]) -> MixGuard {
        let mut g = MixGuard::new(2.0, 10, 20);
        for (i, d) in distances.iter().enumerate() {
            // Many peers, so no single one runs out of drift budget.
            let peer = PeerId::random();
            let _ = g.judge(peer, *d, 100 + i as u64, 100);
            g.observe(peer, i as u64, *d);
        }
        g
    }

    #[test]
    fn before_anything_is_known_the_runs_bound_applies() {
        let g = MixGuard::new(2.0, 10, 20);
        assert_eq!(g.reference(), None);
        assert_eq!(g.bound(), 2.0);
        assert_eq!(g.severity(2.0), Severity::Far);
        assert_eq!(g.severity(1.9), Severity::Outlier);
    }

    #[test]
    fn the_bound_follows_the_typical_peers_largest_distance() {
        let g = warmed(&[0.1, 0.08, 0.12, 0.09, 0.11, 0.1]);
        let r = g.reference().unwrap();
        assert!((r - 0.1).abs() < 1e-12, "{r}");
        assert!((g.bound() - REFUSE_FACTOR * 0.1).abs() < 1e-12);
        // Scaled or noised parameters at 1.996 are far beyond it, and penalized.
        assert_eq!(g.severity(1.996), Severity::Far);
        assert_eq!(g.severity(0.4), Severity::Outlier);
        // It never exceeds the run's bound.
        let wide = warmed(&[1.0; 8]);
        assert_eq!(wide.bound(), 2.0);
    }

    #[test]
    fn a_partner_just_averaged_with_does_not_shrink_the_reference() {
        // Three peers, each measured far off once and then close to 0 (right after a mix).
        let mut g = MixGuard::new(2.0, 10, 20);
        let peers = [PeerId::random(), PeerId::random(), PeerId::random()];
        for p in peers {
            g.observe(p, 0, 0.4);
        }
        for step in 1..9 {
            for p in peers {
                g.observe(p, step, 0.001);
            }
        }
        assert_eq!(g.reference(), Some(0.4));
        assert_eq!(g.severity(0.45), Severity::Outlier);
    }

    #[test]
    fn sessions_repeated_at_one_step_count_once_and_own_movement_is_a_floor() {
        let mut g = MixGuard::new(2.0, 10, 20);
        let (a, b) = (PeerId::random(), PeerId::random());
        g.observe(a, 10, 0.3);
        g.observe(b, 10, 0.3);
        // Waiting for a slow peer: forty sessions at step 20, each close to 0.
        for _ in 0..20 {
            g.observe(a, 20, 0.0001);
            g.observe(b, 20, 0.0001);
        }
        g.observe(a, 30, 0.2);
        g.observe(b, 30, 0.2);
        assert_eq!(g.measured.len(), 6);
        assert_eq!(g.reference(), Some(0.3));
        // Our own movement per period floors it.
        g.note_own_movement(0.5);
        assert_eq!(g.reference(), Some(0.5));
    }

    #[test]
    fn one_peer_cannot_drag_the_median() {
        let mut g = warmed(&[0.1; 20]);
        let rogue = PeerId::random();
        for _ in 0..12 {
            // Just below the bound each time, a third of the mixes.
            let d = g.bound() * 0.99;
            let _ = g.judge(rogue, d, 100, 100);
            g.observe(rogue, 100, d);
            // Or far beyond it, refused: one vote all the same.
            g.observe(rogue, 101, 1.99);
        }
        assert!(g.reference().unwrap() <= 0.1 + 1e-12, "{:?}", g.reference());
    }

    #[test]
    fn a_claimed_sample_count_does_not_buy_weight() {
        let mut g = warmed(&[0.1; 8]);
        match g.judge(PeerId::random(), 0.1, 100, 1_000_000_000_000) {
            Decision::Mix { weight, .. } => assert!(weight <= 2.0 / 3.0 + 1e-12, "{weight}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deltas_beyond_the_clip_radius_are_mixed_as_if_clipped() {
        let mut g = warmed(&[0.1; 8]);
        match g.judge(PeerId::random(), 0.4, 100, 100) {
            Decision::Mix {
                weight, clipped, ..
            } => {
                assert!(clipped);
                // 0.5 * tau / d: the movement is what a delta of norm tau would cause.
                assert!(
                    (weight * 0.4 - 0.5 * CLIP_FACTOR * 0.1).abs() < 1e-9,
                    "{weight}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_peers_drift_is_bounded_and_an_honest_sole_partner_is_not_limited() {
        let mut g = warmed(&[0.1; 8]);
        let rogue = PeerId::random();
        let (mut moved, mut limited) = (0.0, 0);
        for i in 0..50 {
            // Two mixes in three from the same peer, at the clip radius and a huge claim; the
            // third from one of several honest peers.
            if i % 2 == 1 {
                let honest = PeerId::random();
                let _ = g.judge(honest, 0.1, 100, 100);
                g.observe(honest, i, 0.1);
            }
            g.observe(rogue, i, 0.25);
            match g.judge(rogue, 0.25, 100, u64::MAX) {
                Decision::Mix {
                    weight,
                    drift_limited,
                    ..
                } => {
                    moved += weight * 0.25;
                    limited += usize::from(drift_limited);
                }
                Decision::Skip => {}
            }
        }
        assert!(limited > 10, "the budget ran out: {limited}");
        // The peer moves the model by at most the budget plus what the decay frees, against
        // 50 * 2/3 * 0.25 = 8.3 unlimited.
        let budget = DRIFT_FACTOR * 0.1;
        let decays = 75.0; // mixes in all, each freeing a tenth of the peer's sum at most
        assert!(
            moved <= budget * (1.0 + decays * (1.0 - DRIFT_DECAY)) + 1e-9,
            "{moved}"
        );

        // The only partner of a two-node run, at typical distances and equal samples, is
        // never limited.
        let mut g = warmed(&[0.1; 8]);
        let partner = PeerId::random();
        for i in 0..100 {
            match g.judge(partner, 0.1, 1000 + i, 1000 + i) {
                Decision::Mix { drift_limited, .. } => assert!(!drift_limited, "mix {i}"),
                Decision::Skip => panic!("skipped at {i}"),
            }
        }
    }

    #[test]
    fn before_a_reference_deltas_are_clipped_to_half_the_runs_bound() {
        let mut g = MixGuard::new(2.0, 10, 20);
        match g.judge(PeerId::random(), 1.9, 100, 100) {
            Decision::Mix {
                weight, clipped, ..
            } => {
                assert!(clipped);
                assert!((weight - 0.5 * 1.0 / 1.9).abs() < 1e-9, "{weight}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_are_free_early_and_between_peers_far_apart_in_steps() {
        let g = MixGuard::new(2.0, 10, 20);
        assert!(g.free_refusal(0, 0) && g.free_refusal(49, 49));
        assert!(!g.free_refusal(50, 50));
        assert!(
            !g.free_refusal(300, 260),
            "within bounded staleness: in sync"
        );
        assert!(g.free_refusal(300, 10), "a late starter");
        assert!(g.free_refusal(10 + 300, 300 + 300 + 50));
    }

    #[test]
    fn outer_parameters_cost_a_penalty_only_at_the_runs_bound() {
        // Honest distances of 0.05: parameters 6x farther are far, but outer parameters are
        // penalized only at the run's bound of 2.0.
        let g = warmed(&[0.05; 8]);
        let (step, peer_step) = (100, 100);
        let at = |distance: f64| params::Refusal::TooFar {
            distance,
            bound: g.bound(),
        };
        assert_eq!(g.cost(&at(0.5), false, (step, peer_step)), Cost::Penalty);
        assert_eq!(g.cost(&at(0.5), true, (step, peer_step)), Cost::Free);
        assert_eq!(g.cost(&at(0.2), false, (step, peer_step)), Cost::Free);
        assert_eq!(g.cost(&at(2.0), true, (step, peer_step)), Cost::Penalty);
        let opposed = params::Refusal::Opposed { cosine: -0.04 };
        assert_eq!(g.cost(&opposed, false, (step, peer_step)), Cost::Penalty);
        assert_eq!(g.cost(&opposed, true, (step, peer_step)), Cost::Free);
        // Broken values exclude, even in the first rounds; nothing else costs anything then.
        let nan = params::Refusal::NonFinite(3);
        assert_eq!(g.cost(&nan, true, (0, 0)), Cost::Exclusion);
        assert_eq!(g.cost(&at(2.0), true, (0, 0)), Cost::Free);
        assert_eq!(g.cost(&opposed, false, (0, 0)), Cost::Free);
    }

    #[test]
    fn a_peer_is_excluded_at_its_third_far_refusal() {
        let mut g = MixGuard::new(2.0, 10, 20);
        let (bad, other) = (PeerId::random(), PeerId::random());
        assert!(!g.strike(bad));
        assert!(!g.strike(other));
        assert!(!g.strike(bad));
        assert!(g.strike(bad));
    }

    #[test]
    fn the_drift_table_is_bounded() {
        let mut g = MixGuard::new(2.0, 10, 20);
        for _ in 0..MAX_TRACKED_PEERS + 10 {
            let _ = g.judge(PeerId::random(), 0.01, 10, 10);
        }
        assert!(g.drift.len() <= MAX_TRACKED_PEERS);
    }
}
