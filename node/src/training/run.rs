//! Which run a node trains, on which data, from which weights.
//!
//! * **Create** (`train --create spec.toml`): the spec is read and resolved (a text run's
//!   vocabulary is fixed from the creator's file; a run without a name gets one), the data is
//!   loaded to check it, the initial weights are published as version 0 of the run's model,
//!   and the run is announced. The run's id is version 0's id.
//! * **Join** (`train`): the node asks its peers for runs (and hears announcements, each
//!   signed by its creator) until one shows up (the one most connected peers train, see
//!   [`choose_run`], or `--run ID`), then starts from the best checkpoint of the run's members
//!   that passes its check on this node's own test split (see `start_version`), or from the
//!   initial weights.
//! * **Resume**: a node restarted with `train` continues the run recorded in its data dir
//!   (`training/state.json`) from its last local checkpoint.
//!
//! A node without `--shard` takes shard `hash(peer id) % shards` of the run's data set.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use libp2p::PeerId;
use p2p_models::checkpoint::{self, CheckpointMeta};
use p2p_models::data::{Dataset, Vocab};
use p2p_models::device::DeviceChoice;
use p2p_models::model::Model;
use p2p_models::spec::RunSpec;
use p2p_protocol::manifest::VersionId;
use p2p_protocol::messages::Announcement;
use p2p_protocol::training::{RunAnnouncement, MAX_PLAUSIBLE_CHECKPOINT_VERSION};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Between connectivity changes, how often peers are asked again for runs and versions.
const LOOKUP_RETRY: Duration = Duration::from_secs(1);

use crate::averaging::KnownRuns;
use crate::network::lookup::{self, IfUnreachable, Lookup};
use crate::network::Client;

/// How a node takes part in training.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Create a run from this spec file.
    pub create: Option<PathBuf>,
    /// Join this run (default: the one being resumed, else what [`choose_run`] picks).
    pub run: Option<VersionId>,
    /// Read the run's kind of data set from this path instead of the spec's.
    pub data: Option<PathBuf>,
    /// This node's shard `(index, count)`.
    pub shard: Option<(u32, u32)>,
    /// Where to train.
    pub device: DeviceChoice,
    /// Train alone: no averaging rounds (for comparisons).
    pub no_averaging: bool,
    /// Fault injection for tests and testnets: lie in averaging sessions this way.
    pub attack: Option<crate::averaging::Attack>,
    /// How long to look for a run to join.
    pub find_timeout: Duration,
    /// Checkpoint versions of the run's model kept in the store: the newest this many, plus
    /// any a peer is still fetching ([`DEFAULT_KEEP_VERSIONS`] by default; at least 1).
    pub keep_versions: usize,
    /// With `create`: start a new run even if this data dir trains another one.
    pub new_run: bool,
}

/// Checkpoint versions kept by default.
pub const DEFAULT_KEEP_VERSIONS: usize = 3;

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            create: None,
            run: None,
            data: None,
            shard: None,
            device: DeviceChoice::default(),
            no_averaging: false,
            attack: None,
            find_timeout: Duration::from_secs(120),
            keep_versions: DEFAULT_KEEP_VERSIONS,
            new_run: false,
        }
    }
}

/// Where the starting weights come from.
#[derive(Debug, Clone)]
pub enum Start {
    /// The run's initial weights, drawn from the spec's seed (this node created the run, or no
    /// checkpoint passed its check).
    Initial,
    /// A checkpoint file: this node's own (resume) or a version fetched from the swarm.
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// Keep its step (resume) rather than take the version's step, at most half the run's
        /// (join).
        resume: bool,
    },
}

/// A run ready to train.
#[derive(Debug)]
pub struct PreparedRun {
    /// The run.
    pub announcement: RunAnnouncement,
    /// Its spec.
    pub spec: RunSpec,
    /// This node's shard of the training data, and the full test split.
    pub data: Dataset,
    /// `(index, count)` of the shard.
    pub shard: (u32, u32),
    /// The starting weights.
    pub start: Start,
    /// The directory of this run's local files.
    pub dir: PathBuf,
}

/// The run a node trains, remembered across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    announcement: RunAnnouncement,
    shard: (u32, u32),
    data: Option<PathBuf>,
}

/// Directory of training files in a data dir.
pub fn training_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("training")
}

