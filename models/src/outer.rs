//! The outer loop of local-SGD training (DiLoCo: Douillard et al., "DiLoCo: Distributed
//! Low-Communication Training of Language Models", 2023).
//!
//! Every node holds the shared *outer* parameters θ. It runs `inner_steps` steps of its inner
//! optimizer from them, and its *pseudo-gradient* is where it started minus where it ended
//! ([`pseudo_gradient`]). Nodes average their pseudo-gradients (weighted by samples) and apply
//! the average to θ with the *outer optimizer* ([`OuterOptimizer`]): SGD with Nesterov momentum,
//! learning rate 0.7 and momentum 0.9 in DiLoCo. With learning rate 1 and no momentum the outer
//! step is plain averaging of the nodes' models (FedAvg).

use crate::{Error, Result};

/// `start - end`: how far the inner steps moved the parameters, as a gradient (positive
/// where they went down).
pub fn pseudo_gradient(start: &[f32], end: &[f32]) -> Vec<f32> {
    start.iter().zip(end).map(|(s, e)| s - e).collect()
}

/// SGD with (optionally Nesterov) momentum on the outer parameters, as PyTorch's `SGD` with
/// `dampening = 0` computes it: `v ← μ v + g`, then `θ ← θ − lr (g + μ v)` with Nesterov or
/// `θ ← θ − lr v` without.
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    learning_rate: f64,
    momentum: f64,
    nesterov: bool,
    velocity: Vec<f32>,
}

impl OuterOptimizer {
    /// An optimizer with no momentum accumulated yet.
    pub fn new(learning_rate: f64, momentum: f64, nesterov: bool) -> Self {
        Self {
            learning_rate,
            momentum,
            nesterov,
            velocity: Vec::new(),
        }
    }

    /// Applies the pseudo-gradient `g` to `params` (same length, else an error).
    pub fn step(&mut self, params: &mut [f32], g: &[f32]) -> Result<()> {
        self.step_scaled(params, g, 1.0, f64::INFINITY).map(|_| ())
    }

    /// [`Self::step`] at `scale` times the learning rate, capped at `max_rate`, for this step
    /// only (an adaptive outer step, see [`extrapolation_factor`]). Gives the learning rate
    /// it applied.
    pub fn step_scaled(
        &mut self,
        params: &mut [f32],
        g: &[f32],
        scale: f64,
        max_rate: f64,
    ) -> Result<f64> {
        if params.len() != g.len() {
            return Err(Error::Params(format!(
                "a pseudo-gradient of {} values for {} parameters",
                g.len(),
                params.len()
            )));
        }
        if self.velocity.len() != params.len() {
            self.velocity = vec![0.0; params.len()];
        }
        let rate = (self.learning_rate * scale).min(max_rate);
        let (lr, mu) = (rate as f32, self.momentum as f32);
        for ((p, g), v) in params.iter_mut().zip(g).zip(self.velocity.iter_mut()) {
            *v = mu * *v + g;
            let update = if self.nesterov { g + mu * *v } else { *v };
            *p -= lr * update;
        }
        Ok(rate)
    }

    /// The momentum buffer (empty before the first step).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Replaces the momentum buffer (a node resuming, or joining from a peer's state); one of
    /// another length is ignored.
    pub fn set_velocity(&mut self, velocity: Vec<f32>) {
        self.velocity = velocity;
    }
}

/// Adds `weight × values` to a running weighted sum; `sum` starts empty.
pub fn accumulate(sum: &mut Vec<f64>, values: &[f32], weight: f64) {
    if sum.len() != values.len() {
        *sum = vec![0.0; values.len()];
    }
    for (s, v) in sum.iter_mut().zip(values) {
        *s += weight * f64::from(*v);
    }
}

