//! [`Trainer`]: a model, its optimizer and one node's shard of the data: training steps with
//! the run's learning-rate schedule, evaluation on the test split, and access to the weights as
//! a flat vector for averaging and checkpoints.
//!
//! Labelled batches walk a fresh shuffle of the shard each epoch; text batches are random
//! windows of `context + 1` characters.

use candle_core::Device;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::data::Dataset;
use crate::model::{labeled_batch, text_batch, Batch, Evaluation, Model};
use crate::optim::Optimizer;
use crate::params::Layout;
use crate::spec::RunSpec;
use crate::{Error, Result};

/// Training state of one node.
pub struct Trainer {
    spec: RunSpec,
    model: Model,
    optimizer: Optimizer,
    data: Dataset,
    rng: StdRng,
    order: Vec<usize>,
    cursor: usize,
    /// Local steps taken (the schedule's position).
    pub step: u64,
    /// Samples this model has been trained on, inherited ones included (the averaging weight).
    pub samples_seen: u64,
}

impl Trainer {
    /// A trainer for `spec` on `device` with the run's initial weights, training on `data` (one
    /// shard, see [`Dataset::shard`]); `seed` drives batch order.
    pub fn new(spec: &RunSpec, data: Dataset, device: &Device, seed: u64) -> Result<Self> {
        check_fits(spec, &data)?;
        let model = Model::new(spec, device)?;
        let optimizer = Optimizer::new(spec, model.vars().to_vec())?;
        Ok(Self {
            spec: spec.clone(),
            model,
            optimizer,
            data,
            rng: StdRng::seed_from_u64(seed),
            order: Vec::new(),
            cursor: 0,
            step: 0,
            samples_seen: 0,
        })
    }

    /// One training step at the schedule's learning rate; returns the batch loss.
    pub fn train_step(&mut self) -> Result<f32> {
        let lr = self.spec.learning_rate_at(self.step);
        self.optimizer.set_learning_rate(lr);
        let batch = self.next_batch()?;
        let loss = self.model.loss(&batch)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Diverged {
                step: self.step,
                loss: value,
            });
        }
        let grads = loss.backward()?;
        self.optimizer.step(&grads)?;
        self.step += 1;
        self.samples_seen += self.spec.batch_size as u64;
        Ok(value)
    }

    /// Loss and accuracy on the test split.
    pub fn evaluate(&self) -> Result<Evaluation> {
        self.model.evaluate(&self.data)
    }

    /// The weights as a flat vector.
    pub fn params(&self) -> Result<Vec<f32>> {
        self.model.params()
    }

    /// Replaces the weights (length and finiteness are checked).
    pub fn set_params(&mut self, values: &[f32]) -> Result<()> {
        self.model.set_params(values)
    }

    /// Rolls back to earlier weights taken at `step` after `samples_seen` samples (a
    /// checkpoint): the weights are replaced and the optimizer's state (momentum, moments)
    /// starts afresh, since it holds the history that led to the state being abandoned.
    pub fn restore(&mut self, values: &[f32], step: u64, samples_seen: u64) -> Result<()> {
        self.model.set_params(values)?;
        self.optimizer = Optimizer::new(&self.spec, self.model.vars().to_vec())?;
        self.step = step;
        self.samples_seen = samples_seen;
        Ok(())
    }

    /// The layout of the flat weight vector.
    pub fn layout(&self) -> &Layout {
        self.model.layout()
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The run.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The data this trainer uses.
    pub fn data(&self) -> &Dataset {
        &self.data
    }

    fn next_batch(&mut self) -> Result<Batch> {
        let size = self.spec.batch_size;
        let device = self.model.device().clone();
        match &self.data {
            Dataset::Labeled { train, .. } => {
                let mut idx = Vec::with_capacity(size);
                while idx.len() < size {
                    if self.cursor >= self.order.len() {
                        self.order = (0..train.len()).collect();
                        self.order.shuffle(&mut self.rng);
                        self.cursor = 0;
                    }
                    let take = (size - idx.len()).min(self.order.len() - self.cursor);
                    idx.extend_from_slice(&self.order[self.cursor..self.cursor + take]);
                    self.cursor += take;
                }
                labeled_batch(train, &idx, &device)
            }
            Dataset::Text { train, .. } => {
                let t = self.spec.transformer.context;
                let last = train.len() - t - 1;
                let starts: Vec<usize> = (0..size).map(|_| self.rng.gen_range(0..=last)).collect();
                text_batch(train, &starts, t, &device)
            }
        }
    }
}

