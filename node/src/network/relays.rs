//! Circuit relays and hole punching: which relays a node behind NAT reserves slots on, and the
//! counts `/status` and the metrics show. Pure logic; the event loop feeds it and carries out
//! what it decides (listening on relay circuits, closing them).
//!
//! The design is libp2p's (circuit relay v2, <https://github.com/libp2p/specs/blob/master/relay/circuit-v2.md>;
//! DCUtR, <https://github.com/libp2p/specs/blob/master/relay/DCUtR.md>): a private node keeps
//! [`WANTED_RESERVATIONS`] reservations on publicly reachable peers that speak the relay's hop
//! protocol, and advertises the relayed addresses it gets. A peer that dials such an address
//! gets a relayed connection, over which DCUtR coordinates a simultaneous dial (hole punch)
//! that gives a direct one. Our protocols only run on direct connections (see
//! [`crate::wire_behaviour`]): a relay carries control traffic only.
//!
//! **Relay server limits** ([`server_config`], libp2p's defaults, which go-libp2p shares):
//! at most 128 reservations in total and 4 per peer, each for 1 hour; at most 16 circuits in
//! total and 4 per peer, each closed after 2 minutes or 128 KiB relayed (both directions
//! together); new reservations and new circuits rate-limited by token buckets of 30 per peer
//! (one back every 2 minutes) and 60 per IP (one back every minute). A node relays only while
//! it is public (AutoNAT confirmed an address, or `--kad-mode server` declares it reachable),
//! and never with `--no-relay-server`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{relay, Multiaddr, PeerId};
use serde::Serialize;

use super::reachability::Reachability;

/// Reservations a private node keeps (on distinct relays).
pub const WANTED_RESERVATIONS: usize = 2;
/// While reachability is still unknown this long after start, the node reserves anyway: a
/// node that nobody probes (no AutoNAT server among its peers) would otherwise stay
/// unreachable.
pub const RESERVE_WHEN_UNKNOWN_AFTER: Duration = Duration::from_secs(30);
/// A relay whose reservation failed or closed is not asked again for this long.
pub const RELAY_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Relay candidates remembered at most (the connected peers that speak the hop protocol).
pub const MAX_RELAY_CANDIDATES: usize = 64;

/// The relay server's limits (documented in the module's header).
pub fn server_config() -> relay::Config {
    relay::Config::default()
}

/// What a node knows of relays, and decides.
#[derive(Debug, Default)]
pub struct Relays {
    /// Connected peers that speak the hop protocol, with an address to reach them.
    candidates: BTreeMap<PeerId, Multiaddr>,
    /// Circuit listeners: on which relay, and whether the relay accepted.
    reservations: HashMap<ListenerId, Reservation>,
    /// Relays whose reservation failed or closed, and when.
    failed: HashMap<PeerId, Instant>,
    /// Hole punching so far.
    pub hole_punch: HolePunchCounts,
    /// Relay-server work so far.
    pub served: RelayServed,
}

#[derive(Debug, Clone)]
struct Reservation {
    relay: PeerId,
    accepted: bool,
}

/// DCUtR hole punches: attempts, successes by transport, failures by reason.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HolePunchCounts {
    /// Successes plus reported failures.
    pub attempts: u64,
    /// Direct connections made, by transport (`tcp`, `quic`, `other`).
    pub succeeded: BTreeMap<String, u64>,
    /// Attempts given up, by reason (`attempts_exceeded`, `inbound_stream`,
    /// `outbound_stream`, `other`). Counted where libp2p's DCUtR reports them: on the side
    /// that coordinates the punch (the one that received the relayed connection), and
    /// protocol errors on either side; the other side's dials fail silently (its waiting
    /// requests fail after 30 s relayed-only).
    pub failed: BTreeMap<String, u64>,
}

/// What the relay server did for others.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RelayServed {
    /// Reservations accepted (renewals included).
    pub reservations_accepted: u64,
    /// Reservations and circuits refused (limits reached). While the node does not relay,
    /// the hop protocol itself is refused and nothing is counted.
    pub requests_denied: u64,
    /// Circuits opened between two peers.
    pub circuits: u64,
}

