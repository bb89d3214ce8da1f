//! [`Model`]: the network a [`RunSpec`] names, its weights (one candle `VarMap`), their
//! [`Layout`] as a flat vector, and loss and evaluation on a [`Dataset`].
//!
//! Initial weights are drawn from the run's seed, so every node that builds version 0 of a
//! run gets the same bytes: MLP layers as PyTorch initialises `nn.Linear` (uniform within
//! `1/sqrt(fan_in)`), the transformer GPT-style (normal, std 0.02; residual projections scaled
//! down by `sqrt(2 layers)`; norms at 1 and 0).

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr_free::normal;

use crate::data::{Dataset, Labeled};
use crate::mlp::Mlp;
use crate::params::{Layout, TensorShape};
use crate::spec::{ModelKind, RunSpec};
use crate::transformer::{CharTransformer, TransformerConfig};
use crate::{Error, Result};

/// Largest batch evaluated at once.
const EVAL_BATCH: usize = 512;

/// Most text windows evaluated (each `context` characters).
const EVAL_WINDOWS: usize = 256;

/// The network itself.
#[derive(Debug, Clone)]
enum Net {
    Mlp(Mlp),
    Transformer(CharTransformer),
}

/// Loss and accuracy on a data split.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of correct predictions (next character, for text).
    pub accuracy: f64,
    /// Predictions evaluated.
    pub samples: usize,
}

impl Evaluation {
    /// The loss in bits (per character, for text): the mean cross-entropy over ln 2.
    pub fn bits_per_char(&self) -> f64 {
        self.loss / std::f64::consts::LN_2
    }
}

/// One batch of inputs and targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, features]` f32 or `[batch, t]` u32 token ids.
    pub inputs: Tensor,
    /// `[batch]` or `[batch, t]` u32 targets.
    pub targets: Tensor,
}

/// A model with its weights.
pub struct Model {
    varmap: VarMap,
    net: Net,
    layout: Layout,
    vars: Vec<Var>,
    device: Device,
    kind: ModelKind,
}

impl Model {
    /// Builds the model `spec` names on `device`, with the run's initial weights.
    pub fn new(spec: &RunSpec, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let net = match spec.model {
            ModelKind::DigitsMlp => {
                let mut dims = vec![spec.input_dim()];
                dims.extend(&spec.hidden);
                dims.push(10);
                Net::Mlp(Mlp::new(&dims, vb)?)
            }
            ModelKind::CharTransformer => {
                Net::Transformer(CharTransformer::new(transformer_config(spec), vb)?)
            }
        };
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| Error::Params("weights lock poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let layout = Layout::new(
            named
                .iter()
                .map(|(name, var)| TensorShape {
                    name: name.clone(),
                    shape: var.dims().to_vec(),
                })
                .collect(),
        );
        let model = Self {
            varmap,
            net,
            layout,
            vars: named.into_iter().map(|(_, v)| v).collect(),
            device: device.clone(),
            kind: spec.model,
        };
        model.set_params(&initial_params(spec, &model.layout))?;
        Ok(model)
    }

