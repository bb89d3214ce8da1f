//! The address book: every peer this node knows, how it was found, and whether it is alive.
//!
//! The book is bounded. When full, it evicts a peer that is not connected, choosing the one
//! seen longest ago within the most crowded address range, so that the saved peers stay spread
//! across networks (one range cannot push out all others: a cheap guard against eclipse
//! attacks). It is persisted as JSON in the data dir ([`CacheFile`]); on restart the node dials
//! the peers most recently seen alive, so it rejoins without any bootstrap node.
//!
//! This module is pure logic plus (de)serialization; the event loop calls it and does the I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// At most this many addresses are kept per peer (newest first).
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// Largest peer cache file read at start.
pub const MAX_CACHE_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Version of the cache file format.
pub const CACHE_FILE_VERSION: u32 = 1;

/// How a peer first became known to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Given with `--bootstrap`.
    Bootstrap,
    /// Learned from the Kademlia DHT.
    Kademlia,
    /// Found on the local network with mDNS.
    Mdns,
    /// Loaded from the persisted peer cache.
    Cache,
    /// It connected to us first.
    Inbound,
}

/// What the book knows about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// Dialable addresses without the `/p2p/` suffix, newest first.
    pub addrs: Vec<Multiaddr>,
    /// How the peer was first found.
    pub source: Source,
    /// Unix seconds when a connection to it was last up; 0 if never.
    pub last_seen_unix: u64,
    /// Whether a connection is up now.
    pub connected: bool,
}

/// The bounded address book.
#[derive(Debug, Clone)]
pub struct AddressBook {
    entries: HashMap<PeerId, PeerEntry>,
    capacity: usize,
    dirty: bool,
    /// A peer or an address was learned since the last save: worth saving soon.
    learned: bool,
}

impl AddressBook {
    /// An empty book holding at most `capacity` peers (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            dirty: false,
            learned: false,
        }
    }

    /// Number of peers in the book.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the book is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `peer`, if known.
    pub fn get(&self, peer: &PeerId) -> Option<&PeerEntry> {
        self.entries.get(peer)
    }

    /// All entries.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &PeerEntry)> {
        self.entries.iter()
    }

    /// Records that `peer` exists (found through `source`) with these addresses.
    /// The source of a peer already known is kept.
    pub fn learn(
        &mut self,
        peer: PeerId,
        addrs: impl IntoIterator<Item = Multiaddr>,
        source: Source,
    ) {
        let entry = self.entries.entry(peer).or_insert_with(|| PeerEntry {
            addrs: Vec::new(),
            source,
            last_seen_unix: 0,
            connected: false,
        });
        for addr in addrs {
            let Some(addr) = dialable(addr) else { continue };
            if entry.addrs.first() == Some(&addr) {
                continue;
            }
            if !entry.addrs.contains(&addr) {
                self.learned = true;
            }
            entry.addrs.retain(|a| a != &addr);
            entry.addrs.insert(0, addr);
            entry.addrs.truncate(MAX_ADDRS_PER_PEER);
            self.dirty = true;
        }
        self.evict_to_capacity();
    }

    /// Records that a connection to `peer` came up (`true`) or the last one went down.
    pub fn set_connected(&mut self, peer: PeerId, connected: bool, now_unix: u64) {
        let entry = self.entries.entry(peer).or_insert_with(|| PeerEntry {
            addrs: Vec::new(),
            source: Source::Inbound,
            last_seen_unix: 0,
            connected,
        });
        entry.connected = connected;
        entry.last_seen_unix = now_unix;
        self.dirty = true;
        self.evict_to_capacity();
    }

    /// Peers worth dialling to (re)join, most recently seen alive first; never-seen peers last.
    pub fn best(&self, n: usize) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut peers: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.addrs.is_empty())
            .collect();
        peers.sort_by(|a, b| {
            b.1.last_seen_unix
                .cmp(&a.1.last_seen_unix)
                .then(a.0.cmp(b.0))
        });
        peers
            .into_iter()
            .take(n)
            .map(|(p, e)| (*p, e.addrs.clone()))
            .collect()
    }

    /// Whether a new peer or a new address was learned since the last call: such changes are
    /// saved within a second, so that a node killed right after its first contact still
    /// finds the network again.
    pub fn take_learned(&mut self) -> bool {
        std::mem::take(&mut self.learned)
    }

    /// Whether the book changed since the last [`AddressBook::take_dirty`].
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The persisted form: peers with at least one address.
    pub fn to_file(&self) -> CacheFile {
        let mut peers: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.addrs.is_empty())
            .map(|(peer, e)| CachedPeer {
                peer_id: peer.to_string(),
                addrs: e.addrs.iter().map(|a| a.to_string()).collect(),
                last_seen_unix: e.last_seen_unix,
            })
            .collect();
        peers.sort_by(|a, b| {
            b.last_seen_unix
                .cmp(&a.last_seen_unix)
                .then(a.peer_id.cmp(&b.peer_id))
        });
        CacheFile {
            version: CACHE_FILE_VERSION,
            peers,
        }
    }

    /// Rebuilds a book from its persisted form. Entries that do not parse are skipped and
    /// counted in the returned number.
    pub fn from_file(file: CacheFile, capacity: usize) -> (Self, usize) {
        let mut book = Self::new(capacity);
        let mut skipped = 0;
        for cached in file.peers {
            let Ok(peer) = cached.peer_id.parse::<PeerId>() else {
                skipped += 1;
                continue;
            };
            let addrs: Vec<Multiaddr> =
                cached.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if addrs.is_empty() {
                skipped += 1;
                continue;
            }
            // Oldest first so that the newest end up first in each list.
            book.learn(peer, addrs.into_iter().rev(), Source::Cache);
            if let Some(entry) = book.entries.get_mut(&peer) {
                entry.last_seen_unix = cached.last_seen_unix;
            }
        }
        book.dirty = false;
        book.learned = false;
        (book, skipped)
    }

    fn evict_to_capacity(&mut self) {
        while self.entries.len() > self.capacity {
            let mut crowding: HashMap<String, usize> = HashMap::new();
            for entry in self.entries.values().filter(|e| !e.connected) {
                *crowding.entry(address_group(&entry.addrs)).or_default() += 1;
            }
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !e.connected)
                .max_by(|(pa, a), (pb, b)| {
                    let ca = crowding[&address_group(&a.addrs)];
                    let cb = crowding[&address_group(&b.addrs)];
                    ca.cmp(&cb)
                        .then(b.last_seen_unix.cmp(&a.last_seen_unix))
                        .then(pa.cmp(pb))
                })
                .map(|(p, _)| *p);
            match victim {
                Some(peer) => {
                    self.entries.remove(&peer);
                    self.dirty = true;
                }
                None => break, // everyone is connected; connection limits bound this
            }
        }
    }
}

