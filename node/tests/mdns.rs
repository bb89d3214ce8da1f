//! mDNS discovery with no bootstrap at all, between two hosts that are network namespaces this
//! test creates and joins with a veth pair. Multicast never reaches the machine's real
//! interfaces. Where namespaces cannot be created (not root, no `ip`), the test says so and
//! skips.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{Running, Stream, BIN};

/// Two namespaces joined by a veth pair; deleted (with their links) on drop.
struct TwoHosts {
    names: [String; 2],
    addrs: [String; 2],
}

impl TwoHosts {
    fn create() -> Result<Self, String> {
        let id = std::process::id();
        let names = [format!("p2pt{id}a"), format!("p2pt{id}b")];
        // A /24 per test run, inside the namespaces only.
        let subnet = format!("10.213.{}", id % 250);
        let hosts = Self {
            names: names.clone(),
            addrs: [format!("{subnet}.1"), format!("{subnet}.2")],
        };
        ip(&["netns", "add", &names[0]])?;
        ip(&["netns", "add", &names[1]])?;
        ip(&[
            "link", "add", "v0", "netns", &names[0], "type", "veth", "peer", "name", "v1", "netns",
            &names[1],
        ])?;
        for (i, ns) in names.iter().enumerate() {
            let dev = format!("v{i}");
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", hosts.addrs[i]),
                "dev",
                &dev,
            ])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", &dev, "up"])?;
        }
        Ok(hosts)
    }

    fn node(&self, i: usize, data_dir: &std::path::Path) -> Running {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i], BIN])
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--listen", &format!("/ip4/{}/tcp/0", self.addrs[i])])
            .args(["--api-addr", "127.0.0.1:0"]) // mDNS stays on: no --no-mdns here
            .env("RUST_LOG", "p2p_node=debug")
            .env_remove("P2P_NODE_DATA_DIR");
        Running::spawn(&mut cmd)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]); // deleting a namespace deletes its veth end too
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn two_nodes_without_bootstrap_find_each_other_by_mdns() {
    let hosts = match TwoHosts::create() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED two_nodes_without_bootstrap_find_each_other_by_mdns: cannot create network namespaces ({e}); run as root with iproute2");
            return;
        }
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = hosts.node(0, dir_a.path());
    let mut b = hosts.node(1, dir_b.path());
    let timeout = Duration::from_secs(60);
    let id_of = |n: &mut Running| {
        n.wait_line(Stream::Stdout, timeout, |l| l.starts_with("peer id: "))[9..].to_string()
    };
    let (id_a, id_b) = (id_of(&mut a), id_of(&mut b));

    for (node, other) in [(&mut a, &id_b), (&mut b, &id_a)] {
        node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains("peer discovered via mDNS") && l.contains(other.as_str())
        });
        node.wait_line(Stream::Stderr, timeout, |l| {
            l.contains(&format!("connected peer={other}"))
        });
    }
    let (code_a, _) = a.terminate(timeout);
    let (code_b, _) = b.terminate(timeout);
    assert_eq!((code_a, code_b), (0, 0));
    // Each saved the other, found by mDNS, in its peer cache.
    let cache = std::fs::read_to_string(dir_a.path().join("peers.json")).unwrap();
    assert!(
        cache.contains(&id_b) && cache.contains(&hosts.addrs[1]),
        "{cache}"
    );
}