fn state_path(data_dir: &Path) -> PathBuf {
    training_dir(data_dir).join("state.json")
}

/// Directory of one run's local files (checkpoint).
pub fn run_dir(data_dir: &Path, run: &VersionId) -> PathBuf {
    training_dir(data_dir).join(run.to_hex())
}

/// Path of a run's local checkpoint.
pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

/// Reads and resolves a spec file for a new run: the data path, and the vocabulary of a text
/// run. A spec without a name gets one when the run is created.
pub fn resolve_spec(path: &Path, data: Option<&Path>) -> Result<RunSpec> {
    let mut spec = RunSpec::from_file(path)?;
    if let Some(p) = data {
        spec.dataset = spec.dataset.with_path(p)?;
    }
    if spec.dataset.is_text() {
        let text = spec.dataset.read_text()?;
        spec.transformer.vocab = Vocab::from_text(&text).chars();
        spec.validate()?;
    }
    Ok(spec)
}

/// Whether `spec` (resolved from a spec file, possibly without a name) is the spec `run` was
/// created from. A spec without a name matches the run's generated name, and the data set's
/// local path may differ (`--data` with a copy of the same file): a text run's vocabulary,
/// fixed from the file, still has to match.
pub fn created_from(spec: &RunSpec, run: &RunAnnouncement) -> bool {
    let Ok(original) = RunSpec::parse(&run.spec) else {
        return false;
    };
    let mut candidate = spec.clone();
    candidate.name.get_or_insert_with(|| run.model.clone());
    if std::mem::discriminant(&candidate.dataset) == std::mem::discriminant(&original.dataset) {
        candidate.dataset = original.dataset.clone();
    }
    RunSpec::parse(&candidate.to_toml()).is_ok_and(|c| c == original)
}

/// Decides the run, the shard and the starting weights (see the module docs).
pub async fn prepare(
    client: &Client,
    local_peer: PeerId,
    data_dir: &Path,
    options: &TrainOptions,
) -> Result<PreparedRun> {
    std::fs::create_dir_all(training_dir(data_dir))
        .with_context(|| format!("cannot create {}", training_dir(data_dir).display()))?;
    if let Some(spec_path) = &options.create {
        let spec = resolve_spec(spec_path, options.data.as_deref())?;
        match load_state(data_dir)? {
            Some(state) if !options.new_run => {
                let run = &state.announcement;
                if created_from(&spec, run) {
                    tracing::info!(run = %run.run.short(), model = %run.model, "this data dir already trains the run created from this spec; resuming it (add --new-run to start another)");
                    return resume(client, data_dir, state, options).await;
                }
                bail!(
                    "this data dir trains run {} (model {}), which was not created from {} \
                     (with this data); to abandon it and start a new run, add --new-run (or use \
                     another --data-dir)",
                    run.run,
                    run.model,
                    spec_path.display()
                );
            }
            Some(state) => {
                tracing::warn!(run = %state.announcement.run.short(), model = %state.announcement.model, "--new-run: this node leaves the run it trained and creates a new one");
            }
            None => {}
        }
        return create(client, local_peer, data_dir, spec, options).await;
    }
    if let Some(state) = load_state(data_dir)? {
        if options.run.is_none_or(|r| r == state.announcement.run) {
            return resume(client, data_dir, state, options).await;
        }
    }
    join(client, local_peer, data_dir, options).await
}

async fn create(
    client: &Client,
    local_peer: PeerId,
    data_dir: &Path,
    mut spec: RunSpec,
    options: &TrainOptions,
) -> Result<PreparedRun> {
    if spec.name.is_none() {
        spec.name = Some(format!(
            "{}-{:06x}",
            spec.model,
            rand::random::<u32>() & 0xff_ffff
        ));
    }
    let name = spec.name.clone().unwrap_or_default();
    let shard = options.shard.unwrap_or((0, 1));
    let data = load_data(&spec, None, shard)?;
    // Version 0: the run's initial weights, drawn from its seed.
    let model = Model::new(&spec, &p2p_models::Device::Cpu)?;
    // The name may hold '/' (a namespace): it never becomes a path.
    let initial = training_dir(data_dir).join(format!("{}-v0.safetensors", name.replace('/', "_")));
    checkpoint::save(
        &initial,
        model.layout(),
        &model.params()?,
        &CheckpointMeta::default(),
    )?;
    let published = client
        .publish(&initial, &name)
        .await
        .context("cannot publish the run's initial weights")?;
    let mut announcement = RunAnnouncement {
        run: published.id,
        model: name,
        spec: spec.to_toml(),
        creator: local_peer,
        created_unix: unix_now(),
        initial: published,
        signature: Vec::new(),
    };
    client.sign_run(&mut announcement);
    // Recorded before it is announced: from here on, the same command resumes this run.
    save_state(data_dir, &announcement, shard, None)?;
    client.announce_run(announcement.clone()).await?;
    tracing::info!(run = %announcement.run, model = %announcement.model, "training run created");
    let dir = run_dir(data_dir, &announcement.run);
    Ok(PreparedRun {
        announcement,
        spec,
        data,
        shard,
        start: Start::Initial,
        dir,
    })
}

