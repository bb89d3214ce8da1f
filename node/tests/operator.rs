//! The operator's view: Prometheus metrics that parse and move during a fetch and a training
//! run, and the live dashboard in a real headless browser.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::training::{options, start_nodes, stop_all, train};
use common::{http_get, model_file, wait_for, wait_fully_discovered, CONVERGE_TIMEOUT};

/// A small two-shard digits run that averages often and publishes checkpoints.
const SPEC: &str = "model = \"digits-mlp\"\ndataset = \"digits\"\nshards = 2\nsteps = 400\n\
    average_every = 10\ncheckpoint_every = 50\n";

/// A sample's labels.
type Labels = BTreeMap<String, String>;

/// One scrape: sample name -> [(labels, value)].
struct Scrape(BTreeMap<String, Vec<(Labels, f64)>>);

impl Scrape {
    /// `GET /metrics`, checked to be a 200 answer that a Prometheus text parser reads whole.
    fn take(api: SocketAddr) -> Self {
        let (code, body) = http_get(api, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        assert!(
            body.ends_with("# EOF\n"),
            "OpenMetrics answers end with # EOF"
        );
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        // Every sample line was read (histogram lines fold into one sample of their base).
        let names: std::collections::BTreeSet<&str> =
            parsed.samples.iter().map(|s| s.metric.as_str()).collect();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                names.contains(name) || names.contains(base),
                "the parser read {line:?}"
            );
        }
        let mut map: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for s in parsed.samples {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                // Histograms and summaries: their sample count.
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => continue,
            };
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            map.entry(s.metric).or_default().push((labels, value));
        }
        Self(map)
    }

    /// The sum of the samples named `name` whose labels include `with`; `None` if absent.
    fn value(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        let samples = self.0.get(name)?;
        let matching: Vec<f64> = samples
            .iter()
            .filter(|(labels, _)| {
                with.iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn get(&self, name: &str) -> f64 {
        self.value(name, &[])
            .unwrap_or_else(|| panic!("no {name} in the scrape"))
    }
}

/// The status code of `GET path` sent with `Host: host`.
fn status_with_host(api: SocketAddr, path: &str, host: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(api).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Families every node serves from the start.
const ALWAYS: [&str; 24] = [
    "p2p_node_build_info",
    "p2p_node_relay_serving",
    "p2p_node_relay_reservations",
    "p2p_node_relay_served_total",
    "p2p_node_hole_punch_attempts_total",
    "p2p_node_reachability",
    "p2p_node_kademlia_server",
    "p2p_node_autonat_probes_total",
    "p2p_node_uptime_seconds",
    "p2p_node_connections",
    "p2p_node_peers_connected",
    "p2p_node_peers_known",
    "p2p_node_peers_routing_table",
    "p2p_node_peers_banned",
    "p2p_node_peer_penalties_total",
    "p2p_node_peer_bans_total",
    "p2p_node_chunks_served_total",
    "p2p_node_chunks_served_bytes_total",
    "p2p_node_chunks_fetched_total",
    "p2p_node_chunks_fetched_bytes_total",
    "p2p_node_bad_chunks_total",
    "p2p_node_store_disk_bytes",
    "libp2p_swarm_connections_established_total",
    "libp2p_bandwidth_bytes_total",
];

/// Families a training node adds.
const TRAINING: [&str; 11] = [
    "p2p_node_training_step",
    "p2p_node_training_state",
    "p2p_node_training_samples_seen",
    "p2p_node_training_loss",
    "p2p_node_training_accuracy_ratio",
    "p2p_node_averaging_rounds_total",
    "p2p_node_averaging_failures_total",
    "p2p_node_averaging_sent_bytes_total",
    "p2p_node_averaging_received_bytes_total",
    "p2p_node_averaging_seconds_total",
    "p2p_node_averaging_waiting_seconds_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_during_a_fetch_and_a_training_run() {
    let nodes = start_nodes(2).await;
    wait_fully_discovered("two nodes", &[&nodes[0], &nodes[1]]).await;
    let api = |i: usize| nodes[i].handle.api_addr.expect("API on");
    // DNS rebinding: a request under a foreign host name is refused, an address is not.
    assert_eq!(status_with_host(api(1), "/metrics", "evil.example:80"), 403);
    assert_eq!(status_with_host(api(1), "/metrics", "localhost"), 200);
    let before = Scrape::take(api(1));
    for name in ALWAYS {
        assert!(before.value(name, &[]).is_some(), "{name} is served");
    }
    assert!(before.get("p2p_node_peers_connected") >= 1.0);
    assert!(
        before.get("p2p_node_connections") >= 1.0,
        "connections are counted by direction and path"
    );
    assert!(before.get("libp2p_swarm_connections_established_total") >= 1.0);
    assert_eq!(before.get("p2p_node_chunks_fetched_total"), 0.0);

    // A fetch: node 1 downloads a 3-chunk version from node 0.
    let files = tempfile::tempdir().expect("temp dir");
    let (path, bytes) = model_file(files.path(), "m.safetensors", 3, 7);
    let published = nodes[0]
        .handle
        .client
        .publish(&path, "metrics-test")
        .await
        .expect("publish");
    nodes[1]
        .handle
        .client
        .fetch(published.id)
        .await
        .expect("fetch");
    let (fetcher, server) = (Scrape::take(api(1)), Scrape::take(api(0)));
    let chunks = (bytes.len() as f64 / (1 << 20) as f64).ceil();
    assert_eq!(fetcher.get("p2p_node_chunks_fetched_total"), chunks);
    assert!(fetcher.get("p2p_node_chunks_fetched_bytes_total") >= (3 << 20) as f64);
    assert_eq!(server.get("p2p_node_chunks_served_total"), chunks);
    assert!(server.get("p2p_node_chunks_served_bytes_total") >= (3 << 20) as f64);
    let version = [("model", "metrics-test")];
    assert_eq!(
        fetcher.value("p2p_node_version_chunks_held", &version),
        Some(chunks)
    );
    assert_eq!(
        fetcher.value("p2p_node_version_progress_ratio", &version),
        Some(1.0)
    );
    assert!(
        fetcher.get("p2p_node_store_disk_bytes")
            >= before.get("p2p_node_store_disk_bytes") + (3 << 20) as f64
    );
    assert!(
        fetcher.get("libp2p_bandwidth_bytes_total") > before.get("libp2p_bandwidth_bytes_total")
    );

    // A training run on both nodes: the training families appear and move.
    let spec = files.path().join("spec.toml");
    std::fs::write(&spec, SPEC).expect("write spec");
    let mut creator = options((0, 2), true);
    creator.create = Some(spec);
    let handles = vec![
        train(&nodes[0], creator).await,
        train(&nodes[1], options((1, 2), true)).await,
    ];
    let early = wait_for("training metrics", CONVERGE_TIMEOUT * 2, || async {
        let s = Scrape::take(api(1));
        (s.value("p2p_node_training_step", &[]).unwrap_or(0.0) >= 20.0
            && s.value("p2p_node_training_loss", &[]).is_some())
        .then_some(s)
    })
    .await;
    for name in TRAINING {
        assert!(early.value(name, &[]).is_some(), "{name} is served");
    }
    let later = wait_for("training metrics to move", CONVERGE_TIMEOUT * 2, || async {
        let s = Scrape::take(api(1));
        (s.get("p2p_node_training_step") > early.get("p2p_node_training_step")
            && s.get("p2p_node_averaging_rounds_total")
                > early.get("p2p_node_averaging_rounds_total")
            && s.get("p2p_node_averaging_sent_bytes_total") > 0.0
            && s.get("p2p_node_training_samples_seen")
                > early.get("p2p_node_training_samples_seen"))
        .then_some(s)
    })
    .await;
    // The Grafana dashboard draws families this node serves (bits per character: text runs).
    let grafana = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/p2p-node.json"),
    )
    .unwrap();
    let referenced: std::collections::BTreeSet<&str> = grafana
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("p2p_node_") || t.starts_with("libp2p_"))
        .collect();
    assert!(referenced.len() >= 20, "{referenced:?}");
    for name in referenced {
        assert!(
            later.value(name, &[]).is_some() || name == "p2p_node_training_bits_per_char",
            "the Grafana dashboard uses {name}, which the node does not serve"
        );
    }
    let step = &later.0["p2p_node_training_step"];
    assert!(
        step.iter().all(|(labels, _)| labels
            .get("model")
            .is_some_and(|m| m.starts_with("digits-mlp"))),
        "training families carry the run's model name: {step:?}"
    );
    stop_all(handles, nodes).await;
}

/// A browser on this machine: Chromium (Debian's `chromium`) or Chrome.
fn find_browser() -> Option<PathBuf> {
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    })
}

