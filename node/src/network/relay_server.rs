//! The circuit-relay v2 server, kept off relayed connections.
//!
//! libp2p-relay 0.22's server gives relayed connections a `dummy` handler (it relays only
//! over direct ones) but still records them, and when its status changes
//! (`set_status`) it sends the new status to every recorded connection; the `Either`
//! handler of a relayed one then hits `unreachable!` and the node panics. A peer that reaches
//! a public node through a relay, before that node's reachability changes, could so crash it.
//! [`RelayServer`] passes the server every swarm event except the opening and closing of
//! relayed connections, so it never records them.

use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{relay, Multiaddr, PeerId};

/// [`relay::Behaviour`] that never hears of relayed connections (see the module).
pub struct RelayServer(relay::Behaviour);

impl RelayServer {
    /// Wraps `server`.
    pub fn new(server: relay::Behaviour) -> Self {
        Self(server)
    }

    /// See [`relay::Behaviour::set_status`].
    pub fn set_status(&mut self, status: Option<relay::Status>) {
        self.0.set_status(status)
    }
}

impl NetworkBehaviour for RelayServer {
    type ConnectionHandler = <relay::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::Event;

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
        self.0
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
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
        self.0.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match &event {
            FromSwarm::ConnectionEstablished(e) if e.endpoint.is_relayed() => {}
            FromSwarm::ConnectionClosed(e) if e.endpoint.is_relayed() => {}
            _ => self.0.on_swarm_event(event),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0
            .on_connection_handler_event(peer, connection_id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;
    use libp2p::swarm::NotifyHandler;

    use super::*;

    fn established(server: &mut RelayServer, peer: PeerId, id: usize, endpoint: &ConnectedPoint) {
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
    fn a_status_change_is_sent_to_direct_connections_only() {
        let local = PeerId::random();
        let mut server = RelayServer::new(relay::Behaviour::new(local, relay::Config::default()));
        server.set_status(Some(relay::Status::Disable));
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
        server.set_status(Some(relay::Status::Enable));
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