/// The address without a trailing `/p2p/<id>`, or `None` if it cannot be dialled
/// (unspecified IP such as 0.0.0.0, or a relay circuit).
fn dialable(mut addr: Multiaddr) -> Option<Multiaddr> {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    for proto in addr.iter() {
        match proto {
            Protocol::Ip4(ip) if ip.is_unspecified() => return None,
            Protocol::Ip6(ip) if ip.is_unspecified() => return None,
            Protocol::P2pCircuit => return None,
            _ => {}
        }
    }
    (!addr.is_empty()).then_some(addr)
}

/// The network range an address list belongs to: IPv4 /16, IPv6 /32, or the DNS name.
fn address_group(addrs: &[Multiaddr]) -> String {
    let Some(first) = addrs.first() else {
        return String::new();
    };
    for proto in first.iter() {
        let ip = match proto {
            Protocol::Ip4(ip) => IpAddr::V4(ip),
            Protocol::Ip6(ip) => IpAddr::V6(ip),
            Protocol::Dns(name) | Protocol::Dns4(name) | Protocol::Dns6(name) => {
                return name.to_string()
            }
            _ => continue,
        };
        return match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}", o[0], o[1])
            }
            IpAddr::V6(v6) => {
                let s = v6.segments();
                format!("{:x}:{:x}", s[0], s[1])
            }
        };
    }
    String::new()
}

/// The peer cache file (`peers.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFile {
    /// Format version, [`CACHE_FILE_VERSION`].
    pub version: u32,
    /// Known peers, most recently seen first.
    pub peers: Vec<CachedPeer>,
}

/// One peer in the cache file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPeer {
    /// Base58 peer id.
    pub peer_id: String,
    /// Multiaddrs without `/p2p/`.
    pub addrs: Vec<String>,
    /// Unix seconds of the last live connection (0: never connected).
    pub last_seen_unix: u64,
}

/// Loads the cache file. A missing file is an empty cache; a corrupt one is an error the
/// caller reports as a warning (the node then joins by other means).
pub fn load_cache(path: &Path) -> Result<Option<CacheFile>> {
    let Some(bytes) = fsutil::read_bounded(path, MAX_CACHE_FILE_BYTES)? else {
        return Ok(None);
    };
    let file: CacheFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("corrupt peer cache {}", path.display()))?;
    anyhow::ensure!(
        file.version == CACHE_FILE_VERSION,
        "peer cache {} has unsupported version {}",
        path.display(),
        file.version
    );
    Ok(Some(file))
}

