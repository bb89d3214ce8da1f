//! A behaviour that runs on direct connections only: relayed connections get a `dummy`
//! handler (the protocol's streams are refused on them), their opening and closing never
//! reach the wrapped behaviour, and the connection counts it is told
//! (`other_established`, `remaining_established`) count direct connections only, so a peer
//! reachable only through a relay is not connected as far as it knows.
//!
//! Used for the behaviours whose work has no business on a relay:
//! - **our protocols** (models: chunks; averaging: pseudo-gradients), which carry bulk data:
//!   a relay is a volunteer's bandwidth, and circuit-relay v2 caps each circuit anyway
//!   (128 KiB, 2 minutes by default). A peer behind NAT becomes connected for them when hole
//!   punching (DCUtR) gives a direct connection; see [`crate::wire_behaviour`].
//! - the **circuit-relay server**: libp2p-relay 0.22 gives relayed connections a dummy handler
//!   itself but still records them, and when its status changes (`set_status`) it sends the
//!   new status to every recorded connection; the `Either` handler of a relayed one then hits
//!   `unreachable!` and the node panics. A peer that reaches a public node through a relay
//!   before that node's reachability changes could so crash it.
//! - **AutoNAT v2**, both sides: over a relay the server sees the client at `/p2p/ID`, never
//!   the address under test, so it demands 30–100 KB of padding (its amplification guard),
//!   which would eat a circuit's 128 KiB; and a dial-back result says nothing of the relayed
//!   path anyway.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use either::Either;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished};
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Whether a connection on `addr` (the dialled address, or the local address of an inbound
/// connection) goes through a circuit relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// `B` on direct connections only (see the module); dereferences to `B`.
pub struct DirectOnly<B> {
    inner: B,
    /// The direct connections to each peer.
    direct: HashMap<PeerId, HashSet<ConnectionId>>,
}

impl<B> DirectOnly<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            direct: HashMap::new(),
        }
    }
}

impl<B> Deref for DirectOnly<B> {
    type Target = B;

    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> DerefMut for DirectOnly<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for DirectOnly<B> {
    type ConnectionHandler = Either<THandler<B>, dummy::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
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
        self.inner
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
        self.inner.handle_pending_outbound_connection(
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
        self.inner
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
        match event {
            FromSwarm::ConnectionEstablished(e) if e.endpoint.is_relayed() => {}
            FromSwarm::ConnectionClosed(e) if e.endpoint.is_relayed() => {}
            FromSwarm::AddressChange(e) if e.old.is_relayed() => {}
            FromSwarm::ConnectionEstablished(e) => {
                let set = self.direct.entry(e.peer_id).or_default();
                set.insert(e.connection_id);
                let other_established = set.len() - 1;
                self.inner.on_swarm_event(FromSwarm::ConnectionEstablished(
                    ConnectionEstablished {
                        other_established,
                        ..e
                    },
                ));
            }
            FromSwarm::ConnectionClosed(e) => {
                let remaining_established = match self.direct.get_mut(&e.peer_id) {
                    Some(set) => {
                        set.remove(&e.connection_id);
                        let left = set.len();
                        if left == 0 {
                            self.direct.remove(&e.peer_id);
                        }
                        left
                    }
                    None => 0,
                };
                self.inner
                    .on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                        remaining_established,
                        ..e
                    }));
            }
            _ => self.inner.on_swarm_event(event),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(event) => {
                self.inner
                    .on_connection_handler_event(peer, connection_id, event)
            }
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner
            .poll(cx)
            .map(|action| action.map_in(Either::Left))
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use libp2p::core::ConnectedPoint;
    use libp2p::relay;
    use libp2p::swarm::NotifyHandler;

    use super::*;

    fn established<B: NetworkBehaviour>(
        wrapped: &mut DirectOnly<B>,
        peer: PeerId,
        id: usize,
        endpoint: &ConnectedPoint,
        other_established: usize,
    ) {
        wrapped.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(id),
            endpoint,
            failed_addresses: &[],
            other_established,
        }));
    }

    fn closed<B: NetworkBehaviour>(
        wrapped: &mut DirectOnly<B>,
        peer: PeerId,
        id: usize,
        endpoint: &ConnectedPoint,
        remaining_established: usize,
    ) {
        wrapped.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(id),
            endpoint,
            cause: None,
            remaining_established,
        }));
    }

    /// Records what the wrapped behaviour is told.
    #[derive(Default)]
    struct Recorder(Vec<(ConnectionId, &'static str, usize)>);

    impl NetworkBehaviour for Recorder {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = std::convert::Infallible;

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
            match event {
                FromSwarm::ConnectionEstablished(e) => {
                    self.0.push((e.connection_id, "open", e.other_established))
                }
                FromSwarm::ConnectionClosed(e) => {
                    self.0
                        .push((e.connection_id, "close", e.remaining_established))
                }
                _ => {}
            }
        }

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            event: THandlerOutEvent<Self>,
        ) {
            match event {}
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
            Poll::Pending
        }
    }

    #[test]
    fn relayed_connections_are_hidden_and_counts_are_of_direct_ones() {
        let peer = PeerId::random();
        let mut wrapped = DirectOnly::new(Recorder::default());
        let relayed = ConnectedPoint::Listener {
            local_addr: format!(
                "/ip4/10.0.0.9/tcp/4001/p2p/{}/p2p-circuit",
                PeerId::random()
            )
            .parse()
            .expect("multiaddr"),
            send_back_addr: format!("/p2p/{peer}").parse().expect("multiaddr"),
        };
        assert!(relayed.is_relayed());
        let direct_addr: Multiaddr = "/ip4/10.0.0.1/udp/4001/quic-v1".parse().expect("multiaddr");
        assert!(!is_relayed(&direct_addr));
        let direct = ConnectedPoint::Listener {
            local_addr: "/ip4/10.0.0.1/tcp/4001".parse().expect("multiaddr"),
            send_back_addr: "/ip4/10.0.0.2/tcp/5555".parse().expect("multiaddr"),
        };
        established(&mut wrapped, peer, 1, &relayed, 0);
        established(&mut wrapped, peer, 2, &direct, 1);
        established(&mut wrapped, peer, 3, &direct, 2);
        closed(&mut wrapped, peer, 1, &relayed, 2);
        closed(&mut wrapped, peer, 2, &direct, 1);
        closed(&mut wrapped, peer, 3, &direct, 0);
        let id = ConnectionId::new_unchecked;
        assert_eq!(
            wrapped.0,
            vec![
                (id(2), "open", 0),
                (id(3), "open", 1),
                (id(2), "close", 1),
                (id(3), "close", 0)
            ],
            "the relayed connection is never seen; the swarm's counts included it"
        );
    }

    /// Without the wrapper, libp2p-relay 0.22 notifies the relayed connection too, whose
    /// dummy handler panics on it.
    #[test]
    fn a_relay_server_status_change_is_sent_to_direct_connections_only() {
        let local = PeerId::random();
        let mut server = DirectOnly::new(relay::Behaviour::new(local, relay::Config::default()));
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
        established(&mut server, direct_peer, 1, &direct, 0);
        established(&mut server, relayed_peer, 2, &relayed, 0);
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
