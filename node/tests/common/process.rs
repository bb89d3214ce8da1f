//! Spawning the `p2p-node` binary and reading its output with deadlines.

#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_p2p-node");

/// Flags that keep a node on loopback: no mDNS, TCP and API on 127.0.0.1 with OS-chosen ports.
pub const LOOPBACK: [&str; 7] = [
    "--no-mdns",
    // Loopback is not reachable from other machines: `auto` would make nodes DHT clients.
    "--kad-mode",
    "server",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--api-addr",
    "127.0.0.1:0",
];

/// Runs the binary to completion with a deadline; returns (exit code, stdout, stderr).
pub fn run(args: &[&str], timeout: Duration) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("P2P_NODE_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn p2p-node");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(_status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            return (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("p2p-node {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A running `p2p-node` whose output lines are collected as they arrive.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<(Stream, String)>,
    pub seen: Vec<(Stream, String)>,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn p2p-node");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, pipe) in [
            (
                Stream::Stdout,
                Box::new(stdout) as Box<dyn std::io::Read + Send>,
            ),
            (Stream::Stderr, Box::new(stderr)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The binary with `args` and no inherited data-dir variable.
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env_remove("P2P_NODE_DATA_DIR");
        Self::spawn(&mut cmd)
    }

    /// Waits for a line on `stream` satisfying `pred`; returns it.
    pub fn wait_line(
        &mut self,
        stream: Stream,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        if let Some((_, line)) = self.seen.iter().find(|(s, l)| *s == stream && pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((s, line)) => {
                    self.seen.push((s, line.clone()));
                    if s == stream && pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for a line; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// The API address printed at start.
    pub fn api_addr(&mut self) -> std::net::SocketAddr {
        let line = self.wait_line(Stream::Stdout, Duration::from_secs(60), |l| {
            l.starts_with("API listening on http://")
        });
        line.trim_start_matches("API listening on http://")
            .parse()
            .expect("API address parses")
    }

    /// The first `--bootstrap` address printed at start.
    pub fn join_addr(&mut self) -> String {
        let line = self.wait_line(Stream::Stdout, Duration::from_secs(60), |l| {
            l.contains("p2p-node --bootstrap ")
        });
        line.rsplit(' ').next().expect("address").to_string()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self, timeout: Duration) -> (i32, Vec<(Stream, String)>) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status.code().unwrap_or(-1), std::mem::take(&mut self.seen));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("p2p-node did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls a blocking check until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
