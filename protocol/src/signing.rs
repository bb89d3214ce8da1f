//! Signatures of versions and runs by their publisher's identity key.
//!
//! A peer id of an ed25519 identity *is* its public key (an identity multihash of the
//! protobuf-encoded key), so anything signed by a peer can be checked by anyone who knows its
//! peer id, wherever the signed bytes came from: a gossip message, a `Versions` answer relayed
//! by a third peer, a manifest on disk. Each kind of signed object has its own domain prefix, so
//! a signature made for one can never be replayed as another (the practice of libp2p's signed
//! envelopes, RFC 0002).

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;

use crate::manifest::Hash32;

/// Domain of a version signature: the signed message is this prefix then the 32-byte version id.
pub const VERSION_DOMAIN: &[u8] = b"p2p-ml/version/v2\0";
/// Domain of a run signature: this prefix then the 32-byte hash of the run's fields.
pub const RUN_DOMAIN: &[u8] = b"p2p-ml/run/v2\0";
/// Longest signature accepted (an ed25519 signature is 64 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 128;

/// The public key inside `peer`, if its id inlines one (ed25519 ids do; hashed ids of larger
/// keys such as RSA do not, and such publishers cannot be verified and are refused).
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let multihash = peer.as_ref();
    // 0x00: the identity multihash, whose digest is the protobuf-encoded key itself.
    if multihash.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    (key.to_peer_id() == *peer).then_some(key)
}

/// Signs `domain ‖ digest` with `key`. Ed25519 signing cannot fail; a key type that can yields
/// an empty signature, which no verifier accepts.
pub fn sign(key: &Keypair, domain: &[u8], digest: &Hash32) -> Vec<u8> {
    key.sign(&message(domain, digest)).unwrap_or_default()
}

/// Whether `signature` is `signer`'s signature of `domain ‖ digest`.
pub fn verify(signer: &PeerId, domain: &[u8], digest: &Hash32, signature: &[u8]) -> bool {
    if signature.is_empty() || signature.len() > MAX_SIGNATURE_BYTES {
        return false;
    }
    public_key_of(signer).is_some_and(|key| key.verify(&message(domain, digest), signature))
}

fn message(domain: &[u8], digest: &Hash32) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + digest.0.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(&digest.0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_for_its_signer_domain_and_digest_only() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let digest = Hash32::of(b"version");
        let sig = sign(&key, VERSION_DOMAIN, &digest);
        assert!(verify(&peer, VERSION_DOMAIN, &digest, &sig));
        assert!(!verify(&peer, RUN_DOMAIN, &digest, &sig), "other domain");
        assert!(!verify(&peer, VERSION_DOMAIN, &Hash32::of(b"x"), &sig));
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(
            !verify(&other, VERSION_DOMAIN, &digest, &sig),
            "other signer"
        );
        assert!(!verify(&peer, VERSION_DOMAIN, &digest, &[]));
        assert!(!verify(&peer, VERSION_DOMAIN, &digest, &[0; 4096]));
    }

    #[test]
    fn a_peer_id_that_hashes_its_key_has_no_inline_key() {
        // PeerId::random() is an identity multihash of random bytes, not a key.
        assert!(public_key_of(&PeerId::random()).is_none());
        let key = Keypair::generate_ed25519();
        assert!(public_key_of(&key.public().to_peer_id()).is_some());
    }
}