/// `GET /status` → `relay`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RelayStatus {
    /// Whether the relay server is switched on (`false` with `--no-relay-server`).
    pub server_enabled: bool,
    /// Whether this node relays for others now (public, and the server switched on).
    pub serving: bool,
    /// Relays holding a reservation for this node.
    pub reservations: Vec<String>,
    /// Relays asked, not answered yet.
    pub reservations_pending: usize,
    /// Connected peers able to relay.
    pub candidates: usize,
    /// See [`RelayServed`].
    pub served: RelayServed,
    /// See [`HolePunchCounts`].
    pub hole_punch: HolePunchCounts,
}

/// The address to listen on to reserve a slot on `relay` reached at `addr`:
/// `addr/p2p/relay/p2p-circuit`.
pub fn circuit_listen_addr(relay: PeerId, addr: &Multiaddr) -> Multiaddr {
    let mut circuit: Multiaddr = addr
        .iter()
        .take_while(|p| !matches!(p, Protocol::P2p(_) | Protocol::P2pCircuit))
        .collect();
    circuit.push(Protocol::P2p(relay));
    circuit.push(Protocol::P2pCircuit);
    circuit
}

/// The transports [`transport_of`] names.
pub const HOLE_PUNCH_TRANSPORTS: &[&str] = &["tcp", "quic", "other"];
/// The reasons [`hole_punch_failure_reason`] names.
pub const HOLE_PUNCH_FAILURE_REASONS: &[&str] = &[
    "attempts_exceeded",
    "inbound_stream",
    "outbound_stream",
    "other",
];

/// The reason class of a DCUtR failure, from its message (libp2p keeps the kind private).
pub fn hole_punch_failure_reason(message: &str) -> &'static str {
    if message.contains("Giving up") {
        "attempts_exceeded"
    } else if message.contains("Inbound") {
        "inbound_stream"
    } else if message.contains("Outbound") {
        "outbound_stream"
    } else {
        "other"
    }
}

/// The transport of a direct connection on `addr`.
pub fn transport_of(addr: &Multiaddr) -> &'static str {
    if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
        "quic"
    } else if addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
        "tcp"
    } else {
        "other"
    }
}

impl Relays {
    /// Identify told whether `peer` speaks the hop protocol; `addr`: the address this node
    /// dialled it on (`None` for an identify over an inbound or relayed connection, which
    /// keeps what is known).
    pub fn candidate(&mut self, peer: PeerId, addr: Option<Multiaddr>, speaks_hop: bool) {
        if !speaks_hop {
            self.candidates.remove(&peer);
        } else if let Some(addr) = addr {
            if self.candidates.len() < MAX_RELAY_CANDIDATES || self.candidates.contains_key(&peer) {
                self.candidates.insert(peer, addr);
            }
        }
    }

    /// `peer` disconnected: no longer a candidate.
    pub fn forget(&mut self, peer: &PeerId) {
        self.candidates.remove(peer);
    }

    /// Whether the node should hold reservations, given its reachability and how long it
    /// has been running.
    pub fn wants_reservations(reachability: Reachability, running: Duration) -> bool {
        match reachability {
            Reachability::Public => false,
            Reachability::Private => true,
            Reachability::Unknown => running >= RESERVE_WHEN_UNKNOWN_AFTER,
        }
    }

    /// The relays to reserve on now (with the circuit address to listen on), chosen at
    /// random (so that no peer id, ground low, becomes everyone's relay) among candidates not
    /// reserved on and not failed recently, up to [`WANTED_RESERVATIONS`] reservations in all.
    pub fn to_reserve(
        &mut self,
        wanted: bool,
        now: Instant,
        rng: &mut impl rand::Rng,
    ) -> Vec<(PeerId, Multiaddr)> {
        use rand::seq::IteratorRandom;
        self.failed
            .retain(|_, at| now.duration_since(*at) < RELAY_RETRY_AFTER);
        if !wanted {
            return Vec::new();
        }
        let missing = WANTED_RESERVATIONS.saturating_sub(self.reservations.len());
        let reserved: Vec<PeerId> = self.reservations.values().map(|r| r.relay).collect();
        self.candidates
            .iter()
            .filter(|(peer, _)| !reserved.contains(peer) && !self.failed.contains_key(peer))
            .choose_multiple(rng, missing)
            .into_iter()
            .map(|(peer, addr)| (*peer, circuit_listen_addr(*peer, addr)))
            .collect()
    }

    /// A circuit listener on `relay` was opened.
    pub fn reserving(&mut self, listener: ListenerId, relay: PeerId) {
        self.reservations.insert(
            listener,
            Reservation {
                relay,
                accepted: false,
            },
        );
    }

