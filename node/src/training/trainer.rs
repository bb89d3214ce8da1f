//! The trainer thread: runs the local training steps of one node, and nothing else. It never
//! touches the network or the async runtime; it talks to the coordinator through bounded
//! channels ([`ToTrainer`] in, [`FromTrainer`] out).
//!
//! It keeps a snapshot of its parameters in a `watch` channel that the network side serves to
//! peers on its own: replaced every [`snapshot_every`] steps, at each round, after each mix
//! and after the last step, so a peer's `Open` is answered at once with parameters at most
//! that many steps old, without asking this thread (a failed trainer withdraws it). Every `average_every` steps it asks the coordinator for an
//! averaging round ([`FromTrainer::RoundWanted`]) and waits for it: the peer's parameters come
//! back as [`ToTrainer::Mix`] (or the round fails, or times out) and training goes on. Rounds
//! that peers open are mixed in whenever they arrive, keeping the local progress made since
//! the snapshot they were exchanged with
//! ([`p2p_models::params::mix_into`]). It evaluates every `eval_every` steps and writes a
//! checkpoint (atomically) every `checkpoint_every` steps. Mixes against one snapshot share
//! one weight budget ([`crate::averaging::MAX_WEIGHT_PER_SNAPSHOT`]). A step whose loss is NaN or infinite does
//! not end training: the trainer rolls back to its last good state (the last checkpoint that a
//! later step trained from with a finite loss), reports the peer it mixed in last
//! ([`FromTrainer::RolledBack`]) and goes on; divergence with no peer to blame, three times in
//! a row, is the run's own and fails training. After the last step it runs the
//! run's final averaging rounds, writes the final checkpoint, and then only serves: peers'
//! rounds still mix into its parameters, which are evaluated and checkpointed again.
//!
//! With `averaging = "outer"` the thread runs outer steps instead ([`super::outer`]): every
//! `inner_steps` steps it ends the inner phase, publishes its compressed pseudo-gradient as
//! the snapshot peers' sessions get, asks for a round and trains on at once; peers'
//! pseudo-gradients ([`ToTrainer::PseudoGradient`]) are gathered as they come and applied at
//! the next boundary. It waits on the network only for slower peers (bounded staleness) and
//! when the round to apply misses pseudo-gradients that measured arrival times say are about
//! to come (at most [`MAX_ARRIVAL_WAIT`]). Checkpoints then hold the outer parameters, and
//! training ends with them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use p2p_models::checkpoint::{self, CheckpointMeta};
use p2p_models::model::Evaluation;
use p2p_models::params;
use p2p_models::spec::Averaging;
use p2p_models::train::Trainer;
use tokio::sync::{mpsc, watch};

use super::outer::{Averaged, OuterLoop, Received};
use crate::averaging::pieces::OUTER_PARAMS_CODEC;
use crate::averaging::{MixBudget, OuterPayload, Snapshot};

/// How long an averaging round may take before the trainer goes on without it.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a trainer waits for slower peers before it goes on anyway (a peer that stopped
/// answering must not stall it).
const MAX_PACE_WAIT: Duration = Duration::from_secs(10);

/// While waiting for slower peers, the pause between two averaging rounds: rounds back to back
/// would spin (thousands a second with fast partners) and take CPU from the slow peers waited
/// for when they share a machine.
const PACE_ROUND_PAUSE: Duration = Duration::from_millis(50);

/// With outer steps, the longest a boundary (or the last outer step) waits for peers'
/// pseudo-gradients that measured arrival times say are about to come
/// ([`OuterLoop::missing_until`]: twice the median over peers of their arrival delays, and
/// only while the round holds fewer than rounds usually do). Not a fraction of the inner
/// phase: a pseudo-gradient applied a round late costs non-iid shards far more than the wait
/// (see [`super::outer`]). Bounded by the phase instead, 8 by-label digits hosts on the
/// testnet (phases of milliseconds, exchanges of tens) applied 27-51% of their rounds with
/// their own pseudo-gradient alone and ended at 0.79-0.95 with `outer_learning_rate = 2`;
/// waiting for arrivals (and pulling), 1-8% and host means of 0.945-0.967 with 3
/// (`testnet/RESULTS.md`). Where exchanges finish within a phase (the text model) nothing is
/// waited for; where they do not, the wait shows as `network_wait_fraction`, and the cure is
/// a larger `inner_steps`. The median over peers
/// keeps a minority that times its pseudo-gradients late from stretching the wait; identities
/// that are most of the peers heard from can, up to this bound at every boundary.
pub const MAX_ARRIVAL_WAIT: Duration = Duration::from_secs(10);

/// While a boundary waits for peers' pseudo-gradients, how often it opens a session itself
/// (with a random peer of the run) instead of only waiting for peers to open one: nodes that
/// only waited were 1.6-3 times slower on the testnet, each waiting for peers that were
/// waiting too. A pulled session moves no pseudo-gradient twice (`held` in the protocol).
const ARRIVAL_ASK_EVERY: Duration = Duration::from_millis(100);

/// Most sessions one boundary asks for while it waits (beyond the one it opens after
/// publishing); an ask made while a round of this node's still runs is dropped by the
/// coordinator, so fewer may open.
const MAX_ARRIVAL_PULLS: u32 = 4;

/// With outer steps, while waiting for slower peers, how often a session is asked for (to
/// learn how far they got).
const PACE_ASK_EVERY: Duration = Duration::from_millis(500);

/// How often progress (step, loss, speed) is reported while training.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// While only serving, evaluations after mixes are at least this far apart.
const SERVING_EVAL_EVERY: Duration = Duration::from_secs(2);

/// Rollbacks in a row with no peer to blame (nothing mixed since the last good state) after
/// which divergence is taken to be local (a learning rate too high) and training stops.
const MAX_UNBLAMED_ROLLBACKS: u32 = 2;

