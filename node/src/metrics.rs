//! Prometheus metrics (`GET /metrics`, OpenMetrics text exposition via `prometheus-client`).
//!
//! Two sources, one answer:
//! - libp2p's own recorder (`libp2p-metrics`): swarm connections and dial errors, Kademlia
//!   queries, gossipsub, identify, ping and transport bandwidth, as `libp2p_*` families,
//!   recorded by the event loop as events happen;
//! - the node's families, `p2p_node_*`, built at scrape time from a [`Snapshot`] of the
//!   state the JSON API shows (`/status`, `/models`), so no counter is kept twice. Counters
//!   (`*_total`) come from cumulative figures kept since the node started.
//!
//! Names carry their unit (`_bytes`, `_seconds`, `_ratio`), as Prometheus asks. The families
//! are listed in the README and drawn by `contrib/grafana/p2p-node.json`.

use std::path::Path;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::models::ModelInfo;
use crate::network::NetworkStatus;

/// The content type of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the node's families are built from: one scrape's view of the node.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `/status` (with `training` filled in while the node trains).
    pub status: NetworkStatus,
    /// `/models`.
    pub models: Vec<ModelInfo>,
    /// Bytes the model store takes on disk (allocated blocks, so sparse files count what
    /// they hold).
    pub store_disk_bytes: u64,
    /// Seconds since the node started.
    pub uptime_seconds: f64,
}

type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;
type Labels = Vec<(String, String)>;

fn gauge(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: f64) {
    let g = GaugeF::default();
    g.set(value);
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, g),
        None => registry.register(name, help, g),
    }
}

fn counter(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: f64) {
    let c = CounterF::default();
    c.inc_by(value.max(0.0));
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, c),
        None => registry.register(name, help, c),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The node's families (`p2p_node_*`) for `s`.
