//! Whether this node can be dialled from outside: its external addresses (confirmed through
//! AutoNAT v2 dial-backs, or declared by the event loop with `--kad-mode server`; relayed ones
//! never count), AutoNAT's failed probes, and the listen addresses (the event loop's, passed
//! in; relayed ones aside).
//!
//! Pure logic; the event loop feeds it and applies the result (Kademlia's mode, `/status`).
//! A loopback address never makes a node public: nobody on another machine can dial it.

use std::collections::BTreeSet;

use libp2p::Multiaddr;
use serde::Serialize;

use super::discovery::is_loopback;

/// Failed AutoNAT probes, with none succeeding since, after which a node with no address
/// confirmed counts as private. One: libp2p's AutoNAT v2 client tests each candidate address
/// once, and a node behind NAT often has a single candidate (its router's mapping of its
/// port); a later success, or a confirmed address, makes it public again.
pub const PRIVATE_AFTER_FAILURES: u32 = 1;

/// What the node knows of its reachability (`GET /status` → `reachability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Not known yet: no address confirmed, and not enough probes failed.
    #[default]
    Unknown,
    /// A non-loopback external address is confirmed: peers can dial this node.
    Public,
    /// Peers cannot dial this node: it listens on loopback only, or AutoNAT's probes of its
    /// addresses failed.
    Private,
}

impl Reachability {
    /// The name `/status` and the metrics show.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

/// The inputs, and the verdict.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    confirmed: BTreeSet<Multiaddr>,
    failures_since_success: u32,
    /// Probes of candidate addresses that succeeded, and that failed, since start.
    pub probes_ok: u64,
    /// See `probes_ok`.
    pub probes_failed: u64,
}

impl Tracker {
    /// The swarm confirmed (`true`) or withdrew an external address.
    pub fn external(&mut self, addr: Multiaddr, confirmed: bool) {
        if confirmed {
            self.confirmed.insert(addr);
        } else {
            self.confirmed.remove(&addr);
        }
    }

    /// An AutoNAT probe of one of this node's addresses succeeded or failed.
    pub fn probe(&mut self, ok: bool) {
        if ok {
            self.probes_ok += 1;
            self.failures_since_success = 0;
        } else {
            self.probes_failed += 1;
            self.failures_since_success = self.failures_since_success.saturating_add(1);
        }
    }

    /// Confirmed external addresses, loopback ones included.
    pub fn confirmed(&self) -> impl Iterator<Item = &Multiaddr> {
        self.confirmed.iter()
    }

    /// The verdict, for a node listening on `listen`.
    pub fn state(&self, listen: &[Multiaddr]) -> Reachability {
        // A relayed address (confirmed by the relay client when a relay accepts a
        // reservation) makes a node reachable through the relay, not dialable.
        if self
            .confirmed
            .iter()
            .any(|a| !is_loopback(a) && !crate::network::direct_only::is_relayed(a))
        {
            Reachability::Public
        } else if (listen
            .iter()
            .any(|a| !crate::network::direct_only::is_relayed(a))
            && listen
                .iter()
                .filter(|a| !crate::network::direct_only::is_relayed(a))
                .all(is_loopback))
            || self.failures_since_success >= PRIVATE_AFTER_FAILURES
        {
            Reachability::Private
        } else {
            Reachability::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn loopback_only_listeners_are_private_even_when_confirmed() {
        let mut t = Tracker::default();
        assert_eq!(t.state(&[]), Reachability::Unknown);
        let listen = [addr("/ip4/127.0.0.1/tcp/4001")];
        assert_eq!(t.state(&listen), Reachability::Private);
        t.external(addr("/ip4/127.0.0.1/tcp/4001"), true);
        assert_eq!(t.state(&listen), Reachability::Private);
    }

    #[test]
    fn a_confirmed_address_makes_public_and_losing_it_does_not_stay_public() {
        let mut t = Tracker::default();
        let listen = [
            addr("/ip4/0.0.0.0/tcp/4001"),
            addr("/ip4/10.0.0.2/tcp/4001"),
        ];
        assert_eq!(t.state(&listen), Reachability::Unknown);
        t.external(addr("/ip4/203.0.113.9/tcp/4001"), true);
        assert_eq!(t.state(&listen), Reachability::Public);
        t.external(addr("/ip4/203.0.113.9/tcp/4001"), false);
        assert_eq!(t.state(&listen), Reachability::Unknown);
        t.external(
            addr("/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWHFrmLWTTDD4NodngtRMEVYgxrsDHNK2KjVgXM12L6eGt/p2p-circuit"),
            true,
        );
        assert_eq!(
            t.state(&listen),
            Reachability::Unknown,
            "a relayed address is not dialable"
        );
    }

    #[test]
    fn failed_probes_make_private_until_one_succeeds() {
        let mut t = Tracker::default();
        let listen = [addr("/ip4/192.168.1.5/tcp/4001")];
        assert_eq!(t.state(&listen), Reachability::Unknown);
        for _ in 0..PRIVATE_AFTER_FAILURES {
            t.probe(false);
        }
        assert_eq!(t.state(&listen), Reachability::Private);
        t.probe(true);
        assert_eq!(t.state(&listen), Reachability::Unknown);
        assert_eq!(
            (t.probes_ok, t.probes_failed),
            (1, u64::from(PRIVATE_AFTER_FAILURES))
        );
    }
}
