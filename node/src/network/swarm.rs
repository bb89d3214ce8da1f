//! Building the libp2p [`Swarm`]: TCP (Noise + yamux, [`TCP_TIMEOUT`]) and QUIC v1
//! transports, circuits through relays, DNS, the
//! node's [`Behaviour`], and the listeners. In a private network (a swarm key) every TCP
//! connection is first wrapped in the pre-shared key's encryption (libp2p `pnet`), and QUIC,
//! which cannot carry it, is off.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::transport::{ListenerId, TransportError};
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{noise, tcp, yamux, Swarm, Transport};
use prometheus_client::registry::Registry;

use super::behaviour::Behaviour;
use crate::config::NodeConfig;
use crate::models::Behaviour as ModelsBehaviour;

/// How long a TCP connection may take from the first packet to a secured, multiplexed
/// connection, either way. Without it a dial to a host behind a router that drops unsolicited
/// packets (what home routers do) waits for the kernel's SYN retries, about 2 minutes: an
/// AutoNAT v2 server's dial-back would then outlive the server's own 10-second window, the
/// client would never hear "not reachable" and its verdict would stay `unknown`. QUIC has its
/// own handshake timeout (5 s in libp2p's default).
pub const TCP_TIMEOUT: Duration = Duration::from_secs(8);

/// The swarm for `key` as configured (with the models behaviour `models`), listening on every
/// `config.listen` address, its transports counting bytes in `registry` (libp2p-metrics'
/// `libp2p_bandwidth_bytes_total`); returns it with the listeners that have not reported an
/// address yet.
///
/// Fails (with a one-line reason) if an address cannot be listened on.
pub fn build(
    key: Keypair,
    config: &NodeConfig,
    models: ModelsBehaviour,
    registry: &mut Registry,
) -> Result<(Swarm<Behaviour>, HashSet<ListenerId>)> {
    let mut swarm = match config.swarm_key {
        Some(psk) => private(key, psk, models, config, registry)?,
        None => public(key, models, config, registry)?,
    };
    let mut pending = HashSet::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| anyhow!("cannot listen on {addr}: {}", transport_error(&e)))?;
        pending.insert(id);
    }
    Ok((swarm, pending))
}

/// The behaviour, built by the swarm builder around the relay client it made.
fn behaviour(
    config: &NodeConfig,
    models: ModelsBehaviour,
) -> impl FnOnce(
    &Keypair,
    libp2p::relay::client::Behaviour,
) -> std::result::Result<Behaviour, Box<dyn std::error::Error + Send + Sync>>
       + '_ {
    move |key, relay_client| Ok(Behaviour::new(key, config, models, relay_client)?)
}

/// TCP and QUIC, and circuits through relays.
fn public(
    key: Keypair,
    models: ModelsBehaviour,
    config: &NodeConfig,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>> {
    let idle_timeout = config.idle_connection_timeout;
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_other_transport(
            |key| -> std::result::Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .timeout(TCP_TIMEOUT)
                        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))),
                )
            },
        )
        .map_err(|e| anyhow!("cannot set up the TCP transport: {e}"))?
        .with_dns()
        .context("cannot set up DNS resolution")?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .context("cannot set up the relay client")?
        .with_bandwidth_metrics(registry)
        .with_behaviour(behaviour(config, models))
        .map_err(|e| anyhow!("cannot set up the network behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build())
}

/// TCP only, each connection encrypted with `psk` before Noise: a peer without the key fails
/// the handshake and never reaches any protocol. Circuits through relays run over such
/// connections, so they too need the key to reach the relay.
fn private(
    key: Keypair,
    psk: PreSharedKey,
    models: ModelsBehaviour,
    config: &NodeConfig,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>> {
    let idle_timeout = config.idle_connection_timeout;
    tracing::info!(fingerprint = %psk.fingerprint(), "private network: connections need the swarm key; QUIC is off");
    let noise = noise::Config::new(&key).context("cannot set up Noise")?;
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(move |_| {
            tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(TCP_TIMEOUT)
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        })
        .map_err(|e| anyhow!("cannot set up the private TCP transport: {e}"))?
        .with_dns()
        .context("cannot set up DNS resolution")?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .context("cannot set up the relay client")?
        .with_bandwidth_metrics(registry)
        .with_behaviour(behaviour(config, models))
        .map_err(|e| anyhow!("cannot set up the network behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build())
}

fn transport_error(e: &TransportError<std::io::Error>) -> String {
    match e {
        TransportError::MultiaddrNotSupported(addr) => format!("unsupported address {addr}"),
        TransportError::Other(io) => one_line(io),
    }
}

/// An error and its sources on one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}
