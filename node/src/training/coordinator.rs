//! The training coordinator: one async task per training node, between the trainer thread and
//! the network. It hands the network side the trainer's snapshot `watch` (peers' sessions are
//! answered from it without this task), opens an averaging round when the trainer asks
//! (skipping it while one runs), checks every peer's parameters before they are mixed in
//! (finite, the run's length, not opposed to ours, of a comparable norm, within the adaptive
//! distance bound; on a blocking thread) and asks the [`super::guard`] for the weight to mix
//! them at (bounded, clipped, drift-limited), refuses and penalizes peers that fail (excluding
//! them from the run at the third far refusal, or when the trainer rolled back after mixing
//! them in), publishes checkpoints as versions with their training metadata, and keeps the
//! status that `/status` shows.
//!
//! Nothing here waits on the trainer: commands to it go through a bounded channel with
//! `try_send`, so a busy trainer makes the coordinator drop a mix, never stall the network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use libp2p::PeerId;
use p2p_models::checkpoint;
use p2p_models::data::Dataset;
use p2p_models::device::{self, SelectedDevice};
use p2p_models::params;
use p2p_models::spec::RunSpec;
use p2p_models::train::Trainer;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::delta_guard::{DeltaGuard, DeltaVerdict};
use super::guard::{Cost, Decision, MixGuard};
use super::pace::Pace;
use super::run::{checkpoint_path, prepare, PreparedRun, Start, TrainOptions};
use super::trainer::{self, FromTrainer, ToTrainer, TrainerJob};
use super::{TrainingState, TrainingStatus};
use crate::averaging::{PeerParams, PieceCodec, RoundError, RunMembership};
use crate::network::lookup::{self, IfUnreachable, Lookup};
use crate::network::Client;

/// Capacity of the channels to and from the trainer thread.
const TRAINER_QUEUE: usize = 64;

/// How long one averaging round keeps looking for a partner that is not busy.
const ROUND_RETRY_FOR: Duration = Duration::from_secs(2);

/// Random pause between tries of one round, in milliseconds.
const ROUND_RETRY_PAUSE_MS: std::ops::Range<u64> = 1..8;

/// Weight of the newest distance in the consensus moving average.
const CONSENSUS_ALPHA: f64 = 0.2;

/// A training node's coordinator, running.
pub struct TrainingHandle {
    /// The current status.
    pub status: watch::Receiver<TrainingStatus>,
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl TrainingHandle {
    /// Waits until the node's local steps and final rounds are done (it keeps serving).
    pub async fn finished(&mut self) -> Result<TrainingStatus> {
        loop {
            {
                let s = self.status.borrow_and_update();
                match s.state {
                    TrainingState::Finished => return Ok(s.clone()),
                    TrainingState::Failed => {
                        anyhow::bail!("training failed: {}", s.error.clone().unwrap_or_default())
                    }
                    _ => {}
                }
            }
            self.status
                .changed()
                .await
                .context("the training coordinator stopped")?;
        }
    }

    /// Stops training (the trainer writes a checkpoint) and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task
            .await
            .context("the training coordinator panicked")?
    }
}