    /// `relay` accepted (or renewed) this node's reservation.
    pub fn accepted(&mut self, relay: PeerId) {
        for r in self.reservations.values_mut() {
            if r.relay == relay {
                r.accepted = true;
            }
        }
        self.failed.remove(&relay);
    }

    /// A listener closed; if it was a circuit listener, its relay is not asked again for a
    /// while. Returns the relay.
    pub fn closed(&mut self, listener: ListenerId, now: Instant) -> Option<PeerId> {
        let r = self.reservations.remove(&listener)?;
        self.failed.insert(r.relay, now);
        Some(r.relay)
    }

    /// When reservations are no longer wanted (the node became public): forgets them and
    /// returns their relays, which the event loop disconnects from. Closing the circuit
    /// listeners instead would be unsafe: libp2p-relay 0.22 panics when a relay answers a
    /// reservation request whose listener is gone.
    pub fn release(&mut self, wanted: bool) -> Vec<PeerId> {
        if wanted {
            return Vec::new();
        }
        let mut relays: Vec<PeerId> = self.reservations.drain().map(|(_, r)| r.relay).collect();
        relays.sort();
        relays.dedup();
        relays
    }

    /// Counts a hole punch: `Ok(transport)` of the direct connection, or `Err(reason)`.
    pub fn hole_punched(&mut self, result: Result<&str, &str>) {
        self.hole_punch.attempts += 1;
        let (map, key) = match result {
            Ok(transport) => (&mut self.hole_punch.succeeded, transport),
            Err(reason) => (&mut self.hole_punch.failed, reason),
        };
        *map.entry(key.to_string()).or_default() += 1;
    }

