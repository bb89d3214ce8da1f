//! Model versions as manifests: a file cut into fixed-size chunks, each hashed with BLAKE3.
//!
//! A [`Manifest`] is encoded as CBOR. Its *header* is everything an announcement claims: model
//! name, version number, parent, size, publisher, training metadata, and the BLAKE3 hash of the
//! *body* (chunk size, chunk hashes, tensor index). The version's id ([`VersionId`]) is the
//! BLAKE3 hash of the encoded header, and the publisher signs the id
//! ([`crate::signing::VERSION_DOMAIN`]). So a version's claims can be checked from a small
//! [`crate::messages::Announcement`] alone, a manifest from anyone is checked against the id it
//! was asked for ([`Manifest::decode_verified`]), and nobody but the publisher can make a
//! version in its name. Each chunk is then checked against its hash in the manifest before it
//! is used.
//!
//! Chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, total_size))`; every chunk
//! but the last is full. The chunk hashes travel as one CBOR byte string of 32 bytes per chunk.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::safetensors::TensorEntry;
use crate::training::TrainingMeta;

/// Manifest format this code writes and reads (2: signed, id over the header).
pub const MANIFEST_FORMAT: u32 = 2;
/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size a manifest may use.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size a manifest may use (bounds every chunk message).
pub const MAX_CHUNK_SIZE: u32 = 8 << 20;
/// Most chunks one version may have (bounds the manifest: 32 bytes each).
pub const MAX_CHUNKS: usize = 200_000;
/// Longest model name, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 128;
/// Largest encoded manifest a node accepts.
pub const MAX_MANIFEST_BYTES: usize = 8 << 20;

/// Most tensors a manifest may list.
pub const MAX_MANIFEST_TENSORS: usize = 65_536;

/// Most tensors with no elements a manifest may list (each non-empty tensor holds at least one
/// byte of the file, so their count is bounded by its size).
pub const MAX_EMPTY_TENSORS: usize = 1024;

/// Tensors a manifest may list whatever the file's size; beyond them, one per
/// [`BYTES_PER_EXTRA_TENSOR`] of file. A tensor index costs a holder a few hundred bytes of
/// memory per entry, so this keeps that cost a small fraction of the file's size: a 64 KiB
/// file cannot carry a 65,536-entry index (7 MiB of manifest, tens of MiB in memory).
pub const TENSORS_FOR_ANY_SIZE: usize = 1024;

/// File bytes per tensor beyond [`TENSORS_FOR_ANY_SIZE`].
pub const BYTES_PER_EXTRA_TENSOR: u64 = 4096;

/// Most tensors a manifest of a file of `total_size` bytes may list.
pub fn max_tensors(total_size: u64) -> usize {
    let by_size = TENSORS_FOR_ANY_SIZE as u64 + total_size / BYTES_PER_EXTRA_TENSOR;
    by_size.min(MAX_MANIFEST_TENSORS as u64) as usize
}
/// Bytes of one BLAKE3 hash.
pub const HASH_BYTES: usize = 32;

/// A BLAKE3 hash of 32 bytes: a chunk's hash, or a version id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash32(pub [u8; HASH_BYTES]);

/// A version's id: the BLAKE3 hash of its manifest's encoded header (see the module docs).
/// Shown as 64 hex digits.
pub type VersionId = Hash32;

impl Hash32 {
    /// Hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The id as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({})", self.short())
    }
}

impl FromStr for Hash32 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 2 * HASH_BYTES || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{s}' is not a version id (64 hex digits)"));
        }
        let mut out = [0u8; HASH_BYTES];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
            let array: [u8; HASH_BYTES] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"32 bytes"))?;
            Ok(Self(array))
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The bytes do not hash to the id they were asked for.
    #[error("manifest does not match its id (expected {expected}, got {actual})")]
    IdMismatch {
        /// The id asked for.
        expected: VersionId,
        /// The hash of the bytes received.
        actual: VersionId,
    },
    /// The signature is not the publisher's signature of the id.
    #[error("manifest is not signed by its publisher {publisher}")]
    BadSignature {
        /// The publisher the manifest names.
        publisher: PeerId,
    },
    /// The bytes are not a CBOR manifest.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// The manifest decodes but breaks a rule.
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

