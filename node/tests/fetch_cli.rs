//! Publishing and fetching through the `p2p-node` binary: a real fetch process killed with
//! SIGKILL halfway resumes from what it had verified; bad input gets one-line errors.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::Duration;

use common::process::{poll, run, Running, Stream, LOOPBACK};
use common::{http_get, http_post_json};

const QUICK: Duration = Duration::from_secs(60);
const SLOW: Duration = Duration::from_secs(240);

fn args<'a>(base: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(LOOPBACK);
    v
}

/// Runs `p2p-node fetch TARGET --out OUT --timeout SECONDS` on `data_dir`, joining through
/// `join`; returns (exit code, stdout, stderr).
fn fetch(
    target: &str,
    out: &Path,
    timeout: &str,
    data_dir: &Path,
    join: &str,
) -> (i32, String, String) {
    run(
        &args(&[
            "fetch",
            target,
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
            "--timeout",
            timeout,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--bootstrap",
            join,
        ]),
        Duration::from_secs(180),
    )
}

/// Starts a publisher process of `file` as `model`, capped at `rate` MiB/s; returns it with
/// its joining address.
fn publisher(dir: &Path, file: &Path, model: &str, rate: &str) -> (Running, String) {
    let mut node = Running::start(&args(&[
        "--data-dir",
        dir.to_str().unwrap(),
        "--publish",
        file.to_str().unwrap(),
        "--model",
        model,
        "--max-upload-rate",
        rate,
    ]));
    let join = node.join_addr();
    node.wait_line(Stream::Stdout, QUICK, |l| l.starts_with("published "));
    (node, join)
}

/// Chunks of the version held by the fetcher whose data dir is `dir`, from its API.
fn chunks_held(dir: &Path) -> Option<(u64, u64)> {
    let api = std::fs::read_to_string(dir.join("api-addr")).ok()?;
    let (_, body) = http_get(api.trim().parse().ok()?, "/models").ok()?;
    let models: serde_json::Value = serde_json::from_str(&body).ok()?;
    let m = models.as_array()?.first()?;
    Some((m["chunks_held"].as_u64()?, m["chunks"].as_u64()?))
}

/// The number before `label` in the fetch summary line.
fn count_before(line: &str, label: &str) -> u64 {
    let head = &line[..line
        .find(label)
        .unwrap_or_else(|| panic!("{label} in {line}"))];
    head.split_whitespace().last().unwrap().parse().unwrap()
}

