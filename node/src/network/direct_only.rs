//! A behaviour that runs on direct connections only: relayed connections get a `dummy`
//! handler (the protocol's streams are refused on them) and their opening and closing never
//! reach the wrapped behaviour.
//!
//! Used for two libp2p behaviours whose work has no business on a relay:
//! - the **circuit-relay server**: libp2p-relay 0.22 gives relayed connections a dummy handler
//!   itself but still records them, and when its status changes (`set_status`) it sends the
//!   new status to every recorded connection; the `Either` handler of a relayed one then hits
//!   `unreachable!` and the node panics. A peer that reaches a public node through a relay
//!   before that node's reachability changes could so crash it.
//! - **AutoNAT v2**, both sides: over a relay the server sees the client at `/p2p/ID`, never
//!   the address under test, so it demands 30–100 KB of padding (its amplification guard),
//!   which would eat a circuit's 128 KiB; and a dial-back result says nothing of the relayed
//!   path anyway.

use std::task::{Context, Poll};

use either::Either;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use crate::wire_behaviour::is_relayed;

/// `B` on direct connections only (see the module).
pub struct DirectOnly<B>(pub B);

impl<B: NetworkBehaviour> NetworkBehaviour for DirectOnly<B> {
    type ConnectionHandler = Either<THandler<B>, dummy::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(local_addr) {
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        self.0
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
            .map(Either::Left)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(addr) {
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        self.0
            .handle_established_outbound_connection(
                connection_id,
                peer,
                addr,
                role_override,
                port_use,
            )
            .map(Either::Left)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match &event {
            FromSwarm::ConnectionEstablished(e) if e.endpoint.is_relayed() => {}
            FromSwarm::ConnectionClosed(e) if e.endpoint.is_relayed() => {}
            FromSwarm::AddressChange(e) if e.old.is_relayed() => {}
            _ => self.0.on_swarm_event(event),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(event) => self
                .0
                .on_connection_handler_event(peer, connection_id, event),
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx).map(|action| action.map_in(Either::Left))
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;
    use libp2p::swarm::NotifyHandler;

    use libp2p::relay;

    use super::*;

    fn established(
        server: &mut DirectOnly<relay::Behaviour>,
        peer: PeerId,
        id: usize,
        endpoint: &ConnectedPoint,
    ) {
        server.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(id),
            endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
    }

    /// Without the wrapper, libp2p-relay 0.22 notifies the relayed connection too, whose
    /// dummy handler panics on it.
    #[test]
    fn a_relay_server_status_change_is_sent_to_direct_connections_only() {
        let local = PeerId::random();
        let mut server = DirectOnly(relay::Behaviour::new(local, relay::Config::default()));
        server.0.set_status(Some(relay::Status::Disable));
        let (direct_peer, relayed_peer) = (PeerId::random(), PeerId::random());
        let direct = ConnectedPoint::Listener {
            local_addr: "/ip4/10.0.0.1/tcp/4001".parse().expect("multiaddr"),
            send_back_addr: "/ip4/10.0.0.2/tcp/5555".parse().expect("multiaddr"),
        };
        let relayed = ConnectedPoint::Listener {
            local_addr: format!(
                "/ip4/10.0.0.9/tcp/4001/p2p/{}/p2p-circuit",
                PeerId::random()
            )
            .parse()
            .expect("multiaddr"),
            send_back_addr: format!("/p2p/{relayed_peer}").parse().expect("multiaddr"),
        };
        established(&mut server, direct_peer, 1, &direct);
        established(&mut server, relayed_peer, 2, &relayed);
        server.0.set_status(Some(relay::Status::Enable));
        let mut cx = Context::from_waker(Waker::noop());
        let mut notified = Vec::new();
        while let Poll::Ready(action) = server.poll(&mut cx) {
            if let ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(id),
                ..
            } = action
            {
                notified.push((peer_id, id));
            }
        }
        assert_eq!(
            notified,
            vec![(direct_peer, ConnectionId::new_unchecked(1))]
        );
    }
}