/// Runs the headless browser on `url` with `args`; returns its stdout.
fn browse(browser: &Path, profile: &Path, url: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("browser runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The number in `attr="N"` on the element with `id`, in a dumped DOM.
fn attribute_number(dom: &str, id: &str, attr: &str) -> Option<u64> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let tag_end = start + dom[start..].find('>')?;
    let tag = &dom[dom[..start].rfind('<')?..tag_end];
    let value = tag.split(&format!("{attr}=\"")).nth(1)?;
    value.split('"').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_headless_browser_plots_the_loss_and_lists_the_peers() {
    let Some(browser) = find_browser() else {
        eprintln!(
            "SKIPPED: no headless browser (install Debian's `chromium` package; scripts/test \
             does where it can)"
        );
        return;
    };
    let nodes = start_nodes(3).await;
    wait_fully_discovered("three nodes", &[&nodes[0], &nodes[1], &nodes[2]]).await;
    let files = tempfile::tempdir().expect("temp dir");
    let spec = files.path().join("spec.toml");
    std::fs::write(&spec, SPEC.replace("shards = 2", "shards = 3")).expect("write spec");
    let mut creator = options((0, 3), true);
    creator.create = Some(spec);
    let mut handles = vec![train(&nodes[0], creator).await];
    for (i, node) in nodes.iter().enumerate().skip(1) {
        handles.push(train(node, options((i as u32, 3), true)).await);
    }
    let url = format!("http://{}/", nodes[0].handle.api_addr.expect("API on"));
    let profile = tempfile::tempdir().expect("browser profile");
    let others: Vec<String> = nodes[1..].iter().map(|n| n.peer_id().to_string()).collect();
    // The page polls every 2 s; the browser runs it for 6 s of (virtual) time per look.
    const MIN_POINTS: u64 = 8;
    let dom = wait_for(
        "the dashboard's chart and peer table",
        CONVERGE_TIMEOUT * 3,
        || {
            let (browser, profile, url) = (browser.clone(), profile.path().to_owned(), url.clone());
            let others = others.clone();
            async move {
                // The browser blocks for seconds: off the runtime's workers.
                let dom = tokio::task::spawn_blocking(move || {
                    browse(
                        &browser,
                        &profile,
                        &url,
                        &["--virtual-time-budget=6000", "--dump-dom"],
                    )
                })
                .await
                .expect("browser task");
                let points = attribute_number(&dom, "loss-chart", "data-points").unwrap_or(0);
                let peers_listed = others
                    .iter()
                    .all(|p| dom.contains(&format!("data-peer=\"{p}\"")));
                // This node's test and batch losses, and at least one peer's checkpoints.
                let series = attribute_number(&dom, "loss-chart", "data-series").unwrap_or(0);
                (points >= MIN_POINTS && series >= 3 && peers_listed && dom.contains("<canvas"))
                    .then_some(dom)
            }
        },
    )
    .await;
    assert!(
        dom.contains("digits-mlp"),
        "the training section names the model"
    );
    assert!(
        dom.contains("data-version="),
        "the swarm table lists the run's versions"
    );
    // A screenshot as the test's artifact (target/test-artifacts/dashboard.png).
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let (b, p, u) = (browser.clone(), profile.path().to_owned(), url.clone());
    let screenshot = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || {
        browse(&b, &p, &u, &["--virtual-time-budget=6000", &screenshot])
    })
    .await
    .expect("browser task");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    stop_all(handles, nodes).await;
}
