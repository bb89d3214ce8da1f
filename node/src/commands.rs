//! The long-running subcommands: `run` (with `--publish`) and `fetch`. Each starts a node,
//! does its job, and stops the node gracefully on Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use p2p_protocol::manifest::VersionId;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::{FetchArgs, TrainArgs};
use crate::config::NodeConfig;
use crate::models::{DownloadReport, DownloadState, FetchProgress};
use crate::network::client::{Fetching, NetworkStatus};
use crate::network::lookup::{self, IfUnreachable, Lookup};
use crate::network::Client;
use crate::node::{self, NodeHandle};
use crate::shutdown::ShutdownSignal;
use crate::training::coordinator;
use crate::training::run::TrainOptions;

/// How long `fetch MODEL` waits for any peer to name a version before giving up.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);

/// `p2p-node [run]`: start, print how to join, publish the `--publish` files, run until a
/// signal.
pub async fn run_node(
    config: NodeConfig,
    publish: &[PathBuf],
    model: Option<&str>,
    shutdown: &mut ShutdownSignal,
) -> Result<()> {
    let handle = node::start(config).await?;
    print_banner(&handle);
    for file in publish {
        if let Err(e) = publish_file(&handle.client, file, model).await {
            handle.stop().await?;
            return Err(e);
        }
    }
    run_until_signal(handle, shutdown).await
}

/// Publishes one file and prints the version.
async fn publish_file(client: &Client, file: &Path, model: Option<&str>) -> Result<()> {
    let name = match model {
        Some(m) => m.to_string(),
        None => file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| {
                format!("cannot name a model after {}; pass --model", file.display())
            })?,
    };
    let a = client
        .publish(file, &name)
        .await
        .with_context(|| format!("cannot publish {}", file.display()))?;
    println!(
        "published {} version {} ({} bytes) as {}",
        a.model, a.version, a.size, a.id
    );
    println!(
        "fetch it with: p2p-node fetch {} --out <file> --bootstrap <address above>",
        a.model
    );
    Ok(())
}

/// `p2p-node fetch`: join, resolve the target, download, verify, write the file.
pub async fn fetch(
    config: NodeConfig,
    args: &FetchArgs,
    shutdown: &mut ShutdownSignal,
) -> Result<()> {
    let handle = node::start(config).await?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let result = tokio::select! {
        r = fetch_with(&handle.client, args, deadline) => r,
        () = shutdown.recv() => Err(anyhow::anyhow!("interrupted; run the same command again to resume")),
    };
    match result {
        Ok(()) if args.seed => {
            print_banner(&handle);
            run_until_signal(handle, shutdown).await
        }
        Ok(()) => handle.stop().await,
        Err(e) => {
            handle.stop().await?;
            Err(e)
        }
    }
}

async fn fetch_with(client: &Client, args: &FetchArgs, deadline: Instant) -> Result<()> {
    let id = match args.target.parse::<VersionId>() {
        Ok(id) => id,
        Err(_) => resolve_model(client, &args.target, deadline).await?,
    };
    let bar = !args.no_progress && std::io::stderr().is_terminal();
    let report = download(client, id, deadline, args.timeout, bar).await?;
    // A one-shot fetch moves the file out of the store; a seeding node keeps serving it.
    client.export(id, &args.out, args.seed).await?;
    println!(
        "fetched {} version {} ({} bytes, id {}) to {}: {} chunks downloaded from {} peers, {} copied locally, {} already held, in {:.1} s",
        report.model,
        report.version,
        report.size,
        report.id,
        args.out.display(),
        report.chunks_downloaded,
        report.peers_used,
        report.chunks_copied_locally,
        report.chunks_resumed,
        report.seconds
    );
    Ok(())
}

/// Between connectivity changes, how often peers are asked again for a model's versions.
const LOOKUP_RETRY: Duration = Duration::from_secs(1);

/// Downloads `id`; gives up at once when every way to join the network has failed, and at
/// the deadline with the reason the download did not finish.
async fn download(
    client: &Client,
    id: VersionId,
    deadline: Instant,
    timeout_s: u64,
    bar: bool,
) -> Result<DownloadReport> {
    let fetching = client.fetch_with_progress(id).await?;
    let progress = tokio::spawn(show_progress(fetching.progress.clone(), id, bar));
    let result = download_until(client, id, fetching, deadline, timeout_s).await;
    progress.abort();
    let _ = progress.await; // the bar is cleared before anything else is printed
    result
}