/// Prepares the run (see [`super::run`]) and starts training on a running node.
pub async fn start(
    client: Client,
    local_peer: PeerId,
    data_dir: &std::path::Path,
    options: TrainOptions,
) -> Result<TrainingHandle> {
    let selected = device::select(options.device)?;
    if let Some(w) = &selected.warning {
        tracing::warn!("{w}");
    }
    let prepared = prepare(&client, local_peer, data_dir, &options).await?;
    let (trainer, start_note) = build_trainer(&prepared, &selected, local_peer)?;
    tracing::info!(
        run = %prepared.announcement.run.short(), model = %prepared.announcement.model,
        shard = %format!("{}/{}", prepared.shard.0, prepared.shard.1),
        train_samples = prepared.data.train_len(), device = %selected.name(),
        step = trainer.step, samples_seen = trainer.samples_seen, "training starts ({start_note})"
    );
    let layout = trainer.layout().clone();
    let membership = RunMembership {
        announcement: prepared.announcement.clone(),
        layout: p2p_protocol::training::layout_hash(
            layout
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice())),
        ),
        params: layout.len() as u64,
        codec: PieceCodec::of(&prepared.spec),
        attack: options.attack,
    };
    let averaging = !options.no_averaging && prepared.spec.exchange_every() > 0;
    let (peer_tx, peer_rx) = mpsc::channel(8);
    let (snapshots_tx, snapshots_rx) = watch::channel(None);
    client.join_run(membership, snapshots_rx, peer_tx).await?;

    std::fs::create_dir_all(&prepared.dir)
        .with_context(|| format!("cannot create {}", prepared.dir.display()))?;
    // Checkpoints a killed process had not published yet: the local resume checkpoint is
    // newer, and the next checkpoint is published anyway.
    let _ = std::fs::remove_dir_all(trainer::publish_dir(&prepared.dir));
    let wait = averaging && trainer.step == 0 && prepared.spec.min_peers() > 0;
    let status = TrainingStatus {
        run_id: prepared.announcement.run.to_hex(),
        model: prepared.announcement.model.clone(),
        state: if wait {
            TrainingState::WaitingForPeers
        } else {
            TrainingState::Training
        },
        step: trainer.step,
        steps: prepared.spec.steps,
        samples_seen: trainer.samples_seen,
        shard: format!("{}/{}", prepared.shard.0, prepared.shard.1),
        shard_labels: match &prepared.data {
            Dataset::Labeled { train, .. } => Some(train.label_set()),
            Dataset::Text { .. } => None,
        },
        shard_samples: prepared.data.train_len(),
        device: selected.name(),
        ..TrainingStatus::default()
    };
    let (status_tx, status_rx) = watch::channel(status);
    // `/status` reads the training status from this watch, through the client.
    client.watch_training(status_rx.clone());
    let pace_limit = Arc::new(AtomicU64::new(u64::MAX));
    let trainer_first_step = trainer.step;
    let start_samples = trainer.samples_seen;
    let (to_trainer, from_coordinator) = sync_channel(TRAINER_QUEUE);
    let (events_tx, events) = mpsc::channel(TRAINER_QUEUE);
    let job = TrainerJob {
        trainer,
        run: prepared.announcement.run.to_hex(),
        checkpoint_path: checkpoint_path(&prepared.dir),
        averaging,
        pace_limit: Arc::clone(&pace_limit),
        snapshots: snapshots_tx,
    };
    let stop = CancellationToken::new();
    let mut coordinator = Coordinator {
        client,
        guard: MixGuard::new(
            prepared.spec.max_param_distance,
            prepared.spec.exchange_every(),
            prepared.spec.max_lead_steps(),
        ),
        delta_guard: DeltaGuard::default(),
        first_step: trainer_first_step,
        last_base: None,
        spec: prepared.spec,
        model: prepared.announcement.model,
        run: prepared.announcement.run,
        to_trainer,
        status: status_tx,
        keep_versions: options.keep_versions.max(1),
        round_running: false,
        pace_limit,
        pace: Pace::default(),
    };
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        if wait {
            tokio::select! {
                r = wait_for_peers(&coordinator.client, &coordinator.spec) => {
                    coordinator.assume_peers_start_with_us(r?, start_samples);
                }
                () = stopped.cancelled() => {
                    let _ = coordinator.client.leave_run().await;
                    return Ok(());
                }
            }
            coordinator
                .status
                .send_modify(|s| s.state = TrainingState::Training);
        } else if averaging {
            // A resumed node or a newcomer from a checkpoint does not wait for peers; it
            // still trains no further ahead of the run's peers it knows than the pace bound.
            if let Ok(peers) = coordinator.client.run_peers().await {
                coordinator.assume_peers_start_with_us(peers, start_samples);
            }
        }
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || trainer::run(job, from_coordinator, events_tx))
            .context("cannot start the trainer thread")?;
        coordinator.run(events, peer_rx, thread, stopped).await
    });
    Ok(TrainingHandle {
        status: status_rx,
        stop,
        task,
    })
}