async fn resume(
    client: &Client,
    data_dir: &Path,
    state: RunState,
    options: &TrainOptions,
) -> Result<PreparedRun> {
    let announcement = state.announcement;
    let spec = RunSpec::parse(&announcement.spec)?;
    let shard = options.shard.unwrap_or(state.shard);
    let data_path = options.data.clone().or(state.data);
    let data = load_data(&spec, data_path.as_deref(), shard)?;
    let dir = run_dir(data_dir, &announcement.run);
    let own = checkpoint_path(&dir);
    let start = if own.is_file() {
        tracing::info!(run = %announcement.run.short(), checkpoint = %own.display(), "resuming the run from the local checkpoint");
        Start::Checkpoint {
            path: own,
            resume: true,
        }
    } else {
        tracing::info!(run = %announcement.run.short(), "no local checkpoint yet; starting from the newest version on the network");
        start_version(
            client,
            &announcement,
            (&spec, &data),
            &dir,
            options.find_timeout,
        )
        .await?
    };
    save_state(data_dir, &announcement, shard, data_path.as_deref())?;
    Ok(PreparedRun {
        announcement,
        spec,
        data,
        shard,
        start,
        dir,
    })
}

async fn join(
    client: &Client,
    local_peer: PeerId,
    data_dir: &Path,
    options: &TrainOptions,
) -> Result<PreparedRun> {
    let announcement = find_run(client, options.run, options.find_timeout).await?;
    let spec = RunSpec::parse(&announcement.spec).map_err(|e| {
        anyhow!(
            "run {} has a spec this node cannot use: {e}",
            announcement.run
        )
    })?;
    let shard = options
        .shard
        .unwrap_or_else(|| (shard_of(&local_peer, spec.shards), spec.shards));
    let data = load_data(&spec, options.data.as_deref(), shard)?;
    let dir = run_dir(data_dir, &announcement.run);
    let start = start_version(
        client,
        &announcement,
        (&spec, &data),
        &dir,
        options.find_timeout,
    )
    .await?;
    save_state(data_dir, &announcement, shard, options.data.as_deref())?;
    tracing::info!(run = %announcement.run.short(), model = %announcement.model, shard = %format!("{}/{}", shard.0, shard.1), "joined training run");
    Ok(PreparedRun {
        announcement,
        spec,
        data,
        shard,
        start,
        dir,
    })
}

/// The run a volunteer without `--run` joins: among the runs whose spec this node can use, the
/// one the most connected peers train; ties go to the older run, then the smaller id. A run
/// announcement alone wins nothing: a fake "newest" run nobody trains loses to any run with a
/// trainer, and a run this node cannot use is skipped with a warning (once per run, through
/// `warned`) instead of ending `train`. Peers are counted once each, so winning takes as many
/// connected peers (identities) as the honest run has.
pub fn choose_run(known: &KnownRuns, warned: &mut HashSet<VersionId>) -> Option<RunAnnouncement> {
    known
        .runs
        .iter()
        .filter(|r| match RunSpec::parse(&r.spec) {
            Ok(_) => true,
            Err(e) => {
                if warned.insert(r.run) {
                    tracing::warn!(run = %r.run.short(), model = %r.model, error = %e, "skipping a run whose spec this node cannot use");
                }
                false
            }
        })
        .max_by_key(|r| {
            let trainers = known.trainers.get(&r.run).map_or(0, HashSet::len);
            (trainers, std::cmp::Reverse((r.created_unix, r.run)))
        })
        .cloned()
}