pub fn node_registry(s: &Snapshot) -> Registry {
    let mut r = Registry::with_prefix("p2p_node");
    let status = &s.status;
    r.register(
        "build",
        "This node's software version and peer id",
        Info::new(labels(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("peer_id", &status.peer_id),
        ])),
    );
    gauge(
        &mut r,
        "uptime",
        "Time since the node started",
        Some(Unit::Seconds),
        s.uptime_seconds,
    );

    // Connections and peers.
    let connections = Family::<Labels, GaugeF>::default();
    let c = status.connections;
    for (direction, path, n) in [
        ("inbound", "direct", c.inbound_direct),
        ("inbound", "relayed", c.inbound_relayed),
        ("outbound", "direct", c.outbound_direct),
        ("outbound", "relayed", c.outbound_relayed),
    ] {
        connections
            .get_or_create(&labels(&[("direction", direction), ("path", path)]))
            .set(n as f64);
    }
    r.register(
        "connections",
        "Live connections by direction (who dialled) and path (direct or through a relay)",
        connections,
    );
    let peers = [
        (
            "peers_connected",
            "Peers with a live connection",
            status.connected_peers,
        ),
        (
            "peers_known",
            "Peers in the address book",
            status.known_peers,
        ),
        (
            "peers_routing_table",
            "Peers in the Kademlia routing table",
            status.routing_table_peers,
        ),
        ("peers_banned", "Peers banned now", status.banned_peers),
    ];
    for (name, help, n) in peers {
        gauge(&mut r, name, help, None, n as f64);
    }
    counter(
        &mut r,
        "connections_denied",
        "Connections refused (banned peers, peers not on the allowlist)",
        None,
        status.denied_connections as f64,
    );
    counter(
        &mut r,
        "peer_penalties",
        "Offences counted against peers (bad chunks, lies in averaging, ...)",
        None,
        status.penalties as f64,
    );
    counter(&mut r, "peer_bans", "Bans given", None, status.bans as f64);
    let reachability = Family::<Labels, GaugeF>::default();
    for state in ["public", "private", "unknown"] {
        let on = if status.reachability.as_str() == state {
            1.0
        } else {
            0.0
        };
        reachability
            .get_or_create(&labels(&[("state", state)]))
            .set(on);
    }
    r.register(
        "reachability",
        "1 for what AutoNAT says of this node: public (dialable), private or unknown",
        reachability,
    );
    gauge(
        &mut r,
        "kademlia_server",
        "1 while Kademlia answers DHT queries (server mode), 0 as a client",
        None,
        if status.kademlia_server { 1.0 } else { 0.0 },
    );
    let probes = Family::<Labels, CounterF>::default();
    probes
        .get_or_create(&labels(&[("result", "ok")]))
        .inc_by(status.autonat_probes_ok as f64);
    probes
        .get_or_create(&labels(&[("result", "failed")]))
        .inc_by(status.autonat_probes_failed as f64);
    r.register(
        "autonat_probes",
        "AutoNAT probes of this node's addresses, by result",
        probes,
    );

    // Relays and hole punching.
    let relay = &status.relay;
    gauge(
        &mut r,
        "relay_serving",
        "1 while this node relays circuits for private peers (public, relay server on)",
        None,
        if relay.serving { 1.0 } else { 0.0 },
    );
    gauge(
        &mut r,
        "relay_reservations",
        "Relays holding a reservation for this node",
        None,
        relay.reservations.len() as f64,
    );
    let served = Family::<Labels, CounterF>::default();
    for (what, n) in [
        ("reservations_accepted", relay.served.reservations_accepted),
        ("requests_denied", relay.served.requests_denied),
        ("circuits", relay.served.circuits),
    ] {
        served
            .get_or_create(&labels(&[("what", what)]))
            .inc_by(n as f64);
    }
    r.register(
        "relay_served",
        "Relay-server work for others: reservations accepted, requests denied, circuits opened",
        served,
    );
    let punch = &relay.hole_punch;
    counter(
        &mut r,
        "hole_punch_attempts",
        "DCUtR hole punches, succeeded or not",
        None,
        punch.attempts as f64,
    );
    // Every known label value is served from the start (at 0), so that rates and
    // dashboards have a series before the first punch.
    for (name, help, label, keys, counts) in [
        (
            "hole_punch_succeeded",
            "Hole punches that gave a direct connection, by transport",
            "transport",
            crate::network::relays::HOLE_PUNCH_TRANSPORTS,
            &punch.succeeded,
        ),
        (
            "hole_punch_failed",
            "Hole punches given up, by reason",
            "reason",
            crate::network::relays::HOLE_PUNCH_FAILURE_REASONS,
            &punch.failed,
        ),
    ] {
        let family = Family::<Labels, CounterF>::default();
        for key in keys {
            let n = counts.get(*key).copied().unwrap_or(0);
            family
                .get_or_create(&labels(&[(label, key)]))
                .inc_by(n as f64);
        }
        r.register(name, help, family);
    }

    // The swarm: chunks moved, over every version.
    let t = status.transfers;
    let chunk_counters = [
        (
            "chunks_served",
            "Chunks sent to peers",
            None,
            t.chunks_served,
        ),
        (
            "chunks_served",
            "Bytes of chunks sent to peers",
            Some(Unit::Bytes),
            t.bytes_served,
        ),
        (
            "chunks_fetched",
            "Chunks received from peers that matched their hash",
            None,
            t.chunks_fetched,
        ),
        (
            "chunks_fetched",
            "Bytes of chunks received from peers that matched their hash",
            Some(Unit::Bytes),
            t.bytes_fetched,
        ),
        (
            "bad_chunks",
            "Chunks received that did not match their hash",
            None,
            t.bad_chunks,
        ),
    ];
    for (name, help, unit, n) in chunk_counters {
        counter(&mut r, name, help, unit, n as f64);
    }
    version_families(&mut r, &s.models);
    gauge(
        &mut r,
        "store_disk",
        "Disk space the model store takes",
        Some(Unit::Bytes),
        s.store_disk_bytes as f64,
    );

    if let Some(training) = &status.training {
        training_families(&mut r, training);
    }
    r
}

/// Per version held: chunks, progress, peers serving it.
fn version_families(r: &mut Registry, models: &[ModelInfo]) {
    let held = Family::<Labels, GaugeF>::default();
    let total = Family::<Labels, GaugeF>::default();
    let progress = Family::<Labels, GaugeF>::default();
    let serving = Family::<Labels, GaugeF>::default();
    for m in models {
        let version = m.version.to_string();
        let id = &m.id[..m.id.len().min(12)];
        let l = labels(&[("model", &m.model), ("version", &version), ("id", id)]);
        held.get_or_create(&l).set(f64::from(m.chunks_held));
        total.get_or_create(&l).set(f64::from(m.chunks));
        progress.get_or_create(&l).set(m.progress);
        serving.get_or_create(&l).set(m.peers_serving as f64);
    }
    r.register(
        "version_chunks_held",
        "Chunks of a version held and verified",
        held,
    );
    r.register("version_chunks", "Chunks in a version", total);
    r.register_with_unit(
        "version_progress",
        "Share of a version held, 0 to 1",
        Unit::Other("ratio".into()),
        progress,
    );
    r.register(
        "version_peers_serving",
        "Peers known to hold chunks of a version being fetched",
        serving,
    );
}

