//! Messages of the model-distribution protocol ([`MODELS_PROTOCOL`]) and of announcements.
//!
//! Each request is answered by exactly one response on its own stream. Bulk bytes (manifests,
//! chunks) are CBOR byte strings (`serde_bytes`), never arrays of integers.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::bitfield::Bitfield;
use crate::codec::GossipError;
use crate::manifest::{VersionId, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES};

/// Request-response protocol id for model distribution.
pub const MODELS_PROTOCOL: &str = "/p2p-ml/models/1.0.0";

/// Largest encoded request.
pub const MAX_REQUEST_BYTES: u64 = 4 * 1024;

/// Largest encoded response: a full manifest or a largest chunk, plus framing.
pub const MAX_RESPONSE_BYTES: u64 = {
    let biggest = if MAX_MANIFEST_BYTES > MAX_CHUNK_SIZE as usize {
        MAX_MANIFEST_BYTES
    } else {
        MAX_CHUNK_SIZE as usize
    };
    biggest as u64 + 64 * 1024
};

/// Most versions listed in one [`Response::Versions`].
pub const MAX_VERSIONS_LISTED: usize = 64;

/// What one peer asks another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The encoded manifest of a version.
    Manifest {
        /// The version.
        id: VersionId,
    },
    /// Which chunks of a version the peer holds, verified.
    Have {
        /// The version.
        id: VersionId,
    },
    /// One chunk's bytes.
    Chunk {
        /// The version.
        id: VersionId,
        /// The chunk index.
        index: u32,
    },
    /// The versions of a model the peer knows of, newest first.
    Versions {
        /// The model name.
        model: String,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The manifest's exact bytes (their hash is the id).
    Manifest {
        /// Encoded manifest.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The chunks the peer holds.
    Have {
        /// One bit per chunk.
        bitfield: Bitfield,
        /// Whether the answering peer published this version.
        publisher: bool,
    },
    /// A chunk.
    Chunk {
        /// The chunk index.
        index: u32,
        /// Its bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Known versions of the model asked for, newest first.
    Versions {
        /// The announcements.
        versions: Vec<Announcement>,
    },
    /// The peer does not hold what was asked (or does not serve it under its settings).
    NotFound,
    /// The peer is at its upload limit; ask again later or elsewhere.
    Busy,
}

/// A new version, announced on gossipsub (signed by the publisher as gossipsub signs messages)
/// and listed in [`Response::Versions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// Version id.
    pub id: VersionId,
    /// File size in bytes.
    pub size: u64,
    /// The publisher (on the wire: its multihash bytes; in JSON: base58). Gossip receivers
    /// accept the announcement only if it is also the message's signed author.
    pub publisher: PeerId,
    /// For a checkpoint of a training run: its run, step, samples and evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<crate::training::TrainingMeta>,
}

impl Announcement {
    /// Encodes for gossipsub.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode_gossip(self)
    }

    /// Decodes a gossip message, checking the model name.
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        let a: Self = crate::codec::decode_gossip(bytes, "announcement")?;
        crate::manifest::validate_model_name(&a.model).map_err(|e| GossipError::Invalid {
            what: "announcement",
            reason: e.to_string(),
        })?;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Hash32;

    #[test]
    fn announcements_round_trip_and_bad_names_are_refused() {
        let a = Announcement {
            model: "digits-mlp".into(),
            version: 3,
            id: Hash32::of(b"m"),
            size: 10,
            publisher: PeerId::random(),
            training: None,
        };
        assert_eq!(Announcement::decode(&a.encode()).unwrap(), a);
        let bad = Announcement {
            model: "no spaces".into(),
            ..a
        };
        assert!(Announcement::decode(&bad.encode()).is_err());
        assert!(Announcement::decode(b"\x00\x01").is_err());
    }

    /// A well-formed announcement whose publisher bytes are no peer id is refused at decode,
    /// so no string that merely looks like a peer id travels on.
    #[test]
    fn an_announcement_whose_publisher_is_not_a_peer_id_is_refused() {
        #[derive(Serialize)]
        struct Lying {
            model: String,
            version: u64,
            id: VersionId,
            size: u64,
            #[serde(with = "serde_bytes")]
            publisher: Vec<u8>,
        }
        let lying = Lying {
            model: "m".into(),
            version: 1,
            id: Hash32::of(b"m"),
            size: 10,
            publisher: vec![0xff; 40],
        };
        let err = Announcement::decode(&crate::codec::encode_gossip(&lying)).unwrap_err();
        assert!(
            matches!(
                err,
                GossipError::Malformed {
                    what: "announcement",
                    ..
                }
            ),
            "{err}"
        );
        let honest = Announcement {
            model: "m".into(),
            version: 1,
            id: lying.id,
            size: 10,
            publisher: PeerId::random(),
            training: None,
        };
        let json = serde_json::to_value(&honest).unwrap();
        assert_eq!(
            json["publisher"],
            honest.publisher.to_base58(),
            "base58 in JSON"
        );
    }
}
