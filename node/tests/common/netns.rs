//! Hosts for tests: network namespaces this test creates and joins with a veth pair. Traffic
//! (multicast included) never reaches the machine's real interfaces. Needs root and iproute2;
//! `create` says why it cannot otherwise, and tests skip with that message.

use std::process::Command;

use super::process::{Running, BIN};

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Two namespaces joined by a veth pair; deleted (with their links) on drop.
pub struct TwoHosts {
    pub names: [String; 2],
    pub addrs: [String; 2],
}

impl TwoHosts {
    /// Creates them, or says why it cannot (not root, no `ip`).
    pub fn create() -> Result<Self, String> {
        let id = std::process::id();
        // Per test binary and per call: several tests of one binary may run at once.
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names = [format!("p2pt{id}{n}a"), format!("p2pt{id}{n}b")];
        // A /24 per test run, inside the namespaces only.
        let subnet = format!("10.{}.{}", 200 + n % 50, id % 250);
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

    /// `p2p-node` in host `i`, listening on its address (TCP, OS-chosen port), with `extra`
    /// flags; mDNS stays on unless `extra` turns it off.
    pub fn node(&self, i: usize, data_dir: &std::path::Path, extra: &[&str]) -> Running {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i], BIN])
            .args(["--data-dir", data_dir.to_str().expect("UTF-8 path")])
            .args(["--listen", &format!("/ip4/{}/tcp/0", self.addrs[i])])
            .args(["--api-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "p2p_node=debug")
            .env_remove("P2P_NODE_DATA_DIR");
        Running::spawn(&mut cmd)
    }

    /// Runs `command` inside host `i`; says why it failed.
    pub fn exec(&self, i: usize, command: &[&str]) -> Result<(), String> {
        let mut args = vec!["netns", "exec", self.names[i].as_str()];
        args.extend_from_slice(command);
        ip(&args)
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