/// FedExP's server step size (Jhunjhunwala, Wang and Joshi, "FedExP: Speeding up Federated
/// Averaging via Extrapolation", ICLR 2023, eq. 9 with its ε at 0): `max(1, sum_sq / (2 M
/// mean_sq))`, where `sum_sq` is the sum of the squared L2 norms of `M = count` updates and
/// `mean_sq` the squared L2 norm of their mean. Updates that agree give 1 (the factor is at
/// least 1); `M` orthogonal updates of equal norm give `M / 2`. Unbounded as the mean
/// vanishes, so the caller caps the rate (ours: at `M`); a mean of norm 0 (or no updates, or
/// values that are not finite) gives 1.
pub fn extrapolation_factor(sum_sq: f64, count: u32, mean_sq: f64) -> f64 {
    let factor = sum_sq / (2.0 * f64::from(count) * mean_sq);
    if factor.is_finite() {
        factor.max(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::dot;

    /// PyTorch 2.x `torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)` on
    /// `p = [1.0, -2.0]` with gradients `[0.5, 0.25]`, `[0.5, -0.5]`, `[-0.1, 0.0]`, written out
    /// by hand from its documented update (`dampening = 0`).
    #[test]
    fn nesterov_matches_the_reference_update() {
        let mut params = vec![1.0f32, -2.0];
        let mut opt = OuterOptimizer::new(0.7, 0.9, true);
        let grads = [[0.5f32, 0.25], [0.5, -0.5], [-0.1, 0.0]];
        // Reference, in f64.
        let (mut p, mut v) = ([1.0f64, -2.0], [0.0f64, 0.0]);
        for g in grads {
            opt.step(&mut params, &g).unwrap();
            for i in 0..2 {
                v[i] = 0.9 * v[i] + f64::from(g[i]);
                p[i] -= 0.7 * (f64::from(g[i]) + 0.9 * v[i]);
            }
        }
        // Step 1: v = [0.5, 0.25], p = [1 - 0.7*0.95, -2 - 0.7*0.475] = [0.335, -2.3325].
        // Step 2: v = [0.95, -0.275], p = [0.335 - 0.7*1.355, -2.3325 - 0.7*(-0.7475)].
        // Step 3: v = [0.755, -0.2475], p -= 0.7 * [0.5795, -0.22275].
        let expected = [
            0.335 - 0.7 * 1.355 - 0.7 * 0.5795,
            -2.3325 + 0.7 * 0.7475 + 0.7 * 0.22275,
        ];
        for i in 0..2 {
            assert!(
                (f64::from(params[i]) - p[i]).abs() < 1e-6,
                "{params:?} vs {p:?}"
            );
            assert!((p[i] - expected[i]).abs() < 1e-7, "{p:?} vs {expected:?}");
        }
    }

    #[test]
    fn learning_rate_one_without_momentum_is_model_averaging() {
        // Two nodes started at 1.0 and ended at 0.6 and 0.8: the outer step lands on their
        // average, 0.7.
        let start = [1.0f32];
        let mut sum = Vec::new();
        accumulate(&mut sum, &pseudo_gradient(&start, &[0.6]), 1.0);
        accumulate(&mut sum, &pseudo_gradient(&start, &[0.8]), 1.0);
        let average: Vec<f32> = sum.iter().map(|s| (s / 2.0) as f32).collect();
        let mut params = start.to_vec();
        OuterOptimizer::new(1.0, 0.0, false)
            .step(&mut params, &average)
            .unwrap();
        assert!((params[0] - 0.7).abs() < 1e-6);
    }

    #[test]
    fn a_capped_step_uses_the_lower_rate_for_that_step_only() {
        let mut params = vec![0.0f32];
        let mut opt = OuterOptimizer::new(2.0, 0.0, false);
        opt.step_scaled(&mut params, &[1.0], 1.0, 1.0).unwrap();
        assert_eq!(params, [-1.0]);
        opt.step(&mut params, &[1.0]).unwrap();
        assert_eq!(params, [-3.0]);
        // A cap above the learning rate changes nothing.
        opt.step_scaled(&mut params, &[1.0], 1.0, 5.0).unwrap();
        assert_eq!(params, [-5.0]);
    }

    /// FedExP's factor on hand-computed cases: two equal updates (they agree: 1), two
    /// orthogonal unit updates (sum of squares 2, mean [0.5, 0.5] of squared norm 0.5:
    /// 2 / (2 * 2 * 0.5) = 1), four orthogonal unit updates (4 / (2 * 4 * 0.25) = 2 = M / 2),
    /// and opposite updates (a mean of 0: no extrapolation).
    #[test]
    fn extrapolation_factor_matches_fedexp_on_fixed_vectors() {
        let factor = |updates: &[Vec<f32>]| {
            let mut sum = Vec::new();
            for u in updates {
                accumulate(&mut sum, u, 1.0);
            }
            let m = updates.len() as f64;
            let mean: Vec<f32> = sum.iter().map(|s| (s / m) as f32).collect();
            let sum_sq = updates.iter().map(|u| dot(u, u)).sum();
            extrapolation_factor(sum_sq, updates.len() as u32, dot(&mean, &mean))
        };
        assert_eq!(factor(&[vec![1.0, 2.0], vec![1.0, 2.0]]), 1.0);
        assert!((factor(&[vec![1.0, 0.0], vec![0.0, 1.0]]) - 1.0).abs() < 1e-12);
        let unit = |i: usize| {
            let mut v = vec![0.0f32; 4];
            v[i] = 1.0;
            v
        };
        let four: Vec<Vec<f32>> = (0..4).map(unit).collect();
        assert!((factor(&four) - 2.0).abs() < 1e-12);
        assert_eq!(factor(&[vec![1.0, -1.0], vec![-1.0, 1.0]]), 1.0);
        assert_eq!(extrapolation_factor(0.0, 0, 0.0), 1.0);
    }

    #[test]
    fn a_scaled_step_multiplies_the_rate_up_to_its_cap() {
        let mut params = vec![1.0f32];
        let mut opt = OuterOptimizer::new(0.5, 0.0, false);
        assert_eq!(
            opt.step_scaled(&mut params, &[1.0], 3.0, 10.0).unwrap(),
            1.5
        );
        assert!((params[0] - (1.0 - 1.5)).abs() < 1e-6, "{params:?}");
        assert_eq!(opt.step_scaled(&mut params, &[1.0], 3.0, 1.0).unwrap(), 1.0);
        assert!((params[0] - (1.0 - 1.5 - 1.0)).abs() < 1e-6, "{params:?}");
    }

    #[test]
    fn plain_momentum_and_a_wrong_length() {
        let mut params = vec![0.0f32];
        let mut opt = OuterOptimizer::new(0.5, 0.5, false);
        opt.step(&mut params, &[1.0]).unwrap();
        opt.step(&mut params, &[1.0]).unwrap();
        // v = 1, then 1.5: p = -0.5 - 0.75.
        assert!((params[0] + 1.25).abs() < 1e-6);
        assert!(opt.step(&mut params, &[1.0, 2.0]).is_err());
    }
}
