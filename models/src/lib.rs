//! Models, data sets, training and parameter math for p2p-node.
//!
//! Everything here touches candle and nothing touches the network; the node crate drives it
//! from a dedicated trainer thread.
//!
//! * [`spec`]: the description of a training run ([`spec::RunSpec`], TOML), checked on parse;
//! * [`device`]: CPU / CUDA / Metal selection with a clear fallback;
//! * [`data`]: the bundled UCI digits set, MNIST IDX files, text files; deterministic train/test
//!   splits and sharding across peers (iid or by label);
//! * [`mlp`], [`transformer`]: the models, in the candle idiom (`VarBuilder` + `VarMap`), and
//!   [`model`] which builds the one a spec names;
//! * [`optim`]: SGD (with momentum) and AdamW behind one interface;
//! * [`train`]: a [`train::Trainer`] that runs training steps and evaluations;
//! * [`params`]: parameters as one flat vector: weighted averaging, finite checks, norms,
//!   f16/bf16 wire encodings;
//! * [`checkpoint`]: safetensors files written atomically, with training metadata;
//! * [`outer`]: the outer optimizer of local-SGD training (DiLoCo) and pseudo-gradients;
//! * [`compress`]: int8 and top-k encodings of pseudo-gradients, with error feedback.

pub mod checkpoint;
pub mod compress;
pub mod data;
pub mod device;
pub mod layers;
pub mod memory;
pub mod mlp;
pub mod model;
pub mod ops;
pub mod optim;
pub mod outer;
pub mod params;
pub mod spec;
pub mod train;
pub mod transformer;

pub use candle_core::Device;

/// Errors of this crate. Each message is one line that names the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A run spec is invalid.
    #[error("invalid run spec: {0}")]
    Spec(String),
    /// A data set cannot be loaded or does not fit the run.
    #[error("{0}")]
    Data(String),
    /// Parameters do not fit the model, or are not finite.
    #[error("{0}")]
    Params(String),
    /// A checkpoint cannot be read or written.
    #[error("{0}")]
    Checkpoint(String),
    /// A training step's loss was NaN or infinite: the parameters are no longer usable.
    #[error("training diverged at step {step} (loss {loss}); lower the learning rate")]
    Diverged {
        /// The step that diverged.
        step: u64,
        /// Its loss.
        loss: f32,
    },
    /// The requested device is unavailable in this build.
    #[error("{0}")]
    Device(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
