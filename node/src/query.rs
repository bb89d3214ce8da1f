//! `p2p-node status`, `p2p-node peers` and `p2p-node models`: ask a running node's JSON API
//! (found through the address it wrote to `DATA_DIR/api-addr`, or `--api`) and print a table
//! (`comfy-table`), or the JSON itself with `--json`.
//!
//! The formatting functions are pure (JSON in, text out); [`get`] is the one that does I/O.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

/// How long a query waits for the node.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of an answer read.
const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// The API address to ask: the one the node running on a data dir wrote to `file`
/// ([`crate::config::NodeConfig::api_addr_path`]), else `configured` (`--api-addr` or the
/// config file's `api_addr`) when it names a port.
pub fn find_api(file: &Path, configured: Option<SocketAddr>) -> Result<SocketAddr> {
    match api_addr(file) {
        Ok(addr) => Ok(addr),
        Err(e) => configured.filter(|a| a.port() != 0).ok_or(e),
    }
}

/// The API address a running node wrote to `file` (at most 256 bytes read).
pub fn api_addr(file: &Path) -> Result<SocketAddr> {
    let absent = || {
        anyhow!(
            "no running node found for data dir {} (no {}); start one with `p2p-node`, or \
             give its address with --api or --api-addr",
            file.parent().unwrap_or(file).display(),
            file.display()
        )
    };
    let bytes = crate::fsutil::read_bounded(file, 256)?.ok_or_else(absent)?;
    String::from_utf8_lossy(&bytes)
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold an IP:PORT", file.display()))
}

/// `GET path` from the API at `addr`, as JSON.
pub fn get(addr: SocketAddr, path: &str) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let mut response = agent.get(&url).call().map_err(|e| {
        anyhow!("cannot reach the node's API at {addr} (is the node running?): {e}")
    })?;
    let status = response.status();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()
        .with_context(|| format!("cannot read the answer of {url}"))?;
    if !status.is_success() {
        let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut shown: String = body.chars().take(300).collect();
        if shown.len() < body.len() {
            shown.push('…');
        }
        bail!("{url} answered {status}: {shown}");
    }
    serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON"))
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic);
    if !header.is_empty() {
        t.set_header(header.iter().copied());
    }
    t
}

