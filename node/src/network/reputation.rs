//! [`Reputation`]: penalties and bans for peers that send bad data, in one place. Every
//! protocol reports misbehaviour as an event (a chunk that does not match its hash, a manifest
//! that does not match its id, parameters that are NaN or refused, a stalled session); the
//! event loop feeds those here, and blocks the peer's connections when this says so. Pure
//! bookkeeping with the clock passed in, no swarm; the bans are saved as a [`BansFile`]
//! (`bans.json` in the data dir, [`load_bans`] / [`save_bans`]) so that a restart does not
//! forgive a liar.
//!
//! A peer is banned at its [`MAX_PENALTY`]th offence: for [`FIRST_BAN`], doubling with each
//! later ban up to [`LONGEST_BAN`]. Its penalty points start again from zero after a ban.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Offences after which a peer is banned.
pub const MAX_PENALTY: u32 = 3;

/// Most peers with a score (or a ban) remembered; beyond it the lowest score (the ban that
/// ends first) is forgotten first.
pub const MAX_SCORED_PEERS: usize = 4096;

/// How long a first ban lasts.
pub const FIRST_BAN: Duration = Duration::from_secs(10 * 60);

/// The longest ban.
pub const LONGEST_BAN: Duration = Duration::from_secs(24 * 60 * 60);

/// What to do after an offence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Count it and go on.
    Warn,
    /// The peer reached [`MAX_PENALTY`]: block its connections until `until`.
    Ban {
        /// When the ban ends.
        until: SystemTime,
    },
}

/// One ban as saved: the peer and the Unix second its ban ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBan {
    /// The peer.
    pub peer: PeerId,
    /// Unix seconds when the ban ends.
    pub until_unix: u64,
    /// Bans so far (the next one lasts twice as long).
    pub bans: u32,
}

/// The `bans.json` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BansFile {
    /// Bans in force when it was written.
    pub bans: Vec<SavedBan>,
}

/// Penalty points and bans per peer.
#[derive(Debug, Default)]
pub struct Reputation {
    scores: HashMap<PeerId, u32>,
    /// Peers banned: when their ban ends, and how many bans they had.
    bans: HashMap<PeerId, (SystemTime, u32)>,
}

impl Reputation {
    /// A reputation that starts with the bans of `file` still in force at `now`.
    pub fn restore(file: BansFile, now: SystemTime) -> Self {
        let mut r = Self::default();
        for ban in file.bans.into_iter().take(MAX_SCORED_PEERS) {
            let until = UNIX_EPOCH + Duration::from_secs(ban.until_unix);
            if until > now {
                // A clock set back must not turn a ban into a life sentence.
                let until = until.min(now + LONGEST_BAN);
                r.bans.insert(ban.peer, (until, ban.bans.max(1)));
            }
        }
        r
    }

    /// Counts one offence of `peer` at `now` (`why` is logged) and says what to do.
    pub fn penalize(&mut self, peer: PeerId, why: &str, now: SystemTime) -> Verdict {
        if !self.scores.contains_key(&peer) && self.scores.len() >= MAX_SCORED_PEERS {
            if let Some(forget) = self
                .scores
                .iter()
                .min_by_key(|(p, s)| (**s, **p))
                .map(|(p, _)| *p)
            {
                self.scores.remove(&forget);
            }
        }
        let score = self.scores.entry(peer).or_insert(0);
        *score = score.saturating_add(1);
        tracing::warn!(%peer, penalty = *score, "penalized peer: {why}");
        if *score < MAX_PENALTY {
            return Verdict::Warn;
        }
        *score = 0;
        let previous = self.bans.get(&peer).map_or(0, |(_, n)| *n);
        let length = FIRST_BAN
            .saturating_mul(1u32 << previous.min(16))
            .min(LONGEST_BAN);
        let until = now + length;
        if !self.bans.contains_key(&peer) && self.bans.len() >= MAX_SCORED_PEERS {
            if let Some(forget) = self
                .bans
                .iter()
                .min_by_key(|(p, (until, _))| (*until, **p))
                .map(|(p, _)| *p)
            {
                self.bans.remove(&forget);
            }
        }
        self.bans.insert(peer, (until, previous.saturating_add(1)));
        tracing::warn!(%peer, minutes = length.as_secs() / 60, "banning a peer that keeps sending bad data");
        Verdict::Ban { until }
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &PeerId, now: SystemTime) -> bool {
        self.bans.get(peer).is_some_and(|(until, _)| *until > now)
    }