/// Waits until a run is known (the given one, or the one [`choose_run`] picks).
async fn find_run(
    client: &Client,
    wanted: Option<VersionId>,
    timeout: Duration,
) -> Result<RunAnnouncement> {
    let deadline = Instant::now() + timeout;
    let warned = std::cell::RefCell::new(HashSet::new());
    let found = lookup::ask_until(
        client,
        deadline,
        LOOKUP_RETRY,
        IfUnreachable::GiveUp,
        || async {
            let known = client.query_runs().await?;
            Ok(match wanted {
                Some(id) => known.runs.into_iter().find(|r| r.run == id),
                None => choose_run(&known, &mut warned.borrow_mut()),
            })
        },
    )
    .await?;
    match found {
        Lookup::Found(run) => Ok(run),
        Lookup::Unreachable(why) => bail!("cannot look for a training run: {why}"),
        Lookup::TimedOut { .. } => bail!(match wanted {
            Some(id) => format!("run {id} was not found on the network within {} s", timeout.as_secs()),
            None => format!(
                "no training run found on the network within {} s (start one with: p2p-node train --create <spec.toml>)",
                timeout.as_secs()
            ),
        }),
    }
}

/// Most checkpoints (each of another publisher) a newcomer fetches and checks.
const MAX_START_CANDIDATES: usize = 3;

/// How much worse than announced a checkpoint's loss on this node's test split may be: a
/// factor and an absolute slack (the test split is the same for every node of a run, so an
/// honest figure matches up to floating-point noise, device differences, and an evaluation a
/// few steps older than the weights).
const LOSS_TOLERANCE: (f64, f64) = (1.10, 0.05);