/// Everything needed to fetch, verify and interpret one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Model name, e.g. `digits-mlp`.
    pub model: String,
    /// Version number within the model: 0 for the first, else its parent's plus one.
    pub version: u64,
    /// The version this one was derived from; `None` exactly for version 0.
    pub parent: Option<VersionId>,
    /// Size of the file in bytes.
    pub total_size: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// Concatenated BLAKE3 hashes, 32 bytes per chunk.
    #[serde(with = "serde_bytes")]
    pub chunk_hashes: Vec<u8>,
    /// The safetensors tensor index: which bytes hold which tensor.
    pub tensors: Vec<TensorEntry>,
    /// The publisher, whose peer id holds its ed25519 public key.
    pub publisher: PeerId,
    /// For a checkpoint of a training run: its run, step, samples and evaluation.
    pub training: Option<TrainingMeta>,
    /// The publisher's signature of the id ([`crate::signing::VERSION_DOMAIN`]).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// The signed part of a version: what an announcement claims, with the body's hash.
#[derive(Serialize)]
struct Header<'a> {
    format: u32,
    model: &'a str,
    version: u64,
    parent: Option<VersionId>,
    size: u64,
    publisher: &'a PeerId,
    training: Option<&'a TrainingMeta>,
    body: Hash32,
}

/// The body of a manifest, hashed into the header.
#[derive(Serialize)]
struct Body<'a> {
    chunk_size: u32,
    #[serde(with = "serde_bytes")]
    chunk_hashes: &'a [u8],
    tensors: &'a [TensorEntry],
}

/// The version id of these header fields (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn header_id(
    model: &str,
    version: u64,
    parent: Option<VersionId>,
    size: u64,
    publisher: &PeerId,
    training: Option<&TrainingMeta>,
    body: Hash32,
) -> VersionId {
    let header = Header {
        format: MANIFEST_FORMAT,
        model,
        version,
        parent,
        size,
        publisher,
        training,
        body,
    };
    Hash32::of(&cbor(&header))
}

fn cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

