//! The node's ed25519 identity: created on first run (file mode 0600), reused afterwards.

use std::path::Path;

use anyhow::{bail, Context, Result};
use libp2p::identity::Keypair;

use crate::fsutil;

/// Largest identity file we read: a protobuf-encoded ed25519 keypair is under 100 bytes.
const MAX_IDENTITY_FILE: u64 = 4096;

/// Loads the keypair at `path`, or creates and saves a new one if the file does not exist.
///
/// A file that exists but does not hold a valid key is an error: silently replacing it would
/// change the node's peer id under the operator's feet.
pub fn load_or_create(path: &Path) -> Result<Keypair> {
    match fsutil::read_bounded(path, MAX_IDENTITY_FILE)? {
        Some(bytes) => {
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "corrupt identity file {} ({e}); move it away to create a new identity",
                    path.display()
                )
            })?;
            if key.key_type() != libp2p::identity::KeyType::Ed25519 {
                bail!(
                    "identity file {} does not hold an ed25519 key",
                    path.display()
                );
            }
            Ok(key)
        }
        None => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .context("cannot encode the new identity")?;
            fsutil::write_atomic(path, &bytes, 0o600)
                .with_context(|| format!("cannot save identity to {}", path.display()))?;
            tracing::info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created a new identity");
            Ok(key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let first = load_or_create(&path).unwrap();
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_identity_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        std::fs::write(&path, b"garbage").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt identity file"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"garbage",
            "file left untouched"
        );
    }
}
