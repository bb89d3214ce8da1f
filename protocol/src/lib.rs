//! Wire-level names and rules of the p2p-node network.
//!
//! This crate holds everything two nodes must agree on to talk to each other, and nothing that
//! performs I/O: no sockets, no files, no async runtime. The node crate wires these constants
//! into libp2p behaviours.
//!
//! # Protocols
//!
//! | purpose | id | transport |
//! |---|---|---|
//! | peer routing (Kademlia DHT) | [`KADEMLIA_PROTOCOL`] | libp2p-kad, private id so we never join the public IPFS DHT |
//! | peer metadata (addresses, protocols) | [`IDENTIFY_PROTOCOL_VERSION`] | libp2p-identify |
//! | announcements (small, signed) | [`ANNOUNCE_TOPIC`] over [`GOSSIPSUB_PROTOCOL_PREFIX`] | libp2p-gossipsub |
//! | model distribution: manifests, bitfields, chunks | [`messages::MODELS_PROTOCOL`] | libp2p-request-response, [`codec::CborCodec`] |
//! | who holds a version | Kademlia provider records keyed by the version id's 32 bytes | libp2p-kad |
//! | training runs (small, signed) | [`training::RUNS_TOPIC`] | libp2p-gossipsub |
//! | gossip averaging, run discovery | [`training::TRAINING_PROTOCOL`] | libp2p-request-response, [`codec::CborCodec`] |
//!
//! Every connection is encrypted and authenticated with Noise (XX, ed25519 identities) over TCP
//! and multiplexed with yamux, or runs over QUIC v1. Peers are identified by the libp2p
//! [peer id](https://docs.libp2p.io/concepts/fundamentals/peers/) derived from their ed25519 key.
//!
//! # Limits
//!
//! * Gossipsub messages are at most [`MAX_GOSSIP_MESSAGE_BYTES`]; bulk data never travels on
//!   gossip.
//! * Kademlia packets are at most [`MAX_KADEMLIA_PACKET_BYTES`].
//! * Model requests are at most [`messages::MAX_REQUEST_BYTES`], responses at most
//!   [`messages::MAX_RESPONSE_BYTES`] (one chunk of at most [`manifest::MAX_CHUNK_SIZE`], or
//!   one manifest of at most [`manifest::MAX_MANIFEST_BYTES`]). Larger messages are refused
//!   unread.
//!
//! # Model versions
//!
//! A version is a safetensors file cut into chunks (default [`manifest::DEFAULT_CHUNK_SIZE`]),
//! each hashed with BLAKE3 and listed in a CBOR [`manifest::Manifest`] together with the
//! file's tensor index ([`safetensors::TensorEntry`]). The version id is the BLAKE3 hash of the
//! manifest's header (model, number, parent, size, publisher, training metadata, hash of the
//! rest), signed by the publisher ([`signing`]), so a manifest and each chunk can be fetched
//! from anyone and checked, and nobody can make a version in another peer's name.
//! Announcements ([`messages::Announcement`], CBOR) carry the header and the signature, so they
//! are checked wherever they come from. Runs ([`training::RunAnnouncement`]) are signed by
//! their creator.
//!
//! # Training
//!
//! See [`training`]: runs are announced on their own topic, checkpoints are model versions
//! whose announcements carry training metadata, and parameters are averaged pairwise in
//! bounded pieces (at most [`training::MAX_PIECE_BYTES`] each).
//!
//! # Versioning
//!
//! Each protocol id ends in a semantic version. A change that old nodes cannot parse gets a new
//! major version and a new id; nodes may speak several versions at once during a migration.
//! Nodes whose identify [`IDENTIFY_PROTOCOL_VERSION`] differs are still connected to, but only
//! protocols both sides list are used.

pub mod bitfield;
pub mod codec;
pub mod manifest;
pub mod messages;
pub mod safetensors;
pub mod signing;
pub mod training;

/// Kademlia protocol id. Private: a node never answers or queries the public IPFS DHT.
pub const KADEMLIA_PROTOCOL: &str = "/p2p-ml/kad/1.0.0";

/// The protocol version string nodes send in identify.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/p2p-ml/1.0.0";

/// Prefix of the gossipsub protocol ids (`<prefix>/1.1.0`, ...), private to this network.
pub const GOSSIPSUB_PROTOCOL_PREFIX: &str = "/p2p-ml/meshsub";

/// The gossipsub topic every node joins; model versions and training runs are announced here.
pub const ANNOUNCE_TOPIC: &str = "p2p-ml/announce/2";

/// Largest gossipsub message a node sends or accepts.
pub const MAX_GOSSIP_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest Kademlia packet a node sends or accepts.
pub const MAX_KADEMLIA_PACKET_BYTES: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_ids_are_private_and_versioned() {
        for id in [KADEMLIA_PROTOCOL, IDENTIFY_PROTOCOL_VERSION] {
            assert!(id.starts_with("/p2p-ml/"), "{id} must be private");
            assert!(id.ends_with("1.0.0"), "{id} must carry a version");
        }
        assert_ne!(KADEMLIA_PROTOCOL, "/ipfs/kad/1.0.0");
    }
}
