//! Which publisher a model name means.
//!
//! Versions are signed, so anyone can publish a model called `digits-mlp`, but only under their
//! own peer id: a model is really *publisher + name*. A bare `NAME` resolves, in this order, to
//!
//! 1. the publisher bound to it with `--trust NAME=PEER_ID`;
//! 2. the publisher followed or fetched by name before (remembered in `trust.json`; versions of
//!    a single publisher held when the node starts following the name count);
//! 3. this node, if it publishes `NAME` itself;
//! 4. a publisher trusted with `--trust PEER_ID` that publishes `NAME`; with such publishers
//!    given, nobody else is taken on first use;
//! 5. the only publisher of `NAME` known (trust on first use, as SSH does with host keys).
//!
//! Whatever it resolves to by 4 or 5 is remembered once used. Several candidates and none of
//! the above: the name is ambiguous, and the user is shown them all and asked to pick one.
//! Versions of `NAME` by other publishers are shown in logs, never followed. A
//! `--trust PEER_ID` is a tie-breaker for names not yet bound: it never takes a name followed
//! before from its publisher (that takes `--trust NAME=PEER_ID`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libp2p::PeerId;

use crate::fsutil;

/// Most names remembered (beyond it, new names are not remembered).
pub const MAX_REMEMBERED: usize = 10_000;
/// Largest `trust.json` read.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// What a model name means here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// This publisher's versions.
    Publisher(PeerId),
    /// Several candidates and no reason to prefer one (sorted).
    Ambiguous(Vec<PeerId>),
    /// Nobody known (or, with `--trust PEER_ID` given, nobody trusted) publishes it.
    Unknown,
}

/// A `--trust` value: a publisher trusted for names not yet bound, or one bound to a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustArg {
    /// `--trust PEER_ID`.
    Publisher(PeerId),
    /// `--trust NAME=PEER_ID`.
    Name(String, PeerId),
}

impl std::str::FromStr for TrustArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse_peer = |p: &str| {
            p.parse::<PeerId>()
                .map_err(|e| format!("'{p}' is not a peer id: {e}"))
        };
        match s.split_once('=') {
            Some((name, peer)) => {
                p2p_protocol::manifest::validate_model_name(name)
                    .map_err(|e| format!("'{name}' is not a model name: {e}"))?;
                Ok(Self::Name(name.to_string(), parse_peer(peer)?))
            }
            None => Ok(Self::Publisher(parse_peer(s)?)),
        }
    }
}

/// The publishers trusted per model name.
#[derive(Debug)]
pub struct Trust {
    explicit: HashSet<PeerId>,
    bound: BTreeMap<String, PeerId>,
    remembered: BTreeMap<String, PeerId>,
    path: Option<PathBuf>,
}

impl Trust {
    /// Trust in memory only, from `--trust` values.
    pub fn new(args: impl IntoIterator<Item = TrustArg>) -> Self {
        let mut trust = Self {
            explicit: HashSet::new(),
            bound: BTreeMap::new(),
            remembered: BTreeMap::new(),
            path: None,
        };
        for arg in args {
            match arg {
                TrustArg::Publisher(p) => {
                    trust.explicit.insert(p);
                }
                TrustArg::Name(name, p) => {
                    trust.bound.insert(name, p);
                }
            }
        }
        trust
    }

