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
pub const MODELS_PROTOCOL: &str = "/p2p-ml/models/2.0.0";

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

/// Most versions of one publisher in a [`Response::Versions`] that names no publisher, so that
/// one publisher's many (or highly numbered) versions cannot push the others out.
pub const MAX_VERSIONS_PER_PUBLISHER: usize = 8;

/// Most publishers whose addresses a [`Response::Versions`] gives.
pub const MAX_ADDRESS_HINT_PEERS: usize = 16;

/// Most addresses given per publisher in a [`Response::Versions`].
pub const MAX_ADDRESS_HINTS_PER_PEER: usize = 8;

/// Where the answering peer reaches a publisher it lists: a hint for peers that cannot find
/// it otherwise (a publisher in Kademlia client mode is in nobody's routing table). Unsigned
/// and untrusted: a dial checks the peer id in its handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressHint {
    /// The publisher.
    pub peer: PeerId,
    /// Its addresses as the answering peer knows them.
    pub addrs: Vec<libp2p::Multiaddr>,
}

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
        /// Long polling: the number of chunks the requester knows the peer to hold (from its
        /// last answer). A peer that holds requests ([`Response::Have`]'s `holds`) answers
        /// only once it holds another number, frees an upload slot after answering the
        /// requester "busy", or its own bounded wait passes. `None` (and older requesters):
        /// answered at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        known: Option<u32>,
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
        /// Only this publisher's versions (else a few of each publisher's, see
        /// [`MAX_VERSIONS_PER_PUBLISHER`]).
        #[serde(default)]
        publisher: Option<PeerId>,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The manifest's exact (canonical) bytes; the hash of its header is the id.
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
        /// Whether the answering peer holds availability requests that carry `known` (long
        /// polling); `false` from peers that do not (then they are polled).
        #[serde(default)]
        holds: bool,
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
        /// Addresses of the listed versions' publishers (at most [`MAX_ADDRESS_HINT_PEERS`],
        /// [`MAX_ADDRESS_HINTS_PER_PEER`] each); absent from older peers' answers.
        #[serde(default)]
        addrs: Vec<AddressHint>,
    },
    /// The peer does not hold what was asked (or does not serve it under its settings).
    NotFound,
    /// The peer is at its upload limit; ask again later or elsewhere.
    Busy,
}

