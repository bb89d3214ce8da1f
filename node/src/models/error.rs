//! [`Error`]: why publishing, fetching or exporting a version failed.

use p2p_protocol::manifest::{ModelNameError, VersionId};

/// Why publishing, fetching or exporting a version failed. `Clone`, because a download's
/// result goes to every caller waiting for it. The store's own errors (an I/O error with its
/// path, a limit with its numbers) are kept as their one-line text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The model name breaks the rules.
    #[error(transparent)]
    ModelName(#[from] ModelNameError),
    /// The file to publish could not be imported: unreadable, not safetensors, over a limit,
    /// or changed while it was read.
    #[error("{0}")]
    Import(String),
    /// A checkpoint to publish lacks the training metadata.
    #[error("{file}: {reason}")]
    NotACheckpoint {
        /// The file.
        file: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// The store could not take the version (its manifest, its folder, a full disk).
    #[error("cannot store version {id}: {reason}")]
    Store {
        /// The version (short form).
        id: String,
        /// The store's error.
        reason: String,
    },
    /// Writing or syncing the downloaded chunks failed.
    #[error("{0}")]
    Disk(String),
    /// Every chunk matched its hash, but the manifest describes a file the reference
    /// safetensors reader does not open: nothing of it is kept.
    #[error("version {id} is not a safetensors file the reference reader opens: {reason}")]
    NotSafetensors {
        /// The version (short form).
        id: String,
        /// The reader's error.
        reason: String,
    },
    /// The version to export is not held completely.
    #[error("version {0} is not held completely")]
    NotHeld(VersionId),
    /// Writing the exported file failed (or a chunk no longer matched its hash).
    #[error("{0}")]
    Export(String),
    /// Several peers publish a model of this name and none is trusted.
    #[error("model '{model}' is published by {} peers ({}): choose one with --trust {model}=PEER_ID", publishers.len(), publishers.iter().map(|p| p.to_base58()).collect::<Vec<_>>().join(", "))]
    AmbiguousModel {
        /// The name.
        model: String,
        /// Its publishers.
        publishers: Vec<libp2p::PeerId>,
    },
    /// The version's number is not its parent's plus one (its publisher signed a broken chain).
    #[error("{0}")]
    BrokenChain(String),
    /// The download was cancelled (a newer version superseded it, or the version was refused).
    #[error("the download of version {0} was cancelled")]
    Cancelled(String),
}

impl Error {
    /// A store error for version `id`.
    pub(super) fn store(id: &VersionId, e: &anyhow::Error) -> Self {
        Self::Store {
            id: id.short(),
            reason: format!("{e:#}"),
        }
    }
}
