//! The part every one of our protocol behaviours shares: a libp2p `NetworkBehaviour` that
//! wraps one `request_response::Behaviour`, handles its events itself, tracks which peers are
//! connected, runs its own timers, and emits its own events. A type implements
//! [`WrapsRequestResponse`] (its protocol logic) and [`crate::impl_wire_behaviour!`] writes the
//! `NetworkBehaviour` impl: connection handling is delegated to the wrapped behaviour, and
//! `poll` runs the timers, hands the wrapped behaviour's events to the logic, then yields the
//! logic's events. The pattern follows rust-libp2p's own protocols that wrap request-response
//! (e.g. `libp2p-rendezvous`'s client).
//!
//! Our protocols carry bulk data (chunks, averaging pieces) and run on direct connections
//! only: the node wraps these behaviours in [`DirectOnly`](crate::network::direct_only), so
//! "connected" here means "has a direct connection", and requests to a peer reachable only
//! through a relay wait in the wrapped behaviour's queue until hole punching gives one (or
//! `fail_requests_awaiting_connection`, which the macro adds, ends the wait).

use std::task::Context;

use libp2p::request_response::{self, Codec};
use libp2p::PeerId;

/// A protocol's logic around the request-response behaviour it wraps.
pub trait WrapsRequestResponse {
    /// The wire codec.
    type Codec: Codec + Clone + Send + 'static;
    /// What the behaviour emits.
    type Event: Send + 'static;

    /// The wrapped behaviour.
    fn inner(&mut self) -> &mut request_response::Behaviour<Self::Codec>;
    /// The first (direct) connection to `peer` came up.
    fn on_peer_connected(&mut self, peer: PeerId);
    /// The last (direct) connection to `peer` closed.
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
            type ConnectionHandler = <libp2p::request_response::Behaviour<
                <$ty as $crate::wire_behaviour::WrapsRequestResponse>::Codec,
            > as libp2p::swarm::NetworkBehaviour>::ConnectionHandler;
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
                use $crate::wire_behaviour::WrapsRequestResponse;
                self.inner().handle_established_inbound_connection(
                    connection_id,
                    peer,
                    local_addr,
                    remote_addr,
                )
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
                use $crate::wire_behaviour::WrapsRequestResponse;
                self.inner().handle_established_outbound_connection(
                    connection_id,
                    peer,
                    addr,
                    role_override,
                    port_use,
                )
            }

            fn on_swarm_event(&mut self, event: libp2p::swarm::FromSwarm<'_>) {
                use $crate::wire_behaviour::WrapsRequestResponse;
                match &event {
                    libp2p::swarm::FromSwarm::ConnectionEstablished(e)
                        if e.other_established == 0 =>
                    {
                        self.on_peer_connected(e.peer_id)
                    }
                    libp2p::swarm::FromSwarm::ConnectionClosed(e)
                        if e.remaining_established == 0 =>
                    {
                        self.on_peer_disconnected(e.peer_id)
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
                use $crate::wire_behaviour::WrapsRequestResponse;
                self.inner()
                    .on_connection_handler_event(peer, connection_id, event);
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
                            return Poll::Ready(other.map_out(|_| {
                                unreachable!("request-response events are handled above")
                            }))
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    };
}