    /// Counts what the relay server reported.
    pub fn on_server_event(&mut self, event: &relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted { .. } => self.served.reservations_accepted += 1,
            relay::Event::ReservationReqDenied { .. } | relay::Event::CircuitReqDenied { .. } => {
                self.served.requests_denied += 1
            }
            relay::Event::CircuitReqAccepted { .. } => self.served.circuits += 1,
            _ => {}
        }
    }

    /// The `/status` view; `server_enabled`: no `--no-relay-server`; `serving`: whether the
    /// relay server relays now.
    pub fn status(&self, server_enabled: bool, serving: bool) -> RelayStatus {
        let mut reservations: Vec<String> = self
            .reservations
            .values()
            .filter(|r| r.accepted)
            .map(|r| r.relay.to_string())
            .collect();
        reservations.sort();
        RelayStatus {
            server_enabled,
            serving,
            reservations,
            reservations_pending: self.reservations.values().filter(|r| !r.accepted).count(),
            candidates: self.candidates.len(),
            served: self.served,
            hole_punch: self.hole_punch.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn the_circuit_address_names_the_relay_after_its_transport_address() {
        let relay = PeerId::random();
        let other = PeerId::random();
        let circuit = circuit_listen_addr(
            relay,
            &addr(&format!("/ip4/198.51.100.1/tcp/4001/p2p/{other}")),
        );
        assert_eq!(
            circuit,
            addr(&format!(
                "/ip4/198.51.100.1/tcp/4001/p2p/{relay}/p2p-circuit"
            ))
        );
        assert!(crate::network::direct_only::is_relayed(&circuit));
    }

    #[test]
    fn relays_are_chosen_at_random_not_by_lowest_peer_id() {
        let mut relays = Relays::default();
        for i in 0..20 {
            let a = addr(&format!("/ip4/198.51.100.{i}/tcp/1"));
            relays.candidate(PeerId::random(), Some(a), true);
        }
        let lowest: Vec<PeerId> = relays.candidates.keys().take(2).copied().collect();
        let rng = &mut rand::rngs::StdRng::seed_from_u64(1);
        let picks: Vec<Vec<PeerId>> = (0..8)
            .map(|_| {
                let chosen = relays.to_reserve(true, Instant::now(), rng);
                let mut p: Vec<PeerId> = chosen.into_iter().map(|(p, _)| p).collect();
                p.sort();
                p
            })
            .collect();
        assert!(picks.iter().all(|p| p.len() == 2));
        assert!(picks.iter().any(|p| *p != lowest), "{picks:?}");
    }

    #[test]
    fn a_private_node_reserves_on_two_relays_and_retries_a_failed_one_later() {
        let mut relays = Relays::default();
        let rng = &mut rand::rngs::StdRng::seed_from_u64(7);
        let now = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        relays.candidate(a, Some(addr("/ip4/198.51.100.1/tcp/1")), true);
        relays.candidate(b, Some(addr("/ip4/198.51.100.2/tcp/1")), true);
        relays.candidate(c, Some(addr("/ip4/198.51.100.3/tcp/1")), false);
        let public = relays.to_reserve(false, now, rng);
        assert!(public.is_empty(), "public nodes reserve nothing");
        let chosen = relays.to_reserve(true, now, rng);
        assert_eq!(chosen.len(), 2);
        let not_c = chosen.iter().all(|(p, _)| *p != c);
        assert!(not_c, "c does not speak the hop protocol");
        let (l1, l2) = (ListenerId::next(), ListenerId::next());
        relays.reserving(l1, chosen[0].0);
        relays.reserving(l2, chosen[1].0);
        assert!(
            relays.to_reserve(true, now, rng).is_empty(),
            "two are enough"
        );
        relays.accepted(chosen[0].0);
        let held = vec![chosen[0].0.to_string()];
        assert_eq!(relays.status(true, false).reservations, held);
        assert_eq!(relays.status(true, false).reservations_pending, 1);
        assert_eq!(relays.closed(l2, now), Some(chosen[1].0));
        let waiting = relays.to_reserve(true, now, rng);
        assert!(waiting.is_empty(), "the failed relay waits");
        let later = now + RELAY_RETRY_AFTER;
        assert_eq!(relays.to_reserve(true, later, rng), vec![chosen[1].clone()]);
        assert!(relays.release(true).is_empty());
        assert_eq!(relays.release(false), vec![chosen[0].0]);
        let closed = relays.closed(l1, later);
        assert_eq!(closed, None, "a released reservation is not a failure");
        assert!(relays.status(true, false).reservations.is_empty());
    }

    #[test]
    fn reservations_wait_for_reachability_unless_it_stays_unknown() {
        assert!(!Relays::wants_reservations(
            Reachability::Public,
            Duration::from_secs(600)
        ));
        assert!(Relays::wants_reservations(
            Reachability::Private,
            Duration::ZERO
        ));
        assert!(!Relays::wants_reservations(
            Reachability::Unknown,
            Duration::from_secs(5)
        ));
        assert!(Relays::wants_reservations(
            Reachability::Unknown,
            RESERVE_WHEN_UNKNOWN_AFTER
        ));
    }

    #[test]
    fn hole_punches_are_counted_by_transport_and_reason() {
        let mut relays = Relays::default();
        relays.hole_punched(Ok(transport_of(&addr("/ip4/198.51.100.1/udp/1/quic-v1"))));
        relays.hole_punched(Ok(transport_of(&addr("/ip4/198.51.100.1/tcp/1"))));
        relays.hole_punched(Err(hole_punch_failure_reason(
            "Failed to hole-punch connection: Giving up after 3 dial attempts",
        )));
        let counts = &relays.hole_punch;
        assert_eq!(counts.attempts, 3);
        assert_eq!(counts.succeeded.get("quic"), Some(&1));
        assert_eq!(counts.succeeded.get("tcp"), Some(&1));
        assert_eq!(counts.failed.get("attempts_exceeded"), Some(&1));
    }

    #[test]
    fn candidates_are_bounded_and_forgotten() {
        let mut relays = Relays::default();
        for i in 0..MAX_RELAY_CANDIDATES + 10 {
            let a = addr(&format!("/ip4/198.51.100.1/tcp/{i}"));
            relays.candidate(PeerId::random(), Some(a), true);
        }
        assert_eq!(relays.status(true, false).candidates, MAX_RELAY_CANDIDATES);
        let known = *relays.candidates.keys().next().expect("one");
        relays.candidate(known, None, true);
        let kept = relays.candidates.contains_key(&known);
        assert!(kept, "an identify over an inbound connection keeps it");
        relays.candidate(known, None, false);
        assert!(
            !relays.candidates.contains_key(&known),
            "no hop protocol: gone"
        );
        let other = *relays.candidates.keys().next().expect("one");
        relays.forget(&other);
        assert_eq!(
            relays.status(true, false).candidates,
            MAX_RELAY_CANDIDATES - 2
        );
    }
}