    /// Loads the names remembered in `path` (none if it does not exist) and keeps `path` to
    /// save new ones. Entries that do not parse are skipped with a warning; a file that is not
    /// a JSON map at all is moved aside (`trust.json.damaged`). A file that cannot be read (or
    /// moved aside) is never overwritten: nothing is saved this run.
    pub fn load(path: &Path, args: impl IntoIterator<Item = TrustArg>) -> Self {
        let mut trust = Self::new(args);
        match fsutil::read_bounded(path, MAX_FILE_BYTES) {
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cannot read the trust file: no name is remembered, and none saved, this run");
            }
            Ok(None) => trust.path = Some(path.to_path_buf()),
            Ok(Some(bytes)) => match parse(path, &bytes) {
                Ok(remembered) => {
                    trust.remembered = remembered;
                    trust.path = Some(path.to_path_buf());
                }
                Err(e) => {
                    let aside = path.with_extension("json.damaged");
                    let moved = std::fs::rename(path, &aside).is_ok();
                    if moved {
                        trust.path = Some(path.to_path_buf());
                    }
                    let moved_to = if moved {
                        aside.display().to_string()
                    } else {
                        "- (not moved: nothing is saved this run)".into()
                    };
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), moved_to, "ignoring a damaged trust file");
                }
            },
        }
        // A name bound on the command line is remembered as such.
        let bound: Vec<(String, PeerId)> =
            trust.bound.iter().map(|(m, p)| (m.clone(), *p)).collect();
        for (model, p) in bound {
            trust.remember(&model, p);
        }
        trust
    }

    /// What `model` means, given the publishers known to publish it and this node's id (see
    /// the module docs for the order).
    pub fn resolve(&self, model: &str, publishers: &[PeerId], local: PeerId) -> Resolution {
        if let Some(p) = self.bound.get(model).or_else(|| self.remembered.get(model)) {
            return Resolution::Publisher(*p);
        }
        if publishers.contains(&local) {
            return Resolution::Publisher(local);
        }
        let mut all = publishers.to_vec();
        all.sort();
        all.dedup();
        if !self.explicit.is_empty() {
            all.retain(|p| self.explicit.contains(p));
        }
        match all.len() {
            0 => Resolution::Unknown,
            1 => Resolution::Publisher(all[0]),
            _ => Resolution::Ambiguous(all),
        }
    }

    /// Whether `model` is bound to a publisher (on the command line, or remembered).
    pub fn is_bound(&self, model: &str) -> bool {
        self.bound.contains_key(model) || self.remembered.contains_key(model)
    }

    /// Whether `peer` was given with `--trust PEER_ID`.
    pub fn trusts(&self, peer: &PeerId) -> bool {
        self.explicit.contains(peer)
    }

    /// The publisher remembered for `model`, if any.
    pub fn remembered(&self, model: &str) -> Option<PeerId> {
        self.remembered.get(model).copied()
    }

    /// Whether `--trust PEER_ID` values were given (then only those are taken on first use).
    pub fn has_trusted_publishers(&self) -> bool {
        !self.explicit.is_empty()
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

fn parse(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, PeerId>> {
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(bytes).with_context(|| {
            format!(
                "{} is not a JSON map of model names to peer ids",
                path.display()
            )
        })?;
    let mut out = BTreeMap::new();
    for (model, peer) in map.into_iter().take(MAX_REMEMBERED) {
        let parsed = p2p_protocol::manifest::validate_model_name(&model)
            .ok()
            .and_then(|()| peer.as_str()?.parse::<PeerId>().ok());
        match parsed {
            Some(p) => {
                out.insert(model, p);
            }
            None => {
                tracing::warn!(path = %path.display(), %model, "skipping a trust entry that is not a model name and a peer id");
            }
        }
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
    fn a_name_means_the_bound_the_remembered_our_own_the_trusted_then_the_only_publisher() {
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
        let trusting_bob = Trust::new([TrustArg::Publisher(bob)]);
        assert_eq!(
            trusting_bob.resolve("m", &[alice, bob], me),
            Resolution::Publisher(bob)
        );
        assert_eq!(
            trusting_bob.resolve("m", &[alice], me),
            Resolution::Unknown,
            "with publishers trusted, a stranger is not taken on first use"
        );
        let bound = Trust::new([TrustArg::Name("m".into(), alice), TrustArg::Publisher(bob)]);
        assert_eq!(
            bound.resolve("m", &[bob, me], me),
            Resolution::Publisher(alice)
        );
        let mut remembering = Trust::new([TrustArg::Publisher(bob)]);
        remembering.remember("m", alice);
        assert_eq!(
            remembering.resolve("m", &[bob, me], me),
            Resolution::Publisher(alice),
            "neither a publisher trusted for other names nor a liar takes a name followed before"
        );
    }

    #[test]
    fn trust_arguments_parse_as_a_publisher_or_a_name_bound_to_one() {
        let peer = PeerId::random();
        assert_eq!(
            peer.to_base58().parse::<TrustArg>().unwrap(),
            TrustArg::Publisher(peer)
        );
        assert_eq!(
            format!("digits-mlp={peer}").parse::<TrustArg>().unwrap(),
            TrustArg::Name("digits-mlp".into(), peer)
        );
        assert!("a b=x".parse::<TrustArg>().is_err());
        assert!("m=notapeer".parse::<TrustArg>().is_err());
    }

    #[test]
    fn remembered_publishers_survive_a_restart_and_damage_costs_only_what_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let alice = PeerId::random();
        Trust::load(&path, []).remember("digits-mlp", alice);
        let again = Trust::load(&path, []);
        assert_eq!(
            again.resolve("digits-mlp", &[PeerId::random()], PeerId::random()),
            Resolution::Publisher(alice)
        );
        // One bad entry costs that entry only.
        let json = format!("{{\"m\": \"not a peer\", \"n\": \"{alice}\"}}");
        std::fs::write(&path, json).unwrap();
        let loaded = Trust::load(&path, []);
        assert_eq!(loaded.resolve("m", &[], alice), Resolution::Unknown);
        assert_eq!(
            loaded.resolve("n", &[], alice),
            Resolution::Publisher(alice)
        );
        // A file that is no map at all is moved aside, never overwritten.
        std::fs::write(&path, b"[1, 2").unwrap();
        Trust::load(&path, []).remember("m", alice);
        assert_eq!(
            std::fs::read(path.with_extension("json.damaged")).unwrap(),
            b"[1, 2"
        );
    }
}
