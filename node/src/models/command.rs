//! [`Command`]: what the rest of the node asks of the models protocol (through the network
//! `Client`), and [`Behaviour::handle`], which answers it.

use std::path::PathBuf;

use p2p_protocol::manifest::VersionId;
use p2p_protocol::messages::Announcement;
use tokio::sync::{oneshot, watch};

use super::disk::PublishFile;
use super::{Behaviour, DownloadReport, DownloadState, Error, FetchProgress, ModelInfo};

/// Which versions of a model a [`Command::QueryVersions`] answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every verified version, whoever published it (a run's checkpoints come from all its
    /// members).
    All,
    /// Those of the publisher the name means (see [`super::trust`]); an error if ambiguous.
    Trusted,
    /// As `Trusted`, and that publisher is remembered for the name (trust on first use): what
    /// a fetch by name does once its dials settled.
    Resolve,
}

/// Requests to the models behaviour.
#[derive(Debug)]
pub enum Command {
    /// Import a file (off the event loop) as the next version of a model, announce and
    /// serve it.
    Publish(PublishFile),
    /// Download a version; the reply comes when it is complete (or failed).
    Fetch {
        /// The version.
        id: VersionId,
        /// The report, or why it failed.
        reply: oneshot::Sender<Result<DownloadReport, Error>>,
        /// Where progress goes on the way, if anywhere.
        progress: Option<watch::Sender<FetchProgress>>,
    },
    /// Known versions of a model, after asking connected peers.
    QueryVersions {
        /// Model name.
        model: String,
        /// Which versions.
        scope: Scope,
        /// Newest first, or why the name is ambiguous.
        reply: oneshot::Sender<Result<Vec<Announcement>, Error>>,
    },
    /// Forget a version (see [`Behaviour::forget`]): one that could not be fetched in time;
    /// with `for_good` ([`Behaviour::refuse`]), a checkpoint that failed its check.
    Forget {
        /// The version.
        id: VersionId,
        /// Never take it in again.
        for_good: bool,
        /// Why, for the log.
        why: String,
    },
    /// Versions held (`GET /models`).
    Models(oneshot::Sender<Vec<ModelInfo>>),
    /// Write a complete version to a file (off the event loop).
    Export {
        /// The version.
        id: VersionId,
        /// The file to write.
        out: PathBuf,
        /// Keep serving the version from the store (else the store's data file moves to
        /// `out` where it can, and the version is dropped).
        keep: bool,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Where the download of a version stands (`None`: no download of it in progress).
    DownloadState {
        /// The version.
        id: VersionId,
        /// Its state.
        reply: oneshot::Sender<Option<DownloadState>>,
    },
    /// Delete the complete versions of a model beyond the newest `keep` (see
    /// [`Behaviour::prune`]).
    Prune {
        /// Model name.
        model: String,
        /// How many of the newest versions to keep.
        keep: usize,
        /// The versions deleted.
        reply: oneshot::Sender<Vec<VersionId>>,
    },
}

impl Behaviour {
    /// Carries out `command`; replies go to its channel (a caller that went away is ignored).
    pub fn handle(&mut self, command: Command) {
        match command {
            Command::Publish(request) => self.publish_file(request),
            Command::Fetch {
                id,
                reply,
                progress,
            } => self.fetch(id, reply, progress),
            Command::QueryVersions {
                model,
                scope,
                reply,
            } => self.query_versions(model, scope, reply),
            Command::Forget { id, for_good, why } => {
                if for_good {
                    self.refuse(&id, &why);
                } else {
                    self.forget(&id, &why);
                }
            }
            Command::Models(reply) => {
                let _ = reply.send(self.models());
            }
            Command::Export {
                id,
                out,
                keep,
                reply,
            } => self.export(id, out, keep, reply),
            Command::DownloadState { id, reply } => {
                let _ = reply.send(self.download_state(&id));
            }
            Command::Prune { model, keep, reply } => {
                let _ = reply.send(self.prune(&model, keep));
            }
        }
    }
}