#[test]
fn a_fetch_killed_halfway_resumes_without_downloading_verified_chunks_again() {
    let (files, pub_dir, fetch_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (file, bytes) = common::model_file(files.path(), "big.safetensors", 32, 7);
    // 4 MiB/s: the 32 MiB download takes about 8 s, long enough to be killed halfway.
    let (_publisher, join) = publisher(pub_dir.path(), &file, "resume-test", "4");
    let out = files.path().join("out.safetensors");
    let out_s = out.to_str().unwrap();
    let fetch_args = args(&[
        "fetch",
        "resume-test",
        "--out",
        out_s,
        "--no-progress",
        "--data-dir",
        fetch_dir.path().to_str().unwrap(),
        "--bootstrap",
        &join,
    ]);

    let mut first = Running::start(&fetch_args);
    let (held_at_kill, total) = poll(SLOW, "the fetch to get a quarter of the chunks", || {
        chunks_held(fetch_dir.path()).filter(|(held, total)| *held * 4 >= *total)
    });
    first.child.kill().unwrap(); // SIGKILL: no shutdown, no state saved
    first.child.wait().unwrap();
    assert!(held_at_kill < total, "killed too late to test resuming");
    assert!(
        !out.exists(),
        "no output file before the download completes"
    );

    let (code, stdout, stderr) = run(&fetch_args, SLOW);
    assert_eq!(code, 0, "{stderr}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("fetched resume-test version 0"))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    let downloaded = count_before(summary, "chunks downloaded");
    let resumed = count_before(summary, "already held");
    let copied = count_before(summary, "copied locally");
    assert!(
        resumed >= held_at_kill,
        "{resumed} chunks resumed, but {held_at_kill} were verified before the kill: {summary}"
    );
    assert_eq!(downloaded + resumed + copied, total, "{summary}");
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "fetched bytes differ"
    );
}

#[test]
fn fetch_of_an_unknown_model_fails_with_one_line() {
    let (files, pub_dir, fetch_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (file, _) = common::model_file(files.path(), "m.safetensors", 1, 8);
    let (_publisher, join) = publisher(pub_dir.path(), &file, "known", "100");
    let out = files.path().join("out");
    let (code, _, stderr) = fetch("no-such-model", &out, "3", fetch_dir.path(), &join);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("reachable, but none knows a version of model 'no-such-model'"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Two publishers of one name, both reachable, neither connected to the other: a fetch by the
/// bare name is refused naming both (not resolved to whichever answered first), and binding
/// the name with `--trust NAME=PEER_ID` fetches that publisher's bytes.
#[test]
fn a_name_two_reachable_peers_publish_is_refused_until_one_is_chosen() {
    let files = tempfile::tempdir().unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a_file, _) = common::model_file(files.path(), "a.safetensors", 1, 11);
    let (b_file, b_bytes) = common::model_file(files.path(), "b.safetensors", 1, 12);
    let (_a, a_join) = publisher(dirs[0].path(), &a_file, "m", "100");
    let (_b, b_join) = publisher(dirs[1].path(), &b_file, "m", "100");
    let b_id = b_join.rsplit('/').next().unwrap().to_string();
    let out = files.path().join("out");
    let fetch_both = |extra: &[&str]| {
        let mut a = args(&[
            "fetch",
            "m",
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
            "--timeout",
            "60",
            "--data-dir",
            dirs[2].path().to_str().unwrap(),
            "--bootstrap",
            &a_join,
            "--bootstrap",
            &b_join,
        ]);
        a.extend(extra);
        run(&a, Duration::from_secs(180))
    };
    let (code, _, stderr) = fetch_both(&[]);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("is published by 2 peers") && last.contains(&b_id),
        "{stderr}"
    );
    assert!(!out.exists());
    let bound = format!("m={b_id}");
    let (code, _, stderr) = fetch_both(&["--trust", &bound]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read(&out).unwrap() == b_bytes, "B's bytes");
}

/// The only way in is a stopped node: the error names that cause (not a missing model), and
/// the fetch ends as soon as every way to join has failed, long before its timeout.
#[test]
fn a_fetch_through_a_stopped_bootstrap_node_says_no_peer_was_reachable_at_once() {
    let (files, stopped_dir, fetch_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut stopped = Running::start(&args(&["--data-dir", stopped_dir.path().to_str().unwrap()]));
    let join = stopped.join_addr();
    let (code, _) = stopped.terminate(QUICK);
    assert_eq!(code, 0);
    let out = files.path().join("out");
    for target in ["anything", &"ab".repeat(32)] {
        let started = std::time::Instant::now();
        let (code, _, stderr) = fetch(target, &out, "600", fetch_dir.path(), &join);
        assert_eq!(code, 1, "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains("no peer could be reached"),
            "{target}: {stderr}"
        );
        assert!(
            last.contains("Connection refused"),
            "the dial error: {last}"
        );
        assert!(!last.contains("found"), "blames the model: {last}");
        assert!(started.elapsed() < QUICK, "{:?}", started.elapsed());
    }
}

/// A publisher that started alone is contacted by a hub, then killed (SIGKILL) a few seconds
/// later and restarted on a new port with no `--bootstrap`: the hub it learned from the first
/// contact was saved in its peer cache in time, so it rejoins through the hub, and a fetcher
/// that knows only the hub finds it again.
#[test]
fn a_publisher_killed_soon_after_its_first_contact_is_found_again_after_a_restart() {
    let (files, hub_dir, pub_dir, fetch_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (file, bytes) = common::model_file(files.path(), "m.safetensors", 2, 11);
    let pub_args = args(&[
        "--data-dir",
        pub_dir.path().to_str().unwrap(),
        "--publish",
        file.to_str().unwrap(),
        "--model",
        "comeback",
    ]);
    let mut publisher = Running::start(&pub_args);
    let pub_join = publisher.join_addr();
    publisher.wait_line(Stream::Stdout, QUICK, |l| l.starts_with("published "));
    let mut hub = Running::start(&args(&[
        "--data-dir",
        hub_dir.path().to_str().unwrap(),
        "--bootstrap",
        &pub_join,
    ]));
    let hub_join = hub.join_addr();
    let hub_id = hub_join.rsplit('/').next().unwrap().to_string();
    hub.wait_line(Stream::Stderr, QUICK, |l| {
        l.contains("connected to bootstrap peer")
    });
    // The publisher learned the hub from its inbound connection: saved within about a
    // second (the periodic save of other changes is every 10 s).
    let cache = pub_dir.path().join("peers.json");
    poll(
        Duration::from_secs(3),
        "the hub in the publisher's peer cache",
        || {
            std::fs::read_to_string(&cache)
                .ok()
                .filter(|c| c.contains(&hub_id))
        },
    );
    publisher.child.kill().unwrap();
    publisher.child.wait().unwrap();
    drop(publisher);

    let mut restarted = Running::start(&args(&["--data-dir", pub_dir.path().to_str().unwrap()]));
    assert_ne!(restarted.join_addr(), pub_join, "a new port");
    let out = files.path().join("out.safetensors");
    let (code, stdout, stderr) = fetch("comeback", &out, "120", fetch_dir.path(), &hub_join);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "fetched bytes differ"
    );
    drop(hub);
}

#[test]
fn publishing_a_file_that_is_not_safetensors_exits_1() {
    let (files, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let text = files.path().join("notes.safetensors");
    std::fs::write(&text, "this is text pretending to be a model").unwrap();
    let (code, _, stderr) = run(
        &args(&[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--publish",
            text.to_str().unwrap(),
        ]),
        QUICK,
    );
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("not a safetensors file"),
        "{stderr}"
    );
}

#[test]
fn a_running_node_publishes_over_the_api_and_fetch_by_id_writes_the_file() {
    let (files, pub_dir, fetch_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (file, bytes) = common::model_file(files.path(), "m.safetensors", 3, 9);
    let mut node = Running::start(&args(&["--data-dir", pub_dir.path().to_str().unwrap()]));
    let api = node.api_addr();
    let join = node.join_addr();
    let request = serde_json::json!({"path": file, "model": "api-model"}).to_string();
    let (code, body) = http_post_json(api, "/publish", &request).unwrap();
    assert_eq!(code, 200, "{body}");
    let announced: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = announced["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64, "{body}");

    let bad = serde_json::json!({"path": files.path().join("missing"), "model": "x"}).to_string();
    let (code, body) = http_post_json(api, "/publish", &bad).unwrap();
    assert_eq!(code, 400, "{body}");

    let out = files.path().join("out.safetensors");
    let (code, stdout, stderr) = run(
        &args(&[
            "fetch",
            &id,
            "--out",
            out.to_str().unwrap(),
            "--data-dir",
            fetch_dir.path().to_str().unwrap(),
            "--bootstrap",
            &join,
        ]),
        SLOW,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&id), "{stdout}");
    assert!(std::fs::read(&out).unwrap() == bytes);

    let (_, body) = http_get(api, "/models").unwrap();
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    let held = &models.as_array().unwrap()[0];
    assert_eq!(held["id"], id.as_str());
    assert_eq!(held["complete"], true);
    assert_eq!(held["published"], true);
    assert_eq!(held["bytes_uploaded"].as_u64().unwrap(), bytes.len() as u64);
}

#[test]
fn a_full_disk_is_reported_not_written_as_a_corrupt_file() {
    let (files, pub_dir, fetch_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // A 4 MiB file system for the fetcher's data dir: too small for the 8 MiB version.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(fetch_dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED a_full_disk_is_reported: cannot mount a small tmpfs (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(fetch_dir.path());

    let (file, _) = common::model_file(files.path(), "m.safetensors", 8, 11);
    let (_publisher, join) = publisher(pub_dir.path(), &file, "too-big", "1000");
    let out = files.path().join("out.safetensors");
    let (code, _, stderr) = run(
        &args(&[
            "fetch",
            "too-big",
            "--out",
            out.to_str().unwrap(),
            "--data-dir",
            fetch_dir.path().to_str().unwrap(),
            "--bootstrap",
            &join,
        ]),
        SLOW,
    );
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("No space left on device"),
        "{stderr}"
    );
    assert!(!out.exists(), "no output file from a failed download");
}

/// A publisher in Kademlia client mode is in nobody's routing table, and its announcement
/// went out before its first connection: the fetcher still learns the version (the publisher
/// announces it again when the hub joins the topic), and where to reach the publisher (the
/// hub's `Versions` answer carries its addresses), and fetches it.
#[test]
fn a_version_held_only_by_a_dht_client_publisher_can_be_fetched() {
    let (hub_dir, pub_dir, fetch_dir, files) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (file, bytes) = common::model_file(files.path(), "cm.safetensors", 3, 11);
    let mut hub = Running::start(&args(&["--data-dir", hub_dir.path().to_str().unwrap()]));
    let join = hub.join_addr();
    // LOOPBACK asks for server mode: this one is a client.
    let mut publisher = Running::start(&[
        "--data-dir",
        pub_dir.path().to_str().unwrap(),
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api-addr",
        "127.0.0.1:0",
        "--kad-mode",
        "client",
        "--bootstrap",
        &join,
        "--publish",
        file.to_str().unwrap(),
        "--model",
        "cm",
    ]);
    publisher.wait_line(Stream::Stdout, QUICK, |l| l.starts_with("published "));
    let out = files.path().join("fetched.safetensors");
    let (code, stdout, stderr) = fetch("cm", &out, "60", fetch_dir.path(), &join);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    assert_eq!(publisher.terminate(QUICK).0, 0);
    assert_eq!(hub.terminate(QUICK).0, 0);
}
