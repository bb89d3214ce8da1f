//! The `/p2p-ml/train/5.0.0` protocol: gossip averaging sessions and run discovery, as one
//! libp2p behaviour ([`Behaviour`]) that imports neither the rest of the network nor the
//! model store.
//!
//! **Participants**: nodes training the same run (same run id, tensor layout hash, parameter
//! count and exchange: parameters in a wire dtype, or pseudo-gradients in an encoding, see
//! [`pieces`]). **Flow**: the opener sends `Open` with its run, layout, samples seen, step and
//! (with pseudo-gradients) outer step and the outer step of the other's pseudo-gradient it
//! holds already (`held`), and whether it would mix the other's outer parameters
//! (`wants_outer`, from its snapshot's [`MixBudget`]); the other side answers `Busy`
//! ([`MAX_SESSIONS`] at once, one per peer, or no parameters yet), `Refused` (another run or
//! layout, or a peer refused before), `UpToDate` (each holds the other's current
//! pseudo-gradient: the round ends, and that peer is not asked again for 200 ms) or `Accepted`
//! with the piece count, the samples, step and outer step of its trainer's latest
//! snapshot, what it holds of the opener's and whether it wants the opener's outer
//! parameters. A side whose pseudo-gradient the other holds sends its pieces empty; so does a
//! side whose outer parameters the other would not mix. The snapshot is read from a
//! `watch` the trainer keeps fresh ([`Snapshots`]): the behaviour answers alone, at
//! once, and no thread is asked. The opener then sends its parameters in pieces of at most
//! 1 MiB (4 in flight at a time); each `Piece` is answered with the same piece of the other
//! side's snapshot, so both end holding each other's parameters from the same moment. `Runs`
//! asks a peer for the runs it knows and which one it trains.
//!
//! **Limits**: messages of at most [`p2p_protocol::training::MAX_TRAINING_MESSAGE_BYTES`];
//! 30 s per request; [`MAX_SESSIONS`] sessions at once, one per peer, so a peer that holds
//! one cannot stop a node from averaging with the others; a session (or an `Open`) that waits
//! for the peer longer than ten times the typical time between pieces (3 to 30 s; 10 s before
//! any was measured; 30 s once the peer has sent a piece) is dropped, and a peer that sent
//! nothing at all is reported as stalling ([`Event::Misbehaved`]); at
//! most 256 runs remembered. Every piece is checked for length and finiteness before it is
//! stored; a bad one ends the session and reports [`Event::Misbehaved`]. What a piece that
//! passes may do to the model is the trainer's side: see `training::guard`.
//!
//! **Fault injection**: [`Attack`] makes a node lie in sessions (tests and testnets).

mod attack;
mod behaviour;
mod budget;
mod command;
pub mod pieces;

pub use attack::Attack;
pub use behaviour::{
    AveragerStatus, Behaviour, Event, KnownRuns, OuterPayload, PeerParams, RoundError,
    RunMembership, Snapshot, Snapshots, MAX_SESSIONS,
};
pub use budget::{MixBudget, MAX_WEIGHT_PER_SNAPSHOT};
pub use command::Command;
pub use pieces::PieceCodec;

#[cfg(test)]
mod tests;