impl Manifest {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        (self.chunk_hashes.len() / HASH_BYTES) as u32
    }

    /// Hash of chunk `index`, if it exists.
    pub fn chunk_hash(&self, index: u32) -> Option<Hash32> {
        let start = index as usize * HASH_BYTES;
        let bytes = self.chunk_hashes.get(start..start + HASH_BYTES)?;
        Some(Hash32(bytes.try_into().ok()?))
    }

    /// Byte range of chunk `index` in the file.
    pub fn chunk_range(&self, index: u32) -> Range<u64> {
        chunk_range(self.total_size, self.chunk_size, index)
    }

    /// Whether `bytes` are exactly chunk `index`: right length and right hash.
    pub fn verify_chunk(&self, index: u32, bytes: &[u8]) -> bool {
        let range = self.chunk_range(index);
        bytes.len() as u64 == range.end - range.start
            && self.chunk_hash(index) == Some(Hash32::of(bytes))
    }

    /// Chunks that hold any byte of `tensor`.
    pub fn chunks_of(&self, tensor: &TensorEntry) -> Range<u32> {
        if tensor.end <= tensor.start {
            return 0..0;
        }
        let size = u64::from(self.chunk_size);
        (tensor.start / size) as u32..tensor.end.div_ceil(size) as u32
    }

    /// Canonical CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        cbor(self)
    }

    /// BLAKE3 hash of the body: chunk size, chunk hashes, tensor index.
    pub fn body_hash(&self) -> Hash32 {
        Hash32::of(&cbor(&Body {
            chunk_size: self.chunk_size,
            chunk_hashes: &self.chunk_hashes,
            tensors: &self.tensors,
        }))
    }

    /// The id: hash of the header, which holds [`Self::body_hash`].
    pub fn id(&self) -> VersionId {
        header_id(
            &self.model,
            self.version,
            self.parent,
            self.total_size,
            &self.publisher,
            self.training.as_ref(),
            self.body_hash(),
        )
    }

    /// Makes `key` the publisher and signs the id; returns the id.
    pub fn sign(&mut self, key: &Keypair) -> VersionId {
        self.publisher = key.public().to_peer_id();
        let id = self.id();
        self.signature = crate::signing::sign(key, crate::signing::VERSION_DOMAIN, &id);
        id
    }

    /// The signed announcement of this version (it carries the same signature).
    pub fn announcement(&self) -> crate::messages::Announcement {
        crate::messages::Announcement {
            model: self.model.clone(),
            version: self.version,
            id: self.id(),
            size: self.total_size,
            publisher: self.publisher,
            training: self.training.clone(),
            parent: self.parent,
            body: self.body_hash(),
            signature: self.signature.clone(),
        }
    }

    /// Decodes `bytes` as the manifest of `expected`: every rule of [`Self::validate`]
    /// (signature included), then the id.
    pub fn decode_verified(bytes: &[u8], expected: &VersionId) -> Result<Self, ManifestError> {
        let manifest = Self::decode(bytes)?;
        let actual = manifest.id();
        if &actual != expected {
            return Err(ManifestError::IdMismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(manifest)
    }

    /// Decodes and validates `bytes` (without an id to check them against). The bytes must
    /// be the manifest's own canonical encoding ([`Self::encode`]): no trailing bytes, no
    /// unknown fields, nothing unsigned that would be stored and served on.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Invalid(format!(
                "{} bytes, more than {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let manifest: Self =
            ciborium::from_reader(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if manifest.encode() != bytes {
            return Err(ManifestError::Malformed(
                "not the canonical encoding (extra bytes or fields)".into(),
            ));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the rules: known format, sane name and sizes, one hash per chunk, tensors inside
    /// the file, version 0 exactly when there is no parent, finite training figures, and the
    /// publisher's signature of the id.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |m: String| Err(ManifestError::Invalid(m));
        if self.format != MANIFEST_FORMAT {
            return invalid(format!("unknown format {}", self.format));
        }
        if (self.version == 0) != self.parent.is_none() {
            return invalid(format!(
                "version {} {} a parent",
                self.version,
                if self.parent.is_some() {
                    "has"
                } else {
                    "lacks"
                }
            ));
        }
        if let Some(t) = &self.training {
            t.check().map_err(ManifestError::Invalid)?;
        }
        if let Err(e) = validate_model_name(&self.model) {
            return invalid(e.to_string());
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return invalid(format!("chunk size {} out of range", self.chunk_size));
        }
        if !self.chunk_hashes.len().is_multiple_of(HASH_BYTES) {
            return invalid("chunk hash list is not a multiple of 32 bytes".into());
        }
        let expected = chunk_count(self.total_size, self.chunk_size);
        if expected > MAX_CHUNKS as u64 || u64::from(self.chunk_count()) != expected {
            return invalid(format!(
                "{} chunk hashes for {} bytes in chunks of {}",
                self.chunk_count(),
                self.total_size,
                self.chunk_size
            ));
        }
        if let Some(t) = self
            .tensors
            .iter()
            .find(|t| t.start > t.end || t.end > self.total_size)
        {
            return invalid(format!("tensor {} lies outside the file", t.name));
        }
        // A small file with a huge tensor index (35,000 entries for 4 KiB) is memory and CPU
        // spent on a version that holds nothing: tensors must not overlap, and only a few may
        // be empty.
        if self.tensors.len() > max_tensors(self.total_size) {
            return invalid(format!(
                "{} tensors for a file of {} bytes, more than {} (1,024, then one per 4 KiB, at most {MAX_MANIFEST_TENSORS})",
                self.tensors.len(),
                self.total_size,
                max_tensors(self.total_size)
            ));
        }
        let empty = self.tensors.iter().filter(|t| t.start == t.end).count();
        if empty > MAX_EMPTY_TENSORS {
            return invalid(format!(
                "{empty} empty tensors, more than {MAX_EMPTY_TENSORS}"
            ));
        }
        let mut spans: Vec<(u64, u64)> = self
            .tensors
            .iter()
            .filter(|t| t.start < t.end)
            .map(|t| (t.start, t.end))
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return invalid("tensors overlap".into());
        }
        // Last: the most expensive check, on a manifest otherwise sound.
        let id = self.id();
        if !crate::signing::verify(
            &self.publisher,
            crate::signing::VERSION_DOMAIN,
            &id,
            &self.signature,
        ) {
            return Err(ManifestError::BadSignature {
                publisher: self.publisher,
            });
        }
        Ok(())
    }
}

/// Checks a model name: 1 to [`MAX_MODEL_NAME_BYTES`] bytes of ASCII letters, digits, `-`, `_`,
/// `.` and `/`.
pub fn validate_model_name(name: &str) -> Result<(), ModelNameError> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME_BYTES {
        return Err(ModelNameError::Length);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_./".contains(*c)))
    {
        return Err(ModelNameError::Character {
            name: name.to_string(),
            c,
        });
    }
    Ok(())
}

/// Why a model name is refused ([`validate_model_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelNameError {
    /// Empty or longer than [`MAX_MODEL_NAME_BYTES`].
    #[error("model name must have 1 to {MAX_MODEL_NAME_BYTES} characters")]
    Length,
    /// A character outside letters, digits and `-_./`.
    #[error("model name '{name}' contains '{c}'; use letters, digits, '-', '_', '.', '/'")]
    Character {
        /// The name.
        name: String,
        /// The first character refused.
        c: char,
    },
}

