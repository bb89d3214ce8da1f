//! [`RunSpec`]: what a training run is. A small TOML file names the model, the data set and the
//! hyperparameters; every field but `model` and `dataset` has a default:
//!
//! ```toml
//! model = "digits-mlp"       # or "char-transformer"
//! dataset = "digits"         # bundled; or "austen" (bundled text), "mnist:<dir>", "text:<file>"
//! partition = "by-label"     # or "iid"
//! steps = 600                # local steps per node
//! batch_size = 32
//! learning_rate = 0.05
//! average_every = 10         # local steps between averaging rounds (0: never average)
//! checkpoint_every = 100     # local steps between published checkpoints (0: never)
//! averaging = "parameters"   # or "outer": DiLoCo-style outer steps on pseudo-gradients
//! inner_steps = 50           # outer: local steps between outer steps
//! outer_learning_rate = 0.7  # outer: SGD with Nesterov momentum on averaged pseudo-gradients
//! outer_momentum = 0.5
//! outer_extrapolation = false # outer: FedExP's adaptive step (see the field's docs)
//! compression = "int8"       # outer: or "top-k" (with topk_fraction) or "f32"
//! ```
//!
//! The creator of a run resolves the spec (a text data set's vocabulary is fixed from the
//! creator's file, a missing name gets a random suffix) and sends the resolved spec to every
//! volunteer, so all nodes build the same model. Unknown fields are errors, so a typo is not
//! silently ignored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::compress::{Codec, Compression};
use crate::params::WireDtype;
use crate::{Error, Result};

/// Largest spec accepted, from a file or from the network.
pub const MAX_SPEC_BYTES: usize = 32 * 1024;

/// Most characters in a text run's vocabulary (index 0, "unknown", not counted).
pub const MAX_VOCAB: usize = 1024;

/// Which model a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// A multi-layer perceptron over digit images (`fc1`, `fc2`, ... with ReLU between).
    DigitsMlp,
    /// A small decoder-only transformer over characters.
    CharTransformer,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DigitsMlp => "digits-mlp",
            Self::CharTransformer => "char-transformer",
        })
    }
}

/// Where the training data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DatasetSpec {
    /// The UCI handwritten digits set bundled with the program (8x8 images, 1797 samples).
    Digits,
    /// MNIST in IDX files (the four `*-ubyte` files, optionally gzipped) in a directory.
    Mnist(PathBuf),
    /// A UTF-8 text file, for the character model.
    Text(PathBuf),
    /// Jane Austen's six novels, bundled with the program (4 MB of English text, public
    /// domain), for the character model.
    Austen,
}

impl FromStr for DatasetSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once(':') {
            None if s == "digits" => Ok(Self::Digits),
            None if s == "austen" => Ok(Self::Austen),
            Some(("mnist", path)) if !path.is_empty() => Ok(Self::Mnist(path.into())),
            Some(("text", path)) if !path.is_empty() => Ok(Self::Text(path.into())),
            _ => Err(format!(
                "unknown data set '{s}'; expected \"digits\", \"austen\", \"mnist:<dir>\" or \"text:<file>\""
            )),
        }
    }
}

impl TryFrom<String> for DatasetSpec {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DatasetSpec> for String {
    fn from(d: DatasetSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Digits => f.write_str("digits"),
            Self::Austen => f.write_str("austen"),
            Self::Mnist(p) => write!(f, "mnist:{}", p.display()),
            Self::Text(p) => write!(f, "text:{}", p.display()),
        }
    }
}

impl DatasetSpec {
    /// Whether it is text (for the character model).
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text(_) | Self::Austen)
    }

    /// The same kind of data set, read from `path` instead (a volunteer's `--data`).
    pub fn with_path(&self, path: &Path) -> Result<Self> {
        match self {
            Self::Digits | Self::Austen => Err(Error::Spec(format!(
                "this run trains on the bundled {self} data set; --data does not apply"
            ))),
            Self::Mnist(_) => Ok(Self::Mnist(path.to_path_buf())),
            Self::Text(_) => Ok(Self::Text(path.to_path_buf())),
        }
    }
}

/// How the training set is divided among peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partition {
    /// Each shard is a random sample of the training set.
    #[default]
    Iid,
    /// The training set sorted by label, cut into contiguous shards: each peer sees only some
    /// labels (non-iid).
    ByLabel,
}