/// `/status` → `relay` in one cell: the relay server's state, this node's reservations, and
/// hole punches.
fn relay_row(r: &Value) -> String {
    let server = if r["server_enabled"].as_bool() == Some(false) {
        "server off (--no-relay-server)"
    } else if r["serving"].as_bool().unwrap_or(false) {
        "relaying for others"
    } else {
        "not relaying (not public)"
    };
    let sum = |v: &Value| {
        v.as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>())
    };
    let hp = &r["hole_punch"];
    format!(
        "{server}; {} reservations held\nhole punches: {} ({} direct, {} failed)",
        r["reservations"].as_array().map_or(0, Vec::len),
        num(hp, "attempts"),
        sum(&hp["succeeded"]),
        sum(&hp["failed"]),
    )
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.4}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Bytes with a binary unit.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A peer id shortened to its start and end (by characters: the answer may come from
/// anything listening on that port).
fn short(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() > 16 {
        let head: String = chars[..8].iter().collect();
        let tail: String = chars[chars.len() - 6..].iter().collect();
        format!("{head}…{tail}")
    } else {
        id.to_string()
    }
}

/// Seconds as the largest two units (`3 h 12 min`).
pub fn duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} days {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `GET /status` as a two-column table.
pub fn format_status(s: &Value) -> String {
    let mut t = table(&[]);
    let c = &s["connections"];
    let tr = &s["transfers"];
    let rows = [
        ("peer id", text(&s["peer_id"])),
        ("version", text(&s["version"])),
        ("uptime", duration(num(s, "uptime_s"))),
        ("data dir", text(&s["data_dir"])),
        (
            "listening on",
            s["listen_addrs"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default(),
        ),
        (
            "connected peers",
            format!(
                "{} ({} inbound, {} outbound; {} relayed)",
                num(s, "connected_peers"),
                num(c, "inbound_direct") + num(c, "inbound_relayed"),
                num(c, "outbound_direct") + num(c, "outbound_relayed"),
                num(c, "inbound_relayed") + num(c, "outbound_relayed"),
            ),
        ),
        (
            "reachability",
            format!(
                "{} (Kademlia {})",
                text(&s["reachability"]),
                if s["kademlia_server"].as_bool().unwrap_or(false) {
                    "server"
                } else {
                    "client"
                },
            ),
        ),
        ("external addresses", {
            let list = s["external_addrs"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            if list.is_empty() {
                "none yet".to_string()
            } else {
                list
            }
        }),
        ("relay", relay_row(&s["relay"])),
        (
            "known peers",
            format!(
                "{} ({} in the routing table, {} banned)",
                num(s, "known_peers"),
                num(s, "routing_table_peers"),
                num(s, "banned_peers")
            ),
        ),
        (
            "chunks served",
            format!(
                "{} ({})",
                num(tr, "chunks_served"),
                human_bytes(num(tr, "bytes_served"))
            ),
        ),
        (
            "chunks fetched",
            format!(
                "{} ({}; {} bad)",
                num(tr, "chunks_fetched"),
                human_bytes(num(tr, "bytes_fetched")),
                num(tr, "bad_chunks")
            ),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    let training = &s["training"];
    if training.is_object() {
        let rows = [
            (
                "training",
                format!(
                    "{} ({})",
                    text(&training["model"]),
                    text(&training["state"])
                ),
            ),
            (
                "step",
                format!("{} / {}", num(training, "step"), num(training, "steps")),
            ),
            ("test loss", text(&training["loss"])),
            ("accuracy", text(&training["accuracy"])),
            ("bits per char", text(&training["bits_per_char"])),
            (
                "averaging rounds",
                format!(
                    "{} ({} failed)",
                    num(training, "averaging_rounds"),
                    num(training, "averaging_failures")
                ),
            ),
            (
                "waiting on network",
                format!(
                    "{:.0}%",
                    training["network_wait_fraction"].as_f64().unwrap_or(0.0) * 100.0
                ),
            ),
            ("peers in run", text(&training["run_peers"])),
        ];
        for (k, v) in rows {
            t.add_row(vec![k.to_string(), v]);
        }
    } else {
        t.add_row(vec!["training".to_string(), "not training".to_string()]);
    }
    t.to_string()
}

/// `GET /peers` as a table, connected peers first.
pub fn format_peers(peers: &Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_peers_at(peers, now)
}

/// How long ago `unix` was, at `now`.
fn ago(unix: u64, now: u64) -> String {
    match now.saturating_sub(unix) {
        _ if unix == 0 => "never".to_string(),
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// [`format_peers`] at Unix time `now` (seconds).
pub fn format_peers_at(peers: &Value, now: u64) -> String {
    let mut list: Vec<&Value> = peers
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    list.sort_by_key(|p| {
        (
            !p["connected"].as_bool().unwrap_or(false),
            p["peer_id"].as_str().unwrap_or("").to_string(),
        )
    });
    let mut t = table(&[
        "peer",
        "state",
        "path",
        "source",
        "last seen",
        "penalty",
        "address",
    ]);
    for p in &list {
        let state = if !p["banned_until_unix"].is_null() {
            "banned"
        } else if p["connected"].as_bool().unwrap_or(false) {
            "connected"
        } else {
            "known"
        };
        t.add_row(vec![
            short(p["peer_id"].as_str().unwrap_or("")),
            state.to_string(),
            text(&p["path"]),
            text(&p["source"]),
            if state == "connected" {
                "now".to_string()
            } else {
                ago(num(p, "last_seen_unix"), now)
            },
            text(&p["penalty"]),
            p["addrs"][0].as_str().unwrap_or("-").to_string(),
        ]);
    }
    let connected = list
        .iter()
        .filter(|p| p["connected"].as_bool().unwrap_or(false))
        .count();
    format!("{t}\n{} peers known, {connected} connected", list.len())
}

/// `GET /models` as a table.
pub fn format_models(models: &Value) -> String {
    let list = models.as_array().cloned().unwrap_or_default();
    let mut t = table(&[
        "model",
        "version",
        "id",
        "size",
        "chunks",
        "progress",
        "peers",
        "uploaded",
        "downloaded",
        "publisher",
    ]);
    for m in &list {
        let id = m["id"].as_str().unwrap_or("");
        t.add_row(vec![
            text(&m["model"]),
            text(&m["version"]),
            id.chars().take(12).collect(),
            human_bytes(num(m, "size")),
            format!("{} / {}", num(m, "chunks_held"), num(m, "chunks")),
            format!("{:.0}%", m["progress"].as_f64().unwrap_or(0.0) * 100.0),
            text(&m["peers_serving"]),
            human_bytes(num(m, "bytes_uploaded")),
            human_bytes(num(m, "bytes_downloaded")),
            short(m["publisher"].as_str().unwrap_or("")),
        ]);
    }
    if list.is_empty() {
        "no model versions held".to_string()
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_table_shows_connections_transfers_and_training() {
        let s = json!({
            "peer_id": "12D3KooWAbc", "version": "0.1.0", "uptime_s": 42, "data_dir": "/d",
            "listen_addrs": ["/ip4/127.0.0.1/tcp/1"], "connected_peers": 3, "known_peers": 5,
            "routing_table_peers": 4, "banned_peers": 1,
            "reachability": "private", "kademlia_server": false, "external_addrs": [],
            "relay": {"server_enabled": true, "serving": false, "reservations": ["12D3KooWr1", "12D3KooWr2"],
                      "hole_punch": {"attempts": 3, "succeeded": {"tcp": 1, "quic": 1}, "failed": {"attempts_exceeded": 1}}},
            "connections": {"inbound_direct": 1, "inbound_relayed": 0, "outbound_direct": 1, "outbound_relayed": 1},
            "transfers": {"chunks_served": 7, "bytes_served": 7340032, "chunks_fetched": 2, "bytes_fetched": 2048, "bad_chunks": 1},
            "training": {"model": "digits-mlp", "state": "training", "step": 10, "steps": 600, "loss": 0.5,
                         "accuracy": 0.9, "averaging_rounds": 4, "averaging_failures": 1, "network_wait_fraction": 0.25, "run_peers": 2}
        });
        let out = format_status(&s);
        for expected in [
            "12D3KooWAbc",
            "3 (1 inbound, 2 outbound; 1 relayed)",
            "5 (4 in the routing table, 1 banned)",
            "7 (7.0 MiB)",
            "2 (2.0 KiB; 1 bad)",
            "10 / 600",
            "4 (1 failed)",
            "25%",
            "digits-mlp (training)",
            "private (Kademlia client)",
            "none yet",
            "not relaying (not public); 2 reservations held",
            "hole punches: 3 (2 direct, 1 failed)",
        ] {
            assert!(out.contains(expected), "{expected:?} in\n{out}");
        }
        assert!(format_status(&json!({})).contains("not training"));
    }

    #[test]
    fn peers_table_lists_connected_first_and_counts() {
        let peers = json!([
            {"peer_id": "12D3KooWzzzzzzzzzzzzzzzzzz", "connected": false, "source": "cache", "addrs": [], "penalty": 0, "banned_until_unix": null, "last_seen_unix": 5, "path": null},
            {"peer_id": "12D3KooWaaaaaaaaaaaaaaaaaa", "connected": true, "source": "bootstrap", "addrs": ["/ip4/1.2.3.4/tcp/1"], "penalty": 1, "banned_until_unix": null, "last_seen_unix": 9, "path": "direct"}
        ]);
        let out = format_peers_at(&peers, 65);
        let (a, z) = (out.find("12D3KooW…aaaaaa"), out.find("12D3KooW…zzzzzz"));
        assert!(a.is_some() && z.is_some() && a < z, "{out}");
        assert!(
            out.contains("direct") && out.contains("/ip4/1.2.3.4/tcp/1"),
            "{out}"
        );
        assert!(out.ends_with("2 peers known, 1 connected"), "{out}");
    }

    #[test]
    fn models_table_shows_progress_and_sizes() {
        let models = json!([{"model": "m", "version": 3, "id": "abcdef0123456789", "size": 3145728, "chunks": 4,
            "chunks_held": 2, "progress": 0.5, "peers_serving": 2, "bytes_uploaded": 0, "bytes_downloaded": 2097152, "publisher": "12D3KooWpub"}]);
        let out = format_models(&models);
        for expected in ["abcdef012345", "3.0 MiB", "2 / 4", "50%", "2.0 MiB"] {
            assert!(out.contains(expected), "{expected:?} in\n{out}");
        }
        assert_eq!(format_models(&json!([])), "no model versions held");
    }

    #[test]
    fn a_missing_api_addr_file_says_no_node_runs_there() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = api_addr(&dir.path().join("api-addr"))
            .expect_err("no node")
            .to_string();
        assert!(
            err.contains("no running node") && err.contains("--api"),
            "{err}"
        );
    }

    #[test]
    fn answers_from_something_else_do_not_panic() {
        let weird = json!([{"id": "aéééééééééééééééé", "peer_id": "ééééééééééééééééééé", "publisher": "é"}]);
        assert!(format_models(&weird).contains("aééééééééééé"));
        assert!(format_peers(&weird).contains("éééééééé…éééééé"));
        assert!(format_status(&json!({"uptime_s": "x", "connections": 3})).contains("not training"));
    }

    #[test]
    fn the_configured_address_is_the_fallback_when_it_names_a_port() {
        let dir = tempfile::tempdir().expect("temp dir");
        let configured: SocketAddr = "127.0.0.1:4002".parse().expect("addr");
        assert_eq!(
            find_api(&dir.path().join("api-addr"), Some(configured)).expect("configured"),
            configured
        );
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert!(find_api(&dir.path().join("api-addr"), Some(any_port)).is_err());
        std::fs::write(dir.path().join("api-addr"), "127.0.0.1:5555\n").expect("write");
        assert_eq!(
            find_api(&dir.path().join("api-addr"), Some(configured))
                .expect("file")
                .port(),
            5555,
            "the running node's own file comes first"
        );
    }
}
