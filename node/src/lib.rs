//! The p2p-node library: everything the `p2p-node` binary does, callable from tests.
//!
//! * [`node::start`] brings a node up from a [`config::NodeConfig`] and returns a
//!   [`node::NodeHandle`];
//! * [`network`] holds the libp2p behaviours and the event loop that owns the swarm;
//! * [`models`] stores, serves and downloads model versions (the swarm);
//! * [`averaging`] is the `/p2p-ml/train` protocol (averaging sessions, run discovery) as its
//!   own libp2p behaviour;
//! * [`training`] trains a run's model with candle and averages it with peers;
//! * [`api`] serves the local JSON API.

pub mod api;
pub mod averaging;
pub mod bounded;
pub mod cli;
pub mod commands;
pub mod config;
pub mod config_file;
pub mod dashboard;
pub mod fsutil;
pub mod history;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod names;
pub mod network;
pub mod node;
pub mod query;
pub mod shutdown;
pub mod training;
pub mod wire_behaviour;
