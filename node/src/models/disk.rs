//! The models behaviour's disk and CPU work off the event loop: one writer thread that verifies
//! and writes received chunks (`ChunkWriter`), and blocking tasks for decoding and verifying
//! received manifests (up to 8 MiB, a signature and a hash over all of it), reads of chunks to
//! serve, syncs, imports of files to publish and exports of complete versions. All but exports
//! report back as [`DiskEvent`]s; an export answers its caller directly.

use std::collections::HashMap;
use std::path::PathBuf;

use libp2p::request_response::{InboundRequestId, ResponseChannel};
use libp2p::PeerId;
use p2p_protocol::manifest::{Manifest, ManifestError, VersionId};
use p2p_protocol::messages::{Announcement, Response};
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

/// A chunk received from `peer`, to verify and write.
#[derive(Debug)]
pub(super) struct ChunkJob {
    /// The version.
    pub id: VersionId,
    /// The chunk.
    pub index: u32,
    /// Who sent it.
    pub peer: PeerId,
    /// The bytes and where they go.
    pub write: ChunkWrite,
}

/// A chunk read to serve a peer's request.
#[derive(Debug)]
pub struct ChunkRead {
    /// The version.
    pub id: VersionId,
    /// The chunk.
    pub index: u32,
    /// The request it answers.
    pub request: InboundRequestId,
    /// Where the answer goes.
    pub channel: ResponseChannel<Response>,
    /// The bytes, or why they could not be read.
    pub result: std::io::Result<Vec<u8>>,
}

/// Disk work that finished on a blocking thread.
#[derive(Debug)]
pub enum DiskEvent {
    /// A received chunk was verified and written, or did not match its hash (`Ok(false)`,
    /// nothing written), or could not be written.
    ChunkWritten {
        /// The version.
        id: VersionId,
        /// The chunk.
        index: u32,
        /// Who sent it.
        peer: PeerId,
        /// Its length in bytes.
        bytes: u64,
        /// Whether it matched, or why the write failed.
        result: Result<bool, Error>,
    },
    /// A chunk to serve was read (or failed to be).
    ChunkRead(Box<ChunkRead>),
    /// A received manifest was decoded and verified against its id (or refused).
    ManifestDecoded(Box<DecodedManifest>),
    /// A file to publish was imported (or failed to be).
    Imported(Box<Imported>),
    /// A complete version was written to a file (`Ok(true)`: the store's data file was moved
    /// there, so the store drops the version), or failed to be.
    Exported {
        /// The version.
        id: VersionId,
        /// Whether the store's data file was moved, or why the export failed.
        result: Result<bool, Error>,
        /// Who waits for the outcome.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// A version's written chunks were made durable (or failed to be).
    Synced {
        /// The version.
        id: VersionId,
        /// Why the sync failed, if it did.
        result: Result<(), Error>,
    },
}

impl ChunkJob {
    /// Verifies and writes the chunk (blocking).
    fn run(self) -> DiskEvent {
        let result = self.write.run().map_err(|e| Error::Disk(format!("{e:#}")));
        DiskEvent::ChunkWritten {
            id: self.id,
            index: self.index,
            peer: self.peer,
            bytes: self.write.len() as u64,
            result,
        }
    }
}

/// One thread that verifies (BLAKE3) and writes received chunks in arrival order, off the
/// event loop. A single writer keeps the file's lock uncontended (threads writing one file at
/// once spin on it) and costs no thread hand-off per chunk. Jobs queued are bounded by the
/// chunk requests in flight.
pub(super) struct ChunkWriter {
    jobs: std::sync::mpsc::Sender<ChunkJob>,
    done: mpsc::UnboundedSender<DiskEvent>,
}

impl ChunkWriter {
    /// Starts the writer thread; it ends when the behaviour (the sender) is dropped.
    pub(super) fn start(done: mpsc::UnboundedSender<DiskEvent>) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<ChunkJob>();
        let thread_done = done.clone();
        let spawned = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || {
                for job in queue {
                    let _ = thread_done.send(job.run());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the chunk writer thread; writing on the event loop");
        }
        Self { jobs, done }
    }

    /// Queues a chunk; its end comes back as [`DiskEvent::ChunkWritten`].
    pub(super) fn write(&self, job: ChunkJob) {
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            // No writer thread: write here rather than lose the chunk.
            let _ = self.done.send(job.run());
        }
    }
}

/// A manifest received for a download, decoded and verified off the event loop.
#[derive(Debug)]
pub struct DecodedManifest {
    /// The version asked for.
    pub id: VersionId,
    /// Who sent it.
    pub peer: PeerId,
    /// The bytes received.
    pub bytes: Vec<u8>,
    /// The manifest and its announcement (both hash the whole body, so both are made here),
    /// or why it was refused.
    pub result: Result<(Manifest, Announcement), ManifestError>,
}

/// Decodes and verifies `bytes` as the manifest of `id` on a blocking thread (see
/// [`Manifest::decode_verified`]); the outcome comes back as [`DiskEvent::ManifestDecoded`].
pub(super) fn spawn_decode(
    id: VersionId,
    peer: PeerId,
    bytes: Vec<u8>,
    done: mpsc::UnboundedSender<DiskEvent>,
) {
    tokio::task::spawn_blocking(move || {
        let result = Manifest::decode_verified(&bytes, &id).map(|m| {
            let announcement = m.announcement();
            (m, announcement)
        });
        let _ = done.send(DiskEvent::ManifestDecoded(Box::new(DecodedManifest {
            id,
            peer,
            bytes,
            result,
        })));
    });
}

/// Reads a chunk to serve on a blocking thread; the bytes come back as
/// [`DiskEvent::ChunkRead`], to be sent on `channel`.
pub(super) fn spawn_read(
    read: store::ChunkRead,
    (id, index): (VersionId, u32),
    request: InboundRequestId,
    channel: ResponseChannel<Response>,
    done: mpsc::UnboundedSender<DiskEvent>,
) {
    tokio::task::spawn_blocking(move || {
        let result = read.run();
        let _ = done.send(DiskEvent::ChunkRead(Box::new(ChunkRead {
            id,
            index,
            request,
            channel,
            result,
        })));
    });
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

/// Writes the complete version `id` described by `manifest`, stored at `data`, to `out` on a
/// blocking thread (see [`store::export_file`]; `take`: move it out of the store); the
/// outcome comes back through `done` as [`DiskEvent::Exported`], for `reply`.
pub(super) fn spawn_export(
    id: VersionId,
    manifest: Manifest,
    data: PathBuf,
    out: PathBuf,
    take: bool,
    reply: oneshot::Sender<Result<(), Error>>,
    done: mpsc::UnboundedSender<DiskEvent>,
) {
    tokio::task::spawn_blocking(move || {
        let result = store::export_file(&manifest, &data, &out, take)
            .map_err(|e| Error::Export(format!("{e:#}")));
        let _ = done.send(DiskEvent::Exported { id, result, reply });
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
        bits_per_char: meta.bits_per_char,
    })
}
