//! Fused CPU optimizer updates: each parameter tensor is updated in one pass, in place, with
//! the optimizer state in plain buffers, instead of a dozen tensor ops that each allocate a
//! full-size temporary (candle's `AdamW` allocates eight per tensor and step, and copies three
//! back). The arithmetic follows the reference updates in [`super`] operation by operation, in
//! f32 with the same constants, so both give the same numbers (the tests check it).
//!
//! The update rules are pure functions on slices ([`adamw_update`], [`sgd_update`]); a small
//! candle in-place op ([`InPlace`]) hands them a variable's storage and its gradient.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};

use crate::Result;

/// AdamW hyperparameters of one step (bias corrections included).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The step number, from 1.
    pub t: u64,
}

/// SGD hyperparameters.
#[derive(Debug, Clone, Copy)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum (0: plain SGD, no velocity kept).
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Whether the velocity holds anything yet (the first step starts it from the gradient).
    pub has_velocity: bool,
}

/// One AdamW update of `p` from `g`, moving the moments `m` and `v`; all slices the same length.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
    let t = i32::try_from(h.t).unwrap_or(i32::MAX);
    let scale_m = (1.0 / (1.0 - h.beta1.powi(t))) as f32;
    let scale_v = (1.0 / (1.0 - h.beta2.powi(t))) as f32;
    let (b1, one_b1) = (h.beta1 as f32, (1.0 - h.beta1) as f32);
    let (b2, one_b2) = (h.beta2 as f32, (1.0 - h.beta2) as f32);
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let (lr, eps) = (h.lr as f32, h.eps as f32);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = *m * b1 + g * one_b1;
        *v = *v * b2 + (g * g) * one_b2;
        let adjusted = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
        *p = *p * decay - adjusted * lr;
    }
}

/// One SGD update of `p` from `g`: `g += wd * p; vel = momentum * vel + g; p -= lr * vel`.
pub fn sgd_update(p: &mut [f32], g: &[f32], velocity: &mut [f32], h: SgdStep) {
    let (lr, momentum, wd) = (h.lr as f32, h.momentum as f32, h.weight_decay as f32);
    for ((p, &g), vel) in p.iter_mut().zip(g).zip(velocity.iter_mut()) {
        let g = if h.weight_decay > 0.0 { g + *p * wd } else { g };
        let step = if h.momentum > 0.0 {
            *vel = if h.has_velocity {
                *vel * momentum + g
            } else {
                g
            };
            *vel
        } else {
            g
        };
        *p -= step * lr;
    }
}

/// An update rule applied in place to a variable's storage, given its gradient.
pub struct InPlace<'a, F: Fn(&mut [f32], &[f32], &mut [f32], &mut [f32])> {
    /// Optimizer state buffers for this variable (the second is empty for SGD).
    pub state: RefCell<(&'a mut [f32], &'a mut [f32])>,
    /// The update.
    pub update: F,
}

impl<F: Fn(&mut [f32], &[f32], &mut [f32], &mut [f32])> InplaceOp2 for InPlace<'_, F> {
    fn name(&self) -> &'static str {
        "fused-optimizer-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused optimizer: f32 parameters and gradients only");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused optimizer: contiguous parameters and gradients only");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut state = self.state.borrow_mut();
        let (a, b) = &mut *state;
        if p.len() != g.len() || a.len() != p.len() {
            candle_core::bail!("fused optimizer: parameter, gradient and state lengths differ");
        }
        (self.update)(p, g, a, b);
        Ok(())
    }
}

/// Applies `update` to `var` in place from `grad`, with the state buffers `a` and `b`.
pub fn apply(
    var: &Var,
    grad: &Tensor,
    a: &mut [f32],
    b: &mut [f32],
    update: impl Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]),
) -> Result<()> {
    let grad = if grad.is_contiguous() {
        grad.clone()
    } else {
        grad.contiguous()?
    };
    let op = InPlace {
        state: RefCell::new((a, b)),
        update,
    };
    Ok(var.as_tensor().inplace_op2(&grad, &op)?)
}
