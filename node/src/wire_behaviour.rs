//! The part every one of our protocol behaviours shares: a libp2p `NetworkBehaviour` that
//! wraps one `request_response::Behaviour`, handles its events itself, tracks which peers are
//! connected, runs its own timers, and emits its own events. A type implements
//! [`WrapsRequestResponse`] (its protocol logic) and [`crate::impl_wire_behaviour!`] writes the
//! `NetworkBehaviour` impl: connection handling is delegated to the wrapped behaviour, and
//! `poll` runs the timers, hands the wrapped behaviour's events to the logic, then yields the
//! logic's events. The pattern follows rust-libp2p's own protocols that wrap request-response
//! (e.g. `libp2p-rendezvous`'s client).
//!
//! **Direct connections only.** Our protocols carry bulk data (chunks, averaging pieces), which
//! must never cross a circuit relay: a relay is a volunteer's bandwidth, and circuit-relay v2
//! caps each circuit (128 KiB, 2 minutes by default) anyway. So a relayed connection gets a
//! [`dummy`](libp2p::swarm::dummy) handler (the remote's streams for our protocols are refused
//! on it), its events never reach the wrapped behaviour, and a peer reachable only through a
//! relay counts as not connected; it becomes connected when hole punching (DCUtR) or a dial
//! gives a direct connection. [`DirectConnections`] keeps the count.

use std::collections::{HashMap, HashSet};
use std::task::Context;

use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, Codec};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// Whether a connection on `addr` (the dialled address, or the local address of an inbound
/// connection) goes through a circuit relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The direct (not relayed) connections to each peer.
#[derive(Debug, Default)]
pub struct DirectConnections(HashMap<PeerId, HashSet<ConnectionId>>);

impl DirectConnections {
    /// Notes a new direct connection; `true` if it is the peer's first.
    pub fn opened(&mut self, peer: PeerId, connection: ConnectionId) -> bool {
        let set = self.0.entry(peer).or_default();
        set.insert(connection) && set.len() == 1
    }

    /// The direct connections to `peer` now.
    pub fn count(&self, peer: &PeerId) -> usize {
        self.0.get(peer).map_or(0, HashSet::len)
    }

    /// Notes a closed connection; `true` if it was the peer's last direct one.
    pub fn closed(&mut self, peer: PeerId, connection: ConnectionId) -> bool {
        let Some(set) = self.0.get_mut(&peer) else {
            return false;
        };
        let last = set.remove(&connection) && set.is_empty();
        if set.is_empty() {
            self.0.remove(&peer);
        }
        last
    }
}

/// A protocol's logic around the request-response behaviour it wraps.
pub trait WrapsRequestResponse {
    /// The wire codec.
    type Codec: Codec + Clone + Send + 'static;
    /// What the behaviour emits.
    type Event: Send + 'static;