async fn download_until(
    client: &Client,
    id: VersionId,
    fetching: Fetching,
    deadline: Instant,
    timeout_s: u64,
) -> Result<DownloadReport> {
    let finished = fetching.finished();
    tokio::pin!(finished);
    let mut connectivity = client.connectivity();
    loop {
        if let Some(why) = connectivity.borrow_and_update().failure() {
            bail!("cannot fetch version {id}: {why}");
        }
        tokio::select! {
            report = &mut finished => return report,
            changed = connectivity.changed() => {
                changed.map_err(|_| anyhow::anyhow!("the node has stopped"))?;
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let status = client.status().await?;
    let state = client.download_state(id).await?.unwrap_or_default();
    bail!(
        "version {id} was not downloaded within {timeout_s} s: {}; run the same command again to resume",
        stall_reason(&status, &state)
    )
}

/// A download with no chunk for this long is stalled rather than slow.
const STALLED_AFTER_S: f64 = 10.0;

/// Why a download has not finished: nobody reachable, nobody with the version, holders that
/// do not answer (or left), or a network that is merely slow.
fn stall_reason(status: &NetworkStatus, state: &DownloadState) -> String {
    let last = |e: &Option<String>| {
        e.as_ref()
            .map_or(String::new(), |e| format!(" (last error: {e})"))
    };
    if status.connected_peers == 0 && !status.join.ever_connected {
        return format!(
            "no peer could be reached{}",
            last(&status.join.last_dial_error)
        );
    }
    let arrived = format!("{} of {} chunks held", state.chunks_held, state.chunks);
    match state.seconds_since_chunk {
        Some(s) if s < STALLED_AFTER_S => format!("{arrived}; the network is too slow"),
        _ if status.connected_peers == 0 => {
            format!("{arrived}, and no peer is connected any more (the holders left)")
        }
        _ if state.holders == 0 => format!(
            "{arrived}; {} peer(s) reachable, but none has this version (is a node serving it?)",
            status.connected_peers
        ),
        since => format!(
            "{arrived}; {} peer(s) hold it, but none sent a chunk{}{}",
            state.holders,
            since.map_or(String::new(), |s| format!(" for {s:.0} s")),
            last(&state.last_failure)
        ),
    }
}

/// `p2p-node train`: start the node, create or join a run, train until the local steps are
/// done, then serve on (or exit with `--exit-when-done`). Ctrl-C or SIGTERM stops training
/// after a checkpoint; the same command resumes it.
pub async fn train(
    config: NodeConfig,
    args: &TrainArgs,
    shutdown: &mut ShutdownSignal,
) -> Result<()> {
    // A bad spec or data set is reported before the node starts.
    if let Some(spec) = &args.create {
        let spec = crate::training::run::resolve_spec(spec, args.data.as_deref())?;
        p2p_models::data::Dataset::load(&spec, None)?;
    }
    let data_dir = config.data_dir.clone();
    let handle = node::start(config).await?;
    print_banner(&handle);
    let options = TrainOptions {
        create: args.create.clone(),
        run: args.run,
        data: args.data.clone(),
        shard: args.shard.map(|s| (s.index, s.count)),
        device: args.device,
        no_averaging: args.no_averaging,
        attack: args.attack_averaging.or(args
            .poison_averaging
            .then_some(crate::averaging::Attack::Nan)),
        find_timeout: Duration::from_secs(args.find_timeout),
        keep_versions: usize::try_from(args.keep_checkpoints).unwrap_or(usize::MAX),
        new_run: args.new_run,
    };
    let started = tokio::select! {
        r = coordinator::start(handle.client.clone(), handle.peer_id, &data_dir, options) => r,
        () = shutdown.recv() => Err(anyhow::anyhow!("interrupted before training started")),
    };
    let mut training = match started {
        Ok(t) => t,
        Err(e) => {
            handle.stop().await?;
            return Err(e);
        }
    };
    {
        let s = training.status.borrow();
        println!(
            "training run {} (model {}) on shard {}, {}",
            s.run_id, s.model, s.shard, s.device
        );
    }
    let bar = !args.no_progress && std::io::stderr().is_terminal();
    let progress = bar.then(|| tokio::spawn(show_training_progress(training.status.clone())));
    let done = tokio::select! {
        r = training.finished() => Some(r),
        () = shutdown.recv() => None,
    };
    if let Some(task) = progress {
        task.abort();
        let _ = task.await;
    }
    match done {
        Some(Ok(s)) => {
            println!(
                "finished {} local steps: test accuracy {}, loss {}, {} averaging rounds; checkpoint {}",
                s.step,
                s.accuracy.map_or("?".into(), |a| format!("{a:.4}")),
                s.loss.map_or("?".into(), |l| format!("{l:.4}")),
                s.averaging_rounds,
                s.checkpoint_path.as_deref().unwrap_or("-"),
            );
            if !args.exit_when_done {
                println!("serving the model and answering averaging rounds until Ctrl-C");
                shutdown.recv().await;
            }
        }
        Some(Err(e)) => {
            let _ = training.stop().await;
            handle.stop().await?;
            return Err(e);
        }
        None => tracing::info!("shutting down; the checkpoint is saved, the same command resumes"),
    }
    training.stop().await?;
    handle.stop().await
}

/// Finds the newest version of `model` known to the network. Gives up at once when every way
/// to join has failed; at the deadline, says whether no peer was reachable or none knew the
/// model.
async fn resolve_model(client: &Client, model: &str, deadline: Instant) -> Result<VersionId> {
    p2p_protocol::manifest::validate_model_name(model)
        .map_err(|e| anyhow::anyhow!("'{model}' is neither a version id nor a model name: {e}"))?;
    let deadline = deadline.min(Instant::now() + RESOLVE_TIMEOUT);
    let newest = lookup::ask_until(
        client,
        deadline,
        LOOKUP_RETRY,
        IfUnreachable::GiveUp,
        || async { Ok(client.query_versions(model).await?.into_iter().next()) },
    )
    .await?;
    match newest {
        Lookup::Found(first) => {
            // The first answer may come from the first peer reached: once the other ways to
            // join have settled, ask again, so that a name several reachable peers publish is
            // reported as ambiguous every time, not resolved by who answered first.
            let newest = settled_answer(client, model, deadline)
                .await?
                .unwrap_or(first);
            tracing::info!(model, version = newest.version, id = %newest.id, size = newest.size, "newest version found");
            Ok(newest.id)
        }
        Lookup::Unreachable(why) => bail!("cannot look up model '{model}': {why}"),
        Lookup::TimedOut {
            most_connected: 0,
            last,
        } => bail!(
            "cannot look up model '{model}': no peer could be reached{}",
            last.join
                .last_dial_error
                .map_or(String::new(), |e| format!(" (last error: {e})"))
        ),
        Lookup::TimedOut { most_connected, .. } => {
            let mut others: Vec<String> = client
                .query_all_versions(model)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.publisher.to_base58())
                .collect();
            others.sort();
            others.dedup();
            if others.is_empty() {
                bail!("{most_connected} peer(s) reachable, but none knows a version of model '{model}' (is the name right, and is a node serving it?)")
            }
            bail!(
                "model '{model}' is known only from publishers it does not mean here ({}): bind one with --trust {model}=PEER_ID",
                others.join(", ")
            )
        }
    }
}

/// Longest wait for pending dials before a model name is resolved for good.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until no dial to a bootstrap, cached or mDNS peer is pending (at most
/// [`SETTLE_TIMEOUT`], never past `deadline`), then asks for `model`'s newest version again,
/// and remembers its publisher for the name (nothing is remembered before: the first answer
/// may come from the only peer reached so far).
async fn settled_answer(
    client: &Client,
    model: &str,
    deadline: Instant,
) -> Result<Option<p2p_protocol::messages::Announcement>> {
    let mut connectivity = client.connectivity();
    let until = deadline.min(Instant::now() + SETTLE_TIMEOUT);
    while connectivity.borrow().join.dials_pending > 0 {
        match tokio::time::timeout_at(until, connectivity.changed()).await {
            Ok(Ok(())) => {}
            _ => break, // timed out, or the node stopped
        }
    }
    Ok(client.resolve_versions(model).await?.into_iter().next())
}

/// A progress bar on the terminal while it lives: log lines go above it, and it is cleared
/// when dropped (also when the task drawing it is aborted).
struct BarGuard(ProgressBar);

impl BarGuard {
    fn new(bar: ProgressBar) -> Self {
        crate::logging::show_bar(Some(bar.clone()));
        Self(bar)
    }
}

impl Drop for BarGuard {
    fn drop(&mut self) {
        crate::logging::show_bar(None);
        self.0.finish_and_clear();
    }
}

/// Shows a download's progress as it arrives: an `indicatif` bar on a terminal (cleared
/// when the download ends or fails), a log line every few seconds otherwise.
async fn show_progress(mut progress: watch::Receiver<FetchProgress>, id: VersionId, bar: bool) {
    let pb = bar.then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:30} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} peers {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    });
    let _clear = pb.clone().map(BarGuard::new);
    let mut last_log = Instant::now();
    // Bytes held (resumed or copied) when the manifest became known, and when: the rate is
    // of what arrived since.
    let mut first: Option<(u64, Instant)> = None;
    while progress.changed().await.is_ok() {
        let p = *progress.borrow_and_update();
        if p.chunks > 0 {
            first.get_or_insert((p.bytes_held, Instant::now()));
        }
        if let Some(pb) = &pb {
            pb.set_length(p.size);
            pb.set_position(p.bytes_held);
            pb.set_message(p.peers.to_string());
        } else if last_log.elapsed() >= Duration::from_secs(2) && p.chunks > 0 {
            last_log = Instant::now();
            let (base, since) = first.unwrap_or((p.bytes_held, Instant::now()));
            let rate =
                p.bytes_held.saturating_sub(base) as f64 / since.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                version = %id.short(),
                progress = format!("{:.1}%", 100.0 * f64::from(p.chunks_held) / f64::from(p.chunks)),
                held_mib = format!("{:.1}", mib(p.bytes_held)), size_mib = format!("{:.1}", mib(p.size)),
                rate_mib_s = format!("{:.1}", rate / (1024.0 * 1024.0)), peers = p.peers,
                "downloading"
            );
        }
    }
}

