//! The models behaviour's disk work off the event loop: one writer thread for verified chunks
//! (`ChunkWriter`), and blocking tasks for syncs, imports of files to publish and exports of
//! complete versions. Writes, syncs and imports report back as [`DiskEvent`]s; an export
//! answers its caller directly.

use std::collections::HashMap;
use std::path::PathBuf;

use p2p_protocol::manifest::{Manifest, VersionId};
use p2p_protocol::messages::Announcement;
use p2p_protocol::training::TrainingMeta;
use tokio::sync::{mpsc, oneshot};

use super::error::Error;
use super::store::{self, ChunkWrite, ImportedFile, Store, SyncJob};

/// A file to publish: imported into the store off the event loop, then adopted as the next
/// version of `model`.
#[derive(Debug)]
pub struct PublishFile {
    /// The file.
    pub file: PathBuf,
    /// The model it is a version of.
    pub model: String,
    /// Whether it is a checkpoint: its training metadata (run, step, samples, loss,
    /// accuracy) is read from the stored bytes' own `p2p-node` metadata and announced with it;
    /// a file without it is refused.
    pub checkpoint: bool,
    /// The announcement, or why publishing failed.
    pub reply: oneshot::Sender<Result<Announcement, Error>>,
}

/// A finished import.
#[derive(Debug)]
pub struct Imported {
    /// What was asked.
    pub request: PublishFile,
    /// The snapshot in the store's staging area and, for a checkpoint, its training metadata.
    pub result: Result<(ImportedFile, Option<TrainingMeta>), Error>,
}

/// Disk work that finished on a blocking thread.
#[derive(Debug)]
pub enum DiskEvent {
    /// A verified chunk's bytes were written (or failed to be).
    ChunkWritten {
        /// The version.
        id: VersionId,
        /// The chunk.
        index: u32,
        /// Why the write failed, if it did.
        result: Result<(), Error>,
    },
    /// A file to publish was imported (or failed to be).
    Imported(Box<Imported>),
    /// A version's written chunks were made durable (or failed to be).
    Synced {
        /// The version.
        id: VersionId,
        /// Why the sync failed, if it did.
        result: Result<(), Error>,
    },
}

/// One thread that writes verified chunks in arrival order, off the event loop. A single
/// writer keeps the file's lock uncontended (threads writing one file at once spin on it) and
/// costs no thread hand-off per chunk. Writes queued are bounded by the chunk requests in
/// flight.
pub(super) struct ChunkWriter {
    jobs: std::sync::mpsc::Sender<(VersionId, u32, ChunkWrite)>,
    done: mpsc::UnboundedSender<DiskEvent>,
}

impl ChunkWriter {
    /// Starts the writer thread; it ends when the behaviour (the sender) is dropped.
    pub(super) fn start(done: mpsc::UnboundedSender<DiskEvent>) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<(VersionId, u32, ChunkWrite)>();
        let thread_done = done.clone();
        let spawned = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || {
                for (id, index, write) in queue {
                    let result = write.run().map_err(|e| Error::Disk(format!("{e:#}")));
                    let _ = thread_done.send(DiskEvent::ChunkWritten { id, index, result });
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the chunk writer thread; writing on the event loop");
        }
        Self { jobs, done }
    }

    /// Queues a write; its end comes back as [`DiskEvent::ChunkWritten`].
    pub(super) fn write(&self, id: VersionId, index: u32, write: ChunkWrite) {
        if let Err(std::sync::mpsc::SendError((id, index, write))) =
            self.jobs.send((id, index, write))
        {
            // No writer thread: write here rather than lose the chunk.
            let result = write.run().map_err(|e| Error::Disk(format!("{e:#}")));
            let _ = self
                .done
                .send(DiskEvent::ChunkWritten { id, index, result });
        }
    }
}

/// Runs a sync of a version's written chunks on a blocking thread; its end comes back as
/// [`DiskEvent::Synced`].
pub(super) fn spawn_sync(job: SyncJob, done: mpsc::UnboundedSender<DiskEvent>) {
    tokio::task::spawn_blocking(move || {
        let result = job.run().map_err(|e| Error::Disk(format!("{e:#}")));
        let _ = done.send(DiskEvent::Synced { id: job.id, result });
    });
}

/// Imports `request.file` into the store at `root` with chunks of `chunk_size` bytes on a
/// blocking thread; its end comes back as [`DiskEvent::Imported`].
pub(super) fn spawn_import(
    root: PathBuf,
    chunk_size: u32,
    request: PublishFile,
    done: mpsc::UnboundedSender<DiskEvent>,
) {
    tokio::task::spawn_blocking(move || {
        let result = Store::import_file(&root, &request.file, chunk_size)
            .map_err(|e| Error::Import(format!("{e:#}")))
            .and_then(|imported| {
                if !request.checkpoint {
                    return Ok((imported, None));
                }
                // Dropping the import on error deletes its staging copy.
                let training = training_meta(imported.metadata.as_ref()).map_err(|reason| {
                    Error::NotACheckpoint {
                        file: request.file.display().to_string(),
                        reason,
                    }
                })?;
                Ok((imported, Some(training)))
            });
        let _ = done.send(DiskEvent::Imported(Box::new(Imported { request, result })));
    });
}

/// Writes the complete version described by `manifest`, stored at `data`, to `out` on a
/// blocking thread, verifying every chunk again; `reply` gets the outcome.
pub(super) fn spawn_export(
    manifest: Manifest,
    data: PathBuf,
    out: PathBuf,
    reply: oneshot::Sender<Result<(), Error>>,
) {
    tokio::task::spawn_blocking(move || {
        let result =
            store::export_file(&manifest, &data, &out).map_err(|e| Error::Export(format!("{e:#}")));
        let _ = reply.send(result);
    });
}

/// The training metadata of a checkpoint, from its safetensors `__metadata__`
/// ([`p2p_models::checkpoint::METADATA_KEY`]).
fn training_meta(metadata: Option<&HashMap<String, String>>) -> Result<TrainingMeta, String> {
    let json = metadata
        .and_then(|m| m.get(p2p_models::checkpoint::METADATA_KEY))
        .ok_or("not a checkpoint: no training metadata in the file")?;
    let meta: p2p_models::checkpoint::CheckpointMeta = serde_json::from_str(json)
        .map_err(|e| format!("not a checkpoint: bad training metadata ({e})"))?;
    let run = meta
        .run
        .parse::<VersionId>()
        .map_err(|e| format!("not a checkpoint of a run: {e}"))?;
    Ok(TrainingMeta {
        run,
        step: meta.step,
        samples_seen: meta.samples_seen,
        loss: meta.loss,
        accuracy: meta.accuracy,
    })
}