/// A new version, announced on gossipsub and listed in [`Response::Versions`]: the manifest's
/// header and the publisher's signature of the id, so it is checked wherever it comes from
/// ([`Announcement::verify`]; see [`crate::manifest`]).
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
    /// The publisher (on the wire: its multihash bytes; in JSON: base58), whose key signed the
    /// id; relayed by anyone, checked by [`Announcement::verify`].
    pub publisher: PeerId,
    /// For a checkpoint of a training run: its run, step, samples and evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<crate::training::TrainingMeta>,
    /// The version this one was derived from; `None` exactly for version 0.
    pub parent: Option<VersionId>,
    /// Hash of the manifest's body (chunk size, chunk hashes, tensor index).
    pub body: crate::manifest::Hash32,
    /// The publisher's signature of the id.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Announcement {
    /// Encodes for gossipsub.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode_gossip(self)
    }

    /// Decodes a gossip message and [`verifies`](Self::verify) it.
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        let a: Self = crate::codec::decode_gossip(bytes, "announcement")?;
        a.verify()?;
        Ok(a)
    }

    /// Checks the model name, that version 0 alone lacks a parent, the training figures, that
    /// the id is the hash of the header, and the publisher's signature of the id.
    pub fn verify(&self) -> Result<(), GossipError> {
        let invalid = |reason: String| GossipError::Invalid {
            what: "announcement",
            reason,
        };
        crate::manifest::validate_model_name(&self.model).map_err(|e| invalid(e.to_string()))?;
        if (self.version == 0) != self.parent.is_none() {
            return Err(invalid(format!(
                "version {} with{} a parent",
                self.version,
                if self.parent.is_some() { "" } else { "out" }
            )));
        }
        if let Some(t) = &self.training {
            t.check().map_err(invalid)?;
        }
        let id = crate::manifest::header_id(
            &self.model,
            self.version,
            self.parent,
            self.size,
            &self.publisher,
            self.training.as_ref(),
            self.body,
        );
        if id != self.id {
            return Err(invalid("the id is not the hash of the claims".into()));
        }
        if !crate::signing::verify(
            &self.publisher,
            crate::signing::VERSION_DOMAIN,
            &id,
            &self.signature,
        ) {
            return Err(invalid(format!(
                "not signed by its publisher {}",
                self.publisher
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Hash32;
    use libp2p::identity::Keypair;

    /// A signed announcement of version `version` of `model` by `key`.
    fn signed(key: &Keypair, model: &str, version: u64) -> Announcement {
        crate::manifest::signed_for_tests(key, model, version).announcement()
    }

    #[test]
    fn announcements_round_trip_and_bad_names_are_refused() {
        let key = Keypair::generate_ed25519();
        let a = signed(&key, "digits-mlp", 3);
        assert_eq!(Announcement::decode(&a.encode()).unwrap(), a);
        let bad = signed(&key, "no spaces", 3);
        assert!(Announcement::decode(&bad.encode()).is_err());
        assert!(Announcement::decode(b"\x00\x01").is_err());
    }

    /// The adversarial peer's fake newest version: a real announcement renumbered to u64::MAX,
    /// or one claiming another publisher, or with its id swapped, is refused wherever it comes
    /// from; a version the liar signs itself is valid but is the liar's.
    #[test]
    fn a_changed_or_forged_announcement_is_refused() {
        let key = Keypair::generate_ed25519();
        let real = signed(&key, "digits-mlp", 3);
        let mut renumbered = real.clone();
        renumbered.version = u64::MAX;
        let mut other_id = real.clone();
        other_id.id = Hash32::of(b"elsewhere");
        let mut claimed = real.clone();
        claimed.publisher = Keypair::generate_ed25519().public().to_peer_id();
        let mut unsigned = real.clone();
        unsigned.signature.clear();
        for (what, a) in [
            ("renumbered", renumbered),
            ("other id", other_id),
            ("claimed publisher", claimed),
            ("unsigned", unsigned),
        ] {
            let err = Announcement::decode(&a.encode()).unwrap_err();
            assert!(matches!(err, GossipError::Invalid { .. }), "{what}: {err}");
        }
        let liar = Keypair::generate_ed25519();
        let own = signed(&liar, "digits-mlp", u64::MAX);
        let ok = Announcement::decode(&own.encode()).unwrap();
        assert_eq!(ok.publisher, liar.public().to_peer_id());
        assert_ne!(ok.publisher, real.publisher);
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
        let honest = signed(&Keypair::generate_ed25519(), "m", 1);
        let json = serde_json::to_value(&honest).unwrap();
        assert_eq!(
            json["publisher"],
            honest.publisher.to_base58(),
            "base58 in JSON"
        );
    }

    /// A `Versions` answer of an older peer (no address hints) still decodes, and hints
    /// round-trip.
    #[test]
    fn versions_answers_decode_with_and_without_address_hints() {
        #[derive(Serialize)]
        enum OldResponse {
            Versions { versions: Vec<Announcement> },
        }
        let a = signed(&Keypair::generate_ed25519(), "m", 1);
        let mut old = Vec::new();
        ciborium::into_writer(
            &OldResponse::Versions {
                versions: vec![a.clone()],
            },
            &mut old,
        )
        .unwrap();
        let decoded: Response = crate::codec::decode(&old, "response").unwrap();
        assert_eq!(
            decoded,
            Response::Versions {
                versions: vec![a.clone()],
                addrs: vec![]
            }
        );
        let with = Response::Versions {
            versions: vec![a.clone()],
            addrs: vec![AddressHint {
                peer: a.publisher,
                addrs: vec!["/ip4/192.0.2.7/tcp/4001".parse().unwrap()],
            }],
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&with, &mut bytes).unwrap();
        assert_eq!(
            crate::codec::decode::<Response>(&bytes, "response").unwrap(),
            with
        );
    }

    /// Long polling is an addition older peers do not know: their availability request
    /// (without `known`) decodes as "answer at once", their answer (without `holds`) as "does
    /// not hold requests", and the fields are left out of a request that does not long poll.
    #[test]
    fn availability_messages_without_the_long_polling_fields_still_decode() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum OldRequest {
            Have { id: crate::manifest::Hash32 },
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum OldResponse {
            Have { bitfield: Bitfield, publisher: bool },
        }
        let id = crate::manifest::Hash32([3; 32]);
        fn encode<M: Serialize>(m: &M) -> Vec<u8> {
            let mut bytes = Vec::new();
            ciborium::into_writer(m, &mut bytes).unwrap();
            bytes
        }
        let old = encode(&OldRequest::Have { id });
        assert_eq!(
            crate::codec::decode::<Request>(&old, "request").unwrap(),
            Request::Have { id, known: None }
        );
        assert_eq!(old, encode(&Request::Have { id, known: None }));
        let bitfield = Bitfield::full(3);
        let old = encode(&OldResponse::Have {
            bitfield: bitfield.clone(),
            publisher: true,
        });
        assert_eq!(
            crate::codec::decode::<Response>(&old, "response").unwrap(),
            Response::Have {
                bitfield: bitfield.clone(),
                publisher: true,
                holds: false
            }
        );
        // And an older peer reads the new messages, ignoring what it does not know.
        let new = encode(&Request::Have { id, known: Some(5) });
        assert_eq!(
            crate::codec::decode::<OldRequest>(&new, "request").unwrap(),
            OldRequest::Have { id }
        );
        let new = encode(&Response::Have {
            bitfield: bitfield.clone(),
            publisher: false,
            holds: true,
        });
        assert_eq!(
            crate::codec::decode::<OldResponse>(&new, "response").unwrap(),
            OldResponse::Have {
                bitfield,
                publisher: false
            }
        );
    }
}
