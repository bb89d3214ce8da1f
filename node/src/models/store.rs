//! [`Store`]: model versions on disk, one directory per version under `<data-dir>/models/`:
//!
//! * `manifest.cbor`: the manifest's exact bytes (their hash is the directory's name);
//! * `data`: the file itself, chunks written at their offsets as they are verified;
//! * `verified`: the bitfield of chunks known good, written atomically and only after `data`
//!   has been synced, so a mark never points at bytes that did not reach the disk.
//!
//! On open, chunks not marked are hashed again: bytes that were verified and written just
//! before a crash are recovered without a download, and bytes that do not match are never
//! trusted. Chunks are read from the file when served; nothing holds a whole model in memory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use libp2p::identity::Keypair;
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::manifest::{self, Hash32, Manifest, VersionId, MANIFEST_FORMAT};
use p2p_protocol::safetensors;
use p2p_protocol::training::TrainingMeta;

use crate::fsutil;

const MANIFEST_FILE: &str = "manifest.cbor";
const DATA_FILE: &str = "data";
const VERIFIED_FILE: &str = "verified";
const ORIGIN_FILE: &str = "published";

/// A version held (in full or in part).
#[derive(Debug)]
pub struct StoredVersion {
    /// The manifest.
    pub manifest: Manifest,
    /// Its exact encoded bytes.
    pub manifest_bytes: Vec<u8>,
    /// Chunks held and verified.
    pub have: Bitfield,
    /// Whether this node published it (imported it from a local file).
    pub published: bool,
    dir: PathBuf,
    file: Arc<File>,
    /// Chunks were written since the last sync began.
    unsynced: bool,
    /// A sync job is running.
    syncing: bool,
}

impl StoredVersion {
    /// Path of the data file.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    /// Whether every chunk held is on disk and recorded as verified.
    pub fn is_durable(&self) -> bool {
        !self.unsynced && !self.syncing
    }
}

/// Makes a version's written chunks durable off the event loop: syncs the data file, then
/// records the chunks that were held when the job was made as verified.
#[derive(Debug)]
pub struct SyncJob {
    /// The version.
    pub id: VersionId,
    file: Arc<File>,
    have: Bitfield,
    verified_path: PathBuf,
}

impl SyncJob {
    /// Runs the sync (blocking).
    pub fn run(&self) -> Result<()> {
        self.file
            .sync_data()
            .context("cannot make downloaded chunks durable")?;
        fsutil::write_atomic(&self.verified_path, self.have.as_bytes(), 0o644)
    }
}

/// A chunk's bytes as received, to be verified against the manifest and written in one call
/// off the event loop.
#[derive(Debug)]
pub struct ChunkWrite {
    file: Arc<File>,
    range: std::ops::Range<u64>,
    expected: Option<Hash32>,
    data: Vec<u8>,
    what: String,
}

impl ChunkWrite {
    /// Checks the bytes' length and BLAKE3 hash against the manifest and, if they match,
    /// writes them at their offset (blocking). `Ok(false)`: they do not match and nothing was
    /// written.
    pub fn run(&self) -> Result<bool> {
        let matches = self.data.len() as u64 == self.range.end - self.range.start
            && self.expected == Some(Hash32::of(&self.data));
        if !matches {
            return Ok(false);
        }
        self.file
            .write_all_at(&self.data, self.range.start)
            .with_context(|| format!("cannot write {} (disk full?)", self.what))?;
        Ok(true)
    }

