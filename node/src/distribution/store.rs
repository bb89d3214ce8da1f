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
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use p2p_protocol::bitfield::Bitfield;
use p2p_protocol::manifest::{self, Hash32, Manifest, VersionId, MANIFEST_FORMAT};
use p2p_protocol::safetensors;

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

/// Verified chunk bytes on their way to disk, written off the event loop.
#[derive(Debug)]
pub struct ChunkWrite {
    file: Arc<File>,
    offset: u64,
    data: Vec<u8>,
    what: String,
}

impl ChunkWrite {
    /// Writes the bytes at their offset (blocking).
    pub fn run(&self) -> Result<()> {
        self.file
            .write_all_at(&self.data, self.offset)
            .with_context(|| format!("cannot write {} (disk full?)", self.what))
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
}

/// All versions held on disk.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    versions: HashMap<VersionId, StoredVersion>,
}

impl Store {
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
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".import-"))
                {
                    let _ = fs::remove_dir_all(&path); // an import interrupted by a crash
                }
                continue;
            };
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

    /// Copies `source` into a staging directory of the store, checking that it is a
    /// well-formed safetensors file and hashing its chunks. Bounded memory: one chunk at a
    /// time. Runs on a blocking thread; finish with [`Store::adopt`].
    pub fn import_file(root: &Path, source: &Path, chunk_size: u32) -> Result<ImportedFile> {
        let mut input =
            File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
        let total_size = input.metadata()?.len();
        let mut prefix = [0u8; 8];
        input.read_exact(&mut prefix).map_err(|_| {
            anyhow::anyhow!("{} is not a safetensors file: too short", source.display())
        })?;
        let header_len = safetensors::header_len(&prefix, total_size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
        let mut header = vec![0u8; header_len as usize];
        input.read_exact(&mut header)?;
        let tensors = safetensors::parse_index(&header, total_size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
        if manifest::chunk_count(total_size, chunk_size) > manifest::MAX_CHUNKS as u64 {
            bail!(
                "{} is too large for chunks of {chunk_size} bytes",
                source.display()
            );
        }

        fs::create_dir_all(root)?;
        let staging = root.join(format!(
            ".import-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&staging)?;
        let result = (|| -> Result<ImportedFile> {
            let out = File::create(staging.join(DATA_FILE))?;
            let mut input = File::open(source)?;
            let mut buffer = vec![0u8; chunk_size as usize];
            let mut chunk_hashes = Vec::new();
            let mut offset = 0u64;
            while offset < total_size {
                let len = (total_size - offset).min(u64::from(chunk_size)) as usize;
                input
                    .read_exact(&mut buffer[..len])
                    .with_context(|| format!("{} changed while being read", source.display()))?;
                chunk_hashes.extend_from_slice(&Hash32::of(&buffer[..len]).0);
                out.write_all_at(&buffer[..len], offset)
                    .context("cannot write into the store (disk full?)")?;
                offset += len as u64;
            }
            out.sync_all()?;
            Ok(ImportedFile {
                staging: staging.clone(),
                total_size,
                chunk_size,
                chunk_hashes,
                tensors,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Turns an imported file into version `version` of `model` (child of `parent`) and holds
    /// it. If an identical file of the same model is already held, that version's id is
    /// returned and the staging copy is dropped.
    pub fn adopt(
        &mut self,
        imported: ImportedFile,
        model: &str,
        version: u64,
        parent: Option<VersionId>,
    ) -> Result<VersionId> {
        if let Some((id, _)) = self.versions.iter().find(|(_, v)| {
            v.manifest.model == model
                && v.manifest.chunk_hashes == imported.chunk_hashes
                && v.manifest.total_size == imported.total_size
                && v.is_complete()
        }) {
            let id = *id;
            let _ = fs::remove_dir_all(&imported.staging);
            return Ok(id);
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            model: model.to_string(),
            version,
            parent,
            total_size: imported.total_size,
            chunk_size: imported.chunk_size,
            chunk_hashes: imported.chunk_hashes,
            tensors: imported.tensors,
        };
        manifest.validate()?;
        let bytes = manifest.encode();
        let id = Hash32::of(&bytes);
        let dir = self.root.join(id.to_hex());
        let staging = &imported.staging;
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
        fs::rename(staging, &dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let stored = load_version(&dir, &id)?;
        self.versions.insert(id, stored);
        Ok(id)
    }

    /// Starts holding version `id` from its verified manifest bytes (data empty), unless held.
    pub fn begin(&mut self, id: VersionId, manifest_bytes: &[u8]) -> Result<()> {
        if self.versions.contains_key(&id) {
            return Ok(());
        }
        let manifest = Manifest::decode_verified(manifest_bytes, &id)?;
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
        if !v.manifest.verify_chunk(index, data) {
            return Ok(false);
        }
        if v.have.get(index) {
            return Ok(true);
        }
        let write = self.chunk_write(id, index, data.to_vec())?;
        write.run()?;
        self.mark_written(id, index)?;
        Ok(true)
    }

    /// Prepares the write of verified bytes for chunk `index` of `id`, to run on another
    /// thread ([`ChunkWrite::run`]); then [`Store::mark_written`] records it.
    pub fn chunk_write(&self, id: &VersionId, index: u32, data: Vec<u8>) -> Result<ChunkWrite> {
        let v = self.versions.get(id).context("version not held")?;
        Ok(ChunkWrite {
            file: Arc::clone(&v.file),
            offset: v.manifest.chunk_range(index).start,
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

/// Writes the data file of a complete version to `out` (atomically), verifying every chunk
/// against `manifest` on the way. Runs on a blocking thread; one chunk in memory at a time.
pub fn export_file(manifest: &Manifest, data_path: &Path, out: &Path) -> Result<()> {
    let source =
        File::open(data_path).with_context(|| format!("cannot open {}", data_path.display()))?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.part-{}",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut buffer = Vec::new();
        for i in 0..manifest.chunk_count() {
            let range = manifest.chunk_range(i);
            buffer.resize((range.end - range.start) as usize, 0);
            source.read_exact_at(&mut buffer, range.start)?;
            if !manifest.verify_chunk(i, &buffer) {
                bail!("chunk {i} is corrupt on disk");
            }
            file.write_all_at(&buffer, range.start)
                .with_context(|| format!("cannot write {} (disk full?)", tmp.display()))?;
        }
        file.sync_all()?;
        fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