    /// The tensors, sorted by name.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The trainable variables, in layout order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights as one flat vector in layout order.
    pub fn params(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.layout.len());
        for var in &self.vars {
            out.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Replaces the weights with `values` (layout order). The length must match and every value
    /// must be finite.
    pub fn set_params(&self, values: &[f32]) -> Result<()> {
        if values.len() != self.layout.len() {
            return Err(Error::Params(format!(
                "{} values for a model of {} parameters",
                values.len(),
                self.layout.len()
            )));
        }
        if let Some(i) = crate::params::first_non_finite(values) {
            return Err(Error::Params(format!("parameter {i} is not finite")));
        }
        for ((shape, range), var) in self.layout.ranges().zip(&self.vars) {
            let t = Tensor::from_slice(&values[range], shape.shape.as_slice(), &self.device)?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The `VarMap` holding the weights.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Logits for a batch of inputs.
    pub fn forward(&self, inputs: &Tensor) -> Result<Tensor> {
        Ok(match &self.net {
            Net::Mlp(m) => m.forward(inputs)?,
            Net::Transformer(t) => t.forward(inputs)?,
        })
    }

    /// Mean cross-entropy of a batch (a scalar tensor, differentiable).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let logits = self.forward(&batch.inputs)?;
        let classes = logits.dim(D::Minus1)?;
        let logits = logits.reshape(((), classes))?;
        let targets = batch.targets.flatten_all()?;
        Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
    }

    /// Loss and accuracy on the test split of `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation> {
        match data {
            Dataset::Labeled { test, .. } => self.evaluate_labeled(test),
            Dataset::Text { test, .. } => self.evaluate_text(test),
        }
    }

    /// Loss and accuracy on labelled samples.
    pub fn evaluate_labeled(&self, set: &Labeled) -> Result<Evaluation> {
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for start in (0..set.len()).step_by(EVAL_BATCH) {
            let idx: Vec<usize> = (start..(start + EVAL_BATCH).min(set.len())).collect();
            let batch = labeled_batch(set, &idx, &self.device)?;
            let (l, c) = self.batch_scores(&batch)?;
            loss_sum += l * idx.len() as f64;
            correct += c;
        }
        Ok(finish(loss_sum, correct, set.len()))
    }

    fn evaluate_text(&self, tokens: &[u32]) -> Result<Evaluation> {
        let Net::Transformer(t) = &self.net else {
            return Err(Error::Data("text data needs the char-transformer".into()));
        };
        let context = t.config().context;
        let windows = (tokens.len().saturating_sub(1) / context).min(EVAL_WINDOWS);
        let starts: Vec<usize> = (0..windows).map(|w| w * context).collect();
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for chunk in starts.chunks((EVAL_BATCH / 8).max(1)) {
            let batch = text_batch(tokens, chunk, context, &self.device)?;
            let (l, c) = self.batch_scores(&batch)?;
            loss_sum += l * (chunk.len() * context) as f64;
            correct += c;
        }
        Ok(finish(loss_sum, correct, windows * context))
    }

    /// Mean loss and number of correct predictions of one batch.
    fn batch_scores(&self, batch: &Batch) -> Result<(f64, usize)> {
        let logits = self.forward(&batch.inputs)?;
        let classes = logits.dim(D::Minus1)?;
        let logits = logits.reshape(((), classes))?;
        let targets = batch.targets.flatten_all()?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let targets = targets.to_vec1::<u32>()?;
        let correct = predicted
            .iter()
            .zip(&targets)
            .filter(|(p, t)| p == t)
            .count();
        Ok((f64::from(loss), correct))
    }

    /// Which model this is.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }
}

fn finish(loss_sum: f64, correct: usize, n: usize) -> Evaluation {
    if n == 0 {
        return Evaluation {
            loss: f64::NAN,
            accuracy: 0.0,
            samples: 0,
        };
    }
    Evaluation {
        loss: loss_sum / n as f64,
        accuracy: correct as f64 / n as f64,
        samples: n,
    }
}

/// The transformer shape of a run.
pub fn transformer_config(spec: &RunSpec) -> TransformerConfig {
    let t = &spec.transformer;
    TransformerConfig {
        vocab: t.vocab.chars().count() + 1,
        context: t.context,
        dim: t.dim,
        heads: t.heads,
        layers: t.layers,
    }
}

/// A batch of the labelled samples at `indices`.
pub fn labeled_batch(set: &Labeled, indices: &[usize], device: &Device) -> Result<Batch> {
    let mut features = Vec::with_capacity(indices.len() * set.dim);
    indices
        .iter()
        .for_each(|i| features.extend_from_slice(set.row(*i)));
    let labels: Vec<u32> = indices.iter().map(|i| set.labels[*i]).collect();
    Ok(Batch {
        inputs: Tensor::from_vec(features, (indices.len(), set.dim), device)?,
        targets: Tensor::from_vec(labels, indices.len(), device)?,
    })
}

/// A batch of text windows: inputs `tokens[s..s+t]`, targets shifted by one, for each start.
pub fn text_batch(tokens: &[u32], starts: &[usize], t: usize, device: &Device) -> Result<Batch> {
    let mut inputs = Vec::with_capacity(starts.len() * t);
    let mut targets = Vec::with_capacity(starts.len() * t);
    for s in starts {
        let window = tokens
            .get(*s..s + t + 1)
            .ok_or_else(|| Error::Data("text window past the end of the data".into()))?;
        inputs.extend_from_slice(&window[..t]);
        targets.extend_from_slice(&window[1..]);
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (starts.len(), t), device)?,
        targets: Tensor::from_vec(targets, (starts.len(), t), device)?,
    })
}

