//! Which publisher a model name means.
//!
//! Versions are signed, so anyone can publish a model called `digits-mlp`, but only under their
//! own peer id: a model is really *publisher + name*. A bare `NAME` resolves, in this order, to
//!
//! 1. a publisher the user trusts with `--trust PEER_ID` that publishes `NAME`;
//! 2. the publisher followed or fetched under `NAME` before (remembered in `trust.json`; a
//!    version fetched by id, or held when the node starts following the name, counts);
//! 3. this node, if it publishes `NAME` itself;
//! 4. the only publisher of `NAME` known, which is then remembered (trust on first use, as
//!    SSH does with host keys).
//!
//! Several publishers and none of the above: the name is ambiguous, and the user is shown them
//! all and asked to pick one with `--trust`. Versions of `NAME` by other publishers are shown
//! in logs, never followed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libp2p::PeerId;

use crate::fsutil;

/// Most names remembered (the oldest entries are dropped beyond it).
pub const MAX_REMEMBERED: usize = 10_000;
/// Largest `trust.json` read.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// What a model name means here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// This publisher's versions.
    Publisher(PeerId),
    /// Several publishers and no reason to prefer one (sorted).
    Ambiguous(Vec<PeerId>),
    /// Nobody known publishes it.
    Unknown,
}

/// The publishers trusted per model name.
#[derive(Debug)]
pub struct Trust {
    explicit: HashSet<PeerId>,
    remembered: BTreeMap<String, PeerId>,
    path: Option<PathBuf>,
}

impl Trust {
    /// Trust in memory only, with `explicit` publishers.
    pub fn new(explicit: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            explicit: explicit.into_iter().collect(),
            remembered: BTreeMap::new(),
            path: None,
        }
    }

    /// Loads the names remembered in `path` (none if it does not exist; a damaged file is
    /// reported and ignored) and keeps `path` to save new ones.
    pub fn load(path: &Path, explicit: impl IntoIterator<Item = PeerId>) -> Self {
        let mut trust = Self::new(explicit);
        trust.path = Some(path.to_path_buf());
        match read(path) {
            Ok(remembered) => trust.remembered = remembered,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "ignoring a damaged trust file")
            }
        }
        trust
    }

    /// What `model` means, given the publishers known to publish it and this node's id.
    pub fn resolve(&self, model: &str, publishers: &[PeerId], local: PeerId) -> Resolution {
        let mut trusted: Vec<PeerId> = publishers
            .iter()
            .filter(|p| self.explicit.contains(p))
            .copied()
            .collect();
        trusted.sort();
        trusted.dedup();
        match trusted.len() {
            1 => return Resolution::Publisher(trusted[0]),
            n if n > 1 => return Resolution::Ambiguous(trusted),
            _ => {}
        }
        if let Some(p) = self.remembered.get(model) {
            return Resolution::Publisher(*p);
        }
        if publishers.contains(&local) {
            return Resolution::Publisher(local);
        }
        let mut all = publishers.to_vec();
        all.sort();
        all.dedup();
        match all.len() {
            0 => Resolution::Unknown,
            1 => Resolution::Publisher(all[0]),
            _ => Resolution::Ambiguous(all),
        }
    }

    /// The publisher remembered for `model`, if any.
    pub fn remembered(&self, model: &str) -> Option<PeerId> {
        self.remembered.get(model).copied()
    }

    /// Remembers `publisher` for `model` (and saves the file) if it is not already.
    pub fn remember(&mut self, model: &str, publisher: PeerId) {
        if self.remembered.get(model) == Some(&publisher) {
            return;
        }
        if self.remembered.len() >= MAX_REMEMBERED && !self.remembered.contains_key(model) {
            return;
        }
        tracing::info!(model, %publisher, "following this publisher's versions of the model");
        self.remembered.insert(model.to_string(), publisher);
        if let Some(path) = &self.path {
            if let Err(e) = write(path, &self.remembered) {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cannot save the trust file");
            }
        }
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, PeerId>> {
    let Some(bytes) = fsutil::read_bounded(path, MAX_FILE_BYTES)? else {
        return Ok(BTreeMap::new());
    };
    let map: BTreeMap<String, String> = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a JSON map of model names to peer ids",
            path.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (model, peer) in map.into_iter().take(MAX_REMEMBERED) {
        p2p_protocol::manifest::validate_model_name(&model)
            .with_context(|| format!("bad model name '{model}'"))?;
        let peer = peer
            .parse()
            .with_context(|| format!("bad peer id '{peer}' for model '{model}'"))?;
        out.insert(model, peer);
    }
    Ok(out)
}

fn write(path: &Path, remembered: &BTreeMap<String, PeerId>) -> Result<()> {
    let map: BTreeMap<&str, String> = remembered
        .iter()
        .map(|(m, p)| (m.as_str(), p.to_base58()))
        .collect();
    let json = serde_json::to_vec_pretty(&map)?;
    fsutil::write_atomic(path, &json, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_means_the_trusted_then_the_remembered_then_our_own_then_the_only_publisher() {
        let (alice, bob, me) = (PeerId::random(), PeerId::random(), PeerId::random());
        let open = Trust::new([]);
        assert_eq!(open.resolve("m", &[], me), Resolution::Unknown);
        assert_eq!(
            open.resolve("m", &[alice], me),
            Resolution::Publisher(alice)
        );
        assert_eq!(
            open.resolve("m", &[alice, me], me),
            Resolution::Publisher(me)
        );
        let Resolution::Ambiguous(both) = open.resolve("m", &[alice, bob], me) else {
            panic!("two strangers are ambiguous");
        };
        assert_eq!(both.len(), 2);
        let trusting_bob = Trust::new([bob]);
        assert_eq!(
            trusting_bob.resolve("m", &[alice, bob, me], me),
            Resolution::Publisher(bob)
        );
        let mut remembering = Trust::new([]);
        remembering.remember("m", alice);
        assert_eq!(
            remembering.resolve("m", &[bob, me], me),
            Resolution::Publisher(alice),
            "a liar taking the name later does not take it over"
        );
    }

    #[test]
    fn remembered_publishers_survive_a_restart_and_a_damaged_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let alice = PeerId::random();
        Trust::load(&path, []).remember("digits-mlp", alice);
        let again = Trust::load(&path, []);
        assert_eq!(
            again.resolve("digits-mlp", &[PeerId::random()], PeerId::random()),
            Resolution::Publisher(alice)
        );
        std::fs::write(&path, b"{\"m\": \"not a peer\"}").unwrap();
        assert_eq!(
            Trust::load(&path, []).resolve("m", &[], alice),
            Resolution::Unknown
        );
    }
}