/// The local optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// Stochastic gradient descent, with optional momentum and weight decay.
    #[default]
    Sgd,
    /// AdamW (decoupled weight decay).
    Adamw,
}

/// How the learning rate changes over a node's local steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Cosine decay from `learning_rate` to `min_lr_fraction * learning_rate` at `steps`.
    #[default]
    Cosine,
}

/// How the peers of a run combine their progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Averaging {
    /// Every `average_every` local steps a node averages its parameters with a random peer's
    /// (gossip averaging, full parameters in `wire_dtype`).
    #[default]
    Parameters,
    /// Local SGD with outer steps (DiLoCo): every `inner_steps` local steps a node exchanges
    /// its compressed pseudo-gradient with random peers and applies the average with the outer
    /// optimizer (see [`crate::outer`] and [`crate::compress`]).
    Outer,
}

/// Shape of the character transformer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformerSpec {
    /// Characters of context.
    pub context: usize,
    /// Embedding width.
    pub dim: usize,
    /// Attention heads (must divide `dim`).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// The vocabulary, in index order from 1 (index 0 is "unknown"); fixed by the run's
    /// creator from its text file.
    pub vocab: String,
}

impl Default for TransformerSpec {
    fn default() -> Self {
        Self {
            context: 64,
            dim: 64,
            heads: 4,
            layers: 2,
            vocab: String::new(),
        }
    }
}

