//! [`Command`]: what the training coordinator asks of the averaging protocol (through the
//! network `Client`), and [`Behaviour::handle`], which answers it.

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::{Behaviour, PeerParams, RoundError, RunMembership, Snapshots};

/// Requests to the averaging behaviour.
#[derive(Debug)]
pub enum Command {
    /// Runs known to this node and its connected peers, newest first.
    QueryRuns(oneshot::Sender<super::KnownRuns>),
    /// Take part in a run's averaging, serving the latest of `snapshots`; finished sessions
    /// peers open go to `served`.
    JoinRun {
        /// The run and the model's shape.
        membership: Box<RunMembership>,
        /// The trainer's latest parameters.
        snapshots: Snapshots,
        /// Where finished sessions opened by peers go.
        served: mpsc::Sender<PeerParams>,
    },
    /// Stop taking part in the run: sessions end, peers are told "not training any run".
    LeaveRun,
    /// Open an averaging round with a random peer of the run.
    Average(oneshot::Sender<Result<PeerParams, RoundError>>),
    /// Connected peers known to train the same run.
    RunPeers(oneshot::Sender<Vec<PeerId>>),
    /// The trainer took `peer`'s pseudo-gradient of outer step `round` (it passed its
    /// checks): sessions with `peer` name it as held from now on, so it is not sent again.
    Held {
        /// The peer.
        peer: PeerId,
        /// The outer step.
        round: u64,
    },
}

impl Behaviour {
    /// Carries out `command`; replies go to its channel (a caller that went away is ignored).
    pub fn handle(&mut self, command: Command) {
        match command {
            Command::QueryRuns(reply) => self.query_runs(reply),
            Command::JoinRun {
                membership,
                snapshots,
                served,
            } => self.join(*membership, snapshots, served),
            Command::LeaveRun => self.leave(),
            Command::Average(reply) => self.average(reply),
            Command::RunPeers(reply) => {
                let _ = reply.send(self.run_members());
            }
            Command::Held { peer, round } => self.note_held(peer, round),
        }
    }
}