/// A signed manifest of a 10-byte file, version `version` of `model` (with a made-up parent
/// from version 1), for tests of what carries one.
#[cfg(test)]
pub(crate) fn signed_for_tests(key: &Keypair, model: &str, version: u64) -> Manifest {
    let mut m = Manifest {
        format: MANIFEST_FORMAT,
        model: model.into(),
        version,
        parent: (version > 0).then(|| Hash32::of(b"parent")),
        total_size: 10,
        chunk_size: MIN_CHUNK_SIZE,
        chunk_hashes: Hash32::of(b"chunk").0.to_vec(),
        tensors: vec![],
        publisher: key.public().to_peer_id(),
        training: None,
        signature: vec![],
    };
    m.sign(key);
    m
}

/// Number of chunks of a file of `total_size` bytes.
pub fn chunk_count(total_size: u64, chunk_size: u32) -> u64 {
    total_size.div_ceil(u64::from(chunk_size.max(1)))
}

/// Byte range of chunk `index` of a file of `total_size` bytes (empty past the end).
pub fn chunk_range(total_size: u64, chunk_size: u32, index: u32) -> Range<u64> {
    let start = (u64::from(index) * u64::from(chunk_size)).min(total_size);
    let end = (start + u64::from(chunk_size)).min(total_size);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(data: &[u8], chunk_size: u32) -> Manifest {
        let hashes = data
            .chunks(chunk_size as usize)
            .flat_map(|c| Hash32::of(c).0)
            .collect();
        let mut m = Manifest {
            format: MANIFEST_FORMAT,
            model: "m".into(),
            version: 0,
            parent: None,
            total_size: data.len() as u64,
            chunk_size,
            chunk_hashes: hashes,
            tensors: vec![],
            publisher: PeerId::random(),
            training: None,
            signature: vec![],
        };
        m.sign(&Keypair::generate_ed25519());
        m
    }

    #[test]
    fn encoding_round_trips_and_the_id_is_signed_by_the_publisher() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let m = manifest(&data, MIN_CHUNK_SIZE);
        let bytes = m.encode();
        assert_eq!(Manifest::decode_verified(&bytes, &m.id()).unwrap(), m);
        let a = m.announcement();
        a.verify().unwrap();
        assert_eq!(a.id, m.id());
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.chunk_range(2), 8192..10_000);
        assert!(m.verify_chunk(2, &data[8192..]));
        assert!(!m.verify_chunk(1, &data[8192..]));
    }

    #[test]
    fn a_manifest_of_another_id_or_changed_after_signing_is_refused() {
        let m = manifest(&[1; 5000], MIN_CHUNK_SIZE);
        let other = manifest(&[2; 5000], MIN_CHUNK_SIZE);
        assert!(matches!(
            Manifest::decode_verified(&other.encode(), &m.id()),
            Err(ManifestError::IdMismatch { .. })
        ));
        // Any field changed after signing: the signature no longer covers the id.
        let mut renumbered = m.clone();
        renumbered.version = u64::MAX;
        renumbered.parent = Some(m.id());
        assert!(matches!(
            renumbered.validate(),
            Err(ManifestError::BadSignature { .. })
        ));
        let mut rehashed = m.clone();
        rehashed.chunk_hashes[0] ^= 1;
        assert!(matches!(
            rehashed.validate(),
            Err(ManifestError::BadSignature { .. })
        ));
        // Unsigned bytes riding along (trailing junk) are not stored and served on.
        let mut padded = m.encode();
        padded.extend_from_slice(&[0u8; 64]);
        assert!(matches!(
            Manifest::decode_verified(&padded, &m.id()),
            Err(ManifestError::Malformed(_))
        ));
        // Signed again by someone else: valid, but it is that peer's version, another id.
        let mut stolen = m.clone();
        let thief = Keypair::generate_ed25519();
        stolen.sign(&thief);
        stolen.validate().unwrap();
        assert_ne!(stolen.id(), m.id());
        assert_eq!(stolen.publisher, thief.public().to_peer_id());
    }

    #[test]
    fn version_zero_has_no_parent_and_every_later_one_has_one() {
        let key = Keypair::generate_ed25519();
        let mut m = manifest(&[1; 5000], MIN_CHUNK_SIZE);
        m.version = 1;
        m.sign(&key);
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lacks a parent"));
        let mut m = manifest(&[1; 5000], MIN_CHUNK_SIZE);
        m.parent = Some(Hash32::of(b"p"));
        m.sign(&key);
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("has a parent"));
    }

    #[test]
    fn a_huge_tensor_index_for_a_small_file_is_refused() {
        let entry = |i: u64, start: u64, end: u64| TensorEntry {
            name: format!("t{i}"),
            dtype: "U8".into(),
            shape: vec![end - start],
            start,
            end,
        };
        // The adversarial peer's manifest: 35,000 entries for a 4 KiB file.
        let mut m = manifest(&[1; 4096], MIN_CHUNK_SIZE);
        m.tensors = (0..35_000).map(|i| entry(i, 0, 0)).collect();
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("tensors for a file of 4096 bytes"), "{e}");
        m.tensors = (0..1000).map(|i| entry(i, 0, 4096)).collect();
        assert!(m.validate().unwrap_err().to_string().contains("overlap"));
        m.tensors = (0..1025).map(|i| entry(i, 0, 0)).collect();
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("empty tensors"));
        // One byte each, side by side: for 4 KiB, 1,026 are one too many and 1,025 valid.
        m.tensors = (0..1026).map(|i| entry(i, i, i + 1)).collect();
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than 1025"));
        m.tensors.pop();
        m.sign(&Keypair::generate_ed25519());
        m.validate().unwrap();
        // A big file may list many: 65,536 for 256 MiB and more.
        assert_eq!(max_tensors(256 << 20), MAX_MANIFEST_TENSORS);
        assert_eq!(max_tensors(u64::MAX), MAX_MANIFEST_TENSORS);
    }

    #[test]
    fn rule_breaking_manifests_are_refused() {
        let key = Keypair::generate_ed25519();
        let mut m = manifest(&[1; 5000], MIN_CHUNK_SIZE);
        m.chunk_hashes.truncate(32);
        m.sign(&key);
        assert!(m.validate().is_err());
        let mut m = manifest(&[1; 5000], MIN_CHUNK_SIZE);
        m.model = "bad name!".into();
        assert!(m.validate().is_err());
        let mut m = manifest(&[1; 5000], MIN_CHUNK_SIZE);
        m.chunk_size = 1;
        assert!(m.validate().is_err());
        assert!(matches!(
            Manifest::decode(b"\xff\x00garbage"),
            Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn hex_ids_parse_and_print() {
        let id = Hash32::of(b"x");
        assert_eq!(id.to_hex().parse::<Hash32>().unwrap(), id);
        assert!("abc".parse::<Hash32>().is_err());
        assert!("zz".repeat(32).parse::<Hash32>().is_err());
    }

    #[test]
    fn tensors_map_to_the_chunks_that_hold_them() {
        let m = manifest(&[0; 20_000], MIN_CHUNK_SIZE);
        let t = TensorEntry {
            name: "w".into(),
            dtype: "F32".into(),
            shape: vec![10],
            start: 4000,
            end: 8200,
        };
        assert_eq!(m.chunks_of(&t), 0..3);
    }
}