/// Training and averaging, while the node trains.
fn training_families(r: &mut Registry, t: &crate::training::TrainingStatus) {
    let sub = r.sub_registry_with_label((
        std::borrow::Cow::Borrowed("model"),
        std::borrow::Cow::Owned(t.model.clone()),
    ));
    let counters = [
        (
            "averaging_rounds",
            "Averaging rounds completed",
            None,
            t.averaging_rounds as f64,
        ),
        (
            "averaging_failures",
            "Averaging rounds that failed",
            None,
            t.averaging_failures as f64,
        ),
        (
            "averaging_sent",
            "Bytes sent in averaging exchanges",
            Some(Unit::Bytes),
            t.averaging_bytes_sent as f64,
        ),
        (
            "averaging_received",
            "Bytes received in averaging exchanges",
            Some(Unit::Bytes),
            t.averaging_bytes_received as f64,
        ),
        (
            "averaging",
            "Time the trainer spent in averaging rounds",
            Some(Unit::Seconds),
            t.averaging_seconds,
        ),
        (
            "averaging_waiting",
            "Time the trainer spent waiting for slower peers",
            Some(Unit::Seconds),
            t.waiting_seconds,
        ),
        (
            "averaging_mixes_refused",
            "Peers' parameters or pseudo-gradients refused by the guards",
            None,
            t.mixes_refused as f64,
        ),
    ];
    for (name, help, unit, value) in counters {
        counter(sub, name, help, unit, value);
    }
    let gauges = [
        ("training_step", "Local steps taken", Some(t.step as f64)),
        (
            "training_samples_seen",
            "Samples the parameters have seen, this node's and inherited (a gauge: a rollback \
             lowers it)",
            Some(t.samples_seen as f64),
        ),
        (
            "training_steps",
            "Local steps the run asks for",
            Some(t.steps as f64),
        ),
        (
            "training_outer_step",
            "Outer steps taken",
            Some(t.outer_step as f64),
        ),
        (
            "training_last_outer_rate",
            "Learning rate the last outer step applied (FedExP's factor included)",
            Some(t.last_outer_rate),
        ),
        (
            "training_steps_per_second",
            "Training speed since the last report",
            Some(t.steps_per_second),
        ),
        ("training_loss", "Test loss at the last evaluation", t.loss),
        (
            "training_batch_loss",
            "Loss of the last training batch",
            t.batch_loss.map(f64::from),
        ),
        (
            "training_bits_per_char",
            "Test loss in bits per character (text runs)",
            t.bits_per_char,
        ),
        (
            "training_run_peers",
            "Peers known to train the same run",
            Some(t.run_peers as f64),
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            gauge(sub, name, help, None, v);
        }
    }
    let state = Family::<Labels, GaugeF>::default();
    for name in ["waiting for peers", "training", "finished", "failed"] {
        let on = if t.state.as_str() == name { 1.0 } else { 0.0 };
        state.get_or_create(&labels(&[("state", name)])).set(on);
    }
    sub.register(
        "training_state",
        "1 for the state training is in (waiting for peers, training, finished, failed)",
        state,
    );
    if let Some(a) = t.accuracy.filter(|a| a.is_finite()) {
        gauge(
            sub,
            "training_accuracy",
            "Test accuracy at the last evaluation, 0 to 1",
            Some(Unit::Other("ratio".into())),
            a,
        );
    }
}

/// The whole answer: the node's families, then libp2p's, then `# EOF`.
pub fn render(snapshot: &Snapshot, libp2p: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    encode_registry(&mut out, &node_registry(snapshot))?;
    encode_registry(&mut out, libp2p)?;
    encode_eof(&mut out)?;
    Ok(out)
}

/// Disk space taken by the files under `dir` (allocated 512-byte blocks), recursively; what
/// cannot be read counts 0. Symbolic links are not followed.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&entry.path()),
            Ok(m) if m.is_file() => m.blocks() * 512,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_files_in_subdirectories() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("a")).expect("mkdir");
        std::fs::write(dir.path().join("a/f"), vec![1u8; 100_000]).expect("write");
        std::fs::write(dir.path().join("g"), vec![1u8; 10_000]).expect("write");
        let used = disk_usage(dir.path());
        assert!((110_000..=140_000).contains(&used), "{used}");
        assert_eq!(disk_usage(&dir.path().join("missing")), 0);
    }
}