    /// Ends the bans that are over at `now` and returns their peers (to unblock). The count
    /// of past bans is kept while the peer has a score or a ban, so a repeat offender's next
    /// ban is longer.
    pub fn expire(&mut self, now: SystemTime) -> Vec<PeerId> {
        let over: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, (until, _))| *until > UNIX_EPOCH && *until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in &over {
            if let Some(ban) = self.bans.get_mut(peer) {
                // Remembered (as not in force) to double the next ban.
                ban.0 = UNIX_EPOCH;
            }
        }
        over
    }

    /// Bans in force at `now`: peer and end.
    pub fn bans(&self, now: SystemTime) -> Vec<(PeerId, SystemTime)> {
        self.bans
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(p, (until, _))| (*p, *until))
            .collect()
    }

    /// The bans to save.
    pub fn to_file(&self, now: SystemTime) -> BansFile {
        let mut bans: Vec<SavedBan> = self
            .bans
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(peer, (until, n))| SavedBan {
                peer: *peer,
                until_unix: until.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                bans: *n,
            })
            .collect();
        bans.sort_by_key(|b| (b.until_unix, b.peer));
        BansFile { bans }
    }

    /// `peer`'s penalty points, and the Unix second its ban ends while it is banned at `now`.
    pub fn standing(&self, peer: &PeerId, now: SystemTime) -> (u32, Option<u64>) {
        let until = self
            .bans
            .get(peer)
            .filter(|(until, _)| *until > now)
            .and_then(|(until, _)| until.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        (self.scores.get(peer).copied().unwrap_or(0), until)
    }

    /// Penalty points per peer.
    pub fn scores(&self) -> HashMap<PeerId, u32> {
        self.scores.clone()
    }
}

/// Largest `bans.json` read.
const MAX_BANS_FILE_BYTES: u64 = 4 << 20;

/// Reads `bans.json` (none yet: no bans). A corrupt file is an error the caller reports.
pub fn load_bans(path: &std::path::Path) -> anyhow::Result<BansFile> {
    use anyhow::Context;
    let Some(bytes) = crate::fsutil::read_bounded(path, MAX_BANS_FILE_BYTES)? else {
        return Ok(BansFile::default());
    };
    serde_json::from_slice(&bytes).with_context(|| format!("corrupt ban list {}", path.display()))
}

/// Writes `bans.json` atomically.
pub fn save_bans(path: &std::path::Path, file: &BansFile) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(file)?;
    crate::fsutil::write_atomic(path, &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn a_peer_is_banned_at_the_third_offence_and_others_are_unaffected() {
        let mut r = Reputation::default();
        let (bad, other) = (PeerId::random(), PeerId::random());
        assert_eq!(r.penalize(bad, "x", at(0)), Verdict::Warn);
        assert_eq!(r.penalize(other, "y", at(0)), Verdict::Warn);
        assert_eq!(r.penalize(bad, "x", at(0)), Verdict::Warn);
        assert_eq!(
            r.penalize(bad, "x", at(1)),
            Verdict::Ban {
                until: at(1) + FIRST_BAN
            }
        );
        assert!(r.is_banned(&bad, at(2)));
        assert!(!r.is_banned(&other, at(2)));
        assert_eq!(r.scores()[&other], 1);
    }

    #[test]
    fn bans_end_and_a_repeat_offender_is_banned_twice_as_long() {
        let mut r = Reputation::default();
        let bad = PeerId::random();
        for _ in 0..3 {
            r.penalize(bad, "x", at(0));
        }
        assert!(r.expire(at(10)).is_empty());
        let end = at(0) + FIRST_BAN;
        assert_eq!(r.expire(end), vec![bad]);
        assert!(!r.is_banned(&bad, end));
        assert!(r.expire(end).is_empty(), "reported once");
        let later = at(10_000);
        r.penalize(bad, "x", later);
        r.penalize(bad, "x", later);
        assert_eq!(
            r.penalize(bad, "x", later),
            Verdict::Ban {
                until: later + 2 * FIRST_BAN
            }
        );
    }

    #[test]
    fn bans_survive_a_restart_and_ended_ones_do_not() {
        let mut r = Reputation::default();
        let (long, short) = (PeerId::random(), PeerId::random());
        for _ in 0..3 {
            r.penalize(long, "x", at(0));
        }
        for _ in 0..3 {
            r.penalize(short, "x", at(0));
        }
        for _ in 0..3 {
            r.penalize(long, "x", at(0));
        }
        let file = r.to_file(at(1));
        let text = serde_json::to_string(&file).unwrap();
        let restored = Reputation::restore(
            serde_json::from_str(&text).unwrap(),
            at(FIRST_BAN.as_secs() + 5),
        );
        assert!(restored.is_banned(&long, at(FIRST_BAN.as_secs() + 5)));
        assert!(!restored.is_banned(&short, at(FIRST_BAN.as_secs() + 5)));
        // A clock set far back does not stretch a ban past the longest one.
        let far = BansFile {
            bans: vec![SavedBan {
                peer: short,
                until_unix: u64::MAX / 2,
                bans: 1,
            }],
        };
        let r = Reputation::restore(far, at(0));
        assert!(!r.is_banned(&short, at(0) + LONGEST_BAN));
    }

    #[test]
    fn the_tables_are_bounded() {
        let mut r = Reputation::default();
        for _ in 0..MAX_SCORED_PEERS + 10 {
            let p = PeerId::random();
            for _ in 0..3 {
                r.penalize(p, "x", at(0));
            }
        }
        assert!(r.scores().len() <= MAX_SCORED_PEERS);
        assert!(r.bans(at(1)).len() <= MAX_SCORED_PEERS);
    }
}