/// Saves the cache file atomically.
pub fn save_cache(path: &Path, file: &CacheFile) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(file).context("cannot encode the peer cache")?;
    fsutil::write_atomic(path, &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn learn_strips_peer_id_dedups_and_bounds_addresses() {
        let mut book = AddressBook::new(10);
        let peer = PeerId::random();
        book.learn(
            peer,
            [addr(&format!("/ip4/1.2.3.4/tcp/1/p2p/{peer}"))],
            Source::Bootstrap,
        );
        for port in 0..20 {
            book.learn(
                peer,
                [addr(&format!("/ip4/1.2.3.4/tcp/{port}"))],
                Source::Kademlia,
            );
        }
        let entry = book.get(&peer).unwrap();
        assert_eq!(entry.source, Source::Bootstrap, "first source is kept");
        assert_eq!(entry.addrs.len(), MAX_ADDRS_PER_PEER);
        assert_eq!(entry.addrs[0], addr("/ip4/1.2.3.4/tcp/19"), "newest first");
    }

    #[test]
    fn new_peers_and_new_addresses_are_flagged_for_a_prompt_save_and_repeats_are_not() {
        let mut book = AddressBook::new(10);
        let peer = PeerId::random();
        assert!(!book.take_learned());
        book.learn(peer, [addr("/ip4/1.2.3.4/tcp/1")], Source::Kademlia);
        assert!(book.take_learned(), "a new peer");
        book.learn(peer, [addr("/ip4/1.2.3.4/tcp/1")], Source::Kademlia);
        book.set_connected(peer, true, 5);
        assert!(
            !book.take_learned(),
            "nothing new: the periodic save covers it"
        );
        assert!(book.take_dirty(), "but the book changed");
        book.learn(peer, [addr("/ip4/1.2.3.4/tcp/2")], Source::Kademlia);
        assert!(
            book.take_learned(),
            "a new address (a restart on a new port)"
        );
    }

    #[test]
    fn unspecified_and_relay_addresses_are_not_kept() {
        let mut book = AddressBook::new(10);
        let peer = PeerId::random();
        book.learn(
            peer,
            [addr("/ip4/0.0.0.0/tcp/1"), addr("/ip6/::/tcp/1")],
            Source::Mdns,
        );
        assert!(book.get(&peer).unwrap().addrs.is_empty());
        assert!(
            book.best(10).is_empty(),
            "peers without addresses are not dialled"
        );
    }

    #[test]
    fn best_prefers_recently_seen_peers() {
        let mut book = AddressBook::new(10);
        let (old, new, never) = (PeerId::random(), PeerId::random(), PeerId::random());
        for p in [old, new, never] {
            book.learn(p, [addr("/ip4/10.0.0.1/tcp/1")], Source::Kademlia);
        }
        book.set_connected(old, true, 100);
        book.set_connected(new, true, 200);
        let order: Vec<_> = book.best(3).into_iter().map(|(p, _)| p).collect();
        assert_eq!(order, vec![new, old, never]);
        assert_eq!(book.best(1).len(), 1);
    }

    #[test]
    fn eviction_keeps_connected_peers_and_address_diversity() {
        let mut book = AddressBook::new(3);
        let lone = PeerId::random();
        book.learn(lone, [addr("/ip4/8.8.1.1/tcp/1")], Source::Kademlia);
        let connected = PeerId::random();
        book.learn(connected, [addr("/ip4/1.1.0.1/tcp/1")], Source::Kademlia);
        book.set_connected(connected, true, 1);
        // A flood of peers from one range must not push out the lone peer of another range,
        // nor the connected one.
        for i in 0..20 {
            book.learn(
                PeerId::random(),
                [addr(&format!("/ip4/1.1.0.{i}/tcp/1"))],
                Source::Kademlia,
            );
        }
        assert_eq!(book.len(), 3);
        assert!(book.get(&lone).is_some(), "diverse peer kept");
        assert!(book.get(&connected).is_some(), "connected peer kept");
    }

    #[test]
    fn file_round_trip_marks_source_cache_and_skips_bad_entries() {
        let mut book = AddressBook::new(10);
        let peer = PeerId::random();
        book.learn(
            peer,
            [addr("/ip4/1.2.3.4/tcp/2"), addr("/ip4/1.2.3.4/tcp/1")],
            Source::Bootstrap,
        );
        book.set_connected(peer, true, 42);
        let mut file = book.to_file();
        file.peers.push(CachedPeer {
            peer_id: "bad".into(),
            addrs: vec![],
            last_seen_unix: 0,
        });
        let json = serde_json::to_vec(&file).unwrap();
        let (loaded, skipped) = AddressBook::from_file(serde_json::from_slice(&json).unwrap(), 10);
        assert_eq!(skipped, 1);
        let entry = loaded.get(&peer).unwrap();
        assert_eq!(entry.source, Source::Cache);
        assert_eq!(entry.last_seen_unix, 42);
        assert!(!entry.connected);
        assert_eq!(
            entry.addrs,
            book.get(&peer).unwrap().addrs,
            "address order survives"
        );
    }

    #[test]
    fn corrupt_cache_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = format!("{:#}", load_cache(&path).unwrap_err());
        assert!(err.contains("corrupt peer cache"), "{err}");
        assert!(load_cache(&dir.path().join("absent")).unwrap().is_none());
    }
}