/// On a terminal, training progress as an `indicatif` bar (steps, then the last evaluation,
/// averaging rounds and the share of time waiting on the network), cleared when training
/// ends; evaluations are also logged as lines, as without a terminal.
async fn show_training_progress(mut status: watch::Receiver<crate::training::TrainingStatus>) {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let _clear = BarGuard::new(pb.clone());
    loop {
        {
            let s = status.borrow_and_update();
            pb.set_length(s.steps);
            pb.set_position(s.step);
            let figure = match (s.bits_per_char, s.accuracy) {
                (Some(b), _) => format!("bits/char {b:.3}"),
                (None, Some(a)) => format!("accuracy {a:.3}"),
                (None, None) => String::new(),
            };
            pb.set_message(format!(
                "{:.0}/s | loss {} {figure} | {} rounds, waiting {:.0}% | {}",
                s.steps_per_second,
                s.loss.map_or("-".to_string(), |l| format!("{l:.3}")),
                s.averaging_rounds,
                s.network_wait_fraction * 100.0,
                s.state.as_str(),
            ));
        }
        if status.changed().await.is_err() {
            break;
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints the peer id, API address and joining commands.
fn print_banner(handle: &NodeHandle) {
    println!("peer id: {}", handle.peer_id);
    if let Some(api) = handle.api_addr {
        println!("API listening on http://{api}");
    }
    for addr in handle
        .join_addrs()
        .iter()
        .filter(|a| a.to_string().contains("/tcp/"))
    {
        println!("join this network with: p2p-node --bootstrap {addr}");
    }
}

/// Runs until Ctrl-C or SIGTERM (then stops gracefully) or until the node fails.
async fn run_until_signal(mut handle: NodeHandle, shutdown: &mut ShutdownSignal) -> Result<()> {
    tokio::select! {
        () = shutdown.recv() => {}
        result = handle.stopped() => return result,
    }
    tracing::info!("shutting down");
    handle.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::client::JoinState;

    fn status(connected: usize, ever: bool) -> NetworkStatus {
        NetworkStatus {
            peer_id: String::new(),
            listen_addrs: Vec::new(),
            connected_peers: connected,
            routing_table_peers: 0,
            known_peers: 0,
            join: JoinState {
                ever_connected: ever,
                last_dial_error: Some("p: Connection refused".into()),
                ..JoinState::default()
            },
            ..NetworkStatus::default()
        }
    }

    fn state(held: u32, holders: usize, since: Option<f64>) -> DownloadState {
        DownloadState {
            manifest: held > 0,
            chunks_held: held,
            chunks: 10,
            holders,
            last_failure: Some("q: timeout".into()),
            seconds_since_chunk: since,
        }
    }

    #[test]
    fn a_stalled_download_is_explained_by_what_was_seen() {
        let unreachable = stall_reason(&status(0, false), &state(0, 0, None));
        assert!(
            unreachable.starts_with("no peer could be reached"),
            "{unreachable}"
        );
        assert!(unreachable.contains("Connection refused"), "{unreachable}");
        let slow = stall_reason(&status(2, true), &state(4, 2, Some(1.0)));
        assert!(slow.contains("too slow"), "{slow}");
        let left = stall_reason(&status(0, true), &state(4, 1, Some(30.0)));
        assert!(left.contains("the holders left"), "{left}");
        let nobody = stall_reason(&status(3, true), &state(0, 0, None));
        assert!(nobody.contains("none has this version"), "{nobody}");
        let silent = stall_reason(&status(3, true), &state(4, 2, Some(25.0)));
        assert!(
            silent.contains("2 peer(s) hold it, but none sent a chunk for 25 s")
                && silent.contains("q: timeout"),
            "{silent}"
        );
    }
}
