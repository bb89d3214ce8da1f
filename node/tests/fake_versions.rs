//! The adversarial peer's fake newest versions, as processes: a liar publishes a dozen versions
//! of a model a follower follows (numbered 0 to 11, above the real publisher's 0 and 1), each
//! with the largest tensor index its size allows (2,048 tensors for 4 MiB; a 64 KiB file with
//! a 65,536-entry index, the attack as first reported, is refused by every manifest check, see
//! `p2p_protocol::manifest::max_tensors`). The follower fetches none of them (they are the
//! liar's, not the publisher's it follows), its memory and disk stay as they were, its API
//! stays responsive, and the real publisher's next version still arrives. A second follower
//! that trusts the liar for the name does fetch them (manifests decoded off its event loop, at
//! most the newest in progress); its memory figure is printed.
//!
//! Figures print with `cargo test -p p2p-node --test fake_versions -- --nocapture`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{poll, Running, LOOPBACK};
use common::{http_get, http_post_json};

const FAKES: usize = 12;
/// Tensors in each fake version, of [`FAKE_TENSOR_BYTES`] each: the most a file of that size
/// may list.
const FAKE_TENSORS: usize = 2048;
const FAKE_TENSOR_BYTES: usize = 2048;
const WAIT: Duration = Duration::from_secs(240);

fn start(data_dir: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["--data-dir", data_dir.to_str().unwrap()];
    args.extend(LOOPBACK);
    args.extend(extra);
    Running::start(&args)
}

/// A safetensors file of [`FAKE_TENSORS`] tensors with long names.
fn fake_file(path: &Path, seed: usize) {
    let padding = "x".repeat(60);
    let tensors: Vec<(String, Vec<u8>)> = (0..FAKE_TENSORS)
        .map(|i| {
            let name = format!("t{seed:02}.{i:06}.{padding}");
            (
                name,
                common::pseudo_random(FAKE_TENSOR_BYTES, (seed * FAKE_TENSORS + i) as u64),
            )
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    common::write_safetensors(path, &refs);
}

/// `(kB, kB)`: the process's resident memory now and at its peak.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                disk_bytes(&path)
            } else {
                std::fs::metadata(&path).map_or(0, |m| m.len())
            }
        })
        .sum()
}

