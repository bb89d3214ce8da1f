//! Tests of the `p2p-node` binary itself: exit codes and one-line errors for bad input, a
//! stable identity, graceful shutdown, and the JSON API's documented fields.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::http_get;
use common::process::{run, Running, Stream, LOOPBACK};

const QUICK: Duration = Duration::from_secs(60);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Asserts a failed run: the exit code, and exactly one stderr line mentioning `needle`.
fn assert_one_line_error(result: (i32, String, String), code: i32, needle: &str) {
    let (status, _stdout, stderr) = result;
    assert_eq!(status, code, "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert!(
        errors[0].contains(needle),
        "error should mention {needle:?}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn a_bad_model_name_or_trust_value_is_a_usage_error() {
    let dir = tmp();
    let d = dir.path().to_str().unwrap();
    assert_one_line_error(
        run(&["--data-dir", d, "--no-mdns", "--follow", "a b"], QUICK),
        2,
        "'a b' is not a model name",
    );
    assert_one_line_error(
        run(&["fetch", "a b", "--out", "x", "--data-dir", d], QUICK),
        2,
        "nor a version id",
    );
    assert_one_line_error(
        run(
            &["--data-dir", d, "--no-mdns", "--trust", "m=not-a-peer"],
            QUICK,
        ),
        2,
        "is not a peer id",
    );
    let (a, b) = (
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id(),
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id(),
    );
    let (ta, tb) = (format!("m={a}"), format!("m={b}"));
    assert_one_line_error(
        run(
            &["--data-dir", d, "--no-mdns", "--trust", &ta, "--trust", &tb],
            QUICK,
        ),
        2,
        "binds 'm' to two publishers",
    );
    assert_one_line_error(
        run(&["--data-dir", d, "--no-mdns", "--model", "a b"], QUICK),
        2,
        "'a b' is not a model name",
    );
}

#[test]
fn malformed_multiaddr_is_a_usage_error() {
    let dir = tmp();
    let d = dir.path().to_str().unwrap();
    assert_one_line_error(
        run(
            &[
                "--data-dir",
                d,
                "--bootstrap",
                "not/a/multiaddr",
                "--no-mdns",
            ],
            QUICK,
        ),
        2,
        "not a valid multiaddr",
    );
    assert_one_line_error(
        run(
            &[
                "--data-dir",
                d,
                "--listen",
                "/ip4/999.1.1.1/tcp/1",
                "--no-mdns",
            ],
            QUICK,
        ),
        2,
        "999.1.1.1",
    );
}

#[test]
fn bootstrap_without_peer_id_is_a_usage_error() {
    let dir = tmp();
    let d = dir.path().to_str().unwrap();
    assert_one_line_error(
        run(
            &[
                "--data-dir",
                d,
                "--bootstrap",
                "/ip4/127.0.0.1/tcp/4001",
                "--no-mdns",
            ],
            QUICK,
        ),
        2,
        "/p2p/<peer id>",
    );
}

#[test]
fn port_in_use_is_a_clear_error() {
    let dir = tmp();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let args = [
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--no-mdns",
        "--listen",
        &listen,
    ];
    let result = run(&args, QUICK);
    assert_one_line_error(result, 1, &format!("cannot listen on {listen}"));
}

#[test]
fn unwritable_data_dir_is_a_clear_error() {
    // A data dir below a regular file cannot be created, even by root.
    let dir = tmp();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let data_dir = file.join("sub");
    assert_one_line_error(
        run(&["id", "--data-dir", data_dir.to_str().unwrap()], QUICK),
        1,
        "cannot create data dir",
    );
}

#[test]
fn corrupt_identity_is_a_clear_error() {
    let dir = tmp();
    std::fs::write(dir.path().join("identity.key"), b"not a key").unwrap();
    assert_one_line_error(
        run(&["id", "--data-dir", dir.path().to_str().unwrap()], QUICK),
        1,
        "corrupt identity file",
    );
}

#[test]
fn peer_id_is_stable_across_runs_and_key_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let d = dir.path().to_str().unwrap();
    let (code1, first, _) = run(&["id", "--data-dir", d], QUICK);
    // Common flags work before the subcommand too, and through the environment.
    let (code2, second, _) = run(&["--data-dir", d, "id"], QUICK);
    let out = std::process::Command::new(common::process::BIN)
        .arg("id")
        .env("P2P_NODE_DATA_DIR", d)
        .output()
        .unwrap();
    assert_eq!((code1, code2), (0, 0));
    assert_eq!(first, second);
    assert_eq!(first, String::from_utf8(out.stdout).unwrap());
    first.trim().parse::<libp2p::PeerId>().expect("a peer id");
    let mode = std::fs::metadata(dir.path().join("identity.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn api_answers_with_documented_fields_and_sigterm_exits_cleanly() {
    let dir = tmp();
    let mut args = vec!["--data-dir", dir.path().to_str().unwrap()];
    args.extend(LOOPBACK);
    let mut node = Running::start(&args);
    let api = node.api_addr();
    let join = node.join_addr();
    assert!(
        join.starts_with("/ip4/127.0.0.1/tcp/") && join.contains("/p2p/"),
        "{join}"
    );

    let (code, body) = http_get(api, "/healthz").unwrap();
    assert_eq!((code, body.contains("ok")), (200, true), "{body}");

    let (code, body) = http_get(api, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    for field in [
        "peer_id",
        "listen_addrs",
        "connected_peers",
        "routing_table_peers",
        "uptime_s",
    ] {
        assert!(status.get(field).is_some(), "/status lacks {field}: {body}");
    }
    assert!(join.ends_with(status["peer_id"].as_str().unwrap()));
    assert!(status["listen_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| join.starts_with(a.as_str().unwrap())));

    let (code, body) = http_get(api, "/peers").unwrap();
    assert_eq!(code, 200);
    assert!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .is_array(),
        "{body}"
    );
    let (code, _) = http_get(api, "/nope").unwrap();
    assert_eq!(code, 404);

    let (code, lines) = node.terminate(QUICK);
    assert_eq!(code, 0, "graceful exit: {lines:#?}");
    assert!(
        dir.path().join("peers.json").exists(),
        "state saved on SIGTERM"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("api-addr"))
            .unwrap()
            .trim(),
        api.to_string()
    );
}

#[test]
fn two_processes_connect_and_list_each_other_with_their_source() {
    let (a_dir, b_dir) = (tmp(), tmp());
    let mut a_args = vec!["--data-dir", a_dir.path().to_str().unwrap()];
    a_args.extend(LOOPBACK);
    let mut a = Running::start(&a_args);
    let a_join = a.join_addr();
    let a_id = a_join.rsplit('/').next().unwrap().to_string();
    let mut b_args = vec![
        "--data-dir",
        b_dir.path().to_str().unwrap(),
        "--bootstrap",
        &a_join,
    ];
    b_args.extend(LOOPBACK);
    let mut b = Running::start(&b_args);
    let b_api = b.api_addr();
    common::process::poll(QUICK, "b to list a as a connected bootstrap peer", || {
        let (_, body) = http_get(b_api, "/peers").ok()?;
        let peers: serde_json::Value = serde_json::from_str(&body).ok()?;
        peers.as_array()?.iter().find(|p| {
            p["peer_id"] == a_id.as_str() && p["connected"] == true && p["source"] == "bootstrap"
        })?;
        Some(())
    });
    drop(a);
    drop(b);
}

#[test]
fn corrupt_peer_cache_and_unreachable_bootstrap_warn_but_keep_running() {
    let dir = tmp();
    std::fs::write(dir.path().join("peers.json"), b"{ definitely not json").unwrap();
    // A closed port on loopback: the dial is refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = format!(
        "/ip4/127.0.0.1/tcp/{closed}/p2p/{}",
        libp2p::PeerId::random()
    );
    let mut args = vec![
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--bootstrap",
        &unreachable,
    ];
    args.extend(LOOPBACK);
    let mut node = Running::start(&args);
    node.wait_line(Stream::Stderr, QUICK, |l| {
        l.contains("ignoring the peer cache") && l.contains("corrupt peer cache")
    });
    node.wait_line(Stream::Stderr, QUICK, |l| {
        l.contains("bootstrap peer unreachable")
    });
    let api = node.api_addr();
    assert_eq!(http_get(api, "/healthz").unwrap().0, 200, "still running");
    let (code, _) = node.terminate(QUICK);
    assert_eq!(code, 0);
    // The corrupt cache was replaced by a valid one at shutdown.
    let saved = std::fs::read(dir.path().join("peers.json")).unwrap();
    serde_json::from_slice::<serde_json::Value>(&saved).expect("valid cache after restart");
}

#[test]
fn second_node_on_the_same_data_dir_is_refused() {
    let dir = tmp();
    let mut args = vec!["--data-dir", dir.path().to_str().unwrap()];
    args.extend(LOOPBACK);
    let mut first = Running::start(&args);
    first.api_addr(); // it is up and holds the lock
    let pid = first.child.id().to_string();
    let result = run(&args, QUICK);
    assert_one_line_error(result, 1, "is in use by another p2p-node");
    let (_, _, stderr) = run(&args, QUICK);
    assert!(stderr.contains(&format!("(pid {pid})")), "{stderr}");
    // Once the first stops, the data dir is free again.
    assert_eq!(first.terminate(QUICK).0, 0);
    let mut again = Running::start(&args);
    again.api_addr();
}

#[test]
fn help_lists_the_common_flags() {
    let (code, stdout, _) = run(&["--help"], QUICK);
    assert_eq!(code, 0);
    for flag in [
        "--data-dir",
        "--listen",
        "--bootstrap",
        "--api-addr",
        "--no-mdns",
        "--log-format",
    ] {
        assert!(stdout.contains(flag), "help lacks {flag}");
    }
}

/// The binary with `args` and the given environment; returns (exit code, stdout, stderr).
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_p2p-node"))
        .args(args)
        .env_remove("P2P_NODE_DATA_DIR")
        .env_remove("P2P_NODE_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_dump_shows_command_line_over_environment_over_file_over_defaults() {
    let dir = tmp();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "data_dir = \"/from/file\"\nkad_mode = \"client\"\nstage = \"sequential\"\n\
         [fetch]\ntimeout = 77\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    // The file beats the defaults.
    let (code, out, err) = run_with_env(&["config", "--dump", "--config", f], &[]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "data_dir = \"/from/file\"",
        "kad_mode = \"client\"",
        "stage = \"sequential\"",
        "timeout = 77",
        "log_format = \"text\"",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in\n{out}");
    }
    // The environment beats the file (the config file itself can come from it too), and
    // the command line beats both.
    let (code, out, err) = run_with_env(
        &["config", "--dump", "--stage", "swarm"],
        &[("P2P_NODE_DATA_DIR", "/from/env"), ("P2P_NODE_CONFIG", f)],
    );
    assert_eq!(code, 0, "{err}");
    for line in [
        "data_dir = \"/from/env\"",
        "kad_mode = \"client\"",
        "stage = \"swarm\"",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in\n{out}");
    }
    // What it prints is a config file that gives the same configuration.
    let dumped = dir.path().join("dumped.toml");
    std::fs::write(&dumped, &out).unwrap();
    let (code, again, err) = run_with_env(
        &["config", "--dump", "--config", dumped.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, out);
}

#[test]
fn a_config_file_with_an_unknown_key_or_a_bad_value_is_a_one_line_usage_error() {
    let dir = tmp();
    let file = dir.path().join("node.toml");
    let f = file.to_str().unwrap();
    std::fs::write(&file, "no_mdns = true\nbootstrapp = []\n").unwrap();
    assert_one_line_error(
        run(&["id", "--config", f], QUICK),
        2,
        "unknown key 'bootstrapp'",
    );
    std::fs::write(&file, "[train]\nkeep_checkpoints = 0\n").unwrap();
    assert_one_line_error(run(&["train", "--config", f], QUICK), 2, f);
    assert_one_line_error(
        run(&["id", "--config", "/nonexistent/node.toml"], QUICK),
        2,
        "/nonexistent/node.toml",
    );
}

#[test]
fn status_peers_and_models_print_tables_from_the_running_node() {
    let (a, b) = (tmp(), tmp());
    let (da, db) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let mut first = Running::start(&[&["--data-dir", da][..], &LOOPBACK].concat());
    let join = first.join_addr();
    let mut second = Running::start(
        &[
            &["--data-dir", db, "--bootstrap", join.as_str()][..],
            &LOOPBACK,
        ]
        .concat(),
    );
    second.api_addr();
    let peer_a = first.wait_line(Stream::Stdout, QUICK, |l| l.starts_with("peer id: "));
    let peer_a = peer_a.trim_start_matches("peer id: ").trim().to_string();
    let short = &peer_a[..8];
    // Found through the data dir's api-addr file; waits on the connection, not a sleep.
    let peers = common::process::poll(QUICK, "the peer table to list the first node", || {
        let (code, out, _) = run(&["peers", "--data-dir", db], QUICK);
        (code == 0 && out.contains(short) && out.contains("connected")).then_some(out)
    });
    assert!(peers.contains("1 peers known, 1 connected"), "{peers}");
    let (code, status, err) = run(&["status", "--data-dir", db], QUICK);
    assert_eq!(code, 0, "{err}");
    assert!(
        status.contains("connected peers") && status.contains("not training"),
        "{status}"
    );
    let (code, models, err) = run(&["models", "--data-dir", db], QUICK);
    assert_eq!(code, 0, "{err}");
    assert_eq!(models.trim(), "no model versions held");
    let (code, json, err) = run(&["status", "--json", "--data-dir", db], QUICK);
    assert_eq!(code, 0, "{err}");
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["connected_peers"], 1);
    first.terminate(QUICK);
    second.terminate(QUICK);
    // No node on a data dir: a clear error, exit 1.
    let empty = tmp();
    assert_one_line_error(
        run(
            &["status", "--data-dir", empty.path().to_str().unwrap()],
            QUICK,
        ),
        1,
        "no running node found",
    );
}
