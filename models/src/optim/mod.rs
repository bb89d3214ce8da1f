//! [`Optimizer`]: the local optimizer a run names, behind one interface: SGD (with optional
//! momentum and L2 weight decay, PyTorch's semantics) or AdamW (candle's semantics).
//!
//! On the CPU the updates are fused ([`fused`]): one in-place pass per tensor. Elsewhere (CUDA,
//! Metal) they are tensor ops: [`Sgd`] here and candle's `AdamW`, which are also the reference
//! the fused updates are tested against.

pub mod fused;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer as _, ParamsAdamW};

use crate::spec::{OptimizerKind, RunSpec};
use crate::Result;

use fused::{AdamWStep, SgdStep};

/// A local optimizer over a model's variables.
pub enum Optimizer {
    /// Stochastic gradient descent, in tensor ops.
    Sgd(Sgd),
    /// AdamW, in tensor ops (candle's).
    AdamW(Box<AdamW>),
    /// Stochastic gradient descent, fused (CPU).
    FusedSgd(FusedSgd),
    /// AdamW, fused (CPU).
    FusedAdamW(FusedAdamW),
}

impl Optimizer {
    /// The optimizer `spec` names over `vars`, at the spec's peak learning rate: fused when
    /// every variable is an f32 tensor on the CPU, in tensor ops otherwise.
    pub fn new(spec: &RunSpec, vars: Vec<Var>) -> Result<Self> {
        let fusable = vars
            .iter()
            .all(|v| v.device().is_cpu() && v.dtype() == candle_core::DType::F32);
        if !fusable {
            return Self::reference(spec, vars);
        }
        let state = |vars: &[Var]| vars.iter().map(|v| vec![0f32; v.elem_count()]).collect();
        Ok(match spec.optimizer {
            OptimizerKind::Sgd => Self::FusedSgd(FusedSgd {
                velocity: state(&vars),
                started: vec![false; vars.len()],
                vars,
                lr: spec.learning_rate,
                momentum: spec.momentum,
                weight_decay: spec.weight_decay,
            }),
            OptimizerKind::Adamw => {
                let defaults = ParamsAdamW::default();
                Self::FusedAdamW(FusedAdamW {
                    m: state(&vars),
                    v: state(&vars),
                    vars,
                    t: 0,
                    step: AdamWStep {
                        lr: spec.learning_rate,
                        beta1: defaults.beta1,
                        beta2: defaults.beta2,
                        eps: defaults.eps,
                        weight_decay: spec.weight_decay,
                        t: 0,
                    },
                })
            }
        })
    }

    /// The optimizer `spec` names over `vars`, in tensor ops on any device.
    pub fn reference(spec: &RunSpec, vars: Vec<Var>) -> Result<Self> {
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
            Self::FusedSgd(s) => s.step(grads),
            Self::FusedAdamW(a) => a.step(grads),
        }
    }

    /// Sets the learning rate for the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::Sgd(s) => s.lr = lr,
            Self::AdamW(a) => a.set_learning_rate(lr),
            Self::FusedSgd(s) => s.lr = lr,
            Self::FusedAdamW(a) => a.step.lr = lr,
        }
    }
}

/// SGD with its velocities in plain buffers, updated in place.
pub struct FusedSgd {
    vars: Vec<Var>,
    velocity: Vec<Vec<f32>>,
    started: Vec<bool>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl FusedSgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for ((var, velocity), started) in self
            .vars
            .iter()
            .zip(self.velocity.iter_mut())
            .zip(self.started.iter_mut())
        {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let h = SgdStep {
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                has_velocity: *started,
            };
            fused::apply(var, grad, velocity, &mut [], |p, g, vel, _| {
                fused::sgd_update(p, g, vel, h)
            })?;
            *started = true;
        }
        Ok(())
    }
}

/// AdamW with its moments in plain buffers, updated in place.
pub struct FusedAdamW {
    vars: Vec<Var>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: u64,
    step: AdamWStep,
}