/// A training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The model.
    pub model: ModelKind,
    /// The data set.
    pub dataset: DatasetSpec,
    /// How the training set is divided among peers.
    #[serde(default)]
    pub partition: Partition,
    /// Local training steps per node; then the node stops training and keeps serving.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Samples per step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Peak learning rate.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Local steps between averaging rounds; 0 disables averaging.
    #[serde(default = "default_average_every")]
    pub average_every: u64,
    /// Averaging rounds a node starts after its last step (no training between them), so that
    /// the nodes that finish end close to one model.
    #[serde(default = "default_final_averaging_rounds")]
    pub final_averaging_rounds: u32,
    /// A node runs at most this many steps' worth of samples ahead of the slowest peer it has
    /// recently averaged with, then waits for it (bounded staleness: nodes far apart in
    /// training drift apart on non-iid data) [default: `2 * average_every`; 0: no bound].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lead_steps: Option<u64>,
    /// A node starts its local steps once it knows this many other peers training the run
    /// (or after waiting `peer_wait_secs`), so that nodes started together train together
    /// [default: `shards - 1`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_peers: Option<u32>,
    /// Longest wait for `min_peers`, in seconds.
    #[serde(default = "default_peer_wait_secs")]
    pub peer_wait_secs: u64,
    /// Local steps between checkpoints (saved locally and published); 0 disables them.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Local steps between evaluations on the test split.
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Name of the model whose versions hold the run's weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The optimizer.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// SGD momentum (0: plain SGD).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Weight decay (SGD: L2; AdamW: decoupled).
    #[serde(default)]
    pub weight_decay: f64,
    /// Learning-rate schedule over the local steps.
    #[serde(default)]
    pub lr_schedule: Schedule,
    /// The cosine schedule ends at this fraction of the peak rate.
    #[serde(default = "default_min_lr_fraction")]
    pub min_lr_fraction: f64,
    /// Seed of the initial weights and of the train/test split.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Fraction of the data held out for testing (digits and text; MNIST has its own split).
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Number of shards; a node without `--shard` takes shard `hash(peer id) % shards`.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Hidden layer widths of the MLP.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Shape of the character transformer.
    #[serde(default)]
    pub transformer: TransformerSpec,
    /// Element type of parameters sent to peers (`f16`/`bf16` halve the bytes).
    #[serde(default)]
    pub wire_dtype: WireDtype,
    /// Peer parameters farther than this from the local ones (L2 distance relative to the
    /// local norm) are refused and the peer penalized.
    #[serde(default = "default_max_param_distance")]
    pub max_param_distance: f64,
    /// How peers combine their progress.
    #[serde(default)]
    pub averaging: Averaging,
    /// With `averaging = "outer"`: local steps of the inner optimizer between two outer steps
    /// (DiLoCo's H).
    #[serde(default = "default_inner_steps")]
    pub inner_steps: u64,
    /// With `averaging = "outer"`: the outer optimizer's learning rate (1 with no momentum:
    /// plain model averaging). A round's learning rate is capped at the number of
    /// pseudo-gradients it averaged, so that before momentum a step never exceeds their sum
    /// (a lone round's pseudo-gradient still enters the momentum, which later steps apply at
    /// the full rate). On shards that differ a lot (each volunteer's own labels) 3-3.5 does
    /// better than the default, whose average of pseudo-gradients pointing different ways is
    /// short: 8 by-label digits hosts ended at 0.975-0.978 at 3.5 (two runs) and 0.964-0.975
    /// at 3 (six) against 0.900-0.928 (`testnet/RESULTS.md`), but 3.5 with momentum 0.5
    /// collapsed iid shards to 0.19-0.56: where the data may or may not differ, prefer 1 with
    /// no momentum and [`Self::outer_extrapolation`].
    #[serde(default = "default_outer_learning_rate")]
    pub outer_learning_rate: f64,
    /// With `averaging = "outer"`: the outer optimizer's momentum. DiLoCo uses 0.9 with an
    /// all-reduce every outer step; with gossip, where pseudo-gradients can come a phase late,
    /// 0.9 lost most of the accuracy in our measurements and 0.5 kept it (see the README).
    #[serde(default = "default_outer_momentum")]
    pub outer_momentum: f64,
    /// With `averaging = "outer"`: Nesterov momentum (else plain heavy-ball).
    #[serde(default = "default_outer_nesterov")]
    pub outer_nesterov: bool,
    /// With `averaging = "outer"`: each round's learning rate is multiplied by FedExP's
    /// extrapolation factor `max(1, sum_i |d_i|^2 / (2 M |mean d|^2))` over the round's `M`
    /// pseudo-gradients `d_i` (Jhunjhunwala et al., "FedExP: Speeding up Federated Averaging
    /// via Extrapolation", ICLR 2023), still capped at `M`: 1 where they agree, `M / 2` for
    /// orthogonal ones and up to the cap for ones that point apart (on the testnet, 8 digits
    /// hosts: a median of 2.7 on iid shards, 10 on by-label ones), so the rate adapts to
    /// how much the volunteers' data differ instead of being tuned per run. It needs
    /// `outer_momentum = 0` (validated: with momentum, the factor would also scale the
    /// momentum buffer of earlier rounds past the cap, and at 0.5 one testnet run of two fell
    /// to 0.83). Computed on the values as sent, so use it with `int8` or `f32`: top-k
    /// vectors of different supports shorten the mean even where updates agree. 8 by-label digits
    /// hosts then ended at 0.972-0.981 in five runs, iid ones at 0.972-0.975
    /// (`testnet/RESULTS.md`). Off by default; older peers refuse a spec that turns it on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outer_extrapolation: bool,
    /// With `averaging = "outer"`: how pseudo-gradients travel.
    #[serde(default)]
    pub compression: Compression,
    /// With `compression = "top-k"`: the fraction of values sent, in (0, 1].
    #[serde(default = "default_topk_fraction")]
    pub topk_fraction: f64,
}