/// Why the trainer thread stopped training.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A step, an evaluation or reading the parameters failed in the model.
    #[error(transparent)]
    Model(Box<p2p_models::Error>),
    /// A peer's (checked) parameters could not be mixed in.
    #[error("cannot mix parameters from {peer}: {source}")]
    Mix {
        /// The peer.
        peer: PeerId,
        /// Why.
        source: Box<p2p_models::Error>,
    },
    /// The local checkpoint could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The coordinator is gone (the node is stopping).
    #[error("the training coordinator stopped")]
    CoordinatorGone,
}

impl From<p2p_models::Error> for TrainerError {
    fn from(e: p2p_models::Error) -> Self {
        Self::Model(Box::new(e))
    }
}

/// Commands to the trainer thread.
#[derive(Debug)]
pub enum ToTrainer {
    /// Mix a peer's parameters in: `local += weight * (params - base)`.
    Mix {
        /// The peer.
        peer: PeerId,
        /// Its parameters (checked).
        params: Vec<f32>,
        /// The snapshot they were exchanged with.
        base: Arc<Snapshot>,
        /// The peer's share.
        weight: f64,
        /// Whether this node opened the round (else the peer did).
        opened_here: bool,
    },
    /// With outer steps: a peer's pseudo-gradient (checked, clipped), for the round being
    /// gathered, and its outer parameters to mix in, if they passed their checks.
    PseudoGradient {
        /// The peer.
        peer: PeerId,
        /// The outer step it is of.
        round: u64,
        /// Its values, scaled by the guard; `None` when this node held it already and the
        /// session brought the peer's outer parameters only.
        values: Option<Vec<f32>>,
        /// The peer's outer parameters, ours they were exchanged with, and the weight to mix
        /// them at: `θ += weight × (theirs − ours then)`.
        outer: Option<(Vec<f32>, Arc<Snapshot>, f64)>,
    },
    /// With outer steps: the coordinator refused this peer's pseudo-gradient or outer
    /// parameters; what is kept of its pseudo-gradients must not stand in for it
    /// ([`OuterLoop::forget`]).
    Forget {
        /// The peer.
        peer: PeerId,
    },
    /// An averaging round this node opened ended without parameters to mix.
    RoundFailed,
    /// Save a checkpoint and stop.
    Stop,
}

/// What the trainer thread reports.
#[derive(Debug)]
pub enum FromTrainer {
    /// Open an averaging round now, on the snapshot just published.
    RoundWanted,
    /// Training progress.
    Progress {
        /// Local step.
        step: u64,
        /// Samples seen.
        samples_seen: u64,
        /// Loss of the last batch.
        batch_loss: f32,
        /// Training steps per second since the last report.
        steps_per_second: f64,
        /// Fraction of the thread's time spent in averaging rounds (waiting for the peer
        /// included).
        averaging_time_fraction: f64,
        /// Fraction of the thread's time spent waiting for slower peers.
        waiting_time_fraction: f64,
        /// Seconds spent in averaging rounds since the trainer started.
        averaging_seconds: f64,
        /// Seconds spent waiting for slower peers since the trainer started.
        waiting_seconds: f64,
        /// Outer steps taken (0 without outer steps).
        outer_step: u64,
        /// Bytes of the last pseudo-gradient as f32 over as sent (0 without one).
        compression_ratio: f64,
        /// The learning rate the last outer step applied (0 without one).
        outer_rate: f64,
    },
    /// An evaluation on the test split.
    Evaluated {
        /// Local step.
        step: u64,
        /// The result.
        evaluation: Evaluation,
    },
    /// A peer's parameters were mixed in (or its pseudo-gradient used).
    Mixed {
        /// The peer.
        peer: PeerId,
    },
    /// An outer step was taken.
    OuterStep {
        /// Its number.
        round: u64,
        /// Pseudo-gradients its average held (own included; 0 for the first, which applies
        /// none), and how many of them came for their round rather than standing in.
        averaged: Averaged,
    },
    /// A checkpoint was written to the local resume file `path`; with `publish`, the same
    /// bytes were also written to their own immutable file (one per step), to be published as
    /// a new version and then deleted.
    Checkpoint {
        /// The local resume file (rewritten atomically at every checkpoint).
        path: PathBuf,
        /// Its metadata.
        meta: CheckpointMeta,
        /// The immutable copy to publish, if this checkpoint is to be published.
        publish: Option<PathBuf>,
    },
    /// Local steps and final rounds are done; the thread now only serves.
    Finished,
    /// Training diverged (a NaN or infinite loss) and the parameters were rolled back to the
    /// last good state; `blamed` is the peer whose parameters were mixed in last since then.
    RolledBack {
        /// The step that diverged.
        from_step: u64,
        /// The step rolled back to.
        to_step: u64,
        /// The peer mixed in last, now refused.
        blamed: Option<PeerId>,
    },
    /// Training failed (the node keeps running).
    Failed(TrainerError),
}

/// The folder of checkpoint files waiting to be published, in a run's folder.
pub fn publish_dir(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("publish")
}

/// The immutable file of the checkpoint at `step` to publish, beside the resume file
/// `resume`: `<run dir>/publish/step-00000300.safetensors`.
pub fn step_checkpoint_path(resume: &std::path::Path, step: u64) -> PathBuf {
    publish_dir(resume.parent().unwrap_or(std::path::Path::new(".")))
        .join(format!("step-{step:08}.safetensors"))
}

/// Everything the trainer thread needs.
pub struct TrainerJob {
    /// The trainer, holding its starting parameters, step and samples seen.
    pub trainer: Trainer,
    /// The run id (hex), recorded in checkpoints.
    pub run: String,
    /// Where the local checkpoint lives.
    pub checkpoint_path: PathBuf,
    /// Whether averaging rounds are wanted.
    pub averaging: bool,
    /// Samples seen beyond which the trainer waits for slower peers (set by the coordinator;
    /// `u64::MAX`: no bound).
    pub pace_limit: Arc<AtomicU64>,
    /// Where the parameters served to peers are published.
    pub snapshots: watch::Sender<Option<Arc<Snapshot>>>,
}