/// The versions of `model` the node holds completely: (publisher, number).
fn held(api: std::net::SocketAddr, model: &str) -> Vec<(String, u64)> {
    let (_, body) = http_get(api, "/models").unwrap();
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["model"] == model && m["complete"] == true)
        .map(|m| {
            (
                m["publisher"].as_str().unwrap().to_string(),
                m["version"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn peer_id(api: std::net::SocketAddr) -> String {
    let (_, body) = http_get(api, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["peer_id"].as_str().unwrap().to_string()
}

fn publish(api: std::net::SocketAddr, file: &Path, model: &str) -> serde_json::Value {
    let body = format!(
        r#"{{"path": "{}", "model": "{model}"}}"#,
        file.to_str().unwrap()
    );
    let (code, answer) = http_post_json(api, "/publish", &body).unwrap();
    assert_eq!(code, 200, "{answer}");
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn a_liars_fake_versions_move_nothing_on_a_follower() {
    let files = tempfile::tempdir().unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (real0, _) = common::model_file(files.path(), "real0.safetensors", 1, 1);
    let (real1, _) = common::model_file(files.path(), "real1.safetensors", 1, 2);

    let mut publisher = start(
        dirs[0].path(),
        &["--publish", real0.to_str().unwrap(), "--model", "m"],
    );
    let publisher_api = publisher.api_addr();
    let join = publisher.join_addr();
    let publisher_id = peer_id(publisher_api);
    let mut follower = start(dirs[1].path(), &["--bootstrap", &join, "--follow", "m"]);
    let follower_api = follower.api_addr();
    poll(WAIT, "the follower to fetch version 0", || {
        held(follower_api, "m")
            .contains(&(publisher_id.clone(), 0))
            .then_some(())
    });
    let pid = follower.child.id();
    let (rss_before, _) = memory_kib(pid);
    let disk_before = disk_bytes(&dirs[1].path().join("models"));

    // The liar: its own signed versions of "m", one after another, each announced on gossip.
    let mut liar = start(dirs[2].path(), &["--bootstrap", &join]);
    let liar_api = liar.api_addr();
    let liar_id = peer_id(liar_api);
    // The follower that trusts the liar for "m".
    let trusting_dir = tempfile::tempdir().unwrap();
    let bound = format!("m={liar_id}");
    let mut trusting = start(
        trusting_dir.path(),
        &["--bootstrap", &join, "--follow", "m", "--trust", &bound],
    );
    let trusting_api = trusting.api_addr();
    let (trusting_rss_before, _) = memory_kib(trusting.child.id());
    let mut slowest_health = Duration::ZERO;
    let mut trusting_slowest = Duration::ZERO;
    let probe = |api, slowest: &mut Duration| {
        let t = Instant::now();
        let (code, _) = http_get(api, "/healthz").unwrap();
        assert_eq!(code, 200);
        *slowest = (*slowest).max(t.elapsed());
    };
    for i in 0..FAKES {
        let file = files.path().join(format!("fake{i}.safetensors"));
        fake_file(&file, i);
        let answer = publish(liar_api, &file, "m");
        assert_eq!(answer["publisher"], liar_id.as_str());
        std::fs::remove_file(&file).unwrap();
        probe(follower_api, &mut slowest_health);
        probe(trusting_api, &mut trusting_slowest);
    }
    // The follower saw them (it says so), and fetched none.
    follower.wait_line(common::process::Stream::Stderr, WAIT, |l| {
        l.contains("not following another publisher's versions of a followed model")
            && l.contains(&liar_id)
    });
    probe(follower_api, &mut slowest_health);
    probe(trusting_api, &mut trusting_slowest);

    // The trusting follower ends with the liar's newest.
    poll(
        WAIT,
        "the trusting follower to fetch the liar's newest",
        || {
            held(trusting_api, "m")
                .contains(&(liar_id.clone(), FAKES as u64 - 1))
                .then_some(())
        },
    );
    let (trusting_rss, trusting_peak) = memory_kib(trusting.child.id());
    let trusting_held = held(trusting_api, "m").len();

    // The real publisher's next version still arrives.
    let answer = publish(publisher_api, &real1, "m");
    assert_eq!(
        answer["version"], 1,
        "numbered from its own chain: {answer}"
    );
    poll(WAIT, "the follower to fetch version 1", || {
        held(follower_api, "m")
            .contains(&(publisher_id.clone(), 1))
            .then_some(())
    });
    probe(follower_api, &mut slowest_health);
    probe(trusting_api, &mut trusting_slowest);
    let versions = held(follower_api, "m");
    assert!(
        versions.iter().all(|(p, _)| *p == publisher_id),
        "only the followed publisher's versions: {versions:?}"
    );
    let (rss_after, peak) = memory_kib(pid);
    let disk_after = disk_bytes(&dirs[1].path().join("models"));
    let liar_manifests = disk_bytes(&dirs[2].path().join("models"));
    println!(
        "follower: RSS {} -> {} MiB (peak {} MiB); models on disk {:.1} -> {:.1} MiB; slowest /healthz {} ms; \
         the liar published {FAKES} versions holding {:.1} MiB ({FAKE_TENSORS} tensors each)",
        rss_before / 1024,
        rss_after / 1024,
        peak / 1024,
        disk_before as f64 / 1048576.0,
        disk_after as f64 / 1048576.0,
        slowest_health.as_millis(),
        liar_manifests as f64 / 1048576.0,
    );
    println!(
        "trusting follower: RSS {} -> {} MiB (peak {} MiB) holding {trusting_held} of the liar's versions; slowest /healthz {} ms",
        trusting_rss_before / 1024,
        trusting_rss / 1024,
        trusting_peak / 1024,
        trusting_slowest.as_millis(),
    );
    assert!(
        trusting_slowest < Duration::from_secs(2),
        "/healthz took {trusting_slowest:?} while the liar's versions arrived"
    );
    // Version 1 (1 MiB) is the only growth on disk; memory grows by far less than one fake
    // manifest per version would cost (the report had 19 -> 334 MiB).
    assert!(
        disk_after < disk_before + (3 << 20),
        "{disk_before} -> {disk_after}"
    );
    assert!(
        rss_after < rss_before + 48 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        slowest_health < Duration::from_secs(2),
        "/healthz took {slowest_health:?}"
    );
}