/// The run's initial weights, drawn from its seed (see the module docs).
pub fn initial_params(spec: &RunSpec, layout: &Layout) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut out = Vec::with_capacity(layout.len());
    let fan_in = |name: &str| {
        let weight = name.replace(".bias", ".weight");
        layout
            .tensors
            .iter()
            .find(|t| t.name == weight)
            .and_then(|t| t.shape.get(1).copied())
            .unwrap_or(1)
    };
    for t in &layout.tensors {
        let n = t.len();
        match spec.model {
            ModelKind::DigitsMlp => {
                let bound = 1.0 / (fan_in(&t.name) as f32).sqrt();
                out.extend((0..n).map(|_| rng.gen_range(-bound..=bound)));
            }
            ModelKind::CharTransformer => {
                let is_norm = t.name.contains("ln");
                if t.name.ends_with(".bias") {
                    out.extend(std::iter::repeat_n(0.0, n));
                } else if is_norm {
                    out.extend(std::iter::repeat_n(1.0, n));
                } else {
                    let residual =
                        t.name.ends_with("attn.proj.weight") || t.name.ends_with("mlp.out.weight");
                    let std = if residual {
                        0.02 / (2.0 * spec.transformer.layers as f32).sqrt()
                    } else {
                        0.02
                    };
                    out.extend((0..n).map(|_| std * normal(&mut rng)));
                }
            }
        }
    }
    out
}

/// A standard normal sample (Box-Muller), so the crate needs no distribution library.
mod rand_distr_free {
    use rand::Rng;

    /// One draw from N(0, 1).
    pub fn normal(rng: &mut impl Rng) -> f32 {
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits_spec() -> RunSpec {
        RunSpec::parse("model = \"digits-mlp\"\ndataset = \"digits\"\nhidden = [32, 16]").unwrap()
    }

    #[test]
    fn the_mlp_has_the_documented_tensors() {
        let model = Model::new(&digits_spec(), &Device::Cpu).unwrap();
        let names: Vec<(&str, &[usize])> = model
            .layout()
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("fc1.bias", &[32][..]),
                ("fc1.weight", &[32, 64][..]),
                ("fc2.bias", &[16][..]),
                ("fc2.weight", &[16, 32][..]),
                ("fc3.bias", &[10][..]),
                ("fc3.weight", &[10, 16][..]),
            ]
        );
    }

    #[test]
    fn initial_weights_depend_only_on_the_seed() {
        let a = Model::new(&digits_spec(), &Device::Cpu).unwrap();
        let b = Model::new(&digits_spec(), &Device::Cpu).unwrap();
        assert_eq!(a.params().unwrap(), b.params().unwrap());
        let mut other = digits_spec();
        other.seed = 2;
        let c = Model::new(&other, &Device::Cpu).unwrap();
        assert_ne!(a.params().unwrap(), c.params().unwrap());
    }

    #[test]
    fn params_round_trip_and_bad_vectors_are_refused() {
        let model = Model::new(&digits_spec(), &Device::Cpu).unwrap();
        let mut p = model.params().unwrap();
        p.iter_mut().for_each(|v| *v *= 0.5);
        model.set_params(&p).unwrap();
        assert_eq!(model.params().unwrap(), p);
        assert!(model.set_params(&p[1..]).is_err());
        p[3] = f32::NAN;
        assert!(model.set_params(&p).is_err());
    }

    #[test]
    fn the_transformer_predicts_every_position() {
        let spec = RunSpec::parse(
            "model = \"char-transformer\"\ndataset = \"text:x\"\n[transformer]\ncontext = 8\ndim = 16\nheads = 2\nlayers = 1\nvocab = \"abc\"",
        )
        .unwrap();
        let model = Model::new(&spec, &Device::Cpu).unwrap();
        let tokens: Vec<u32> = (0..40).map(|i| (i % 4) as u32).collect();
        let batch = text_batch(&tokens, &[0, 8, 16], 8, &Device::Cpu).unwrap();
        let logits = model.forward(&batch.inputs).unwrap();
        assert_eq!(logits.dims(), &[3, 8, 4]);
        let loss = model.loss(&batch).unwrap().to_scalar::<f32>().unwrap();
        assert!(
            (loss - 4f32.ln()).abs() < 0.3,
            "near-uniform at start: {loss}"
        );
    }
}