/// How many local steps the snapshot served to peers may lag behind while training: a quarter
/// of the spec's `average_every` (at least 1), or 16 steps when it is 0 (parameter averaging
/// only: with outer steps the snapshot is the last pseudo-gradient). Each refresh copies
/// the parameters once. After the last step the final parameters are served, then each mix's
/// result.
pub fn snapshot_every(average_every: u64) -> u64 {
    if average_every == 0 {
        16
    } else {
        average_every.div_ceil(4)
    }
}

/// Runs the trainer until it finishes and is told to stop (or the coordinator goes away).
pub fn run(job: TrainerJob, commands: Receiver<ToTrainer>, events: mpsc::Sender<FromTrainer>) {
    let outer = (job.averaging && job.trainer.spec().averaging == Averaging::Outer).then(|| {
        job.trainer
            .params()
            .map(|p| OuterLoop::new(job.trainer.spec(), p))
    });
    let outer = match outer.transpose() {
        Ok(outer) => outer,
        Err(e) => {
            let _ = events.blocking_send(FromTrainer::Failed(e.into()));
            return;
        }
    };
    let mut state = State {
        outer,
        exchanges_used: 0,
        job,
        events,
        good: None,
        unconfirmed: None,
        last_mixed: None,
        unblamed_rollbacks: 0,
        last_eval: None,
        evaluated_at: None,
        averaging_time: Duration::ZERO,
        pace_time: Duration::ZERO,
        started: Instant::now(),
    };
    if let Err(e) = state.train(&commands) {
        // Parameters that stopped moving are no longer served: peers' Opens get "busy".
        state.job.snapshots.send_replace(None);
        let _ = state.events.blocking_send(FromTrainer::Failed(e));
        // Keep answering Stop so the coordinator can shut down cleanly.
        while let Ok(command) = commands.recv() {
            if matches!(command, ToTrainer::Stop) {
                return;
            }
        }
    }
}

/// Parameters known to be good (a loss was finite there), to roll back to.
struct GoodState {
    params: Vec<f32>,
    step: u64,
    samples_seen: u64,
}

struct State {
    job: TrainerJob,
    /// With outer steps: their state.
    outer: Option<OuterLoop>,
    /// Peers' pseudo-gradients used and outer parameters mixed so far.
    exchanges_used: u64,
    events: mpsc::Sender<FromTrainer>,
    /// The last good state: taken at the start, and from every checkpoint once a training
    /// step after it had a finite loss.
    good: Option<GoodState>,
    /// The last checkpoint's state, until a step confirms it.
    unconfirmed: Option<GoodState>,
    /// The peer mixed in last (and not blamed yet).
    last_mixed: Option<PeerId>,
    /// Rollbacks in a row that blamed nobody.
    unblamed_rollbacks: u32,
    last_eval: Option<Evaluation>,
    /// The step and exchange count at the last evaluation (what it describes).
    evaluated_at: Option<(u64, u64)>,
    averaging_time: Duration,
    pace_time: Duration,
    started: Instant,
}

/// Why the loop ended early.
enum Flow {
    Continue,
    Stop,
}

/// How an averaging round this node opened ended.
enum Round {
    /// The partner's parameters are mixed in.
    Mixed,
    /// No partner, a refusal or a timeout: the parameters are unchanged.
    Failed,
    /// Told to stop meanwhile.
    Stop,
}

