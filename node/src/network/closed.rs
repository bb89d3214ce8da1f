//! Closed networks: a pre-shared swarm key (libp2p `pnet`, the private-network scheme of
//! IPFS: <https://github.com/libp2p/specs/blob/master/pnet/Private-Networks-PSK-V1.md>) and an
//! allowlist of peer ids. Reading, writing and parsing only; the transport and the connection
//! filter that use them are in [`super::swarm`] and [`super::behaviour`].

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use libp2p::pnet::PreSharedKey;
use libp2p::PeerId;

/// Largest swarm key file read (the standard format is 95 bytes).
const MAX_SWARM_KEY_BYTES: u64 = 1024;

/// Largest allowlist file read.
const MAX_ALLOW_FILE_BYTES: u64 = 4 << 20;

/// Most peers an allowlist may name.
pub const MAX_ALLOWED_PEERS: usize = 10_000;

/// Reads a swarm key file in the standard format (`/key/swarm/psk/1.0.0/`, `/base16/`, 64
/// hex digits), as `ipfs` and `p2p-node swarm-key` write it.
pub fn read_swarm_key(path: &Path) -> Result<PreSharedKey> {
    let bytes = crate::fsutil::read_bounded(path, MAX_SWARM_KEY_BYTES)
        .with_context(|| format!("swarm key {}", path.display()))?
        .with_context(|| format!("swarm key {} does not exist", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("swarm key {} is not text", path.display()))?;
    PreSharedKey::from_str(&text).map_err(|_| {
        anyhow::anyhow!(
            "swarm key {} is not a swarm key (expected the lines /key/swarm/psk/1.0.0/, /base16/ \
             and 64 hex digits); make one with: p2p-node swarm-key --out FILE",
            path.display()
        )
    })
}

/// A new random swarm key, in the standard file format.
pub fn new_swarm_key() -> String {
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")
}

/// Writes a new swarm key to `path` (readable by its owner only); refuses to replace a file.
pub fn write_new_swarm_key(path: &Path) -> Result<PreSharedKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = new_swarm_key();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    PreSharedKey::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Parses an allowlist: one peer id per line; blank lines and `#` comments are skipped.
pub fn parse_allow_list(text: &str) -> Result<Vec<PeerId>> {
    let mut peers = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let peer = PeerId::from_str(line)
            .map_err(|e| anyhow::anyhow!("line {}: {line:?} is not a peer id ({e})", n + 1))?;
        if peers.len() == MAX_ALLOWED_PEERS {
            bail!("more than {MAX_ALLOWED_PEERS} peers");
        }
        peers.push(peer);
    }
    Ok(peers)
}

/// Reads an allowlist file ([`parse_allow_list`]).
pub fn read_allow_list(path: &Path) -> Result<Vec<PeerId>> {
    let bytes = crate::fsutil::read_bounded(path, MAX_ALLOW_FILE_BYTES)
        .with_context(|| format!("allowlist {}", path.display()))?
        .with_context(|| format!("allowlist {} does not exist", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("allowlist {} is not text", path.display()))?;
    parse_allow_list(&text).with_context(|| format!("allowlist {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;

    #[test]
    fn a_new_key_round_trips_and_two_keys_differ() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        let key = write_new_swarm_key(&path).unwrap();
        assert_eq!(
            read_swarm_key(&path).unwrap().fingerprint().to_string(),
            key.fingerprint().to_string()
        );
        assert!(
            write_new_swarm_key(&path).is_err(),
            "an existing key is never replaced"
        );
        assert_ne!(new_swarm_key(), new_swarm_key());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_bad_key_file_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnothex\n").unwrap();
        let e = read_swarm_key(&path).unwrap_err().to_string();
        assert!(e.contains("p2p-node swarm-key"), "{e}");
        let e = read_swarm_key(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn allow_lists_skip_comments_and_name_the_bad_line() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let text = format!("# lab machines\n{a}\n\n{b}  # the GPU box\n");
        assert_eq!(parse_allow_list(&text).unwrap(), vec![a, b]);
        let e = parse_allow_list(&format!("{a}\nnot-a-peer\n")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