/// The run's version this node starts from when it has no checkpoint of its own.
///
/// Only checkpoints of this run published by its members count: its creator, or a peer that
/// says it trains the run. The candidates (see [`run_checkpoints`]) are the creator's newest
/// checkpoint and the newest of up to two other members chosen at random, each fetched (if
/// its size fits the run's model) and checked: its metadata must match what its signed
/// announcement claims (run, step, samples), its weights must fit the run's model, its loss on
/// this node's own test split must be within [`LOSS_TOLERANCE`] of the announced loss and
/// below the initial weights' loss. The creator's checkpoint is taken if it passes (the run is
/// the creator's), else the passing one with the lowest loss here; the others are forgotten.
/// A checkpoint that fails is refused for good (deleted, never served on) and its publisher
/// penalized once, but only if another candidate passed: when every one fails, this node's own
/// data is the likelier culprit, and nobody is penalized. One that cannot be fetched in time
/// is forgotten. With none left, training starts from the run's initial weights, drawn from
/// the spec's seed exactly as its creator drew them.
///
/// A member can still hand over weights that are good on the test split and bad elsewhere (a
/// backdoor): loss figures cannot tell; averaging with the honest members then dilutes them.
async fn start_version(
    client: &Client,
    announcement: &RunAnnouncement,
    prepared: (&RunSpec, &Dataset),
    dir: &Path,
    timeout: Duration,
) -> Result<Start> {
    let deadline = Instant::now() + timeout;
    let found = lookup::ask_until(
        client,
        deadline,
        LOOKUP_RETRY,
        IfUnreachable::GiveUp,
        || async {
            let versions = client.query_all_versions(&announcement.model).await?;
            let members = client
                .query_runs()
                .await?
                .trainers
                .remove(&announcement.run)
                .unwrap_or_default();
            let candidates = run_checkpoints(announcement, &members, versions);
            // The creator's version 0 is listed once the creator (or a peer that knows the run)
            // is reached.
            Ok((!candidates.is_empty()).then_some(candidates))
        },
    )
    .await?;
    let candidates = match found {
        Lookup::Found(candidates) => candidates,
        Lookup::Unreachable(why) => bail!("cannot look for the run's model: {why}"),
        Lookup::TimedOut { .. } => bail!(
            "no version of {} found on the network within {} s",
            announcement.model,
            timeout.as_secs()
        ),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (initial_loss, largest) = {
        let (spec, data) = (prepared.0.clone(), prepared.1.clone());
        tokio::task::spawn_blocking(move || -> Result<(f64, u64)> {
            let model = Model::new(&spec, &p2p_models::Device::Cpu)?;
            // F32 weights, and room for a header of names, shapes and metadata.
            let largest = model.layout().len() as u64 * 4 * 2 + (1 << 20);
            Ok((model.evaluate(&data)?.loss, largest))
        })
        .await
        .context("the initial weights' evaluation stopped")??
    };
    let mut passed: Vec<(f64, bool, PathBuf, VersionId)> = Vec::new();
    let mut failed: Vec<(VersionId, PeerId, String)> = Vec::new();
    for (i, candidate) in candidates.into_iter().enumerate() {
        let Some(claimed) = candidate.training.clone() else {
            continue; // version 0: the initial weights, the fallback anyway
        };
        let Some(announced) = claimed.loss else {
            tracing::info!(id = %candidate.id.short(), "skipping a checkpoint announced without a loss to check it against");
            continue;
        };
        if candidate.size > largest {
            failed.push((
                candidate.id,
                candidate.publisher,
                format!(
                    "{} bytes, more than a checkpoint of this run's model can be",
                    candidate.size
                ),
            ));
            continue;
        }
        tracing::info!(model = %announcement.model, version = candidate.version, id = %candidate.id.short(), publisher = %candidate.publisher, step = claimed.step, "fetching and checking a checkpoint to start from");
        let path = dir.join(format!("start-{i}.safetensors"));
        let fetched = tokio::time::timeout(timeout, client.fetch(candidate.id))
            .await
            .map_err(|_| anyhow!("not fetched within {} s", timeout.as_secs()))
            .and_then(|r| r);
        if let Err(e) = fetched {
            tracing::warn!(id = %candidate.id.short(), error = %format!("{e:#}"), "cannot fetch a checkpoint to start from");
            client
                .forget_version(candidate.id, false, format!("not fetched: {e:#}"))
                .await?;
            continue;
        }
        client.export(candidate.id, &path, true).await?;
        let (spec, data, file) = (prepared.0.clone(), prepared.1.clone(), path.clone());
        let checked = tokio::task::spawn_blocking(move || {
            check_start(&spec, &data, &file, &claimed, announced, initial_loss)
        })
        .await
        .context("the checkpoint check stopped")?;
        match checked {
            Ok(loss) => {
                tracing::info!(
                    version = candidate.version,
                    loss,
                    announced,
                    initial_loss,
                    "checkpoint passed its check"
                );
                let by_creator = candidate.publisher == announcement.creator;
                passed.push((loss, by_creator, path, candidate.id));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                failed.push((candidate.id, candidate.publisher, format!("{e:#}")));
            }
        }
    }
    for (id, publisher, why) in &failed {
        let why = format!("checkpoint {} refused: {why}", id.short());
        tracing::warn!(%publisher, "{why}");
        client.forget_version(*id, true, why.clone()).await?;
        if !passed.is_empty() {
            client.refuse_peer(*publisher, why, false).await?;
        }
    }
    if passed.is_empty() && !failed.is_empty() {
        tracing::warn!("every checkpoint failed its check on this node's test split: if this node's data (--data) is not the run's, fix it; nobody was penalized");
    }
    // The creator's if it passed, else the lowest loss here.
    passed.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
    let mut passed = passed.into_iter();
    let chosen = passed.next();
    for (_, _, path, id) in passed {
        let _ = std::fs::remove_file(path);
        client
            .forget_version(
                id,
                false,
                "a checked checkpoint not chosen to start from".into(),
            )
            .await?;
    }
    match chosen {
        Some((loss, _, path, _)) => {
            let start = dir.join("start.safetensors");
            std::fs::rename(&path, &start)
                .with_context(|| format!("cannot rename {}", path.display()))?;
            tracing::info!(loss, "starting from a checked checkpoint");
            Ok(Start::Checkpoint {
                path: start,
                resume: false,
            })
        }
        None => {
            tracing::info!(run = %announcement.run.short(), "starting from the run's initial weights");
            Ok(Start::Initial)
        }
    }
}

/// The versions of `run` a newcomer may start from: the creator's newest checkpoint of the run,
/// the newest of up to [`MAX_START_CANDIDATES`] − 1 other publishers among `members` chosen at
/// random (not by number: numbers are the publisher's own claim), then version 0 (the run's
/// id, by its creator). Checkpoints numbered above [`MAX_PLAUSIBLE_CHECKPOINT_VERSION`] are
/// left out.
fn run_checkpoints(
    run: &RunAnnouncement,
    members: &HashSet<PeerId>,
    versions: Vec<Announcement>,
) -> Vec<Announcement> {
    use rand::seq::SliceRandom;
    let mut newest: std::collections::HashMap<PeerId, Announcement> =
        std::collections::HashMap::new();
    let mut initial = None;
    for a in versions.into_iter().filter(|a| a.model == run.model) {
        if a.id == run.run && a.publisher == run.creator {
            initial = Some(a);
            continue;
        }
        let member = a.publisher == run.creator || members.contains(&a.publisher);
        let of_run = a.training.as_ref().is_some_and(|t| t.run == run.run);
        if !member || !of_run || a.version > MAX_PLAUSIBLE_CHECKPOINT_VERSION {
            continue;
        }
        let slot = newest.entry(a.publisher).or_insert_with(|| a.clone());
        if (a.version, a.id) > (slot.version, slot.id) {
            *slot = a;
        }
    }
    let mut picked: Vec<Announcement> = newest.remove(&run.creator).into_iter().collect();
    let mut others: Vec<Announcement> = newest.into_values().collect();
    others.shuffle(&mut rand::thread_rng());
    let room = MAX_START_CANDIDATES.saturating_sub(picked.len());
    picked.extend(others.into_iter().take(room));
    picked.extend(initial);
    picked
}

/// Checks a fetched checkpoint against its signed claims: metadata, shapes, and loss on this
/// node's test split, which must be within [`LOSS_TOLERANCE`] of `announced` and below
/// `initial` (the initial weights' loss). Returns that loss.
fn check_start(
    spec: &RunSpec,
    data: &Dataset,
    path: &Path,
    claimed: &p2p_protocol::training::TrainingMeta,
    announced: f64,
    initial: f64,
) -> Result<f64> {
    let model = Model::new(spec, &p2p_models::Device::Cpu)?;
    let (values, meta) = checkpoint::load(path, model.layout())?;
    let meta = meta.context("the file has no training metadata")?;
    if meta.run != claimed.run.to_hex()
        || meta.step != claimed.step
        || meta.samples_seen != claimed.samples_seen
    {
        bail!(
            "its metadata (run {}, step {}, {} samples) is not what its announcement claims (step {}, {} samples)",
            meta.run, meta.step, meta.samples_seen, claimed.step, claimed.samples_seen
        );
    }
    model.set_params(&values)?;
    let own = model.evaluate(data)?.loss;
    if !own.is_finite() || own > announced * LOSS_TOLERANCE.0 + LOSS_TOLERANCE.1 {
        bail!("its loss on this node's test split is {own:.4}, not the announced {announced:.4}");
    }
    if own >= initial {
        bail!("its loss on this node's test split, {own:.4}, is no better than the initial weights' {initial:.4}");
    }
    Ok(own)
}

/// Loads the run's data set (or `data` instead) and keeps `shard` of its training split.
fn load_data(spec: &RunSpec, data: Option<&Path>, shard: (u32, u32)) -> Result<Dataset> {
    let full = Dataset::load(spec, data)?;
    Ok(full.shard(shard.0, shard.1, spec.partition, spec.seed)?)
}

/// The shard a node takes when none is given: a hash of its peer id.
pub fn shard_of(peer: &PeerId, shards: u32) -> u32 {
    let hash = blake3::hash(&peer.to_bytes());
    let head = u32::from_le_bytes([
        hash.as_bytes()[0],
        hash.as_bytes()[1],
        hash.as_bytes()[2],
        hash.as_bytes()[3],
    ]);
    head % shards.max(1)
}

fn load_state(data_dir: &Path) -> Result<Option<RunState>> {
    let path = state_path(data_dir);
    let Some(bytes) = crate::fsutil::read_bounded(&path, 1 << 20)? else {
        return Ok(None);
    };
    match serde_json::from_slice::<RunState>(&bytes) {
        Ok(state) if state.announcement.check().is_ok() => Ok(Some(state)),
        _ => {
            tracing::warn!(path = %path.display(), "ignoring a damaged training state file");
            Ok(None)
        }
    }
}

fn save_state(
    data_dir: &Path,
    announcement: &RunAnnouncement,
    shard: (u32, u32),
    data: Option<&Path>,
) -> Result<()> {
    let state = RunState {
        announcement: announcement.clone(),
        shard,
        data: data.map(Path::to_path_buf),
    };
    let json = serde_json::to_vec_pretty(&state)?;
    crate::fsutil::write_atomic(&state_path(data_dir), &json, 0o644)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_spread_by_peer_id() {
        let mut seen = [0u32; 4];
        for _ in 0..200 {
            seen[shard_of(&PeerId::random(), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 20), "{seen:?}");
    }

    fn peers(n: usize) -> HashSet<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    /// A version-0 announcement for runs whose checks these tests do not exercise.
    fn unsigned_initial() -> p2p_protocol::messages::Announcement {
        p2p_protocol::messages::Announcement {
            model: "m".into(),
            version: 0,
            id: VersionId::of(b"v0"),
            size: 0,
            publisher: PeerId::random(),
            training: None,
            parent: None,
            body: VersionId::of(b"body"),
            signature: Vec::new(),
        }
    }

    fn run(n: u8, created_unix: u64, spec: &str) -> RunAnnouncement {
        RunAnnouncement {
            run: VersionId::of(&[n]),
            model: format!("m{n}"),
            spec: spec.into(),
            creator: PeerId::random(),
            created_unix,
            initial: unsigned_initial(),
            signature: Vec::new(),
        }
    }

    #[test]
    fn a_fake_newest_run_nobody_trains_does_not_win_and_an_unusable_one_is_skipped() {
        let usable = "model = \"digits-mlp\"\ndataset = \"digits\"\n";
        let real = run(1, 1_000, usable);
        let fake = run(2, u64::MAX, usable);
        let broken = run(3, 2_000, "model = \"resnet\"\n");
        let mut known = KnownRuns {
            runs: vec![fake.clone(), broken.clone(), real.clone()],
            trainers: [(real.run, peers(3)), (broken.run, peers(9))]
                .into_iter()
                .collect(),
        };
        let mut warned = HashSet::new();
        assert_eq!(choose_run(&known, &mut warned), Some(real.clone()));
        assert!(
            warned.contains(&broken.run),
            "the unusable run was warned about"
        );
        // Nobody trains anything yet: the older run, not the newest announcement.
        known.trainers.clear();
        assert_eq!(choose_run(&known, &mut warned), Some(real));
        // Only unusable runs: none.
        known.runs = vec![broken];
        assert_eq!(choose_run(&known, &mut warned), None);
    }

    fn text_run(dir: &Path, text: &str, file: &str) -> RunSpec {
        std::fs::write(dir.join(file), text).unwrap();
        let spec_path = dir.join("run.toml");
        std::fs::write(
            &spec_path,
            format!("model = \"char-transformer\"\ndataset = \"text:{file}\""),
        )
        .unwrap();
        resolve_spec(&spec_path, None).unwrap()
    }

    fn announced(spec: &RunSpec) -> RunAnnouncement {
        let mut named = spec.clone();
        named.name = Some("char-transformer-abc123".into());
        RunAnnouncement {
            run: VersionId::of(b"run"),
            model: "char-transformer-abc123".into(),
            spec: named.to_toml(),
            creator: PeerId::random(),
            created_unix: 0,
            initial: unsigned_initial(),
            signature: Vec::new(),
        }
    }

    #[test]
    fn the_same_spec_with_a_copy_of_the_data_elsewhere_is_the_same_run() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let original = text_run(a.path(), "abcabc cab", "t.txt");
        let run = announced(&original);
        assert!(created_from(&original, &run), "the same spec file");
        let copy = text_run(b.path(), "abcabc cab", "copy.txt");
        assert!(created_from(&copy, &run), "a copy of the text elsewhere");
        let other_text = text_run(b.path(), "xyz", "other.txt");
        assert!(
            !created_from(&other_text, &run),
            "another text: another vocabulary"
        );
        let mut other_lr = original.clone();
        other_lr.learning_rate *= 2.0;
        assert!(!created_from(&other_lr, &run), "another learning rate");
    }

    #[test]
    fn a_text_spec_gets_the_vocabulary_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.txt"), "abcabc cab").unwrap();
        let spec_path = dir.path().join("run.toml");
        std::fs::write(
            &spec_path,
            "model = \"char-transformer\"\ndataset = \"text:t.txt\"",
        )
        .unwrap();
        let spec = resolve_spec(&spec_path, None).unwrap();
        assert_eq!(spec.transformer.vocab, " abc");
        assert_eq!(spec.name, None);
    }
}