/// Checks that `data` fits the model `spec` describes.
fn check_fits(spec: &RunSpec, data: &Dataset) -> Result<()> {
    match data {
        Dataset::Labeled { train, test, .. } => {
            if train.is_empty() {
                return Err(Error::Data("the training shard is empty".into()));
            }
            if train.dim != spec.input_dim() || test.dim != spec.input_dim() {
                return Err(Error::Data(format!(
                    "samples have {} features but the run's model takes {}",
                    train.dim,
                    spec.input_dim()
                )));
            }
        }
        Dataset::Text {
            train, vocab_size, ..
        } => {
            if *vocab_size != spec.transformer.vocab.chars().count() + 1 {
                return Err(Error::Data("text encoded with another vocabulary".into()));
            }
            if train.len() <= spec.transformer.context + 1 {
                return Err(Error::Data(format!(
                    "the training text ({} characters) is not longer than the context",
                    train.len()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Partition;

    #[test]
    fn the_digits_mlp_learns_on_one_node() {
        let spec = RunSpec::parse(
            "model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 300\nlearning_rate = 0.1\nmomentum = 0.9",
        )
        .unwrap();
        let data = Dataset::load(&spec, None).unwrap();
        let mut trainer = Trainer::new(&spec, data, &Device::Cpu, 3).unwrap();
        let before = trainer.evaluate().unwrap();
        for _ in 0..300 {
            trainer.train_step().unwrap();
        }
        let after = trainer.evaluate().unwrap();
        assert!(after.loss < before.loss / 3.0, "{before:?} -> {after:?}");
        assert!(after.accuracy > 0.9, "{after:?}");
        assert_eq!(trainer.samples_seen, 300 * 32);
    }

    #[test]
    fn the_char_transformer_learns_a_repeating_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(
            &path,
            "the quick brown fox jumps over the lazy dog. ".repeat(40),
        )
        .unwrap();
        let mut spec = RunSpec::parse(&format!(
            "model = \"char-transformer\"\ndataset = \"text:{}\"\noptimizer = \"adamw\"\nlearning_rate = 0.003\nbatch_size = 16\n[transformer]\ncontext = 16\ndim = 32\nheads = 2\nlayers = 1",
            path.display()
        ))
        .unwrap();
        let (before, after) = train_text(&mut spec, 150);
        assert!(after.loss < before.loss * 0.6, "{before:?} -> {after:?}");
    }

    /// Fixes a text spec's vocabulary from its data set (as a run's creator does), trains
    /// `steps` steps on all of it, and gives the evaluations before and after.
    fn train_text(spec: &mut RunSpec, steps: u32) -> (Evaluation, Evaluation) {
        let text = spec.dataset.read_text().unwrap();
        spec.transformer.vocab = crate::data::Vocab::from_text(&text).chars();
        let data = Dataset::load(spec, None)
            .unwrap()
            .shard(0, 1, Partition::Iid, 1)
            .unwrap();
        let mut trainer = Trainer::new(spec, data, &Device::Cpu, 1).unwrap();
        let before = trainer.evaluate().unwrap();
        for _ in 0..steps {
            trainer.train_step().unwrap();
        }
        (before, trainer.evaluate().unwrap())
    }

    /// The bundled Austen corpus: a small transformer learns English characters on it, its
    /// held-out validation loss falling from the uniform 6.4 bits per character (82 ids) to
    /// well below the 4.4 bits of a model that knows only character frequencies.
    #[test]
    fn the_char_transformer_learns_english_from_the_bundled_austen_corpus() {
        let mut spec = RunSpec::parse(
            "model = \"char-transformer\"\ndataset = \"austen\"\noptimizer = \"adamw\"\n\
             learning_rate = 0.003\nbatch_size = 16\nlr_schedule = \"constant\"\n\
             [transformer]\ncontext = 32\ndim = 64\nheads = 4\nlayers = 2",
        )
        .unwrap();
        let (before, after) = train_text(&mut spec, 300);
        assert!(before.bits_per_char() > 6.0, "{before:?}");
        assert!(after.bits_per_char() < 3.5, "{before:?} -> {after:?}");
    }

    #[test]
    fn data_that_does_not_fit_the_model_is_refused() {
        let spec = RunSpec::parse("model = \"digits-mlp\"\ndataset = \"mnist:/nowhere\"").unwrap();
        let digits = RunSpec::parse("model = \"digits-mlp\"\ndataset = \"digits\"").unwrap();
        let data = Dataset::load(&digits, None).unwrap();
        let e = Trainer::new(&spec, data, &Device::Cpu, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("784"), "{e}");
    }
}
