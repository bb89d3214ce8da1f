//! Networking: the libp2p behaviours, the event loop that owns the swarm, the client handle
//! the rest of the node uses to talk to it, discovery with its persisted address book (which
//! lets a node rejoin without bootstrap), and peer reputation.

pub mod address_book;
// The derive generates an undocumented `BehaviourEvent` enum (one variant per field).
#[allow(missing_docs)]
pub mod behaviour;
pub mod client;
pub mod closed;
pub mod direct_only;
pub mod discovery;
pub mod event_loop;
pub mod lookup;
pub mod reachability;
pub mod relays;
pub mod reputation;
pub mod swarm;

pub use client::{Client, ConnectionCounts, NetworkStatus, PeerInfo};
pub use event_loop::EventLoop;
