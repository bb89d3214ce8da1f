//! [`Optimizer`]: the local optimizer a run names, behind one interface: SGD (with optional
//! momentum and L2 weight decay, PyTorch's semantics) or AdamW (candle's).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer as _, ParamsAdamW};

use crate::spec::{OptimizerKind, RunSpec};
use crate::Result;

/// A local optimizer over a model's variables.
pub enum Optimizer {
    /// Stochastic gradient descent.
    Sgd(Sgd),
    /// AdamW.
    AdamW(Box<AdamW>),
}

impl Optimizer {
    /// The optimizer `spec` names over `vars`, at the spec's peak learning rate.
    pub fn new(spec: &RunSpec, vars: Vec<Var>) -> Result<Self> {
        Ok(match spec.optimizer {
            OptimizerKind::Sgd => Self::Sgd(Sgd::new(
                vars,
                spec.learning_rate,
                spec.momentum,
                spec.weight_decay,
            )),
            OptimizerKind::Adamw => Self::AdamW(Box::new(AdamW::new(
                vars,
                ParamsAdamW {
                    lr: spec.learning_rate,
                    weight_decay: spec.weight_decay,
                    ..ParamsAdamW::default()
                },
            )?)),
        })
    }

    /// Applies one update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::Sgd(s) => s.step(grads),
            Self::AdamW(a) => Ok(a.step(grads)?),
        }
    }

    /// Sets the learning rate for the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::Sgd(s) => s.lr = lr,
            Self::AdamW(a) => a.set_learning_rate(lr),
        }
    }
}

/// SGD: `g = grad + wd * p; v = momentum * v + g; p -= lr * v` (plain `p -= lr * g` without
/// momentum).
pub struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    /// SGD over `vars`.
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Self {
            velocity: vec![None; vars.len()],
            vars,
            lr,
            momentum,
            weight_decay,
        }
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let mut g = grad.clone();
            if self.weight_decay > 0.0 {
                g = (g + (var.as_tensor() * self.weight_decay)?)?;
            }
            if self.momentum > 0.0 {
                let v = match velocity.take() {
                    Some(v) => ((v * self.momentum)? + g)?,
                    None => g,
                };
                g = v.clone();
                *velocity = Some(v);
            }
            var.set(&(var.as_tensor() - (g * self.lr)?)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sgd_with_momentum_follows_the_reference_update() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut sgd = Sgd::new(vec![p.clone()], 0.1, 0.9, 0.0);
        // Loss = sum(p^2) / 2, so grad = p.
        let mut reference = [1.0f64, -2.0];
        let mut v = [0.0f64; 2];
        for _ in 0..5 {
            let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            sgd.step(&loss.backward().unwrap()).unwrap();
            for i in 0..2 {
                v[i] = 0.9 * v[i] + reference[i];
                reference[i] -= 0.1 * v[i];
            }
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(got[i]) - reference[i]).abs() < 1e-6,
                "{got:?} vs {reference:?}"
            );
        }
    }
}