impl FusedAdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let h = AdamWStep {
            t: self.t,
            ..self.step
        };
        for ((var, m), v) in self
            .vars
            .iter()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            if let Some(grad) = grads.get(var) {
                fused::apply(var, grad, m, v, |p, g, m, v| {
                    fused::adamw_update(p, g, m, v, h)
                })?;
            }
        }
        Ok(())
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

    /// Trains two copies of a model from the same weights on the same batches, one with the
    /// fused optimizer and one with the tensor-op reference; returns the largest difference
    /// between their parameters relative to the parameters' largest magnitude.
    fn fused_against_reference(spec_text: &str, steps: usize) -> f64 {
        use crate::model::{Batch, Model};
        let spec = RunSpec::parse(spec_text).unwrap();
        let device = Device::Cpu;
        let (fused_model, reference_model) = (
            Model::new(&spec, &device).unwrap(),
            Model::new(&spec, &device).unwrap(),
        );
        let mut fused = Optimizer::new(&spec, fused_model.vars().to_vec()).unwrap();
        let mut reference = Optimizer::reference(&spec, reference_model.vars().to_vec()).unwrap();
        assert!(matches!(
            fused,
            Optimizer::FusedSgd(_) | Optimizer::FusedAdamW(_)
        ));
        assert!(matches!(reference, Optimizer::Sgd(_) | Optimizer::AdamW(_)));
        let b = spec.batch_size;
        for step in 0..steps {
            let inputs = Tensor::rand(0f32, 1f32, (b, spec.input_dim()), &device).unwrap();
            let labels: Vec<u32> = (0..b).map(|i| ((i + step) % 10) as u32).collect();
            let batch = Batch {
                inputs,
                targets: Tensor::new(labels, &device).unwrap(),
            };
            // A decaying learning rate, as the cosine schedule sets it between steps.
            let lr = spec.learning_rate * (1.0 - step as f64 / (2 * steps) as f64);
            for (model, opt) in [
                (&fused_model, &mut fused),
                (&reference_model, &mut reference),
            ] {
                opt.set_learning_rate(lr);
                let grads = model.loss(&batch).unwrap().backward().unwrap();
                opt.step(&grads).unwrap();
            }
        }
        let (a, b) = (
            fused_model.params().unwrap(),
            reference_model.params().unwrap(),
        );
        let initial = Model::new(&spec, &device).unwrap().params().unwrap();
        assert!(
            b.iter().zip(&initial).any(|(x, y)| (x - y).abs() > 1e-3),
            "training moved the parameters"
        );
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
        eprintln!("relative difference {:e}", diff / scale);
        diff / scale
    }

    #[test]
    fn fused_adamw_matches_the_reference_over_many_steps() {
        let spec = "model = \"digits-mlp\"\ndataset = \"digits\"\nhidden = [32, 16]\n\
                    optimizer = \"adamw\"\nlearning_rate = 0.002\nweight_decay = 0.01\n";
        let rel = fused_against_reference(spec, 200);
        assert!(
            rel <= 1e-6,
            "fused AdamW drifted from the reference: {rel:e}"
        );
    }

    #[test]
    fn fused_sgd_with_momentum_and_decay_matches_the_reference_over_many_steps() {
        let spec = "model = \"digits-mlp\"\ndataset = \"digits\"\nhidden = [32, 16]\n\
                    learning_rate = 0.05\nmomentum = 0.9\nweight_decay = 0.001\n";
        let rel = fused_against_reference(spec, 200);
        assert!(rel <= 1e-6, "fused SGD drifted from the reference: {rel:e}");
    }

    #[test]
    fn fused_plain_sgd_matches_the_reference() {
        let spec = "model = \"digits-mlp\"\ndataset = \"digits\"\nlearning_rate = 0.1\n\
                    momentum = 0.0\n";
        let rel = fused_against_reference(spec, 50);
        assert!(rel <= 1e-6, "fused SGD drifted from the reference: {rel:e}");
    }
}
