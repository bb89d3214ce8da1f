//! NAT traversal end to end, in network namespaces: a public hub (bootstrap, AutoNAT server,
//! circuit relay) and two hosts behind two different port-restricted home routers (Linux
//! MASQUERADE, replies only). The publisher finds itself not public, reserves a slot on the
//! relay; the follower reaches it through the relay, DCUtR punches a hole, and the version
//! moves over the direct connection only. The topology and the measurements are the testnet's
//! `nat` scenario (`testnet/nat.py`), run here with this build's binary. Without root,
//! iproute2 or iptables the test says so and skips.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;

use common::process::BIN;

#[test]
fn two_hosts_behind_different_nats_hole_punch_and_fetch_directly() {
    let name = "two_hosts_behind_different_nats_hole_punch_and_fetch_directly";
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("iptables") || !has("ip") {
        eprintln!(
            "SKIPPED {name}: needs iproute2 and iptables (apt-get install iproute2 iptables)"
        );
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testnet/netns.py");
    let run = Command::new("python3")
        .arg(&script)
        .args(["nat", "--pairs", "port-restricted:port-restricted"])
        .args(["--size", "2", "--timeout", "120", "--bin", BIN, "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    if run.status.code() == Some(3) {
        eprintln!("SKIPPED {name}: cannot create network namespaces ({stderr}); run as root");
        return;
    }
    let result = std::fs::read_to_string(out.path().join("result.json"))
        .unwrap_or_else(|e| panic!("no result.json ({e}); the scenario said: {stderr}"));
    let result: serde_json::Value = serde_json::from_str(&result).unwrap();
    let pair = &result["pairs"][0];
    assert_eq!(result["hub_reachability"], "public", "{result:#}");
    // AutoNAT's one test of its candidate address may not have run yet (the node then
    // reserves relays after a 30 s grace): private or unknown, never public.
    assert_ne!(
        pair["publisher_reachability"], "public",
        "AutoNAT: {pair:#}"
    );
    assert_ne!(pair["follower_reachability"], "public", "AutoNAT: {pair:#}");
    assert_eq!(pair["path"], "direct", "hole punching: {pair:#}");
    assert_eq!(pair["complete"], true, "{pair:#}");
    assert_eq!(pair["identical"], true, "{pair:#}");
    assert_eq!(
        pair["seeder"], false,
        "no other holder was needed: {pair:#}"
    );
    let relayed = pair["relayed_bytes"].as_u64().unwrap();
    assert!(
        relayed < 64 * 1024,
        "only control traffic crosses the relay, not 2 MiB of chunks: {relayed} bytes"
    );
    let succeeded: u64 = pair["hole_punch_follower"]["succeeded"]
        .as_object()
        .unwrap()
        .values()
        .chain(
            pair["hole_punch_publisher"]["succeeded"]
                .as_object()
                .unwrap()
                .values(),
        )
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(succeeded >= 1, "{pair:#}");
    assert!(run.status.success(), "the scenario failed: {stderr}");
}