    /// The chunk's length.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A chunk to read off the event loop, to serve it.
#[derive(Debug)]
pub struct ChunkRead {
    file: Arc<File>,
    range: std::ops::Range<u64>,
}

impl ChunkRead {
    /// Reads the chunk (blocking).
    pub fn run(&self) -> std::io::Result<Vec<u8>> {
        let mut buffer = vec![0u8; (self.range.end - self.range.start) as usize];
        self.file.read_exact_at(&mut buffer, self.range.start)?;
        Ok(buffer)
    }
}

/// What the publisher claims of a version it adopts: everything its signed header holds but the
/// file's own description.
#[derive(Debug, Clone)]
pub struct VersionClaims {
    /// Model name.
    pub model: String,
    /// Version number: the parent's plus one, or 0 without a parent.
    pub version: u64,
    /// The version this one derives from.
    pub parent: Option<VersionId>,
    /// For a checkpoint: its run, step, samples and evaluation.
    pub training: Option<TrainingMeta>,
}

impl VersionClaims {
    /// Version 0 of `model`, not a checkpoint.
    pub fn first(model: &str) -> Self {
        Self {
            model: model.to_string(),
            version: 0,
            parent: None,
            training: None,
        }
    }
}

/// A version imported from a file but not yet numbered: see [`Store::adopt`].
#[derive(Debug)]
pub struct ImportedFile {
    /// Staging directory holding the copied data.
    pub staging: PathBuf,
    /// Size in bytes.
    pub total_size: u64,
    /// Chunk size used.
    pub chunk_size: u32,
    /// Concatenated chunk hashes.
    pub chunk_hashes: Vec<u8>,
    /// The safetensors tensor index.
    pub tensors: Vec<safetensors::TensorEntry>,
    /// The file's `__metadata__`, as stored.
    pub metadata: Option<HashMap<String, String>>,
}

impl Drop for ImportedFile {
    /// An import that is never adopted (refused, or its caller went away, e.g. an HTTP client
    /// that disconnected) leaves nothing behind.
    fn drop(&mut self) {
        if !self.staging.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

/// All versions held on disk.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    versions: HashMap<VersionId, StoredVersion>,
}

impl Store {
    /// The folder the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens (creating if needed) the store at `root`, loading every version found. Damaged
    /// version directories are reported and skipped.
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
        let mut store = Self {
            root: root.to_path_buf(),
            versions: HashMap::new(),
        };
        for entry in
            fs::read_dir(root).with_context(|| format!("cannot read {}", root.display()))?
        {
            let path = entry?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<VersionId>().ok())
            else {
                if path.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(".import-") || n.starts_with(".removing-")
                }) {
                    // An import or a removal interrupted by a crash.
                    let _ = fs::remove_dir_all(&path);
                }
                continue;
            };
            if !path.join(MANIFEST_FILE).exists() {
                // A download that had not stored its manifest yet: nothing in it can be
                // verified, so nothing is lost.
                tracing::info!(path = %path.display(), "deleting a version folder without a manifest");
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            match load_version(&path, &id) {
                Ok(v) => {
                    tracing::info!(version = %id.short(), model = %v.manifest.model, chunks_held = v.have.count(), chunks = v.have.len(), "loaded stored version");
                    store.versions.insert(id, v);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "skipping a damaged stored version")
                }
            }
        }
        Ok(store)
    }

    /// The version `id`, if held at all.
    pub fn get(&self, id: &VersionId) -> Option<&StoredVersion> {
        self.versions.get(id)
    }

    /// All versions held.
    pub fn iter(&self) -> impl Iterator<Item = (&VersionId, &StoredVersion)> {
        self.versions.iter()
    }

    /// The newest complete version of `model` (highest version number).
    pub fn latest_complete(&self, model: &str) -> Option<(&VersionId, &StoredVersion)> {
        self.versions
            .iter()
            .filter(|(_, v)| v.manifest.model == model && v.is_complete())
            .max_by_key(|(id, v)| (v.manifest.version, **id))
    }

    /// Takes an immutable snapshot of `source` into a staging directory of the store and
    /// hashes the snapshot's chunks: the bytes hashed are the bytes stored. Where the file
    /// system can share extents (`FICLONE`: btrfs, XFS, bcachefs) the snapshot is a reflink;
    /// elsewhere each chunk is hashed while it is copied (bounded memory: one chunk at a time).
    ///
    /// Every check runs before anything is written: the header is parsed by the reference
    /// safetensors reader, and the version must fit [`manifest::MAX_CHUNKS`] chunks and a
    /// manifest of [`manifest::MAX_MANIFEST_BYTES`]. A source whose size, modification or
    /// change time, inode or header bytes differ between the start and the end of the copy
    /// was written meanwhile and is refused (`... changed while being read`). A refused or
    /// failed import leaves nothing behind. Runs on a blocking thread; finish with
    /// [`Store::adopt`].
    pub fn import_file(root: &Path, source: &Path, chunk_size: u32) -> Result<ImportedFile> {
        import_observed(root, source, chunk_size, &mut |_| {})
    }

    /// Turns an imported file into version `version` of `model` (child of `parent`) and holds
    /// it. If an identical file of the same model is already held, that version's id is
    /// returned and the staging copy is dropped.
    pub fn adopt(
        &mut self,
        mut imported: ImportedFile,
        claims: VersionClaims,
        key: &Keypair,
    ) -> Result<VersionId> {
        let VersionClaims {
            model,
            version,
            parent,
            training,
        } = claims;
        let publisher = key.public().to_peer_id();
        if let Some((id, _)) = self.versions.iter().find(|(_, v)| {
            v.manifest.model == model
                && v.manifest.publisher == publisher
                && v.manifest.training == training
                && v.manifest.chunk_hashes == imported.chunk_hashes
                && v.manifest.total_size == imported.total_size
                && v.is_complete()
        }) {
            return Ok(*id); // the staging copy goes when `imported` is dropped
        }
        let staging = imported.staging.clone();
        let mut manifest = Manifest {
            format: MANIFEST_FORMAT,
            model,
            version,
            parent,
            total_size: imported.total_size,
            chunk_size: imported.chunk_size,
            chunk_hashes: std::mem::take(&mut imported.chunk_hashes),
            tensors: std::mem::take(&mut imported.tensors),
            publisher,
            training,
            signature: Vec::new(),
        };
        let id = manifest.sign(key);
        let bytes = manifest.encode();
        let dir = self.root.join(id.to_hex());
        let result = (|| -> Result<StoredVersion> {
            manifest.validate()?;
            fsutil::write_atomic(&staging.join(MANIFEST_FILE), &bytes, 0o644)?;
            fsutil::write_atomic(
                &staging.join(VERIFIED_FILE),
                Bitfield::full(manifest.chunk_count()).as_bytes(),
                0o644,
            )?;
            fsutil::write_atomic(&staging.join(ORIGIN_FILE), b"", 0o644)?;
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            fs::rename(&staging, &dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            imported.staging = PathBuf::new(); // moved into the store: nothing to clean up
            load_version(&dir, &id)
        })();
        match result {
            Ok(stored) => {
                self.versions.insert(id, stored);
                Ok(id)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Checks that the complete version `id` is a safetensors file the reference reader opens
    /// and that its header lists exactly the manifest's tensor index (a publisher could
    /// describe one file in the manifest and ship another).
    pub fn check_header(&self, id: &VersionId) -> Result<()> {
        let v = self.versions.get(id).context("version not held")?;
        let (header, _, _) = read_header(&v.file, v.manifest.total_size)?;
        if header.tensors != v.manifest.tensors {
            bail!("its manifest lists other tensors than the file's header");
        }
        Ok(())
    }

    /// Stops holding `id` and deletes its files. The folder is first renamed out of the way
    /// (atomically), so a crash midway leaves a `.removing-*` folder that the next
    /// [`Store::open`] deletes, never a damaged version.
    pub fn remove(&mut self, id: &VersionId) -> Result<()> {
        if let Some(v) = self.versions.remove(id) {
            let doomed = self.root.join(format!(".removing-{}", id.to_hex()));
            fs::rename(&v.dir, &doomed)
                .with_context(|| format!("cannot delete {}", v.dir.display()))?;
            fs::remove_dir_all(&doomed)
                .with_context(|| format!("cannot delete {}", doomed.display()))?;
        }
        Ok(())
    }

    /// Starts holding version `id` from its manifest, already verified against `id` (see
    /// [`Manifest::decode_verified`]), and the manifest's bytes (data empty), unless held.
    pub fn begin(
        &mut self,
        id: VersionId,
        manifest: Manifest,
        manifest_bytes: &[u8],
    ) -> Result<()> {
        if self.versions.contains_key(&id) {
            return Ok(());
        }
        let dir = self.root.join(id.to_hex());
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(DATA_FILE))?;
        reserve(&file, manifest.total_size).with_context(|| {
            format!(
                "cannot reserve {} bytes for version {}",
                manifest.total_size,
                id.short()
            )
        })?;
        fsutil::write_atomic(
            &dir.join(VERIFIED_FILE),
            Bitfield::new(manifest.chunk_count()).as_bytes(),
            0o644,
        )?;
        fsutil::write_atomic(&dir.join(MANIFEST_FILE), manifest_bytes, 0o644)?;
        let have = Bitfield::new(manifest.chunk_count());
        self.versions.insert(
            id,
            StoredVersion {
                manifest,
                manifest_bytes: manifest_bytes.to_vec(),
                have,
                published: false,
                dir,
                file: Arc::new(file),
                unsynced: false,
                syncing: false,
            },
        );
        Ok(())
    }

    /// Reads chunk `index` of `id`; only chunks held are read.
    /// Prepares the read of held chunk `index` of `id`, to run on another thread (`None`: not
    /// held).
    pub fn chunk_read(&self, id: &VersionId, index: u32) -> Option<ChunkRead> {
        let v = self.versions.get(id).filter(|v| v.have.get(index))?;
        Some(ChunkRead {
            file: Arc::clone(&v.file),
            range: v.manifest.chunk_range(index),
        })
    }

    /// Reads held chunk `index` of `id` (blocking).
    pub fn read_chunk(&self, id: &VersionId, index: u32) -> Result<Vec<u8>> {
        let v = self.versions.get(id).context("version not held")?;
        if !v.have.get(index) {
            bail!("chunk {index} not held");
        }
        let range = v.manifest.chunk_range(index);
        let mut buffer = vec![0u8; (range.end - range.start) as usize];
        v.file.read_exact_at(&mut buffer, range.start)?;
        Ok(buffer)
    }

    /// Verifies `data` as chunk `index` of `id` and writes it. Returns `Ok(false)` (and
    /// writes nothing) if the bytes do not match the manifest.
    pub fn write_chunk(&mut self, id: &VersionId, index: u32, data: &[u8]) -> Result<bool> {
        let Some(v) = self.versions.get(id) else {
            bail!("version not held");
        };
        if v.have.get(index) {
            return Ok(v.manifest.verify_chunk(index, data));
        }
        if !self.chunk_write(id, index, data.to_vec())?.run()? {
            return Ok(false);
        }
        self.mark_written(id, index)?;
        Ok(true)
    }

    /// Prepares the verification and write of `data` as chunk `index` of `id`, to run on
    /// another thread ([`ChunkWrite::run`]); then [`Store::mark_written`] records it.
    pub fn chunk_write(&self, id: &VersionId, index: u32, data: Vec<u8>) -> Result<ChunkWrite> {
        let v = self.versions.get(id).context("version not held")?;
        Ok(ChunkWrite {
            file: Arc::clone(&v.file),
            range: v.manifest.chunk_range(index),
            expected: v.manifest.chunk_hash(index),
            data,
            what: format!("chunk {index} of {}", id.short()),
        })
    }

    /// Records chunk `index` of `id` as written and verified: it is served from now on, and
    /// recorded on disk by the next sync ([`Store::sync_job`] or [`Store::sync_all`]).
    pub fn mark_written(&mut self, id: &VersionId, index: u32) -> Result<()> {
        let v = self.versions.get_mut(id).context("version not held")?;
        v.have.set(index);
        v.unsynced = true;
        Ok(())
    }

    /// A job that makes what was written to `id` durable, unless nothing changed or a job for
    /// it is running; report its end with [`Store::sync_finished`].
    pub fn sync_job(&mut self, id: &VersionId) -> Option<SyncJob> {
        let v = self.versions.get_mut(id)?;
        if !v.unsynced || v.syncing {
            return None;
        }
        v.unsynced = false;
        v.syncing = true;
        Some(SyncJob {
            id: *id,
            file: Arc::clone(&v.file),
            have: v.have.clone(),
            verified_path: v.dir.join(VERIFIED_FILE),
        })
    }

    /// Versions with chunks written since their last sync began.
    pub fn unsynced(&self) -> Vec<VersionId> {
        self.versions
            .iter()
            .filter(|(_, v)| v.unsynced && !v.syncing)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A sync job of `id` ended; after a failure its chunks count as unsynced again.
    pub fn sync_finished(&mut self, id: &VersionId, ok: bool) {
        if let Some(v) = self.versions.get_mut(id) {
            v.syncing = false;
            if !ok {
                v.unsynced = true;
            }
        }
    }

    /// Copies into `id` every missing chunk whose hash another held version has, verified
    /// again on the way. Returns the chunk indices obtained.
    pub fn copy_local_chunks(&mut self, id: &VersionId) -> Result<Vec<u32>> {
        let Some(target) = self.versions.get(id) else {
            return Ok(Vec::new());
        };
        let mut by_hash: HashMap<Hash32, (VersionId, u32)> = HashMap::new();
        for (other_id, other) in &self.versions {
            if other_id == id {
                continue;
            }
            for i in other.have.ones() {
                if let Some(h) = other.manifest.chunk_hash(i) {
                    by_hash.entry(h).or_insert((*other_id, i));
                }
            }
        }
        let wanted: Vec<(u32, VersionId, u32)> = (0..target.manifest.chunk_count())
            .filter(|i| !target.have.get(*i))
            .filter_map(|i| {
                let (src, j) = by_hash.get(&target.manifest.chunk_hash(i)?)?;
                Some((i, *src, *j))
            })
            .collect();
        let mut copied = Vec::new();
        for (i, src, j) in wanted {
            let data = self.read_chunk(&src, j)?;
            if self.write_chunk(id, i, &data)? {
                copied.push(i);
            }
        }
        Ok(copied)
    }

    /// Makes what was written durable now (blocking; for shutdown): syncs each changed data
    /// file, then records its verified chunks.
    pub fn sync_all(&mut self) -> Result<()> {
        let ids: Vec<VersionId> = self
            .versions
            .iter()
            .filter(|(_, v)| v.unsynced)
            .map(|(id, _)| *id)
            .collect();
        ids.iter().try_for_each(|id| self.sync(id))
    }

    fn sync(&mut self, id: &VersionId) -> Result<()> {
        let v = self.versions.get_mut(id).context("version not held")?;
        v.file.sync_data()?;
        fsutil::write_atomic(&v.dir.join(VERIFIED_FILE), v.have.as_bytes(), 0o644)?;
        v.unsynced = false;
        Ok(())
    }
}

/// What tells cheaply whether a file's bytes may have changed: if none of these moved, no
/// write reached the file in between (to the resolution of the file system's timestamps,
/// which Linux 6.13 and later make fine-grained once a time has been read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The error for a source written to while it was being imported.
fn changed_while_read(source: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} changed while being read; publish it again once it is written",
        source.display()
    )
}

/// [`Store::import_file`], calling `after_chunk(bytes done)` after each chunk (tests use it to
/// write to the source mid-import).
fn import_observed(
    root: &Path,
    source: &Path,
    chunk_size: u32,
    after_chunk: &mut dyn FnMut(u64),
) -> Result<ImportedFile> {
    let not_regular = || anyhow::anyhow!("{} is not a regular file", source.display());
    let at_path =
        fs::metadata(source).with_context(|| format!("cannot open {}", source.display()))?;
    if !at_path.is_file() {
        return Err(not_regular()); // a FIFO would block the open below
    }
    // Non-blocking, in case the path became a FIFO since (regular files ignore the flag).
    let input = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(source)
        .with_context(|| format!("cannot open {}", source.display()))?;
    if !input.metadata()?.is_file() {
        return Err(not_regular());
    }
    // Written-back pages are write-protected again, so a write through a shared mmap after
    // this point updates the modification time (dirty pages would not): the stamps below see
    // every writer, not only write(2).
    if let Err(e) = input.sync_all() {
        // Some file systems refuse it; time stamps still catch write(2).
        tracing::debug!(path = %source.display(), error = %e, "cannot flush the source before import");
    }
    let opened = input
        .metadata()
        .with_context(|| format!("cannot read {}", source.display()))?;
    let before = FileStamp::of(&opened);
    let total_size = before.size;
    let (header, header_hash, prefix_len) = read_header(&input, total_size)
        .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
    check_limits(source, total_size, chunk_size, &header)?;

    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let staging = root.join(format!(
        ".import-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let result = (|| -> Result<ImportedFile> {
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(staging.join(DATA_FILE))?;
        // A reflink is an atomic snapshot sharing the source's extents; without one, copy.
        let cloned = total_size > 0 && rustix::fs::ioctl_ficlone(&out, &input).is_ok();
        if !cloned {
            reserve(&out, total_size).context("cannot reserve space in the store (disk full?)")?;
        }
        let mut prefix = blake3::Hasher::new();
        let mut buffer = vec![0u8; chunk_size as usize];
        let mut chunk_hashes = Vec::with_capacity(
            manifest::chunk_count(total_size, chunk_size) as usize * manifest::HASH_BYTES,
        );
        let mut offset = 0u64;
        while offset < total_size {
            let len = (total_size - offset).min(u64::from(chunk_size)) as usize;
            let chunk = &mut buffer[..len];
            if cloned {
                out.read_exact_at(chunk, offset)
                    .context("cannot read the snapshot in the store")?;
            } else {
                input
                    .read_exact_at(chunk, offset)
                    .map_err(|_| changed_while_read(source))?;
                out.write_all_at(chunk, offset)
                    .context("cannot write into the store (disk full?)")?;
            }
            chunk_hashes.extend_from_slice(&Hash32::of(chunk).0);
            if offset < prefix_len {
                prefix.update(&chunk[..((prefix_len - offset) as usize).min(len)]);
            }
            offset += len as u64;
            after_chunk(offset);
        }
        let after = FileStamp::of(&input.metadata()?);
        let at_path = fs::metadata(source).ok().map(|m| FileStamp::of(&m));
        if after != before || at_path != Some(before) || prefix.finalize() != header_hash {
            return Err(changed_while_read(source));
        }
        out.sync_all()
            .context("cannot write into the store (disk full?)")?;
        Ok(ImportedFile {
            staging: staging.clone(),
            total_size,
            chunk_size,
            chunk_hashes,
            tensors: header.tensors,
            metadata: header.metadata,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Reads and parses the safetensors header of `file`: the header, the BLAKE3 hash of the
/// length prefix and header bytes, and their length.
fn read_header(file: &File, total_size: u64) -> Result<(safetensors::Header, blake3::Hash, u64)> {
    let mut prefix = [0u8; 8];
    if total_size < 8 {
        bail!(safetensors::SafetensorsError::TooShort);
    }
    file.read_exact_at(&mut prefix, 0)?;
    let len = safetensors::header_len(&prefix, total_size)?;
    let mut bytes = vec![0u8; 8 + len as usize];
    file.read_exact_at(&mut bytes, 0)?;
    let header = safetensors::parse_header(&bytes[8..], total_size)?;
    Ok((header, blake3::hash(&bytes), 8 + len))
}

/// Refuses, before anything is written, a file that would not fit a version: too many chunks
/// or a tensor index too large for a manifest.
fn check_limits(
    source: &Path,
    total_size: u64,
    chunk_size: u32,
    header: &safetensors::Header,
) -> Result<()> {
    let chunks = manifest::chunk_count(total_size, chunk_size);
    if chunks > manifest::MAX_CHUNKS as u64 {
        bail!(
            "{} is {total_size} bytes: more than {} chunks of {} KiB, the most one version may have; publish it with a larger --chunk-size-kib",
            source.display(),
            manifest::MAX_CHUNKS,
            chunk_size / 1024
        );
    }
    let allowed = manifest::max_tensors(total_size);
    if header.tensors.len() > allowed {
        bail!(
            "{} has {} tensors: a file of {total_size} bytes may have at most {allowed} (1,024, then one per 4 KiB of file, at most {}); store fewer, larger tensors (concatenate small ones)",
            source.display(),
            header.tensors.len(),
            manifest::MAX_MANIFEST_TENSORS
        );
    }
    // The largest manifest this file could get: longest name, largest number, a parent,
    // training figures and a signature.
    let probe = Manifest {
        format: MANIFEST_FORMAT,
        model: "m".repeat(manifest::MAX_MODEL_NAME_BYTES),
        version: u64::MAX,
        parent: Some(Hash32([0xff; manifest::HASH_BYTES])),
        total_size,
        chunk_size,
        chunk_hashes: vec![0; chunks as usize * manifest::HASH_BYTES],
        tensors: header.tensors.clone(),
        // An ed25519 peer id (38 bytes) and the longest training figures a checkpoint has.
        publisher: Keypair::generate_ed25519().public().to_peer_id(),
        training: Some(TrainingMeta {
            run: Hash32([0xff; manifest::HASH_BYTES]),
            step: u64::MAX,
            samples_seen: u64::MAX,
            loss: Some(f64::MAX),
            accuracy: Some(1.0 / 3.0),
            bits_per_char: Some(f64::MAX),
        }),
        signature: vec![0; p2p_protocol::signing::MAX_SIGNATURE_BYTES],
    };
    let size = probe.encode().len();
    if size > manifest::MAX_MANIFEST_BYTES {
        bail!(
            "{} has {} tensors: their index would make a manifest of {:.1} MiB, more than the {} MiB one version may have; store fewer, larger tensors (concatenate small ones)",
            source.display(),
            header.tensors.len(),
            size as f64 / (1024.0 * 1024.0),
            manifest::MAX_MANIFEST_BYTES >> 20
        );
    }
    Ok(())
}

/// Sizes a download's data file and reserves its disk space up front, so that a full disk is
/// reported when the download starts, not halfway through. File systems without `fallocate`
/// get a sparse file of the right size instead.
fn reserve(file: &File, size: u64) -> std::io::Result<()> {
    file.set_len(size)?;
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOSPC => Err(e.into()),
        Err(e) => {
            tracing::debug!(error = %e, "fallocate unsupported; the data file stays sparse");
            Ok(())
        }
    }
}

/// Writes the data file of a complete version to `out` (atomically). Every chunk was verified
/// against `manifest` when it arrived and is marked verified only once on disk, so the file is
/// not hashed again. With `take`, the store's data file itself is renamed to `out` (nothing is
/// copied or written; the caller then drops the version from the store, whose directory is
/// left without its data file until then, so the store and `out` never share a file); where
/// that is impossible (another file system), and without `take`, the kernel copies it
/// (`copy_file_range`, which shares extents instead where the file system can) into a
/// temporary file in `out`'s directory, synced, then renamed. Returns whether the data file
/// was taken. Runs on a blocking thread.
pub fn export_file(manifest: &Manifest, data_path: &Path, out: &Path, take: bool) -> Result<bool> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if take && fs::rename(data_path, out).is_ok() {
        // The new name survives a crash too.
        File::open(dir).and_then(|d| d.sync_all()).ok();
        return Ok(true);
    }
    let tmp = dir.join(format!(
        ".{}.part-{}",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut source = File::open(data_path)
            .with_context(|| format!("cannot open {}", data_path.display()))?;
        let mut file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let copied = std::io::copy(&mut source, &mut file)
            .with_context(|| format!("cannot write {} (disk full?)", tmp.display()))?;
        if copied != manifest.total_size {
            bail!(
                "the stored data file has {copied} bytes, the manifest says {}",
                manifest.total_size
            );
        }
        file.sync_all()?;
        fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
        File::open(dir).and_then(|d| d.sync_all()).ok();
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| false)
}

/// Loads one version directory, re-hashing chunks not marked verified.
fn load_version(dir: &Path, id: &VersionId) -> Result<StoredVersion> {
    let bytes = fsutil::read_bounded(
        &dir.join(MANIFEST_FILE),
        manifest::MAX_MANIFEST_BYTES as u64,
    )?
    .context("no manifest")?;
    let manifest = Manifest::decode_verified(&bytes, id)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(DATA_FILE))
        .context("no data file")?;
    if file.metadata()?.len() != manifest.total_size {
        file.set_len(manifest.total_size)?;
    }
    let marked = fsutil::read_bounded(&dir.join(VERIFIED_FILE), 1 << 20)?
        .and_then(|b| Bitfield::from_bytes(manifest.chunk_count(), b))
        .unwrap_or_else(|| Bitfield::new(manifest.chunk_count()));
    let mut have = marked.clone();
    let mut buffer = Vec::new();
    for i in (0..manifest.chunk_count()).filter(|i| !marked.get(*i)) {
        let range = manifest.chunk_range(i);
        buffer.resize((range.end - range.start) as usize, 0);
        if file.read_exact_at(&mut buffer, range.start).is_ok() && manifest.verify_chunk(i, &buffer)
        {
            have.set(i);
        }
    }
    let mut version = StoredVersion {
        published: dir.join(ORIGIN_FILE).exists(),
        manifest,
        manifest_bytes: bytes,
        have,
        dir: dir.to_path_buf(),
        file: Arc::new(file),
        unsynced: false,
        syncing: false,
    };
    if version.have != marked {
        fsutil::write_atomic(&dir.join(VERIFIED_FILE), version.have.as_bytes(), 0o644)?;
        version.unsynced = false;
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CHUNK: u32 = 64 * 1024;

    /// Adopts `imported` as version 0 of model `m` by a fresh publisher.
    fn adopt_first(store: &mut Store, imported: ImportedFile) -> VersionId {
        store
            .adopt(
                imported,
                VersionClaims::first("m"),
                &Keypair::generate_ed25519(),
            )
            .unwrap()
    }

    /// Writes a safetensors file of `header` and `data` to `path`; returns its bytes.
    fn write_file(path: &Path, header: &str, data: impl IntoIterator<Item = u8>) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(data);
        fs::write(path, &bytes).unwrap();
        bytes
    }

    /// A safetensors file with one U8 tensor of `len` bytes, all `fill`.
    fn model(path: &Path, len: usize, fill: u8) -> Vec<u8> {
        let header =
            format!(r#"{{"w":{{"dtype":"U8","shape":[{len}],"data_offsets":[0,{len}]}}}}"#);
        let bytes = write_file(path, &header, std::iter::repeat_n(fill, len));
        // An hour old: a write during the test moves the time whatever the file system's
        // timestamp resolution.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        bytes
    }

    /// What the store's directory holds besides nothing: every entry's name.
    fn leftovers(root: &Path) -> Vec<String> {
        fs::read_dir(root)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_bytes_hashed_are_the_bytes_stored() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.safetensors");
        let bytes = model(&source, 300_000, 3);
        let root = dir.path().join("models");
        let imported = Store::import_file(&root, &source, CHUNK).unwrap();
        let stored = fs::read(imported.staging.join(DATA_FILE)).unwrap();
        assert_eq!(stored, bytes);
        let hashes: Vec<u8> = stored
            .chunks(CHUNK as usize)
            .flat_map(|c| Hash32::of(c).0)
            .collect();
        assert_eq!(imported.chunk_hashes, hashes);
    }

    /// A file overwritten in place (same size) while it is copied would give a version that
    /// never existed: the old first half and the new second half.
    #[test]
    fn a_source_overwritten_in_place_mid_import_is_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.safetensors");
        let bytes = model(&source, 1 << 20, 1);
        let root = dir.path().join("models");
        let half = bytes.len() as u64 / 2;
        let mut overwritten = false;
        let result = import_observed(&root, &source, CHUNK, &mut |done| {
            if done >= u64::from(CHUNK) && !overwritten {
                overwritten = true;
                let f = OpenOptions::new().write(true).open(&source).unwrap();
                f.write_all_at(&vec![9u8; (bytes.len() as u64 - half) as usize], half)
                    .unwrap();
            }
        });
        assert!(overwritten);
        let e = format!("{:#}", result.unwrap_err());
        assert!(
            e.contains("changed while being read; publish it again once it is written"),
            "{e}"
        );
        assert_eq!(leftovers(&root), Vec::<String>::new());
    }

    #[test]
    fn a_source_replaced_by_rename_mid_import_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.safetensors");
        model(&source, 1 << 20, 1);
        let root = dir.path().join("models");
        let mut replaced = false;
        let result = import_observed(&root, &source, CHUNK, &mut |_| {
            if !replaced {
                replaced = true;
                let other = source.with_extension("new");
                model(&other, 1 << 20, 2);
                fs::rename(&other, &source).unwrap();
            }
        });
        let e = format!("{:#}", result.unwrap_err());
        assert!(e.contains("changed while being read"), "{e}");
        assert_eq!(leftovers(&root), Vec::<String>::new());
    }

    /// 300,000 one-byte tensors: a valid file whose index cannot fit a manifest. The limit is
    /// named in the user's terms, before anything is written.
    #[test]
    fn a_tensor_index_too_large_for_a_manifest_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("many.safetensors");
        let n = 300_000;
        let mut header = String::from("{");
        for i in 0..n {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&format!(
                r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            ));
        }
        header.push('}');
        let bytes = write_file(&source, &header, std::iter::repeat_n(0u8, n));
        assert!(safetensors::parse_file(&bytes).is_ok(), "a valid file");
        let root = dir.path().join("models");
        let e = format!(
            "{:#}",
            Store::import_file(&root, &source, CHUNK).unwrap_err()
        );
        assert!(e.contains("300000 tensors"), "{e}");
        assert!(e.contains("may have at most"), "{e}");
        assert!(!e.contains("manifest.cbor"), "{e}");
        assert_eq!(leftovers(&root), Vec::<String>::new());
    }

    #[test]
    fn an_import_that_is_never_adopted_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.safetensors");
        model(&source, 100_000, 5);
        let root = dir.path().join("models");
        let imported = Store::import_file(&root, &source, CHUNK).unwrap();
        assert_eq!(leftovers(&root).len(), 1, "the staging copy");
        drop(imported);
        assert_eq!(leftovers(&root), Vec::<String>::new());
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: mkfifo is not available");
            return;
        }
        let root = dir.path().join("models");
        let e = format!("{:#}", Store::import_file(&root, &fifo, CHUNK).unwrap_err());
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn interrupted_removals_and_folders_without_a_manifest_are_cleaned_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("models");
        let source = dir.path().join("m.safetensors");
        model(&source, 100_000, 5);
        let mut store = Store::open(&root).unwrap();
        let imported = Store::import_file(&root, &source, CHUNK).unwrap();
        let id = adopt_first(&mut store, imported);
        drop(store);
        fs::create_dir_all(root.join(format!(".removing-{}", Hash32::of(b"x").to_hex()))).unwrap();
        let orphan = root.join(Hash32::of(b"y").to_hex());
        fs::create_dir_all(&orphan).unwrap();
        fs::write(orphan.join(DATA_FILE), b"data").unwrap();
        let store = Store::open(&root).unwrap();
        assert!(store.get(&id).is_some(), "the good version stays");
        assert_eq!(leftovers(&root), vec![id.to_hex()]);
    }

    #[test]
    fn non_string_metadata_is_refused_like_the_reference_reader_does() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.safetensors");
        let header =
            r#"{"__metadata__":{"step":0},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        write_file(&source, header, [1, 2]);
        let root = dir.path().join("models");
        let e = format!(
            "{:#}",
            Store::import_file(&root, &source, CHUNK).unwrap_err()
        );
        assert!(e.contains("not a valid safetensors file"), "{e}");
        assert_eq!(leftovers(&root), Vec::<String>::new());
    }

    #[test]
    fn a_complete_version_whose_file_disagrees_with_its_manifest_fails_the_header_check() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.safetensors");
        model(&source, 100_000, 5);
        let root = dir.path().join("models");
        let mut store = Store::open(&root).unwrap();
        let mut imported = Store::import_file(&root, &source, CHUNK).unwrap();
        imported.tensors[0].name = "other".into();
        let id = adopt_first(&mut store, imported);
        let e = format!("{:#}", store.check_header(&id).unwrap_err());
        assert!(e.contains("other tensors"), "{e}");
        store.remove(&id).unwrap();
        assert!(store.get(&id).is_none());
        assert_eq!(leftovers(&root), Vec::<String>::new());
    }
}