impl State {
    fn train(&mut self, commands: &Receiver<ToTrainer>) -> Result<(), TrainerError> {
        let spec = self.job.trainer.spec().clone();
        if self.job.trainer.step == 0 {
            self.evaluate()?;
        }
        if self.outer.is_none() {
            self.snapshot()?;
        }
        self.remember_good()?;
        let refresh = snapshot_every(spec.average_every);
        let mut last_report = (Instant::now(), self.job.trainer.step);
        while self.job.trainer.step < spec.steps {
            loop {
                match commands.try_recv() {
                    Ok(command) => {
                        if let Flow::Stop = self.handle(command)? {
                            return self.checkpoint(false);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.checkpoint(false),
                }
            }
            if let Flow::Stop = self.pace(commands)? {
                return self.checkpoint(false);
            }
            let loss = match self.job.trainer.train_step() {
                Err(p2p_models::Error::Diverged { step, loss }) => {
                    self.roll_back(step, loss)?;
                    continue;
                }
                other => other?,
            };
            // A finite loss after the last checkpoint: it is a state to roll back to.
            if let Some(confirmed) = self.unconfirmed.take() {
                self.good = Some(confirmed);
            }
            let step = self.job.trainer.step;
            if last_report.0.elapsed() >= PROGRESS_EVERY || step == spec.steps {
                let rate = (step - last_report.1) as f64 / last_report.0.elapsed().as_secs_f64();
                last_report = (Instant::now(), step);
                self.send(FromTrainer::Progress {
                    step,
                    samples_seen: self.job.trainer.samples_seen,
                    batch_loss: loss,
                    steps_per_second: rate,
                    averaging_time_fraction: self.averaging_time.as_secs_f64()
                        / self.started.elapsed().as_secs_f64().max(1e-9),
                    waiting_time_fraction: self.pace_time.as_secs_f64()
                        / self.started.elapsed().as_secs_f64().max(1e-9),
                    averaging_seconds: self.averaging_time.as_secs_f64(),
                    waiting_seconds: self.pace_time.as_secs_f64(),
                    outer_step: self.outer.as_ref().map_or(0, OuterLoop::round),
                    compression_ratio: self
                        .outer
                        .as_ref()
                        .map_or(0.0, OuterLoop::compression_ratio),
                    outer_rate: self.outer.as_ref().map_or(0.0, OuterLoop::last_rate),
                })?;
            }
            if self.outer.is_some() {
                if step.is_multiple_of(spec.inner_steps) {
                    if let Flow::Stop = self.outer_boundary(commands)? {
                        return self.checkpoint(false);
                    }
                }
            } else if self.job.averaging
                && spec.average_every > 0
                && step.is_multiple_of(spec.average_every)
            {
                if let Round::Stop = self.average(commands)? {
                    return self.checkpoint(false);
                }
            } else if step.is_multiple_of(refresh) {
                self.snapshot()?;
            }
            if step.is_multiple_of(spec.eval_every) {
                self.evaluate()?;
            }
            if spec.checkpoint_every > 0
                && step.is_multiple_of(spec.checkpoint_every)
                && step < spec.steps
            {
                self.checkpoint(true)?;
            }
        }
        if self.outer.is_some() {
            if let Flow::Stop = self.outer_finish(commands)? {
                return self.checkpoint(false);
            }
        } else if self.job.averaging && spec.average_every > 0 {
            for _ in 0..spec.final_averaging_rounds {
                if let Round::Stop = self.average(commands)? {
                    return self.checkpoint(false);
                }
            }
        }
        if self.outer.is_none() {
            // From now on peers get the final parameters (then each mix's result).
            self.snapshot()?;
        }
        self.evaluate()?;
        self.checkpoint(true)?;
        self.send(FromTrainer::Finished)?;
        self.serve(commands)
    }

    /// Bounded staleness: while this node is too far ahead of its slowest recent peer, it
    /// averages instead of training. Each round also tells it how far its partner got, so a
    /// stale view of a peer that has caught up is corrected; after [`MAX_PACE_WAIT`] it trains
    /// on regardless (a peer that stopped answering must not stall it), and at once when a
    /// round finds no partner (waiting for peers it cannot reach is pointless).
    fn pace(&mut self, commands: &Receiver<ToTrainer>) -> Result<Flow, TrainerError> {
        let started = Instant::now();
        let averaging_before = self.averaging_time;
        let mut last_ask = None;
        while self.job.averaging
            && self.job.trainer.samples_seen >= self.job.pace_limit.load(Ordering::Relaxed)
            && started.elapsed() < MAX_PACE_WAIT
        {
            if self.outer.is_some() {
                // Outer steps: the snapshot stays this round's pseudo-gradient (a peer that
                // has it already does not use it twice); a session now and then tells how
                // far the slower peers got.
                if last_ask.is_none_or(|t: Instant| t.elapsed() >= PACE_ASK_EVERY) {
                    last_ask = Some(Instant::now());
                    self.send(FromTrainer::RoundWanted)?;
                }
                if let Flow::Stop =
                    self.gather_until(commands, Instant::now() + PACE_ROUND_PAUSE)?
                {
                    return Ok(Flow::Stop);
                }
                continue;
            }
            match self.average(commands)? {
                Round::Mixed => {}
                Round::Failed => break,
                Round::Stop => return Ok(Flow::Stop),
            }
            // Peers' rounds are still mixed in meanwhile.
            let pause_until = Instant::now() + PACE_ROUND_PAUSE;
            while let Some(left) = pause_until.checked_duration_since(Instant::now()) {
                match commands.recv_timeout(left) {
                    Ok(command) => {
                        if let Flow::Stop = self.handle(command)? {
                            return Ok(Flow::Stop);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return Ok(Flow::Stop),
                }
            }
        }
        // Rounds opened meanwhile count as averaging, not twice: the two add up to the time
        // spent waiting on the network.
        let nested = self.averaging_time.saturating_sub(averaging_before);
        self.pace_time += started.elapsed().saturating_sub(nested);
        Ok(Flow::Continue)
    }

    /// After training: mix in what peers' rounds bring, until told to stop.
    fn serve(&mut self, commands: &Receiver<ToTrainer>) -> Result<(), TrainerError> {
        let mut dirty = false;
        let mut last_eval = Instant::now();
        loop {
            let command = match commands.recv_timeout(SERVING_EVAL_EVERY) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return self.checkpoint(false),
            };
            match command {
                Some(ToTrainer::Stop) => return self.checkpoint(false),
                Some(command) => {
                    let mixed = matches!(
                        command,
                        ToTrainer::Mix { .. } | ToTrainer::PseudoGradient { .. }
                    );
                    if let Flow::Stop = self.handle(command)? {
                        return self.checkpoint(false);
                    }
                    if mixed && self.outer.is_some() {
                        // Peers averaging next get what was just mixed in.
                        self.publish_final_outer();
                    }
                    dirty |= mixed;
                }
                None => {}
            }
            if dirty && last_eval.elapsed() >= SERVING_EVAL_EVERY {
                dirty = false;
                last_eval = Instant::now();
                self.evaluate()?;
                self.checkpoint(false)?;
            }
        }
    }

    /// One averaging round opened by this node: publishes a fresh snapshot and asks for a
    /// round, then waits (up to a timeout) until the peer's parameters are mixed in or the
    /// round failed. Rounds that peers open meanwhile are mixed in as they come.
    fn average(&mut self, commands: &Receiver<ToTrainer>) -> Result<Round, TrainerError> {
        let started = Instant::now();
        self.snapshot()?;
        self.send(FromTrainer::RoundWanted)?;
        let flow = self.wait_for_round(commands);
        self.averaging_time += started.elapsed();
        flow
    }

    /// Waits for the answer to an averaging round (mixing it in), up to a timeout.
    fn wait_for_round(&mut self, commands: &Receiver<ToTrainer>) -> Result<Round, TrainerError> {
        let deadline = Instant::now() + ROUND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match commands.recv_timeout(left) {
                Ok(ToTrainer::RoundFailed) => return Ok(Round::Failed),
                Ok(command) => {
                    // A peer's round is mixed in too; ours is what ends the wait.
                    let ours = matches!(
                        &command,
                        ToTrainer::Mix {
                            opened_here: true,
                            ..
                        }
                    );
                    if let Flow::Stop = self.handle(command)? {
                        return Ok(Round::Stop);
                    }
                    if ours {
                        return Ok(Round::Mixed);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(Round::Failed),
                Err(RecvTimeoutError::Disconnected) => return Ok(Round::Stop),
            }
        }
    }

    fn handle(&mut self, command: ToTrainer) -> Result<Flow, TrainerError> {
        match command {
            ToTrainer::Mix {
                peer,
                params,
                base,
                weight,
                ..
            } => {
                let Some(weight) = base.budget.take(weight) else {
                    tracing::debug!(%peer, "this snapshot already took its share of peers' weight; not mixing");
                    return Ok(Flow::Continue);
                };
                let mut local = self.job.trainer.params()?;
                params::mix_into(&mut local, &base.params, &params, weight)
                    .and_then(|()| self.job.trainer.set_params(&local))
                    .map_err(|e| TrainerError::Mix {
                        peer,
                        source: Box::new(e),
                    })?;
                self.last_mixed = Some(peer);
                // Peers averaging next get what was just mixed in.
                self.snapshot()?;
                self.send(FromTrainer::Mixed { peer })?;
                Ok(Flow::Continue)
            }
            ToTrainer::PseudoGradient {
                peer,
                round,
                values,
                outer: peer_outer,
            } => {
                let Some(outer) = self.outer.as_mut() else {
                    return Ok(Flow::Continue);
                };
                let received = match values {
                    Some(values) => outer.receive(peer, round, &values),
                    None => Received::Duplicate,
                };
                tracing::debug!(%peer, round, ?received, "a peer's pseudo-gradient");
                // Outer parameters that passed their checks are mixed once per peer and
                // snapshot of ours (so a peer cannot take a snapshot's whole weight budget with
                // repeated sessions), whatever became of the pseudo-gradient they came with:
                // gossip on θ is what keeps nodes together. Mixes against one snapshot share
                // one weight budget, as with parameters.
                let mixable = received != Received::WrongLength;
                let peer_outer = peer_outer
                    .filter(|(_, base, _)| mixable && base.budget.first_outer_mix(peer))
                    .and_then(|(theirs, base, weight)| {
                        let weight = base.budget.take(weight)?;
                        Some((theirs, base, weight))
                    });
                let Some(outer) = self.outer.as_mut() else {
                    return Ok(Flow::Continue);
                };
                let mixed = match peer_outer {
                    Some((theirs, base, weight)) => {
                        let n = theirs.len();
                        let ours = base.params.get(n..).unwrap_or_default();
                        let shift = outer.mix_outer(&theirs, ours, weight)?;
                        let mut local = self.job.trainer.params()?;
                        for (p, d) in local.iter_mut().zip(&shift) {
                            *p += d;
                        }
                        self.job.trainer.set_params(&local)?;
                        true
                    }
                    _ => false,
                };
                if matches!(received, Received::Used | Received::Early) || mixed {
                    // No peer is blamed for a divergence with outer steps: what it sent is
                    // averaged with others' and applied a boundary later, so the peer mixed
                    // in last is no better a suspect than any other (the guards bound each).
                    self.exchanges_used += 1;
                    self.send(FromTrainer::Mixed { peer })?;
                }
                Ok(Flow::Continue)
            }
            ToTrainer::Forget { peer } => {
                if let Some(outer) = self.outer.as_mut() {
                    outer.forget(&peer);
                }
                Ok(Flow::Continue)
            }
            ToTrainer::RoundFailed => Ok(Flow::Continue),
            ToTrainer::Stop => Ok(Flow::Stop),
        }
    }

    /// Replaces the snapshot served to peers with the current parameters (not in a run with
    /// outer steps, whose peers expect pseudo-gradients: a node there serves only what
    /// [`Self::outer_boundary`] publishes, and nothing when it trains alone).
    fn snapshot(&mut self) -> Result<(), TrainerError> {
        if self.job.trainer.spec().averaging == Averaging::Outer {
            return Ok(());
        }
        let snapshot = Arc::new(Snapshot {
            params: self.job.trainer.params()?,
            samples: self.job.trainer.samples_seen,
            step: self.job.trainer.step,
            outer: None,
            budget: MixBudget::default(),
        });
        self.job.snapshots.send_replace(Some(snapshot));
        Ok(())
    }

    /// Ends an inner phase: applies the last round's average, starts the next phase, publishes
    /// this phase's pseudo-gradient and asks for a round, without waiting for it (see
    /// [`super::outer`]). Waits briefly first when a peer's pseudo-gradient is due.
    fn outer_boundary(&mut self, commands: &Receiver<ToTrainer>) -> Result<Flow, TrainerError> {
        if let Flow::Stop = self.wait_for_arrival(commands)? {
            return Ok(Flow::Stop);
        }
        let local = self.job.trainer.params()?;
        let Some(outer) = self.outer.as_mut() else {
            return Ok(Flow::Continue);
        };
        let boundary = outer.boundary(&local)?;
        self.job.trainer.set_params(&boundary.params)?;
        self.publish_outer(
            boundary.round,
            boundary.encoded.values,
            boundary.encoded.pieces,
        );
        self.send(FromTrainer::OuterStep {
            round: boundary.round,
            averaged: boundary.averaged,
        })?;
        self.send(FromTrainer::RoundWanted)?;
        Ok(Flow::Continue)
    }

    /// Before a boundary: while the round it applies holds fewer pseudo-gradients than rounds
    /// usually do and measured arrival times say more are coming, waits for them, at most
    /// [`MAX_ARRIVAL_WAIT`] (see [`OuterLoop::missing_until`]), asking for a session every
    /// [`ARRIVAL_ASK_EVERY`], at most [`MAX_ARRIVAL_PULLS`] times.
    fn wait_for_arrival(&mut self, commands: &Receiver<ToTrainer>) -> Result<Flow, TrainerError> {
        let started = Instant::now();
        let limit = started + MAX_ARRIVAL_WAIT;
        let mut flow = Ok(Flow::Continue);
        let mut next_ask = started + ARRIVAL_ASK_EVERY;
        let mut pulls = 0;
        while let Some(due) = self.outer.as_ref().and_then(OuterLoop::missing_until) {
            let deadline = due.min(limit);
            let now = Instant::now();
            if deadline <= now {
                break;
            }
            if next_ask <= now && pulls < MAX_ARRIVAL_PULLS {
                // Pull rather than only wait to be asked: a session with another random peer.
                pulls += 1;
                next_ask = now + ARRIVAL_ASK_EVERY;
                if let Err(e) = self.send(FromTrainer::RoundWanted) {
                    flow = Err(e);
                    break;
                }
            }
            flow = self.gather_until(commands, deadline.min(next_ask));
            if !matches!(flow, Ok(Flow::Continue)) {
                break;
            }
        }
        self.averaging_time += started.elapsed();
        flow
    }

    /// Handles commands until `deadline`, until a peer's pseudo-gradient or outer parameters
    /// were used, or until a round of ours failed.
    fn gather_until(
        &mut self,
        commands: &Receiver<ToTrainer>,
        deadline: Instant,
    ) -> Result<Flow, TrainerError> {
        let used_before = self.exchanges_used;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match commands.recv_timeout(left) {
                Ok(command) => {
                    // A round of ours that found no partner: nothing more is coming for now.
                    let failed = matches!(command, ToTrainer::RoundFailed);
                    if let Flow::Stop = self.handle(command)? {
                        return Ok(Flow::Stop);
                    }
                    if self.exchanges_used != used_before || failed {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return Ok(Flow::Stop),
            }
        }
        Ok(Flow::Continue)
    }

    /// After the last step: ends the last inner phase (unless it just ended), waits for peers'
    /// pseudo-gradients as a boundary does, applies every round being gathered, and takes the
    /// outer parameters as the model.
    fn outer_finish(&mut self, commands: &Receiver<ToTrainer>) -> Result<Flow, TrainerError> {
        let spec_h = self.job.trainer.spec().inner_steps;
        if !self.job.trainer.step.is_multiple_of(spec_h) {
            if let Flow::Stop = self.outer_boundary(commands)? {
                return Ok(Flow::Stop);
            }
        }
        if let Flow::Stop = self.wait_for_arrival(commands)? {
            return Ok(Flow::Stop);
        }
        let Some(outer) = self.outer.as_mut() else {
            return Ok(Flow::Continue);
        };
        let averaged = outer.finish()?;
        let round = outer.round();
        let params = outer.outer_params().to_vec();
        self.job.trainer.set_params(&params)?;
        self.send(FromTrainer::OuterStep { round, averaged })?;
        // Final rounds, as with parameter averaging: the last pseudo-gradient (peers that used
        // it do not use it again) with the final outer parameters, so that nodes that finish
        // at different times end close to one model.
        let rounds = self.job.trainer.spec().final_averaging_rounds;
        for _ in 0..rounds {
            self.publish_final_outer();
            self.send(FromTrainer::RoundWanted)?;
            if let Flow::Stop = self.gather_until(commands, Instant::now() + ROUND_TIMEOUT)? {
                return Ok(Flow::Stop);
            }
        }
        if let Some(outer) = self.outer.as_ref() {
            let params = outer.outer_params().to_vec();
            self.job.trainer.set_params(&params)?;
        }
        self.publish_final_outer();
        Ok(Flow::Continue)
    }

    /// After the last outer step: serves the last pseudo-gradient with the current outer
    /// parameters.
    fn publish_final_outer(&mut self) {
        let Some(n) = self.outer.as_ref().map(|o| o.outer_params().len()) else {
            return;
        };
        let Some(last) = self.job.snapshots.borrow().clone() else {
            return;
        };
        let Some(payload) = last.outer.as_ref() else {
            return;
        };
        let delta = last.params.get(..n).unwrap_or_default().to_vec();
        let pieces = p2p_models::compress::pieces(n) as usize;
        let delta_pieces = payload.pieces.iter().take(pieces).cloned().collect();
        self.publish_outer(payload.round, delta, delta_pieces);
    }

    /// Serves the pseudo-gradient of outer step `round` (its decoded values and encoded pieces)
    /// followed by the current outer parameters in int8, as one vector: what peers' sessions
    /// exchange.
    fn publish_outer(&mut self, round: u64, mut values: Vec<f32>, mut pieces: Vec<Vec<u8>>) {
        let Some(outer) = self.outer.as_ref() else {
            return;
        };
        let theta = OUTER_PARAMS_CODEC.encode(outer.outer_params());
        values.extend_from_slice(&theta.values);
        pieces.extend(theta.pieces);
        let snapshot = Arc::new(Snapshot {
            params: values,
            samples: self.job.trainer.samples_seen,
            step: self.job.trainer.step,
            outer: Some(OuterPayload { round, pieces }),
            budget: MixBudget::default(),
        });
        self.job.snapshots.send_replace(Some(snapshot));
    }

    /// Evaluates the model on the test split: with outer steps, the outer parameters with the
    /// rounds being gathered applied ([`OuterLoop::preview`]: the model checkpoints hold and
    /// peers converge on), not the local ones.
    fn evaluate(&mut self) -> Result<(), TrainerError> {
        let preview = self.outer.as_ref().map(OuterLoop::preview).transpose()?;
        self.evaluate_model(preview.as_deref())
    }

    /// Evaluates `outer_model` (with outer steps: the outer parameters previewed by the
    /// caller) or, without one, the local parameters; reports the evaluation.
    fn evaluate_model(&mut self, outer_model: Option<&[f32]>) -> Result<(), TrainerError> {
        let evaluation = match outer_model {
            Some(values) => {
                let local = self.job.trainer.params()?;
                self.job.trainer.set_params(values)?;
                let evaluation = self.job.trainer.evaluate();
                self.job.trainer.set_params(&local)?;
                evaluation?
            }
            None => self.job.trainer.evaluate()?,
        };
        self.last_eval = Some(evaluation);
        self.evaluated_at = Some((self.job.trainer.step, self.exchanges_used));
        self.send(FromTrainer::Evaluated {
            step: self.job.trainer.step,
            evaluation,
        })
    }

    /// Takes the current parameters as the state to roll back to.
    fn remember_good(&mut self) -> Result<(), TrainerError> {
        self.good = Some(GoodState {
            params: self.job.trainer.params()?,
            step: self.job.trainer.step,
            samples_seen: self.job.trainer.samples_seen,
        });
        Ok(())
    }

    /// Training diverged at `step`: back to the last good state, blaming the peer mixed in
    /// last since then. Divergence with nobody to blame, [`MAX_UNBLAMED_ROLLBACKS`] times in
    /// a row, is this node's own (its learning rate): that fails training.
    fn roll_back(&mut self, step: u64, loss: f32) -> Result<(), TrainerError> {
        let blamed = self.last_mixed.take();
        if blamed.is_none() {
            self.unblamed_rollbacks += 1;
            if self.unblamed_rollbacks > MAX_UNBLAMED_ROLLBACKS {
                return Err(p2p_models::Error::Diverged { step, loss }.into());
            }
        } else {
            self.unblamed_rollbacks = 0;
        }
        self.unconfirmed = None;
        let Some(good) = self.good.as_ref() else {
            return Err(p2p_models::Error::Diverged { step, loss }.into());
        };
        self.job
            .trainer
            .restore(&good.params, good.step, good.samples_seen)?;
        let to_step = good.step;
        tracing::warn!(step, loss, to_step, blamed = ?blamed, "training diverged; rolled back to the last good state");
        // Peers must not average with what diverged.
        match self.outer.as_mut() {
            Some(outer) => {
                outer.reset(good.params.clone());
                self.job.snapshots.send_replace(None);
            }
            None => self.snapshot()?,
        }
        self.send(FromTrainer::RolledBack {
            from_step: step,
            to_step,
            blamed,
        })
    }

    fn checkpoint(&mut self, publish: bool) -> Result<(), TrainerError> {
        // With outer steps the model is the outer parameters with the rounds being gathered
        // applied (the local ones carry this node's progress since the last outer step on top).
        let preview = self.outer.as_ref().map(OuterLoop::preview).transpose()?;
        let evaluated_now = self.evaluated_at == Some((self.job.trainer.step, self.exchanges_used));
        if publish && preview.is_some() && !evaluated_now {
            // The published figures must describe the outer parameters as they are now (a
            // newcomer checks them against the bytes); unless they were just evaluated.
            self.evaluate_model(preview.as_deref())?;
        }
        let meta = CheckpointMeta {
            run: self.job.run.clone(),
            step: self.job.trainer.step,
            samples_seen: self.job.trainer.samples_seen,
            loss: self.last_eval.map(|e| e.loss),
            accuracy: self.last_eval.map(|e| e.accuracy),
            bits_per_char: self
                .last_eval
                .filter(|_| self.job.trainer.spec().dataset.is_text())
                .map(|e| e.bits_per_char()),
        };
        let values = match preview {
            Some(values) => values,
            None => self.job.trainer.params()?,
        };
        let bytes = checkpoint::to_bytes(self.job.trainer.layout(), &values, &meta)?;
        let path = &self.job.checkpoint_path;
        checkpoint::write_atomic(path, &bytes).map_err(|source| TrainerError::Checkpoint {
            path: path.clone(),
            source,
        })?;
        // The version to publish gets its own file, never rewritten: the resume file above
        // may be replaced by the next checkpoint while this one is still being imported.
        let publish = if publish {
            let own = step_checkpoint_path(path, meta.step);
            let written = own
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| checkpoint::write_atomic(&own, &bytes));
            match written {
                Ok(()) => Some(own),
                Err(e) => {
                    tracing::warn!(path = %own.display(), error = %e, "cannot write the checkpoint to publish");
                    None
                }
            }
        } else {
            None
        };
        // The state to roll back to, once the next step shows it trains (a checkpoint taken
        // right after a mix may hold what makes training diverge).
        self.unconfirmed = Some(GoodState {
            params: values,
            step: meta.step,
            samples_seen: meta.samples_seen,
        });
        // The coordinator may be gone at shutdown; the checkpoint is on disk either way.
        let _ = self.events.blocking_send(FromTrainer::Checkpoint {
            path: path.clone(),
            meta,
            publish,
        });
        Ok(())
    }

    fn send(&self, event: FromTrainer) -> Result<(), TrainerError> {
        self.events
            .blocking_send(event)
            .map_err(|_| TrainerError::CoordinatorGone)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use std::sync::mpsc::sync_channel;

    use p2p_models::data::Dataset;
    use p2p_models::spec::RunSpec;

    use super::*;

    /// A running trainer thread, seen from the coordinator's side.
    struct Running {
        commands: std::sync::mpsc::SyncSender<ToTrainer>,
        events: mpsc::Receiver<FromTrainer>,
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        thread: std::thread::JoinHandle<()>,
    }

    /// A trainer thread on the digits MLP that averages every 5 steps and checkpoints every 10.
    fn start(dir: &std::path::Path) -> Running {
        let spec = RunSpec::parse(
            "model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 200\naverage_every = 5\n\
             checkpoint_every = 10\n",
        )
        .unwrap();
        start_with(dir, &spec, Arc::new(AtomicU64::new(u64::MAX)))
    }

    /// A trainer thread on `spec` (the digits data) that may train up to `pace_limit` samples.
    fn start_with(dir: &std::path::Path, spec: &RunSpec, pace_limit: Arc<AtomicU64>) -> Running {
        let data = Dataset::load(spec, None).unwrap();
        let trainer = Trainer::new(spec, data, &p2p_models::Device::Cpu, 1).unwrap();
        let (snapshots, watched) = watch::channel(None);
        let job = TrainerJob {
            trainer,
            run: "test".into(),
            checkpoint_path: dir.join("checkpoint.safetensors"),
            averaging: true,
            pace_limit,
            snapshots,
        };
        let (commands, from_coordinator) = sync_channel(64);
        let (events_tx, events) = mpsc::channel(256);
        let thread = std::thread::spawn(move || run(job, from_coordinator, events_tx));
        Running {
            commands,
            events,
            snapshots: watched,
            thread,
        }
    }

    impl Running {
        /// Answers every round with a failure until training finished (a failure report
        /// fails the test).
        fn run_to_end(&mut self) {
            loop {
                match self.events.blocking_recv().expect("the trainer reports") {
                    FromTrainer::RoundWanted => self.commands.send(ToTrainer::RoundFailed).unwrap(),
                    FromTrainer::Finished => break,
                    FromTrainer::Failed(e) => panic!("training failed: {e}"),
                    _ => {}
                }
            }
        }

        /// Stops the thread and waits for it.
        fn stop(self) {
            self.commands.send(ToTrainer::Stop).unwrap();
            self.thread.join().unwrap();
        }
    }

    #[test]
    fn a_mix_that_makes_training_diverge_is_rolled_back_and_its_peer_blamed() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = start(dir.path());
        let (commands, snapshots) = (running.commands.clone(), running.snapshots.clone());
        let rogue = PeerId::random();
        let mut poisoned = false;
        let rolled_back = loop {
            match running.events.blocking_recv().expect("the trainer reports") {
                // Once the step-10 checkpoint is confirmed, answer a round with huge (finite) parameters:
                // mixed at one half they make the next loss infinite.
                FromTrainer::RoundWanted if poisoned => {
                    commands.send(ToTrainer::RoundFailed).unwrap()
                }
                FromTrainer::RoundWanted => {
                    let base = snapshots.borrow().clone().unwrap();
                    if base.step < 15 {
                        commands.send(ToTrainer::RoundFailed).unwrap();
                        continue;
                    }
                    poisoned = true;
                    commands
                        .send(ToTrainer::Mix {
                            peer: rogue,
                            params: vec![1e30; base.params.len()],
                            base,
                            weight: 0.5,
                            opened_here: true,
                        })
                        .unwrap();
                }
                FromTrainer::RolledBack {
                    from_step,
                    to_step,
                    blamed,
                } => break (from_step, to_step, blamed),
                FromTrainer::Failed(e) => panic!("training failed instead of rolling back: {e}"),
                _ => {}
            }
        };
        let (from_step, to_step, blamed) = rolled_back;
        assert_eq!(blamed, Some(rogue));
        assert!(to_step <= from_step && to_step >= 10, "{rolled_back:?}");
        // Training goes on to the end from there, and the final parameters are finite.
        running.run_to_end();
        let last = snapshots.borrow().clone().unwrap();
        assert!(p2p_models::params::all_finite(&last.params));
        running.stop();
    }

    /// The boundary that applies a round missing a pseudo-gradient that measured arrival
    /// times say is due waits for it beyond its (millisecond) phase, pulling sessions
    /// meanwhile; bounded by the phase instead, it applied the round with its own alone.
    #[test]
    fn a_boundary_waits_past_its_phase_for_a_due_pseudo_gradient_and_pulls_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let spec = RunSpec::parse(
            "model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 40\naveraging = \"outer\"\n\
             inner_steps = 5\ncheckpoint_every = 0\neval_every = 1000\n",
        )
        .unwrap();
        let phase_samples = spec.inner_steps * spec.batch_size as u64;
        // The trainer may train one phase at a time: the test raises the limit.
        let pace_limit = Arc::new(AtomicU64::new(phase_samples));
        let mut running = start_with(dir.path(), &spec, Arc::clone(&pace_limit));
        let (commands, watched) = (running.commands.clone(), running.snapshots.clone());
        let peer = PeerId::random();
        let pseudo_gradient = |round: u64| {
            let n = watched.borrow().as_ref().map_or(0, |s| s.params.len() / 2);
            ToTrainer::PseudoGradient {
                peer,
                round,
                values: Some(vec![0.0; n]),
                outer: None,
            }
        };
        // Rounds 1-4: the peer's pseudo-gradient of each arrives 400 ms after ours, before
        // the next phase starts, so rounds hold two and arrivals take 400 ms.
        let mut awaited = None;
        let mut asked_while_waiting = 0;
        let averaged = loop {
            match running.events.blocking_recv().expect("the trainer reports") {
                FromTrainer::OuterStep { round, .. } if round <= 4 => {
                    std::thread::sleep(Duration::from_millis(400));
                    commands.send(pseudo_gradient(round)).unwrap();
                    pace_limit.store(phase_samples * (round + 1), Ordering::Relaxed);
                }
                FromTrainer::OuterStep { round: 5, .. } => {
                    // Round 5's comes late: the next phase starts at once.
                    awaited = Some(pseudo_gradient(5));
                    pace_limit.store(u64::MAX, Ordering::Relaxed);
                }
                FromTrainer::OuterStep { round: 6, averaged } => break averaged.fresh,
                FromTrainer::RoundWanted if awaited.is_some() => {
                    // The boundary's own session and then two pulled ones: then it comes.
                    asked_while_waiting += 1;
                    if asked_while_waiting == 3 {
                        commands.send(awaited.take().unwrap()).unwrap();
                    } else {
                        commands.send(ToTrainer::RoundFailed).unwrap();
                    }
                }
                FromTrainer::RoundWanted => commands.send(ToTrainer::RoundFailed).unwrap(),
                FromTrainer::Failed(e) => panic!("{e}"),
                _ => {}
            }
        };
        assert_eq!(
            (averaged, asked_while_waiting),
            (2, 3),
            "round 5 should have waited for the peer's pseudo-gradient"
        );
        running.run_to_end();
        running.stop();
    }

    #[test]
    fn peers_mixed_against_one_snapshot_share_one_weight_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = start(dir.path());
        let (commands, snapshots) = (running.commands.clone(), running.snapshots.clone());
        let mut mixed = 0;
        loop {
            match running.events.blocking_recv().expect("the trainer reports") {
                FromTrainer::RoundWanted if mixed == 0 => {
                    // Three sessions that all exchanged this one snapshot, each at one half.
                    let base = snapshots.borrow().clone().unwrap();
                    let peer_params: Vec<f32> = base.params.iter().map(|v| v + 0.01).collect();
                    for _ in 0..3 {
                        commands
                            .send(ToTrainer::Mix {
                                peer: PeerId::random(),
                                params: peer_params.clone(),
                                base: Arc::clone(&base),
                                weight: 0.5,
                                opened_here: false,
                            })
                            .unwrap();
                    }
                    commands.send(ToTrainer::RoundFailed).unwrap();
                }
                FromTrainer::RoundWanted => commands.send(ToTrainer::RoundFailed).unwrap(),
                FromTrainer::Mixed { .. } => mixed += 1,
                FromTrainer::Finished => break,
                FromTrainer::Failed(e) => panic!("{e}"),
                _ => {}
            }
        }
        // 1/2 + 1/6 reach the 2/3 budget; the third mix has nothing left.
        assert_eq!(mixed, 2);
        running.stop();
    }
}