    /// The wrapped behaviour.
    fn inner(&mut self) -> &mut request_response::Behaviour<Self::Codec>;
    /// The direct connections the macro counts for this behaviour.
    fn direct_connections(&mut self) -> &mut DirectConnections;
    /// The first direct connection to `peer` came up.
    fn on_peer_connected(&mut self, peer: PeerId);
    /// The last direct connection to `peer` closed.
    fn on_peer_disconnected(&mut self, peer: PeerId);
    /// An event of the wrapped behaviour.
    fn on_inner_event(
        &mut self,
        event: request_response::Event<
            <Self::Codec as Codec>::Request,
            <Self::Codec as Codec>::Response,
        >,
    );
    /// Runs whatever is due: timers, finished background work (registering `cx` to be woken).
    fn poll_due(&mut self, cx: &mut Context<'_>);
    /// The next event to emit, if any.
    fn next_event(&mut self) -> Option<Self::Event>;
}

/// Implements `NetworkBehaviour` for a type that implements [`WrapsRequestResponse`].
#[macro_export]
macro_rules! impl_wire_behaviour {
    ($ty:ty) => {
        impl $ty {
            /// Fails the requests to `peer` that wait for a connection to be sent on (the
            /// wrapped behaviour queues them while the peer has no direct connection), as a
            /// failed dial: call it when `peer` stays reachable through relays only (hole
            /// punching failed), so they fail now instead of waiting for ever.
            pub fn fail_requests_awaiting_connection(&mut self, peer: libp2p::PeerId) {
                use libp2p::swarm::{
                    ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour,
                };
                use $crate::wire_behaviour::WrapsRequestResponse;
                let error = DialError::Aborted;
                self.inner()
                    .on_swarm_event(FromSwarm::DialFailure(DialFailure {
                        peer_id: Some(peer),
                        error: &error,
                        // Not a real connection: request-response reports it with the failures.
                        connection_id: ConnectionId::new_unchecked(usize::MAX),
                    }));
            }
        }

        impl libp2p::swarm::NetworkBehaviour for $ty {
            type ConnectionHandler = either::Either<
                <libp2p::request_response::Behaviour<
                    <$ty as $crate::wire_behaviour::WrapsRequestResponse>::Codec,
                > as libp2p::swarm::NetworkBehaviour>::ConnectionHandler,
                libp2p::swarm::dummy::ConnectionHandler,
            >;
            type ToSwarm = <$ty as $crate::wire_behaviour::WrapsRequestResponse>::Event;

            fn handle_pending_inbound_connection(
                &mut self,
                connection_id: libp2p::swarm::ConnectionId,
                local_addr: &libp2p::Multiaddr,
                remote_addr: &libp2p::Multiaddr,
            ) -> std::result::Result<(), libp2p::swarm::ConnectionDenied> {
                use $crate::wire_behaviour::WrapsRequestResponse;
                self.inner().handle_pending_inbound_connection(
                    connection_id,
                    local_addr,
                    remote_addr,
                )
            }

            fn handle_established_inbound_connection(
                &mut self,
                connection_id: libp2p::swarm::ConnectionId,
                peer: libp2p::PeerId,
                local_addr: &libp2p::Multiaddr,
                remote_addr: &libp2p::Multiaddr,
            ) -> std::result::Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied>
            {
                use either::Either;
                use $crate::wire_behaviour::{is_relayed, WrapsRequestResponse};
                if is_relayed(local_addr) {
                    return Ok(Either::Right(libp2p::swarm::dummy::ConnectionHandler));
                }
                self.inner()
                    .handle_established_inbound_connection(
                        connection_id,
                        peer,
                        local_addr,
                        remote_addr,
                    )
                    .map(Either::Left)
            }

            fn handle_pending_outbound_connection(
                &mut self,
                connection_id: libp2p::swarm::ConnectionId,
                maybe_peer: Option<libp2p::PeerId>,
                addresses: &[libp2p::Multiaddr],
                effective_role: libp2p::core::Endpoint,
            ) -> std::result::Result<Vec<libp2p::Multiaddr>, libp2p::swarm::ConnectionDenied> {
                use $crate::wire_behaviour::WrapsRequestResponse;
                self.inner().handle_pending_outbound_connection(
                    connection_id,
                    maybe_peer,
                    addresses,
                    effective_role,
                )
            }

            fn handle_established_outbound_connection(
                &mut self,
                connection_id: libp2p::swarm::ConnectionId,
                peer: libp2p::PeerId,
                addr: &libp2p::Multiaddr,
                role_override: libp2p::core::Endpoint,
                port_use: libp2p::core::transport::PortUse,
            ) -> std::result::Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied>
            {
                use either::Either;
                use $crate::wire_behaviour::{is_relayed, WrapsRequestResponse};
                if is_relayed(addr) {
                    return Ok(Either::Right(libp2p::swarm::dummy::ConnectionHandler));
                }
                self.inner()
                    .handle_established_outbound_connection(
                        connection_id,
                        peer,
                        addr,
                        role_override,
                        port_use,
                    )
                    .map(Either::Left)
            }

            fn on_swarm_event(&mut self, event: libp2p::swarm::FromSwarm<'_>) {
                use libp2p::swarm::FromSwarm;
                use $crate::wire_behaviour::WrapsRequestResponse;
                match &event {
                    // Relayed connections have dummy handlers: the wrapped behaviour never
                    // hears of them.
                    FromSwarm::ConnectionEstablished(e) if e.endpoint.is_relayed() => return,
                    FromSwarm::ConnectionClosed(e) if e.endpoint.is_relayed() => return,
                    FromSwarm::AddressChange(e) if e.old.is_relayed() => return,
                    FromSwarm::ConnectionEstablished(e)
                        if self.direct_connections().opened(e.peer_id, e.connection_id) =>
                    {
                        self.on_peer_connected(e.peer_id)
                    }
                    FromSwarm::ConnectionClosed(e) => {
                        let last = self.direct_connections().closed(e.peer_id, e.connection_id);
                        // The wrapped behaviour checks `remaining_established` against the
                        // connections it knows: count the direct ones only.
                        let remaining = self.direct_connections().count(&e.peer_id);
                        self.inner().on_swarm_event(FromSwarm::ConnectionClosed(
                            libp2p::swarm::ConnectionClosed {
                                remaining_established: remaining,
                                ..*e
                            },
                        ));
                        if last {
                            self.on_peer_disconnected(e.peer_id)
                        }
                        return;
                    }
                    _ => {}
                }
                self.inner().on_swarm_event(event);
            }

            fn on_connection_handler_event(
                &mut self,
                peer: libp2p::PeerId,
                connection_id: libp2p::swarm::ConnectionId,
                event: libp2p::swarm::THandlerOutEvent<Self>,
            ) {
                use either::Either;
                use $crate::wire_behaviour::WrapsRequestResponse;
                match event {
                    Either::Left(event) => {
                        self.inner()
                            .on_connection_handler_event(peer, connection_id, event)
                    }
                    Either::Right(never) => match never {},
                }
            }

            fn poll(
                &mut self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<
                libp2p::swarm::ToSwarm<Self::ToSwarm, libp2p::swarm::THandlerInEvent<Self>>,
            > {
                use std::task::Poll;

                use libp2p::swarm::ToSwarm;
                use $crate::wire_behaviour::WrapsRequestResponse;
                self.poll_due(cx);
                loop {
                    if let Some(event) = self.next_event() {
                        return Poll::Ready(ToSwarm::GenerateEvent(event));
                    }
                    match self.inner().poll(cx) {
                        Poll::Ready(ToSwarm::GenerateEvent(event)) => self.on_inner_event(event),
                        // Dials and handler notifications pass through unchanged; the wrapped
                        // behaviour's own events were handled in the arm above.
                        Poll::Ready(other) => {
                            return Poll::Ready(
                                other
                                    .map_out(|_| {
                                        unreachable!("request-response events are handled above")
                                    })
                                    .map_in(either::Either::Left),
                            )
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_are_relayed_and_direct_ones_are_not() {
        let relayed: Multiaddr = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWHFrmLWTTDD4NodngtRMEVYgxrsDHNK2KjVgXM12L6eGt/p2p-circuit"
            .parse()
            .expect("multiaddr");
        assert!(is_relayed(&relayed));
        assert!(!is_relayed(
            &"/ip4/198.51.100.1/udp/4001/quic-v1"
                .parse()
                .expect("multiaddr")
        ));
    }

    #[test]
    fn the_first_and_last_direct_connection_of_a_peer_are_reported_once() {
        let mut direct = DirectConnections::default();
        let peer = PeerId::random();
        let (a, b) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        assert!(direct.opened(peer, a));
        assert!(!direct.opened(peer, b));
        assert!(
            !direct.opened(peer, a),
            "a repeated event is not a new first"
        );
        assert!(!direct.closed(peer, a));
        assert!(
            !direct.closed(PeerId::random(), b),
            "an unknown peer was never connected"
        );
        assert_eq!(direct.count(&peer), 1);
        assert!(direct.closed(peer, b));
        assert!(!direct.closed(peer, b), "closing twice reports once");
        assert_eq!(direct.count(&peer), 0);
    }
}