fn default_steps() -> u64 {
    600
}
fn default_batch_size() -> usize {
    32
}
fn default_learning_rate() -> f64 {
    0.05
}
fn default_average_every() -> u64 {
    10
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_eval_every() -> u64 {
    50
}
fn default_peer_wait_secs() -> u64 {
    120
}
fn default_momentum() -> f64 {
    0.9
}
fn default_final_averaging_rounds() -> u32 {
    3
}
fn default_min_lr_fraction() -> f64 {
    0.1
}
fn default_seed() -> u64 {
    1
}
fn default_test_fraction() -> f64 {
    0.2
}
fn default_shards() -> u32 {
    4
}
fn default_hidden() -> Vec<usize> {
    vec![64]
}
fn default_max_param_distance() -> f64 {
    2.0
}
fn default_inner_steps() -> u64 {
    50
}
fn default_outer_learning_rate() -> f64 {
    0.7
}
fn default_outer_momentum() -> f64 {
    0.5
}
fn default_outer_nesterov() -> bool {
    true
}
fn default_topk_fraction() -> f64 {
    0.03
}

impl RunSpec {
    /// Parses and checks a spec (TOML); errors are one line.
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(Error::Spec(format!("larger than {MAX_SPEC_BYTES} bytes")));
        }
        let spec: Self = toml::from_str(text).map_err(|e| Error::Spec(toml_error(text, &e)))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads a spec file. Relative data paths are taken relative to the file's directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::Spec(format!("cannot read {}: {e}", path.display())))?;
        if meta.len() > MAX_SPEC_BYTES as u64 {
            return Err(Error::Spec(format!(
                "{} is larger than {MAX_SPEC_BYTES} bytes",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Spec(format!("cannot read {}: {e}", path.display())))?;
        let mut spec = Self::parse(&text)
            .map_err(|e| Error::Spec(format!("{}: {}", path.display(), strip_prefix(&e))))?;
        let base = path.parent().unwrap_or(Path::new("."));
        spec.dataset = match spec.dataset {
            DatasetSpec::Mnist(p) if p.is_relative() => DatasetSpec::Mnist(base.join(p)),
            DatasetSpec::Text(p) if p.is_relative() => DatasetSpec::Text(base.join(p)),
            other => other,
        };
        Ok(spec)
    }

    /// The spec as TOML (what travels to volunteers).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every field's range and that the fields fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Spec(m));
        if !(1..=1_000_000_000).contains(&self.steps) {
            return bad(format!("steps = {} must be 1 to 1e9", self.steps));
        }
        if !(1..=65_536).contains(&self.batch_size) {
            return bad(format!(
                "batch_size = {} must be 1 to 65536",
                self.batch_size
            ));
        }
        if !(self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate <= 10.0)
        {
            return bad(format!(
                "learning_rate = {} must be above 0 and at most 10",
                self.learning_rate
            ));
        }
        if self.final_averaging_rounds > 1000 {
            return bad(format!(
                "final_averaging_rounds = {} must be at most 1000",
                self.final_averaging_rounds
            ));
        }
        if self.min_peers.is_some_and(|m| m > 1024) || self.peer_wait_secs > 86_400 {
            return bad("min_peers must be at most 1024 and peer_wait_secs at most 86400".into());
        }
        if self.eval_every == 0 {
            return bad("eval_every must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum = {} must be in [0, 1)", self.momentum));
        }
        if !(0.0..1.0).contains(&self.weight_decay) {
            return bad(format!(
                "weight_decay = {} must be in [0, 1)",
                self.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_fraction) {
            return bad(format!(
                "min_lr_fraction = {} must be in [0, 1]",
                self.min_lr_fraction
            ));
        }
        if !(self.test_fraction > 0.0 && self.test_fraction <= 0.5) {
            return bad(format!(
                "test_fraction = {} must be above 0 and at most 0.5",
                self.test_fraction
            ));
        }
        if !(1..=1024).contains(&self.shards) {
            return bad(format!("shards = {} must be 1 to 1024", self.shards));
        }
        if !(self.max_param_distance.is_finite() && self.max_param_distance > 0.0) {
            return bad(format!(
                "max_param_distance = {} must be a positive number",
                self.max_param_distance
            ));
        }
        if !(1..=1_000_000).contains(&self.inner_steps) {
            return bad(format!(
                "inner_steps = {} must be 1 to 1e6",
                self.inner_steps
            ));
        }
        if !(self.outer_learning_rate.is_finite()
            && self.outer_learning_rate > 0.0
            && self.outer_learning_rate <= 10.0)
        {
            return bad(format!(
                "outer_learning_rate = {} must be above 0 and at most 10",
                self.outer_learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return bad(format!(
                "outer_momentum = {} must be in [0, 1)",
                self.outer_momentum
            ));
        }
        if self.outer_extrapolation && self.outer_momentum != 0.0 {
            return bad(format!(
                "outer_extrapolation needs outer_momentum = 0 (not {}): momentum would carry \
                 extrapolated steps past the cap at the round's pseudo-gradients",
                self.outer_momentum
            ));
        }
        if !(self.topk_fraction > 0.0 && self.topk_fraction <= 1.0) {
            return bad(format!(
                "topk_fraction = {} must be above 0 and at most 1",
                self.topk_fraction
            ));
        }
        if let Some(name) = &self.name {
            validate_name(name).map_err(Error::Spec)?;
        }
        match self.model {
            ModelKind::DigitsMlp => {
                if self.hidden.is_empty()
                    || self.hidden.len() > 8
                    || self.hidden.iter().any(|h| !(1..=16_384).contains(h))
                {
                    return bad("hidden must list 1 to 8 layer widths, each 1 to 16384".into());
                }
                if self.dataset.is_text() {
                    return bad("digits-mlp trains on digits or mnist, not on text".into());
                }
            }
            ModelKind::CharTransformer => {
                let t = &self.transformer;
                if !self.dataset.is_text() {
                    return bad(
                        "char-transformer trains on a text data set (austen or text:<file>)".into(),
                    );
                }
                if self.partition == Partition::ByLabel {
                    return bad(
                        "partition by-label needs a labelled data set (digits or mnist); use iid"
                            .into(),
                    );
                }
                if !(2..=2048).contains(&t.context) {
                    return bad(format!(
                        "transformer.context = {} must be 2 to 2048",
                        t.context
                    ));
                }
                if !(1..=64).contains(&t.heads)
                    || !(8..=4096).contains(&t.dim)
                    || !t.dim.is_multiple_of(t.heads)
                {
                    return bad(format!(
                        "transformer.dim = {} must be 8 to 4096 and a multiple of transformer.heads = {} (1 to 64)",
                        t.dim, t.heads
                    ));
                }
                if !(1..=48).contains(&t.layers) {
                    return bad(format!("transformer.layers = {} must be 1 to 48", t.layers));
                }
                if t.vocab.chars().count() > MAX_VOCAB {
                    return bad(format!(
                        "transformer.vocab has more than {MAX_VOCAB} characters"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Local steps between two exchanges with peers: `average_every`, or `inner_steps` with
    /// outer steps (0: no exchanges).
    pub fn exchange_every(&self) -> u64 {
        match self.averaging {
            Averaging::Parameters => self.average_every,
            Averaging::Outer => self.inner_steps,
        }
    }

    /// The bound on how far a node runs ahead of its slowest recent peer, in steps (0: none):
    /// by default two exchange periods, or with outer steps four inner phases (a peer's
    /// progress is known as of its last outer step, up to a phase late).
    pub fn max_lead_steps(&self) -> u64 {
        let periods = match self.averaging {
            Averaging::Parameters => 2,
            Averaging::Outer => 4,
        };
        self.max_lead_steps
            .unwrap_or(periods * self.exchange_every())
    }

    /// How pseudo-gradients are encoded (with `averaging = "outer"`).
    pub fn codec(&self) -> Codec {
        Codec {
            compression: self.compression,
            topk_fraction: self.topk_fraction,
        }
    }

    /// Other peers a node waits for before training.
    pub fn min_peers(&self) -> u32 {
        self.min_peers.unwrap_or(self.shards.saturating_sub(1))
    }

    /// Input features of the MLP for this run's data set.
    pub fn input_dim(&self) -> usize {
        match self.dataset {
            DatasetSpec::Mnist(_) => 28 * 28,
            _ => 64,
        }
    }

    /// The learning rate at local step `step` (0-based).
    pub fn learning_rate_at(&self, step: u64) -> f64 {
        match self.lr_schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Cosine => {
                let t = (step.min(self.steps) as f64) / (self.steps as f64);
                let min = self.learning_rate * self.min_lr_fraction;
                min + (self.learning_rate - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Checks a run or model name: 1 to 128 of letters, digits and `-_./`.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name '{name}' must be 1 to 128 letters, digits or -_./"
        ))
    }
}

fn strip_prefix(e: &Error) -> String {
    let s = e.to_string();
    s.strip_prefix("invalid run spec: ")
        .unwrap_or(&s)
        .to_string()
}

/// A TOML error on one line, with the line number.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
model = "digits-mlp"       # or "char-transformer"
dataset = "digits"         # bundled; or "mnist:<dir>", "text:<file>"
partition = "by-label"     # or "iid"
steps = 600                # local steps per node, then the node stops training and keeps serving
batch_size = 32
learning_rate = 0.05
average_every = 10         # local steps between averaging rounds
checkpoint_every = 100     # local steps between published checkpoints
"#;

    #[test]
    fn the_documented_example_parses() {
        let spec = RunSpec::parse(EXAMPLE).unwrap();
        assert_eq!(spec.model, ModelKind::DigitsMlp);
        assert_eq!(spec.dataset, DatasetSpec::Digits);
        assert_eq!(spec.partition, Partition::ByLabel);
        assert_eq!((spec.steps, spec.batch_size), (600, 32));
        assert_eq!((spec.average_every, spec.checkpoint_every), (10, 100));
        let again = RunSpec::parse(&spec.to_toml()).unwrap();
        assert_eq!(again, spec, "a spec survives the trip to volunteers");
    }

    #[test]
    fn bad_specs_are_one_line_errors() {
        for (text, needle) in [
            ("model = \"resnet\"\ndataset = \"digits\"", "resnet"),
            ("model = \"digits-mlp\"\ndataset = \"imagenet\"", "imagenet"),
            (
                "model = \"digits-mlp\"\ndataset = \"digits\"\nstepz = 3",
                "stepz",
            ),
            (
                "model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 0",
                "steps",
            ),
            (
                "model = \"digits-mlp\"\ndataset = \"digits\"\nlearning_rate = -1.0",
                "learning_rate",
            ),
            ("model = \"char-transformer\"\ndataset = \"digits\"", "text"),
            (
                "model = \"digits-mlp\"\ndataset = \"austen\"",
                "not on text",
            ),
            (
                "model = \"char-transformer\"\ndataset = \"text:a.txt\"\npartition = \"by-label\"",
                "iid",
            ),
            (
                "model = \"digits-mlp\"\ndataset = \"digits\"\nname = \"a b\"",
                "name",
            ),
            ("model = ", "line 1"),
        ] {
            let e = RunSpec::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn outer_fields_default_to_diloco_and_are_checked() {
        let spec =
            RunSpec::parse("model = \"digits-mlp\"\ndataset = \"digits\"\naveraging = \"outer\"")
                .unwrap();
        assert_eq!(spec.averaging, Averaging::Outer);
        assert_eq!((spec.inner_steps, spec.exchange_every()), (50, 50));
        assert_eq!((spec.outer_learning_rate, spec.outer_momentum), (0.7, 0.5));
        assert!(spec.outer_nesterov);
        assert_eq!(spec.compression, Compression::Int8);
        assert_eq!(spec.max_lead_steps(), 200);
        assert_eq!(RunSpec::parse(&spec.to_toml()).unwrap(), spec);
        // Off, the field stays out of the signed text: specs from before it keep their hash.
        assert!(!spec.outer_extrapolation);
        assert!(!spec.to_toml().contains("outer_extrapolation"));
        let fedexp = RunSpec::parse(
            "model = \"digits-mlp\"\ndataset = \"digits\"\nouter_extrapolation = true\n\
             outer_momentum = 0.0",
        )
        .unwrap();
        assert!(fedexp.to_toml().contains("outer_extrapolation = true"));
        assert_eq!(RunSpec::parse(&fedexp.to_toml()).unwrap(), fedexp);
        let topk =
            RunSpec::parse("model = \"digits-mlp\"\ndataset = \"digits\"\ncompression = \"top-k\"")
                .unwrap();
        assert_eq!(topk.codec().compression, Compression::TopK);
        for (field, needle) in [
            ("inner_steps = 0", "inner_steps"),
            ("outer_learning_rate = 0.0", "outer_learning_rate"),
            ("outer_momentum = 1.0", "outer_momentum"),
            (
                "outer_extrapolation = true",
                "outer_extrapolation needs outer_momentum = 0",
            ),
            ("topk_fraction = 1.5", "topk_fraction"),
            ("compression = \"int4\"", "int4"),
        ] {
            let text = format!("model = \"digits-mlp\"\ndataset = \"digits\"\n{field}");
            let e = RunSpec::parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{field}: {e}");
        }
    }

    #[test]
    fn cosine_schedule_decays_to_the_floor() {
        let spec = RunSpec::parse(EXAMPLE).unwrap();
        assert!((spec.learning_rate_at(0) - 0.05).abs() < 1e-12);
        assert!((spec.learning_rate_at(600) - 0.005).abs() < 1e-12);
        assert!(spec.learning_rate_at(300) < 0.05 && spec.learning_rate_at(300) > 0.005);
    }

    #[test]
    fn relative_data_paths_follow_the_spec_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "model = \"char-transformer\"\ndataset = \"text:corpus.txt\"",
        )
        .unwrap();
        let spec = RunSpec::from_file(&path).unwrap();
        assert_eq!(
            spec.dataset,
            DatasetSpec::Text(dir.path().join("corpus.txt"))
        );
    }
}