/// One averaging round: peers average with one partner at a time, so a round that finds its
/// candidates busy tries again after a short random pause, until [`ROUND_RETRY_FOR`] passed.
/// A round with no peer to ask at all ends at once.
async fn average_with_retries(client: &Client) -> std::result::Result<PeerParams, RoundError> {
    let deadline = tokio::time::Instant::now() + ROUND_RETRY_FOR;
    loop {
        match client.average().await {
            Ok(Ok(p)) => return Ok(p),
            Ok(Err(RoundError::Failed(why))) if tokio::time::Instant::now() < deadline => {
                tracing::trace!(why, "averaging round: retrying");
                let pause = rand::thread_rng().gen_range(ROUND_RETRY_PAUSE_MS);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(RoundError::Failed(format!("{e:#}"))),
        }
    }
}

/// Waits until the run's `min_peers` other peers are known to train it (asking connected
/// peers which run they train), or until `peer_wait_secs` passed; returns the peers known.
async fn wait_for_peers(client: &Client, spec: &RunSpec) -> Result<Vec<PeerId>> {
    let min_peers = spec.min_peers();
    if min_peers == 0 {
        return client.run_peers().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.peer_wait_secs);
    tracing::info!(min_peers, "waiting for peers of the run before training");
    // A run's creator may have no way in yet: its peers join through it.
    let retry = Duration::from_millis(500);
    let enough = lookup::ask_until(client, deadline, retry, IfUnreachable::Wait, || async {
        client.query_runs().await?;
        let known = client.run_peers().await?;
        Ok((known.len() >= min_peers as usize).then_some(known))
    })
    .await?;
    match enough {
        Lookup::Found(peers) => {
            tracing::info!(
                peers = peers.len(),
                "enough peers of the run; training starts"
            );
            Ok(peers)
        }
        Lookup::Unreachable(_) | Lookup::TimedOut { .. } => {
            let peers = client.run_peers().await?;
            tracing::warn!(
                peers = peers.len(),
                min_peers,
                "not enough peers of the run in time; training with those there are"
            );
            Ok(peers)
        }
    }
}

/// Where in the run's learning-rate schedule a newcomer starting from a version published at
/// `claimed_step` starts: there, so that it trains the steps left at the run's learning rate,
/// but never past half the run's steps, so that every volunteer trains at least half of them
/// (the step is the publisher's claim, signed but not provable: a liar claiming the last step
/// could otherwise have newcomers skip training). Restarting at step 0 trained eight by-label
/// hosts' last 300 steps on two shards at the full learning rate, and every host ended at
/// 0.49 accuracy against 0.88-0.95 with the step taken (measured, testnet churn).
fn newcomer_start_step(spec: &RunSpec, claimed_step: u64) -> u64 {
    claimed_step.min(spec.steps / 2)
}

/// The trainer with the run's starting weights, and a note on where they came from.
fn build_trainer(
    prepared: &PreparedRun,
    selected: &SelectedDevice,
    local_peer: PeerId,
) -> Result<(Trainer, String)> {
    let seed = u64::from(super::run::shard_of(&local_peer, u32::MAX))
        ^ u64::from(prepared.shard.0).rotate_left(32);
    let mut trainer = Trainer::new(
        &prepared.spec,
        prepared.data.clone(),
        &selected.device,
        seed,
    )?;
    let note = match &prepared.start {
        Start::Initial => "from the run's initial weights".to_string(),
        Start::Checkpoint { path, resume } => {
            let (values, meta) = checkpoint::load(path, trainer.layout())?;
            trainer.set_params(&values)?;
            let meta = meta.unwrap_or_default();
            trainer.samples_seen = meta.samples_seen;
            if *resume {
                trainer.step = meta.step.min(prepared.spec.steps);
                format!("resumed from the local checkpoint at step {}", meta.step)
            } else {
                trainer.step = newcomer_start_step(&prepared.spec, meta.step);
                format!(
                    "from the newest version, at step {} of the run, trained on {} samples",
                    trainer.step, meta.samples_seen
                )
            }
        }
    };
    Ok((trainer, note))
}

struct Coordinator {
    client: Client,
    spec: RunSpec,
    model: String,
    run: p2p_protocol::manifest::VersionId,
    to_trainer: SyncSender<ToTrainer>,
    status: watch::Sender<TrainingStatus>,
    /// Checkpoint versions of the model kept in the store (newest first).
    keep_versions: usize,
    round_running: bool,
    /// Shared with the trainer: samples seen beyond which it waits for slower peers.
    pace_limit: Arc<AtomicU64>,
    /// Peers' progress, for bounded staleness.
    pace: Pace,
    /// The adaptive bounds on what a peer's parameters may do to ours.
    guard: MixGuard,
    /// The bounds on what a peer's pseudo-gradient may do (outer steps).
    delta_guard: DeltaGuard,
    /// The trainer's step when this node started training (bytes per step count from it).
    first_step: u64,
    /// Our snapshot of the last round, to measure how far we move between rounds.
    last_base: Option<Arc<crate::averaging::Snapshot>>,
}

/// How a round's parameters came in.
enum Arrival {
    /// From a round this node opened.
    Opened(std::result::Result<PeerParams, RoundError>),
    /// From a round a peer opened.
    Served(PeerParams),
}

impl Coordinator {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<FromTrainer>,
        mut served: mpsc::Receiver<PeerParams>,
        thread: std::thread::JoinHandle<()>,
        stop: CancellationToken,
    ) -> Result<()> {
        let (round_tx, mut rounds) =
            mpsc::channel::<std::result::Result<PeerParams, RoundError>>(1);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => self.on_trainer(event, &round_tx).await,
                    None => break,
                },
                Some(result) = rounds.recv() => {
                    self.round_running = false;
                    self.on_arrival(Arrival::Opened(result)).await;
                }
                Some(p) = served.recv() => self.on_arrival(Arrival::Served(p)).await,
            }
        }
        let _ = self.to_trainer.try_send(ToTrainer::Stop);
        // Peers asking which run this node trains hear "none" from now on.
        let _ = self.client.leave_run().await;
        drop(events); // the trainer's last sends fail fast instead of blocking
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            anyhow::bail!("the trainer thread panicked");
        }
        Ok(())
    }

    async fn on_trainer(
        &mut self,
        event: FromTrainer,
        round_tx: &mpsc::Sender<std::result::Result<PeerParams, RoundError>>,
    ) {
        match event {
            FromTrainer::RoundWanted => {
                if !self.round_running {
                    self.round_running = true;
                    let (client, tx) = (self.client.clone(), round_tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(average_with_retries(&client).await).await;
                    });
                }
            }
            FromTrainer::Progress {
                step,
                samples_seen,
                batch_loss,
                steps_per_second,
                averaging_time_fraction,
                waiting_time_fraction,
                averaging_seconds,
                waiting_seconds,
                outer_step,
                compression_ratio,
                outer_rate,
            } => {
                let first_step = self.first_step;
                let ratio = match self.spec.averaging {
                    p2p_models::spec::Averaging::Outer => compression_ratio,
                    p2p_models::spec::Averaging::Parameters => {
                        4.0 / self.spec.wire_dtype.size() as f64
                    }
                };
                self.status.send_modify(|s| {
                    s.step = step;
                    s.samples_seen = samples_seen;
                    s.batch_loss = Some(batch_loss);
                    s.steps_per_second = steps_per_second;
                    s.averaging_time_fraction = averaging_time_fraction;
                    s.waiting_time_fraction = waiting_time_fraction;
                    s.averaging_seconds = averaging_seconds;
                    s.waiting_seconds = waiting_seconds;
                    s.network_wait_fraction =
                        (averaging_time_fraction + waiting_time_fraction).min(1.0);
                    s.outer_step = outer_step;
                    s.compression_ratio = ratio;
                    s.last_outer_rate = outer_rate;
                    let steps = step.saturating_sub(first_step).max(1) as f64;
                    s.bytes_sent_per_step = s.averaging_bytes_sent as f64 / steps;
                    s.bytes_received_per_step = s.averaging_bytes_received as f64 / steps;
                })
            }
            FromTrainer::OuterStep { round, averaged } => {
                tracing::debug!(run = %self.run.short(), round, averaged = averaged.total, fresh = averaged.fresh, "outer step");
                let averaged = averaged.total;
                self.status.send_modify(|s| {
                    s.outer_step = round;
                    if averaged > 0 {
                        s.last_outer_averaged = averaged;
                    }
                });
            }
            FromTrainer::Evaluated { step, evaluation } => {
                tracing::info!(
                    run = %self.run.short(), step, loss = format!("{:.4}", evaluation.loss),
                    accuracy = format!("{:.4}", evaluation.accuracy), samples = evaluation.samples,
                    bits_per_char = self.spec.dataset.is_text().then(|| format!("{:.3}", evaluation.bits_per_char())),
                    "evaluation"
                );
                let text = self.spec.dataset.is_text();
                self.status.send_modify(|s| {
                    s.step = s.step.max(step);
                    s.loss = Some(evaluation.loss);
                    s.accuracy = Some(evaluation.accuracy);
                    s.bits_per_char = text.then(|| evaluation.bits_per_char());
                    s.evaluated_at_step = Some(step);
                    s.evaluated_after_rounds = s.averaging_rounds;
                });
            }
            FromTrainer::Mixed { .. } => self.status.send_modify(|s| s.averaging_rounds += 1),
            FromTrainer::Checkpoint {
                path,
                meta,
                publish,
            } => {
                self.status.send_modify(|s| {
                    s.checkpoint_path = Some(path.display().to_string());
                    s.checkpoint_step = Some(meta.step);
                });
                if let Some(own) = publish {
                    self.publish_checkpoint(&own, meta.step).await;
                }
            }
            FromTrainer::Finished => {
                tracing::info!(run = %self.run.short(), "local training finished; serving the model and answering averaging rounds");
                self.status
                    .send_modify(|s| s.state = TrainingState::Finished);
            }
            FromTrainer::RolledBack {
                from_step,
                to_step,
                blamed,
            } => {
                self.status.send_modify(|s| {
                    s.rollbacks += 1;
                    s.step = to_step;
                });
                match blamed {
                    Some(peer) => {
                        let why = format!("its parameters, mixed in last, made training diverge at step {from_step}");
                        tracing::warn!(%peer, from_step, to_step, "training diverged; rolled back and refusing the peer mixed in last");
                        if let Err(e) = self.client.refuse_peer(peer, why, true).await {
                            tracing::debug!(error = %format!("{e:#}"), "cannot refuse the peer");
                        }
                    }
                    None => tracing::warn!(
                        from_step,
                        to_step,
                        "training diverged with no peer mixed in; rolled back"
                    ),
                }
            }
            FromTrainer::Failed(e) => {
                tracing::error!(run = %self.run.short(), error = %e, "training failed; the node keeps serving");
                self.status.send_modify(|s| {
                    s.state = TrainingState::Failed;
                    s.error = Some(e.to_string());
                });
            }
        }
    }

    /// Publishes the immutable checkpoint file `own` (then deletes it: the store holds the
    /// bytes) and prunes the model's old versions.
    async fn publish_checkpoint(&mut self, own: &std::path::Path, step: u64) {
        match self.client.publish_checkpoint(own, &self.model).await {
            Ok(a) => {
                tracing::info!(model = %a.model, version = a.version, id = %a.id.short(), step, "checkpoint published");
                self.status.send_modify(|s| s.checkpoints_published += 1);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot publish the checkpoint")
            }
        }
        if let Err(e) = std::fs::remove_file(own) {
            tracing::debug!(path = %own.display(), error = %e, "cannot delete a published checkpoint file");
        }
        match self
            .client
            .prune_versions(&self.model, self.keep_versions)
            .await
        {
            Ok(removed) if !removed.is_empty() => {
                tracing::debug!(
                    pruned = removed.len(),
                    keep = self.keep_versions,
                    "old checkpoint versions pruned"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "cannot prune old versions"),
        }
    }

    /// Checks a peer's parameters and hands them to the trainer, or refuses the peer.
    async fn on_arrival(&mut self, arrival: Arrival) {
        let (p, opened_here) = match arrival {
            Arrival::Opened(Ok(p)) => (p, true),
            Arrival::Served(p) => (p, false),
            Arrival::Opened(Err(why)) => {
                tracing::debug!(%why, "averaging round failed");
                // Peers not heard from lately no longer hold this node back.
                self.refresh_pace_limit();
                if why != RoundError::UpToDate {
                    self.status.send_modify(|s| s.averaging_failures += 1);
                }
                let _ = self.to_trainer.try_send(ToTrainer::RoundFailed);
                return;
            }
        };
        if p.base.outer.is_some() {
            self.on_pseudo_gradient(p).await;
            return;
        }
        let bound = self.guard.bound();
        let previous = self.last_base.replace(Arc::clone(&p.base));
        let period = self.spec.average_every.max(1) as f64;
        let checked = tokio::task::spawn_blocking(move || {
            let verdict = params::check_peer(&p.base.params, &p.params, bound);
            // How far our parameters moved per averaging period since the last round: the
            // guard's floor for honest distances.
            let moved = previous.filter(|prev| prev.step < p.base.step).map(|prev| {
                let steps = (p.base.step - prev.step) as f64;
                params::relative_distance(&prev.params, &p.base.params) * period / steps
            });
            (p, verdict, moved)
        })
        .await;
        let Ok((p, verdict, moved)) = checked else {
            return;
        };
        if let Some(moved) = moved {
            self.guard.note_own_movement(moved);
        }
        self.status.send_modify(|s| {
            s.averaging_bytes_sent += p.bytes.0;
            s.averaging_bytes_received += p.bytes.1;
        });
        let distance = match verdict {
            Ok(distance) => distance,
            Err(refusal) => {
                let far = match refusal {
                    params::Refusal::TooFar { distance, .. } => Some(distance),
                    _ => None,
                };
                self.refuse(p.peer, refusal, (p.base.step, p.step), (opened_here, false))
                    .await;
                if let Some(distance) = far {
                    self.guard.observe(p.peer, p.base.step, distance);
                }
                return;
            }
        };
        self.note_peer_at(&p);
        let decision = self
            .guard
            .judge(p.peer, distance, p.base.samples, p.samples);
        self.guard.observe(p.peer, p.base.step, distance);
        tracing::debug!(peer = %p.peer, distance, bound, ?decision, opened_here, step = p.base.step, peer_step = p.step, peer_samples = p.samples, seconds = p.seconds, "averaging with peer");
        self.status.send_modify(|s| {
            s.last_peer = Some(p.peer.to_string());
            s.last_distance = Some(distance);
            s.consensus_distance = Some(match s.consensus_distance {
                Some(c) => (1.0 - CONSENSUS_ALPHA) * c + CONSENSUS_ALPHA * distance,
                None => distance,
            });
            s.distance_bound = Some(self.guard.bound());
        });
        let Decision::Mix { weight, .. } = decision else {
            self.status.send_modify(|s| s.mixes_refused += 1);
            if opened_here {
                let _ = self.to_trainer.try_send(ToTrainer::RoundFailed);
            }
            return;
        };
        let mix = ToTrainer::Mix {
            peer: p.peer,
            params: p.params,
            base: p.base,
            weight,
            opened_here,
        };
        match self.to_trainer.try_send(mix) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::debug!("trainer busy; dropping a peer's parameters")
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Checks a peer's pseudo-gradient against ours ([`DeltaGuard`]) and its outer
    /// parameters against ours (finite, the run's length, within the adaptive distance bound of
    /// [`MixGuard`], which also clips their weight: [`params::check_outer_params`]), on a
    /// blocking thread, and hands them to the trainer as the guards say, or refuses them
    /// (penalizing the peer, and excluding it at the third time, when no honest peer sends such
    /// a thing). Outer parameters refused alone are skipped without a penalty and the
    /// pseudo-gradient is still used, unless they are broken or at the run's own bound
    /// ([`MixGuard::cost`]): then the pseudo-gradient is dropped too. A refused pseudo-gradient,
    /// an impossible outer step and outer parameters refused at a cost have the trainer
    /// forget the peer's kept pseudo-gradients ([`Self::forget`]); a free refusal of outer
    /// parameters does not (its pseudo-gradient is used).
    async fn on_pseudo_gradient(&mut self, p: PeerParams) {
        self.status.send_modify(|s| {
            s.averaging_bytes_sent += p.bytes.0;
            s.averaging_bytes_received += p.bytes.1;
        });
        // No honest node counts far more outer steps than the run has (its count follows the
        // highest it sees, so one lie would spread).
        // Counts jump to the highest seen when far behind, so honest ones can exceed the run's
        // own number of outer steps somewhat; twice it, plus slack, is no honest count.
        let max_round = self
            .spec
            .steps
            .div_ceil(self.spec.inner_steps)
            .saturating_mul(2)
            .saturating_add(16);
        if p.round > max_round {
            self.status.send_modify(|s| s.mixes_refused += 1);
            let why = format!(
                "claimed outer step {}, more than the run's {max_round}",
                p.round
            );
            self.penalize(p.peer, why).await;
            self.forget(p.peer);
            return;
        }
        self.note_peer_at(&p);
        if p.already_held && p.outer_skipped {
            // The session brought nothing new from this side (ours went out).
            return;
        }
        let mut guard = std::mem::take(&mut self.delta_guard);
        let bound = self.guard.bound();
        let judged = tokio::task::spawn_blocking(move || {
            let mut p = p;
            let n = p.params.len() / 2;
            let theirs = p.params.split_off(n);
            let (own_delta, own_outer) = p.base.params.split_at(n.min(p.base.params.len()));
            // A pseudo-gradient held already came as zeros: only the outer parameters are new.
            let verdict = if p.already_held {
                DeltaVerdict::Use { scale: 1.0 }
            } else {
                guard.judge(p.peer, own_delta, &p.params)
            };
            // Outer parameters this node said it would not mix did not come.
            let outer_check =
                (!p.outer_skipped).then(|| params::check_outer_params(own_outer, &theirs, bound));
            (guard, p, theirs, verdict, outer_check)
        })
        .await;
        let Ok((guard, mut p, theirs, verdict, outer_check)) = judged else {
            return;
        };
        self.delta_guard = guard;
        tracing::debug!(peer = %p.peer, round = p.round, own_round = p.base.round(), ?verdict, ?outer_check, seconds = p.seconds, "pseudo-gradient from peer");
        match verdict {
            DeltaVerdict::Use { scale } => {
                if scale < 1.0 {
                    p.params
                        .iter_mut()
                        .for_each(|v| *v = (f64::from(*v) * scale) as f32);
                }
                let outer = match outer_check {
                    None => None,
                    Some(Ok(distance)) => {
                        // Every phase is the same number of samples by the spec: a peer's
                        // claimed samples do not buy its outer parameters more weight.
                        let decision =
                            self.guard
                                .judge(p.peer, distance, p.base.samples, p.base.samples);
                        tracing::debug!(peer = %p.peer, ?decision, "outer parameters judged");
                        self.guard.observe(p.peer, p.base.step, distance);
                        self.status.send_modify(|s| {
                            s.last_distance = Some(distance);
                            s.consensus_distance = Some(match s.consensus_distance {
                                Some(c) => (1.0 - CONSENSUS_ALPHA) * c + CONSENSUS_ALPHA * distance,
                                None => distance,
                            });
                            s.distance_bound = Some(self.guard.bound());
                        });
                        match decision {
                            Decision::Mix { weight, .. } => {
                                Some((theirs, Arc::clone(&p.base), weight))
                            }
                            Decision::Skip => None,
                        }
                    }
                    Some(Err(refusal)) => {
                        if let params::Refusal::TooFar { distance, .. } = refusal {
                            // Counted at most at the bound: refusals that cost nothing must
                            // not let many identities sending far-off outer parameters raise
                            // the reference at will (it can still triple per window, which
                            // lets a node whose own outer parameters are the outlier recover).
                            let observed = distance.min(self.guard.bound());
                            self.guard.observe(p.peer, p.base.step, observed);
                        }
                        let cost = self
                            .refuse(p.peer, refusal, (p.base.step, p.step), (false, true))
                            .await;
                        if cost != Cost::Free {
                            // Outer parameters no honest peer sends: its pseudo-gradient is
                            // not used either.
                            self.forget(p.peer);
                            return;
                        }
                        None
                    }
                };
                self.status
                    .send_modify(|s| s.last_peer = Some(p.peer.to_string()));
                let (peer, round, fresh) = (p.peer, p.round, !p.already_held);
                let command = ToTrainer::PseudoGradient {
                    peer,
                    round,
                    values: fresh.then_some(p.params),
                    outer,
                };
                match self.to_trainer.try_send(command) {
                    // Taken: sessions with this peer need not move it again.
                    Ok(()) if fresh => {
                        if let Err(e) = self.client.note_held(peer, round).await {
                            tracing::debug!(error = %format!("{e:#}"), "cannot record a held pseudo-gradient");
                        }
                    }
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        tracing::debug!("trainer busy; dropping a peer's pseudo-gradient")
                    }
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            DeltaVerdict::Refuse { why, penalize } => {
                self.status.send_modify(|s| s.mixes_refused += 1);
                self.forget(p.peer);
                let why = format!("sent {why}");
                if !penalize {
                    tracing::info!(peer = %p.peer, "{why} (refused, no penalty: an outlier)");
                    return;
                }
                self.penalize(p.peer, why).await;
            }
        }
    }

    /// Has the trainer forget what it keeps of `peer`'s pseudo-gradients, so that none stands
    /// in for a round it misses after one of its was refused (best effort: while the trainer's
    /// queue is full the command is dropped, and what is kept expires after
    /// `outer::MEMORY_ROUNDS` outer steps).
    fn forget(&self, peer: PeerId) {
        if self
            .to_trainer
            .try_send(ToTrainer::Forget { peer })
            .is_err()
        {
            tracing::debug!(%peer, "trainer busy; cannot forget a refused peer's pseudo-gradient");
        }
    }

    /// Penalizes `peer` for what no honest peer sends, excluding it from the run at its third
    /// strike.
    async fn penalize(&mut self, peer: PeerId, why: String) {
        tracing::warn!(%peer, "{why}");
        let exclude = self.guard.strike(peer);
        if let Err(e) = self.client.refuse_peer(peer, why, exclude).await {
            tracing::debug!(error = %format!("{e:#}"), "cannot refuse the peer");
        }
    }

    /// Refuses a peer's parameters (with `outer`, its outer parameters) at the cost
    /// [`MixGuard::cost`] puts on it: broken ones (NaN, a wrong length) exclude the peer from
    /// the run; ones that no honest peer sends cost it a penalty (and, the third time, the
    /// run); an outlier that an honest peer could send is skipped without one. Gives the cost.
    async fn refuse(
        &mut self,
        peer: PeerId,
        refusal: params::Refusal,
        steps: (u64, u64),
        (opened_here, outer): (bool, bool),
    ) -> Cost {
        self.status.send_modify(|s| s.mixes_refused += 1);
        if opened_here {
            let _ = self.to_trainer.try_send(ToTrainer::RoundFailed);
        }
        let what = if outer {
            "outer parameters"
        } else {
            "parameters"
        };
        let why = format!("sent {what} that were refused: {refusal}");
        let cost = self.guard.cost(&refusal, outer, steps);
        let exclude = match cost {
            Cost::Free => {
                tracing::info!(%peer, "{why} (no penalty: an outlier, or the run's first rounds)");
                return cost;
            }
            Cost::Penalty => self.guard.strike(peer),
            Cost::Exclusion => true,
        };
        tracing::warn!(%peer, "{why}");
        if let Err(e) = self.client.refuse_peer(peer, why, exclude).await {
            tracing::debug!(error = %format!("{e:#}"), "cannot refuse the peer");
        }
        cost
    }

    /// Records where a peer averaged with stands: finished (it holds nobody back), or its
    /// progress.
    fn note_peer_at(&mut self, p: &PeerParams) {
        if p.step >= self.spec.steps {
            self.pace.finished(&p.peer);
            self.refresh_pace_limit();
        } else {
            self.note_progress(p.peer, p.samples);
        }
    }

    /// Until they say otherwise, the run's peers known at the start are taken to start where
    /// this node does: a node that never heard from a peer then trains at most
    /// `max_lead_steps` ahead of them, and waits for their first exchange (at most
    /// [`super::pace::STALLED_AFTER`], after which a silent peer no longer holds it back).
    /// Without this, a node whose first sessions had not finished yet (a 5k-parameter model
    /// trains 600 steps in 0.4 s) trained its whole run alone: measured on the testnet.
    fn assume_peers_start_with_us(&mut self, peers: Vec<PeerId>, samples: u64) {
        let now = Instant::now();
        for peer in peers {
            self.pace.note(peer, samples, now);
        }
        self.refresh_pace_limit();
    }

    /// Records a peer's progress and moves the trainer's pace limit: at most
    /// `max_lead_steps` batches ahead of the slowest peer still progressing ([`Pace`]).
    fn note_progress(&mut self, peer: PeerId, samples: u64) {
        self.pace.note(peer, samples, Instant::now());
        self.refresh_pace_limit();
    }

    /// Recomputes the pace limit, forgetting peers that stopped progressing.
    fn refresh_pace_limit(&mut self) {
        let lead = self.spec.max_lead_steps();
        let limit = self.pace.limit(
            Instant::now(),
            lead.saturating_mul(self.spec.batch_size as u64),
        );
        self.pace_limit.store(limit, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newcomer_joins_the_schedule_where_the_run_is_but_trains_at_least_half() {
        let spec =
            RunSpec::parse("model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 600\n").unwrap();
        assert_eq!(newcomer_start_step(&spec, 0), 0);
        assert_eq!(newcomer_start_step(&spec, 250), 250);
        // A claim of the last step (or beyond) still leaves half the run's steps to train.
        assert_eq!(newcomer_start_step(&spec, 600), 300);
        assert_eq!(newcomer_start_step(&spec, u64::MAX), 300);
    }
}
