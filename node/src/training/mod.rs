//! Decentralized training: every node trains its own copy of a run's model on its own shard of
//! the data and averages parameters with random peers of the run every few steps, or (with
//! `averaging = "outer"`) exchanges compressed pseudo-gradients and takes outer steps
//! ([`outer`], [`delta_guard`]). No node coordinates the others.
//!
//! * [`run`]: creating a run (its spec and version 0), finding one to join, or resuming the
//!   one this node trained before a restart; data shard and starting weights;
//! * [`trainer`]: the trainer thread (candle; never on the async runtime);
//! * the network side of averaging and run discovery is [`crate::averaging`], a libp2p
//!   behaviour of its own;
//! * [`coordinator`]: the task between them: snapshots to serve, rounds to open, peers'
//!   parameters checked and handed to the trainer, checkpoints published as versions.

use serde::Serialize;

pub mod coordinator;
pub mod delta_guard;
pub mod guard;
pub mod outer;
pub mod pace;
pub mod run;
pub mod trainer;

/// Where a node's training stands (`GET /status` → `training.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum TrainingState {
    /// Waiting until enough peers of the run are known (or the wait ends).
    #[default]
    #[serde(rename = "waiting for peers")]
    WaitingForPeers,
    /// Taking local steps.
    #[serde(rename = "training")]
    Training,
    /// Local steps done; the node still serves the model and answers averaging rounds.
    #[serde(rename = "finished")]
    Finished,
    /// Training failed (see `error`); the node keeps serving.
    #[serde(rename = "failed")]
    Failed,
}

impl TrainingState {
    /// The name `GET /status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForPeers => "waiting for peers",
            Self::Training => "training",
            Self::Finished => "finished",
            Self::Failed => "failed",
        }
    }
}

/// Training as `GET /status` reports it (`training`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainingStatus {
    /// The run (its version 0's id).
    pub run_id: String,
    /// Model name of the run's versions.
    pub model: String,
    /// Where the node's training stands.
    pub state: TrainingState,
    /// Local steps taken.
    pub step: u64,
    /// Local steps the run asks for.
    pub steps: u64,
    /// Samples the parameters have seen (this node's and inherited).
    pub samples_seen: u64,
    /// Test loss at the last evaluation.
    pub loss: Option<f64>,
    /// Test accuracy at the last evaluation.
    pub accuracy: Option<f64>,
    /// For a character model: the test (validation) loss in bits per character at the last
    /// evaluation.
    pub bits_per_char: Option<f64>,
    /// Step of the last evaluation.
    pub evaluated_at_step: Option<u64>,
    /// Averaging rounds mixed in before the last evaluation: equal to `averaging_rounds` when
    /// `loss` and `accuracy` describe the current parameters.
    pub evaluated_after_rounds: u64,
    /// Loss of the last training batch.
    pub batch_loss: Option<f32>,
    /// Training steps per second (recent).
    pub steps_per_second: f64,
    /// Averaging rounds whose parameters were mixed in (opened here or by peers).
    pub averaging_rounds: u64,
    /// Rounds this node opened that found no peer or failed.
    pub averaging_failures: u64,
    /// The peer averaged with last.
    pub last_peer: Option<String>,
    /// Relative parameter distance (L2, to the local norm) to that peer.
    pub last_distance: Option<f64>,
    /// The relative distance at which peers' parameters are refused now (adaptive: see
    /// [`guard`]).
    pub distance_bound: Option<f64>,
    /// Peers' parameters refused or skipped (too far, broken, or past a peer's drift budget).
    pub mixes_refused: u64,
    /// Times the trainer diverged and rolled back to its last good checkpoint.
    pub rollbacks: u64,
    /// Consensus metric: moving average of the relative distance to the peers averaged
    /// with; it falls as the nodes agree.
    pub consensus_distance: Option<f64>,
    /// Bytes of parameters sent to peers, in all rounds.
    pub averaging_bytes_sent: u64,
    /// Bytes of parameters received from peers, in all rounds.
    pub averaging_bytes_received: u64,
    /// Fraction of the trainer's time spent in averaging rounds (waiting for the peer
    /// included).
    pub averaging_time_fraction: f64,
    /// Fraction of the trainer's time spent waiting for slower peers (bounded staleness),
    /// besides the averaging rounds it opened meanwhile.
    pub waiting_time_fraction: f64,
    /// Fraction of the trainer's wall time spent waiting on the network, 0 to 1: averaging
    /// rounds (parameter averaging) or pseudo-gradients due (outer steps), plus slower peers.
    pub network_wait_fraction: f64,
    /// Seconds the trainer spent in averaging rounds (the partner's answer included), since
    /// it started.
    pub averaging_seconds: f64,
    /// Seconds the trainer spent waiting for slower peers, since it started.
    pub waiting_seconds: f64,
    /// Outer steps taken (with `averaging = "outer"`; else 0).
    pub outer_step: u64,
    /// Mean bytes sent to peers in exchanges per local step taken since this node started.
    pub bytes_sent_per_step: f64,
    /// Mean bytes received from peers in exchanges per local step taken since this node
    /// started.
    pub bytes_received_per_step: f64,
    /// Bytes of this node's last pseudo-gradient as f32 over the bytes it is sent as (with
    /// outer steps; 1 for parameters in f32, 2 in f16/bf16).
    pub compression_ratio: f64,
    /// Pseudo-gradients averaged by the last outer step (own included, and peers' latest
    /// standing in for ones that did not come).
    pub last_outer_averaged: u32,
    /// The learning rate the last outer step applied: `outer_learning_rate`, times FedExP's
    /// factor with `outer_extrapolation`, capped at the pseudo-gradients averaged (0 before
    /// the first).
    pub last_outer_rate: f64,
    /// Peers known to train this run.
    pub run_peers: usize,
    /// Peers whose parameters were refused (NaN, wrong shape, too far), by peer id.
    pub refused_peers: Vec<libp2p::PeerId>,
    /// The newest local checkpoint file.
    pub checkpoint_path: Option<String>,
    /// The training step that checkpoint holds (the step a restart resumes from).
    pub checkpoint_step: Option<u64>,
    /// Checkpoints published as versions.
    pub checkpoints_published: u64,
    /// This node's shard of the training data, `I/N`.
    pub shard: String,
    /// Labels present in this node's shard (labelled data sets only).
    pub shard_labels: Option<Vec<u32>>,
    /// Training samples in this node's shard (tokens for text).
    pub shard_samples: usize,
    /// The device training runs on.
    pub device: String,
    /// Why training failed, when it did.
    pub error: Option<String>,
}
