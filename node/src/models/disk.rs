//! The models behaviour's disk work off the event loop: one writer thread for verified chunks
//! ([`ChunkWriter`]) and blocking tasks for syncs; both report back as [`DiskEvent`]s.

use p2p_protocol::manifest::VersionId;
use tokio::sync::mpsc;

use super::store::{ChunkWrite, SyncJob};

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
        result: Result<(), String>,
    },
    /// A version's written chunks were made durable (or failed to be).
    Synced {
        /// The version.
        id: VersionId,
        /// Why the sync failed, if it did.
        result: Result<(), String>,
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
    /// Starts the writer thread; it ends when the engine (the sender) is dropped.
    pub(super) fn start(done: mpsc::UnboundedSender<DiskEvent>) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<(VersionId, u32, ChunkWrite)>();
        let thread_done = done.clone();
        let spawned = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || {
                for (id, index, write) in queue {
                    let result = write.run().map_err(|e| format!("{e:#}"));
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
            let result = write.run().map_err(|e| format!("{e:#}"));
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
        let result = job.run().map_err(|e| format!("{e:#}"));
        let _ = done.send(DiskEvent::Synced { id: job.id, result });
    });
}
