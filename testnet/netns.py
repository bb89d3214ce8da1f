#!/usr/bin/env python3
"""Testnet with real links: each host a Linux network namespace with its own address, joined
by veth pairs to a bridge, its upload and download shaped with `tc`, running one p2p-node.

    testnet/netns.py distribute [--hosts 8] [--profile dc] [--size 64] [--stages all]
    testnet/netns.py churn [--hosts 8] [--kill 0.25]
    testnet/netns.py bootstrap-loss [--hosts 8]
    testnet/netns.py train [--hosts 4] [--workload digits|text] [--averaging outer|parameters]
                           [--inner-steps 50] [--compression int8|top-k|f32] [--set 'FIELD = V']
                           [--churn 2] [--attack negate --attack scale=2.9] [--no-baseline]
    testnet/netns.py speedup [--steps 300] [--hosts-list 2,4,8] [--target-from RESULT]
    testnet/netns.py nat [--pairs full-cone:full-cone,symmetric:symmetric] [--size 8]
    testnet/netns.py up [--hosts 8]                  # hosts and idle nodes until Ctrl-C

Scenarios print a summary table and write `result.json` into `--out` (default
testnet/run/netns/<scenario>-<time>/); `testnet/report.py` turns results into a Markdown
report with SVG plots.

Profiles (per host): `lan` 1 Gbit/s both ways, 0.2 ms; `dc` 100 Mbit/s, 1 ms; `wan` 20 Mbit/s
up, 50 Mbit/s down, 40 ms, 0.1% loss; `custom` from --up/--down/--delay/--loss. Upload is
shaped on the host's veth inside its namespace, download on the bridge side of the same veth.
Latency and loss need the kernel's `netem` qdisc; where it is missing (as on the development
VMs) rates are still shaped, and the script says that latency and loss are not emulated.

Needs root and iproute2 (exit code 3 where namespaces cannot be created). `--loopback` runs the same scenarios as processes on 127.0.0.1
without namespaces or shaping (what CI uses where namespaces are unavailable). Everything the
script creates (namespaces, bridge, veths, processes) is removed on exit, on Ctrl-C and on
error. Traffic stays on the bridge and namespaces it created. Standard library only.
"""

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from local import DEMO_SPEC, wait_for  # the demo's run spec and polling, shared
import nat

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = ROOT / "target" / "release" / "p2p-node"
STAGES = ["sequential", "parallel-push", "host-assisted", "coordinated", "swarm"]
PROFILES = {
    "lan": dict(up=1000.0, down=1000.0, delay=0.2, loss=0.0),
    "dc": dict(up=100.0, down=100.0, delay=1.0, loss=0.0),
    "wan": dict(up=20.0, down=50.0, delay=40.0, loss=0.1),
}
MIB = 1 << 20


class NamespacesUnavailable(RuntimeError):
    """This machine cannot create namespaces or links (not root, no iproute2, no permission):
    exit code 3, so that callers can fall back to --loopback."""


def log(msg):
    print(f"[netns] {msg}", file=sys.stderr, flush=True)


def sh(*args, check=True):
    """Runs a command; raises with its stderr on failure."""
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def http(api, path, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{api}{path}", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Network:
    """The bridge and the hosts of one run; `close()` removes all of it."""

    def __init__(self, args, out):
        self.args, self.out = args, out
        self.loopback = args.loopback
        self.tag = f"{os.getpid() % 0xffff:04x}"
        self.subnet = 200 + os.getpid() % 50
        self.bridge = f"pnb{self.tag}"
        self.hosts = []
        self.netem = False
        self.shaping = False
        self.created_bridge = False
        p = PROFILES.get(args.profile, {}) if args.profile != "custom" else {}
        self.link = dict(up=args.up or p.get("up", 100.0), down=args.down or p.get("down", 100.0),
                         delay=args.delay if args.delay is not None else p.get("delay", 0.0),
                         loss=args.loss if args.loss is not None else p.get("loss", 0.0))
        # `--slow-fetchers UP/DOWN` (distribute): every second fetcher (hosts 3, 5, ...) gets
        # this link.
        self.slow = None
        if args.slow_fetchers:
            if args.scenario not in ("distribute", "bittorrent"):
                raise ValueError("--slow-fetchers applies to the distribute and bittorrent scenarios only")
            up, _, down = args.slow_fetchers.partition("/")
            try:
                self.slow = dict(self.link, up=float(up), down=float(down))
            except ValueError:
                raise ValueError(f"--slow-fetchers '{args.slow_fetchers}': expected UP/DOWN in Mbit/s, e.g. 20/50")
            if not all(math.isfinite(self.slow[k]) and self.slow[k] > 0 for k in ("up", "down")):
                raise ValueError("--slow-fetchers rates must be positive numbers")
        if not self.loopback:
            self.setup_bridge()

    def link_of(self, index):
        """The link of host `index` (1 is the publisher in `distribute`), as shaped."""
        slow = self.slow and (self.shaping or self.netem) and index >= 3 and index % 2 == 1
        return self.slow if slow else self.link

    def setup_bridge(self):
        if os.geteuid() != 0:
            raise NamespacesUnavailable("network namespaces need root (run with sudo), or use --loopback")
        if not shutil.which("ip") or not shutil.which("tc"):
            raise NamespacesUnavailable("iproute2 (ip, tc) is missing: apt-get install iproute2, or use --loopback")
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
        except RuntimeError as e:
            raise NamespacesUnavailable(f"cannot create network namespaces and links here ({e}); use --loopback")
        self.created_bridge = True
        self.netem = self.probe_netem()
        sh("ip", "addr", "add", f"10.{self.subnet}.0.254/16", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        if not self.netem and (self.link["delay"] > 0 or self.link["loss"] > 0):
            log("this kernel has no netem qdisc: rates are shaped, latency "
                f"({self.link['delay']} ms) and loss ({self.link['loss']}%) are NOT emulated")

    def probe_netem(self):
        """Checks that namespaces and veth pairs can be made here (else NamespacesUnavailable),
        and whether the kernel has the netem qdisc."""
        probe = f"pnp{self.tag}"
        try:
            sh("ip", "netns", "add", probe)
            sh("ip", "link", "add", f"pnp{self.tag}a", "type", "veth", "peer", "name", f"pnp{self.tag}b",
               "netns", probe)
        except RuntimeError as e:
            sh("ip", "netns", "del", probe, check=False)
            raise NamespacesUnavailable(f"cannot create network namespaces and links here ({e}); use --loopback")
        try:
            self.shaping = sh("tc", "qdisc", "add", "dev", f"pnp{self.tag}a", "root", "tbf", "rate",
                              "1mbit", "burst", "32kbit", "latency", "50ms", check=False).returncode == 0
            if not self.shaping:
                log("this kernel has no tbf qdisc: links are NOT shaped")
            return sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
                      "netem", "delay", "1ms", check=False).returncode == 0
        finally:
            sh("ip", "link", "del", f"pnp{self.tag}a", check=False)
            sh("ip", "netns", "del", probe, check=False)

    def add_host(self):
        index = len(self.hosts) + 1
        host = Host(self, index)
        self.hosts.append(host)
        return host

    def close(self):
        nat_hosts = getattr(self, "nat_hosts", [])
        for h in [*self.hosts, *nat_hosts]:
            h.kill()
        if not self.loopback:
            for h in [*self.hosts, *nat_hosts]:
                h.remove()
            if self.created_bridge:
                sh("ip", "link", "del", self.bridge, check=False)

    def describe(self):
        l = self.link
        shaped = "not shaped (loopback)" if self.loopback else "not shaped (no tbf qdisc)" if not (
            self.shaping or self.netem) else (
            f"{l['up']:g} Mbit/s up, {l['down']:g} Mbit/s down"
            + (f", {l['delay']:g} ms, {l['loss']:g}% loss" if self.netem
               else " (latency and loss not emulated: no netem)"))
        slow = self.slow if self.shaping or self.netem else None
        if slow:
            shaped += f"; every second fetcher {slow['up']:g} up / {slow['down']:g} down"
        return {"profile": self.args.profile, **l, "netem": self.netem, "shaped": self.shaping or self.netem,
                "loopback": self.loopback, "slow_fetchers": slow,
                "summary": shaped}


def tc_shape(prefix, dev, mbit, delay, loss, netem):
    """Egress shaping of `dev` (run through `prefix`, e.g. `ip netns exec NS`)."""
    if netem:
        args = ["netem", "rate", f"{mbit}mbit"]
        if delay > 0:
            args += ["delay", f"{delay}ms"]
        if loss > 0:
            args += ["loss", f"{loss}%"]
    else:
        rate_bytes = mbit * 1e6 / 8
        burst = max(32 * 1024, int(rate_bytes / 250))
        args = ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]
    sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *args)


class Host:
    """One namespace (or, with --loopback, one slot on 127.0.0.1) and its node process."""

    def __init__(self, net, index):
        self.net, self.index = net, index
        self.name = f"host-{index}"
        self.dir = net.out / self.name
        self.proc = None
        self.log_file = None
        self.others = []  # other processes run in this host (`run`)
        self.cpus = None  # `taskset -c` list the node is pinned to (None: not pinned)
        if net.loopback:
            self.ip = "127.0.0.1"
            self.ns = None
            return
        self.ns = f"pn{net.tag}-{index}"
        self.ip = f"10.{net.subnet}.{index // 250}.{index % 250 + 1}"
        outer, inner = f"pn{net.tag}h{index}", f"pn{net.tag}n{index}"
        self.outer = outer
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", self.ns)
        sh("ip", "-n", self.ns, "link", "set", inner, "name", "eth0")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ip}/16", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "link", "set", outer, "master", net.bridge, "up")
        l = net.link_of(index)
        if net.shaping or net.netem:
            tc_shape(["ip", "netns", "exec", self.ns], "eth0", l["up"], l["delay"] / 2, l["loss"], net.netem)
            tc_shape([], outer, l["down"], l["delay"] / 2, 0.0, net.netem)

    def start(self, args, bootstrap=None, fresh=True):
        """Starts p2p-node with `args` (subcommand and flags) in this host."""
        data = self.dir / "data"
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        data.mkdir(parents=True, exist_ok=True)
        (data / "api-addr").unlink(missing_ok=True)
        port = "0" if self.net.loopback else "4001"
        # Every host of these scenarios is public: DHT servers from the start, as measured
        # before AutoNAT (`auto` waits for its first confirmation).
        cmd = [str(self.net.args.bin), *args, "--data-dir", str(data), "--no-mdns", "--kad-mode", "server",
               "--listen", f"/ip4/{self.ip}/tcp/{port}",
               "--listen", f"/ip4/{self.ip}/udp/{port}/quic-v1",
               "--api-addr", f"{self.ip}:{0 if self.net.loopback else 7000}"]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        cmd += getattr(self.net.args, "node_flag", [])
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        self.log_file = self.dir / "node.log"
        with open(self.log_file, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        return self

    def run(self, cmd, log_name):
        """Starts another program (`cmd`) in this host, logging to `log_name` in its dir."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        with open(self.dir / log_name, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.others.append(proc)
        return proc

    def tx_bytes(self):
        """Bytes this host has sent on its link (0 on loopback)."""
        if not self.ns:
            return 0
        out = subprocess.run(["ip", "netns", "exec", self.ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                             capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: " + " | ".join(tail))

    def api(self):
        try:
            return (self.dir / "data" / "api-addr").read_text().strip() or None
        except FileNotFoundError:
            return None

    def get(self, path):
        api = self.api()
        if not api:
            return None
        try:
            return http(api, path)
        except (OSError, ValueError):
            return None

    def join_addr(self):
        def find():
            self.check_alive()
            if not self.log_file or not self.log_file.exists():
                return None
            for line in self.log_file.read_text(errors="replace").splitlines():
                if "p2p-node --bootstrap " in line and f"/ip4/{self.ip}/tcp/" in line:
                    return line.rsplit(" ", 1)[1]
            return None
        return wait_for(f"{self.name}'s join address", 60, find)

    def kill(self, sig=signal.SIGKILL):
        for proc in self.others:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.others = []
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self):
        """SIGTERM: the node saves its state and exits 0."""
        self.kill(signal.SIGTERM)
        return self.proc.returncode if self.proc else None

    def remove(self):
        if self.ns:
            # Deleting one end deletes the pair at once (a namespace with sockets still in
            # TIME_WAIT would otherwise keep its veth alive for a while after `netns del`).
            sh("ip", "link", "del", self.outer, check=False)
            sh("ip", "netns", "del", self.ns, check=False)


# ---------------------------------------------------------------------------------------------
# Scenarios


def safetensors_file(path, size_mib, seed):
    """A well-formed safetensors file of about `size_mib` MiB of seeded random bytes."""
    n = size_mib * MIB // 4
    header = json.dumps({"weights": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}})
    header += " " * (-len(header) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        left = n * 4
        while left:
            block = min(left, MIB)
            f.write(rng.randbytes(block))
            left -= block
    return path


def lower_bound(size_bytes, publisher, fetchers):
    """The fluid-model lower bound: T_min = max(S/u_pub, S/d_min, N*S/(u_pub + sum u_i)), with
    `publisher` and each of `fetchers` a link dict (Mbit/s)."""
    rate = lambda mbit: mbit * 1e6 / 8
    u_pub = rate(publisher["up"])
    d_min = min(rate(f["down"]) for f in fetchers)
    total_up = u_pub + sum(rate(f["up"]) for f in fetchers)
    return max(size_bytes / u_pub, size_bytes / d_min, len(fetchers) * size_bytes / total_up)


def version_of(host, model):
    for m in host.get("/models") or []:
        if m["model"] == model:
            return m
    return None


def all_connected(hosts, timeout=120):
    ids = {}

    def check():
        for h in hosts:
            h.check_alive()
            s = h.get("/status")
            if not s:
                return False
            ids[h.name] = s["peer_id"]
        for h in hosts:
            peers = h.get("/peers") or []
            table = {p["peer_id"] for p in peers if p["in_routing_table"]}
            if not set(ids.values()) - {ids[h.name]} <= table:
                return False
        return True

    wait_for("every host to see all others", timeout, check, interval=0.3)


def run_distribution(net, hosts, stage, size_mib, file, model, timeout):
    """Host 1 publishes `file` over the API while hosts 2.. follow `model`; returns per-host
    completion times (seconds since the publish) and the publisher's upload."""
    n = len(hosts) - 1
    chunk = [] if net.args.chunk_kib is None else ["--chunk-size-kib", str(net.args.chunk_kib)]
    join = hosts[0].start(["--stage", stage, *chunk]).join_addr()
    # Followers name the publisher they follow (a name not bound yet is taken only after a
    # settling delay, which would count in the timings).
    common = ["--stage", stage, "--follow", model, "--trust", f"{model}={join.rsplit('/', 1)[1]}"]
    for i, h in enumerate(hosts[1:]):
        extra = ["--portion", f"{i}/{n}"] if stage == "coordinated" else []
        h.start(common + extra, bootstrap=join)
    all_connected(hosts)
    started = time.monotonic()
    answer = http(hosts[0].api(), "/publish", {"path": str(file), "model": model}, timeout=120)
    done, timeline, last_sample = {}, [], 0.0

    def progress():
        nonlocal last_sample
        now = time.monotonic() - started
        for h in hosts[1:]:
            h.check_alive()
            if h.name not in done:
                v = version_of(h, model)
                if v and v["complete"]:
                    done[h.name] = now
        if now - last_sample >= 0.25:
            last_sample = now
            v = version_of(hosts[0], model)
            timeline.append([round(now, 2), v["bytes_uploaded"] if v else 0])
        return len(done) == n

    wait_for(f"{n} hosts to fetch {size_mib} MiB with stage {stage}", timeout, progress, 0.05)
    traffic = {h.name: {k: (version_of(h, model) or {}).get(k, 0)
                        for k in ("bytes_uploaded", "bytes_downloaded")} for h in hosts}
    published = version_of(hosts[0], model)
    for h in hosts:
        h.stop()
    return {"stage": stage, "times": [done[h.name] for h in hosts[1:]], "id": answer["id"],
            "publisher_uploaded": published["bytes_uploaded"] if published else None,
            "publisher_timeline": timeline, "traffic": traffic,
            "size": published["size"] if published else size_mib * MIB}


def scenario_distribute(net, args):
    stages = STAGES if args.stages == "all" else args.stages.split(",")
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage '{s}'; expected one of {', '.join(STAGES)}")
    hosts = [net.add_host() for _ in range(args.hosts)]
    file = safetensors_file(net.out / "model.safetensors", args.size, seed=1)
    size = file.stat().st_size
    t_min = lower_bound(size, net.link_of(1), [net.link_of(i) for i in range(2, args.hosts + 1)])
    runs = []
    print(f"{args.hosts} hosts, {args.size} MiB, links: {net.describe()['summary']}; "
          f"lower bound T_min = {t_min:.2f} s" + ("" if not net.loopback else " (not meaningful on loopback)"))
    print(f"{'stage':<14} {'median':>8} {'slowest':>8} {'median/T_min':>12} {'slowest/T_min':>13} {'publisher copies':>16}")
    for stage in stages:
        r = run_distribution(net, hosts, stage, args.size, file, f"bench-{stage}", args.timeout)
        r["median"], r["slowest"] = statistics.median(r["times"]), max(r["times"])
        r["publisher_copies"] = (r["publisher_uploaded"] or 0) / r["size"]
        runs.append(r)
        print(f"{stage:<14} {r['median']:>7.2f}s {r['slowest']:>7.2f}s {r['median'] / t_min:>12.2f} "
              f"{r['slowest'] / t_min:>13.2f} {r['publisher_copies']:>16.2f}", flush=True)
    return {"hosts": args.hosts, "size_mib": args.size, "size_bytes": size, "t_min": t_min,
            "chunk_kib": args.chunk_kib, "node_flags": args.node_flag, "runs": runs}


def scenario_bittorrent(net, args):
    """The `distribute` workload moved by a real BitTorrent swarm on the same links, for
    comparison: opentracker and a seeding aria2 on host 1, aria2 on the others (256 KiB pieces,
    no DHT or local discovery, peer exchange on, every host keeps seeding once done). Times run
    from the moment the fetchers' aria2 processes start."""
    missing = [b for b in ("aria2c", "opentracker", "mktorrent") if not shutil.which(b)]
    if missing:
        raise ValueError(f"bittorrent needs {', '.join(missing)} (Debian packages aria2, opentracker, mktorrent)")
    if net.loopback:
        raise ValueError("bittorrent needs network namespaces (one address per host)")
    hosts = [net.add_host() for _ in range(args.hosts)]
    seed = hosts[0]
    seed.dir.mkdir(parents=True, exist_ok=True)
    file = safetensors_file(seed.dir / "model.safetensors", args.size, seed=1)
    size = file.stat().st_size
    t_min = lower_bound(size, net.link_of(1), [net.link_of(i) for i in range(2, args.hosts + 1)])
    print(f"{args.hosts} hosts, {args.size} MiB, links: {net.describe()['summary']}; "
          f"lower bound T_min = {t_min:.2f} s")
    torrent = net.out / "model.torrent"
    torrent.unlink(missing_ok=True)
    sh("mktorrent", "-a", f"http://{seed.ip}:6969/announce", "-l", "18", "-o", str(torrent), str(file))
    # Debian's opentracker serves only torrents on its whitelist.
    info = subprocess.run(["aria2c", "-S", str(torrent)], capture_output=True, text=True).stdout
    info_hash = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("Info Hash:"))
    whitelist = net.out / "tracker-whitelist"
    whitelist.write_text(info_hash + "\n")
    seed.run(["opentracker", "-i", seed.ip, "-p", "6969", "-P", "6969", "-w", str(whitelist)], "tracker.log")

    def tracker_up():
        probe = f"import socket; socket.create_connection(('{seed.ip}', 6969), 1)"
        return subprocess.run(["ip", "netns", "exec", hosts[1].ns, sys.executable, "-c", probe],
                              capture_output=True).returncode == 0
    wait_for("the tracker", 30, tracker_up, 0.1)
    hook = net.out / "bt-done.sh"
    hook.write_text("#!/bin/sh\ndate +%s.%N > \"$(dirname \"$3\")/done\"\n")
    hook.chmod(0o755)
    common = ["aria2c", "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
              "--enable-peer-exchange=true", "--seed-ratio=0.0", "--file-allocation=none",
              "--bt-max-peers=0", "--max-overall-upload-limit=0", "--summary-interval=0",
              "--console-log-level=warn", "--listen-port=6881", "--bt-tracker-interval=1",
              f"--on-bt-download-complete={hook}"]
    seed.run([*common, "--dir", str(seed.dir), "--bt-seed-unverified=true", str(torrent)], "aria2.log")
    seed_tx = seed.tx_bytes()
    started = time.time()
    for h in hosts[1:]:
        h.dir.mkdir(parents=True, exist_ok=True)
        (h.dir / "done").unlink(missing_ok=True)
        h.run([*common, "--dir", str(h.dir), str(torrent)], "aria2.log")
    done = {}

    def progress():
        for h in hosts[1:]:
            marker = h.dir / "done"
            if h.name not in done and marker.exists() and marker.read_text().strip():
                done[h.name] = float(marker.read_text().strip()) - started
        return len(done) == len(hosts) - 1

    wait_for(f"{len(hosts) - 1} aria2 fetchers to finish", args.timeout, progress, 0.05)
    copies = (seed.tx_bytes() - seed_tx) / size
    for h in hosts[1:]:
        if file_digest(h.dir / "model.safetensors") != file_digest(file):
            raise RuntimeError(f"{h.name} got different bytes from BitTorrent")
    times = [done[h.name] for h in hosts[1:]]
    median, slowest = statistics.median(times), max(times)
    print(f"{'bittorrent':<14} {median:>7.2f}s {slowest:>7.2f}s {median / t_min:>12.2f} "
          f"{slowest / t_min:>13.2f} {copies:>16.2f} (publisher link bytes, with protocol overhead)")
    return {"hosts": args.hosts, "size_mib": args.size, "size_bytes": size, "t_min": t_min,
            "runs": [{"stage": "bittorrent", "times": times, "median": median, "slowest": slowest,
                      "publisher_copies": copies}]}


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def scenario_churn(net, args):
    hosts = [net.add_host() for _ in range(args.hosts)]
    file = safetensors_file(net.out / "model.safetensors", args.size, seed=2)
    expected = file_digest(file)
    model = "churn"
    join = hosts[0].start([]).join_addr()
    follow = ["--follow", model, "--trust", f"{model}={join.rsplit('/', 1)[1]}"]
    for h in hosts[1:]:
        h.start(follow, bootstrap=join)
    all_connected(hosts)
    started = time.monotonic()
    http(hosts[0].api(), "/publish", {"path": str(file), "model": model}, timeout=120)
    fetchers = hosts[1:]
    victims = random.Random(3).sample(fetchers, max(1, round(args.kill * len(fetchers))))
    # Kill the chosen fetchers halfway through their download.
    wait_for("the download to be halfway", args.timeout, lambda: statistics.mean(
        (version_of(h, model) or {"progress": 0})["progress"] for h in fetchers) >= 0.5, 0.05)
    for v in victims:
        v.kill()
    killed = [v.name for v in victims]
    log(f"killed {', '.join(killed)} halfway (SIGKILL)")
    # The publisher goes once a full copy exists elsewhere.
    survivors = [h for h in fetchers if h not in victims]
    wait_for("a full copy on another host", args.timeout,
             lambda: any((version_of(h, model) or {}).get("complete") for h in survivors), 0.05)
    hosts[0].kill()
    killed.append(hosts[0].name)
    log("killed the publisher (a full copy exists elsewhere)")
    newcomers = []
    contact = next(h for h in survivors if (version_of(h, model) or {}).get("complete"))
    contact_addr = contact.join_addr()
    for _ in victims:
        h = net.add_host()
        h.start(follow, bootstrap=contact_addr)
        newcomers.append(h)
    finishers = survivors + newcomers
    done = {}

    def progress():
        for h in finishers:
            h.check_alive()
            v = version_of(h, model)
            if h.name not in done and v and v["complete"]:
                done[h.name] = (time.monotonic() - started, file_digest(v["path"]))
        return len(done) == len(finishers)

    wait_for("every surviving and new host to finish", args.timeout, progress, 0.1)
    rows = [{"host": h.name, "new": h in newcomers, "time": done[h.name][0],
             "identical": done[h.name][1] == expected} for h in finishers]
    print(f"{'host':<8} {'kind':<9} {'done after':>10} {'bytes':>10}")
    for r in rows:
        print(f"{r['host']:<8} {'new' if r['new'] else 'survivor':<9} {r['time']:>9.2f}s "
              f"{'identical' if r['identical'] else 'DIFFERENT':>10}")
    ok = all(r["identical"] for r in rows)
    print(f"{sum(r['identical'] for r in rows)}/{len(rows)} surviving and new hosts finished "
          f"with identical bytes; killed: {', '.join(killed)}")
    for h in finishers:
        h.stop()
    return {"hosts": args.hosts, "size_mib": args.size, "killed": killed, "rows": rows, "ok": ok}


def scenario_bootstrap_loss(net, args):
    hosts = [net.add_host() for _ in range(args.hosts)]
    join = hosts[0].start([]).join_addr()
    started = time.monotonic()
    for h in hosts[1:]:
        h.start([], bootstrap=join)
    all_connected(hosts)
    formed = time.monotonic() - started
    hosts[0].kill()
    log(f"network of {args.hosts} formed after {formed:.1f}s; killed the first contact ({hosts[0].name})")
    members = hosts[1:]
    # Newcomers join through another member.
    contact = members[0].join_addr()
    t0 = time.monotonic()
    newcomers = [net.add_host().start([], bootstrap=contact) for _ in range(2)]
    all_connected(members + newcomers)
    joined = time.monotonic() - t0
    # Restarted members rejoin from their peer caches alone (no --bootstrap).
    restarted = members[1:3]
    for h in restarted:
        h.stop()
    t0 = time.monotonic()
    for h in restarted:
        h.start([], fresh=False)
    all_connected(members + newcomers)
    rejoined = time.monotonic() - t0
    print(f"{'step':<52} {'seconds':>8}")
    print(f"{'network of ' + str(args.hosts) + ' formed through host-1':<52} {formed:>8.2f}")
    print(f"{'2 newcomers joined through host-2 after host-1 died':<52} {joined:>8.2f}")
    print(f"{'2 members restarted with no --bootstrap and rejoined':<52} {rejoined:>8.2f}")
    for h in members + newcomers:
        h.stop()
    return {"hosts": args.hosts, "formed": formed, "newcomers_joined": joined,
            "restarted_rejoined": rejoined, "ok": True}


TEXT_SPEC = """model = "char-transformer"
dataset = "austen"
shards = {shards}
steps = {steps}
batch_size = 8
optimizer = "adamw"
learning_rate = 0.001
eval_every = {eval_every}
checkpoint_every = {checkpoint_every}
{averaging}
[transformer]
context = 128
dim = 256
heads = 8
layers = 4
"""


def run_spec(args, shards, steps, alone=False):
    """The run spec of a `train`/`speedup` scenario: the digits demo (non-iid by-label shards)
    or the Austen text model, with the averaging the flags ask for. `alone`: the baseline's
    spec (one shard, iid)."""
    averaging = "".join(f"{line}\n" for line in args.set)
    if args.averaging == "outer":
        averaging += (f'averaging = "outer"\ninner_steps = {args.inner_steps}\n'
                      f'compression = "{args.compression}"')
    if args.workload == "text":
        return TEXT_SPEC.format(shards=shards, steps=steps, eval_every=args.eval_every,
                                checkpoint_every=max(args.eval_every, args.inner_steps),
                                averaging=averaging)
    spec = DEMO_SPEC.format(shards=shards, steps=steps) + averaging + "\n"
    if args.averaging == "outer":
        # Checkpoints at outer-step boundaries, so that a newcomer starts from outer parameters.
        spec = spec.replace("checkpoint_every = 100", f"checkpoint_every = {args.inner_steps * 2}")
    return spec.replace("by-label", "iid") if alone or args.partition == "iid" else spec


def parameter_count(path):
    """Values in a safetensors file (its header's shapes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            count = 1
            for d in t["shape"]:
                count *= d
            total += count
    return total


def start_log_line(host, needle):
    """The first line of `host`'s log that contains `needle`, or None."""
    if not host.log_file or not host.log_file.exists():
        return None
    for line in host.log_file.read_text(errors="replace").splitlines():
        if needle in line:
            return line
    return None


def log_field(line, key):
    """`key=value` from a text log line (None when absent)."""
    for word in (line or "").split():
        if word.startswith(key + "="):
            return word.split("=", 1)[1].strip('",')
    return None


class Training:
    """Samples `/status.training` of a set of hosts: per-host curves of
    (seconds since the host's first training step, step, accuracy or validation loss),
    and the last status."""

    def __init__(self, text):
        self.text = text
        self.curves, self.last, self.began, self.evaluated = {}, {}, {}, {}

    def sample(self, hosts, until_settled=True):
        """One round of samples; true when every host finished and evaluated its final model."""
        done = True
        for h in hosts:
            h.check_alive()
            t = (h.get("/status") or {}).get("training")
            if not t:
                done = False
                continue
            if t.get("state") == "failed":
                raise RuntimeError(f"{h.name}: training failed: {t.get('error')}")
            self.last[h.name] = t
            now = time.monotonic()
            if t["step"] > 0 and h.name not in self.began:
                self.began[h.name] = now
            metric = t.get("loss") if self.text else t.get("accuracy")
            c = self.curves.setdefault(h.name, [])
            evaluated = (t.get("evaluated_at_step"), t.get("evaluated_after_rounds"))
            if metric is not None and evaluated[0] is not None and self.evaluated.get(h.name) != evaluated:
                self.evaluated[h.name] = evaluated
                c.append([round(now - self.began.get(h.name, now), 2), evaluated[0], metric])
            settled = t["state"] == "finished" and t["evaluated_after_rounds"] == t["averaging_rounds"]
            done = done and settled
        return done or not until_settled


def metric_label(args):
    return "val loss" if args.workload == "text" else "accuracy"


def print_hosts(rows, args):
    """The per-host table: steps, outer steps, traffic, waiting, final quality."""
    print(f"{'host':<10} {'role':<10} {'shard':<6} {'steps':>6} {'outer':>5} {'KiB/step':>9} "
          f"{'waiting':>8} {metric_label(args):>9}")
    for r in rows:
        m = r["metric"]
        print(f"{r['host']:<10} {r['role']:<10} {r['shard']:<6} {r['steps']:>6} {r['outer_step']:>5} "
              f"{r['sent_per_step'] / 1024:>9.2f} {r['network_wait'] * 100:>7.1f}% "
              f"{'-' if m is None else f'{m:.3f}':>9}")


def host_row(host, status, role, text):
    t = status or {}
    return {"host": host.name, "role": role, "shard": t.get("shard", "-"), "steps": t.get("step", 0),
            "outer_step": t.get("outer_step", 0), "sent_per_step": t.get("bytes_sent_per_step", 0.0),
            "received_per_step": t.get("bytes_received_per_step", 0.0),
            "network_wait": t.get("network_wait_fraction", 0.0),
            "metric": t.get("loss") if text else t.get("accuracy"),
            "bits_per_char": t.get("bits_per_char"), "compression_ratio": t.get("compression_ratio")}


def scenario_train(net, args):
    """N hosts train one run on their shards (optionally with attackers, and with hosts killed
    halfway and replaced by newcomers); a baseline host trains alone on all data for the same
    total samples. Prints quality, traffic per step against f32 every step, and waiting."""
    n, steps, text = args.hosts, args.steps, args.workload == "text"
    spec = net.out / "run.toml"
    spec.write_text(run_spec(args, n, steps))
    base = net.out / "baseline.toml"
    base.write_text(run_spec(args, 1, steps * n, alone=True))
    hosts = [net.add_host() for _ in range(n)]
    attackers = [net.add_host() for _ in args.attack]
    baseline_host = None if args.no_baseline else net.add_host()
    join = hosts[0].start(["train", "--create", str(spec), "--shard", f"0/{n}"]).join_addr()
    for i, h in enumerate(hosts[1:], start=1):
        h.start(["train", "--shard", f"{i}/{n}"], bootstrap=join)
    for i, (h, attack) in enumerate(zip(attackers, args.attack)):
        h.start(["train", "--shard", f"{i % n}/{n}", "--attack-averaging", attack], bootstrap=join)
    if baseline_host:
        baseline_host.start(["train", "--create", str(base), "--shard", "0/1", "--no-averaging"])
    everyone = hosts + attackers + ([baseline_host] if baseline_host else [])
    training = Training(text)
    replaced, newcomers = [], []
    if args.churn:
        # Kill `churn` hosts (not the first: it is the others' contact) halfway, then start as
        # many newcomers on the same shards with fresh data dirs.
        wait_for("the hosts to be halfway", args.timeout, lambda: (
            training.sample(everyone, until_settled=False) and
            statistics.mean(training.last.get(h.name, {}).get("step", 0) for h in hosts) >= steps / 2), 0.25)
        victims = hosts[-args.churn:]
        for v in victims:
            v.kill()
            replaced.append(v.name)
        log(f"killed {', '.join(replaced)} halfway (SIGKILL)")
        contact = hosts[0].join_addr()
        for v in victims:
            h = net.add_host()
            shard = training.last.get(v.name, {}).get("shard", f"{hosts.index(v)}/{n}")
            h.start(["train", "--shard", shard], bootstrap=contact)
            newcomers.append(h)
        hosts = [h for h in hosts if h not in victims] + newcomers
        everyone = [h for h in everyone if h not in victims] + newcomers
    wait_for("training to finish", args.timeout, lambda: training.sample(everyone), 0.25)
    for h in everyone:
        h.stop()
    rows = [host_row(h, training.last.get(h.name), "newcomer" if h in newcomers else "honest", text)
            for h in hosts]
    rows += [host_row(h, training.last.get(h.name), "attacker", text) for h in attackers]
    if baseline_host:
        rows.append(host_row(baseline_host, training.last.get(baseline_host.name), "baseline", text))
    print_hosts(rows, args)
    result = {"hosts": n, "steps": steps, "workload": args.workload, "averaging": args.averaging,
              "inner_steps": args.inner_steps, "compression": args.compression,
              "partition": args.partition, "set": args.set,
              "attack": args.attack, "replaced": replaced, "rows": rows,
              "curves": training.curves, "baseline": baseline_host.name if baseline_host else None,
              "final": {r["host"]: r["metric"] for r in rows}}
    honest = [r for r in rows if r["role"] in ("honest", "newcomer")]
    checkpoint = (training.last.get(hosts[0].name) or {}).get("checkpoint_path")
    if checkpoint and Path(checkpoint).exists():
        params = parameter_count(checkpoint)
        f32_per_step = params * 4
        sent = max(r["sent_per_step"] for r in honest)
        result.update(parameters=params, f32_bytes_per_step=f32_per_step, max_sent_per_step=sent)
        print(f"traffic: {params} parameters; full f32 parameters every step would send "
              f"{f32_per_step / 1024:.1f} KiB/step; the most any host sent was {sent / 1024:.2f} KiB/step "
              f"({f32_per_step / max(sent, 1e-9):.0f}x fewer)")
    waits = [r["network_wait"] for r in honest]
    print(f"waiting on the network: {min(waits) * 100:.1f}-{max(waits) * 100:.1f}% of wall time")
    values = [r["metric"] for r in honest if r["metric"] is not None]
    if values:
        print(f"{metric_label(args)} of honest hosts: {min(values):.3f}-{max(values):.3f}"
              + (f"; baseline {rows[-1]['metric']:.3f}" if baseline_host and rows[-1]["metric"] is not None else ""))
    for h in newcomers:
        line = start_log_line(h, "training starts (")
        start = {"host": h.name, "how": line.split("training starts (", 1)[1].split(")", 1)[0] if line else None,
                 "samples_seen": log_field(line, "samples_seen")}
        result.setdefault("newcomer_starts", []).append(start)
        print(f"{h.name} (newcomer) started {start['how']}")
    return result


def scenario_speedup(net, args):
    """Time to a target loss: one host pinned to one core trains alone for `--steps`; its final
    validation loss is L*. Then 2 hosts (each pinned to its own core), and the larger counts of
    `--hosts-list` (cores shared), train one run until every host's loss reaches L*. Text model
    by default."""
    cores = os.cpu_count() or 1
    results = {"steps": args.steps, "workload": args.workload, "cores": cores, "runs": [],
               "averaging": args.averaging, "inner_steps": args.inner_steps,
               "compression": args.compression, "set": args.set}

    def run(count):
        label = "alone" if count == 1 else f"{count} hosts"
        spec = net.out / f"speedup-{count}.toml"
        spec.write_text(run_spec(args, count, args.steps, alone=count == 1))
        hosts = [net.add_host() for _ in range(count)]
        for i, h in enumerate(hosts):
            h.cpus = str(i % cores)
        if count == 1:
            hosts[0].start(["train", "--create", str(spec), "--shard", "0/1", "--no-averaging"])
        else:
            join = hosts[0].start(["train", "--create", str(spec), "--shard", f"0/{count}"]).join_addr()
            for i, h in enumerate(hosts[1:], start=1):
                h.start(["train", "--shard", f"{i}/{count}"], bootstrap=join)
        training = Training(args.workload == "text")
        target = results.get("target")
        better = (lambda v: v <= target) if args.workload == "text" else (lambda v: v >= target)

        def reached_or_done():
            done = training.sample(hosts)
            if target is None:
                return done
            return done or all(any(better(p[2]) for p in training.curves.get(h.name, [])) for h in hosts)

        wait_for(f"{label} to finish", args.timeout, reached_or_done, 0.25)
        for h in hosts:
            h.stop()
        row = {"hosts": count, "per_host": []}
        for h in hosts:
            c = training.curves.get(h.name, [])
            t = training.last.get(h.name) or {}
            hit = next((p for p in c if target is not None and better(p[2])), None)
            row["per_host"].append({"host": h.name, "cpu": h.cpus, "curve": c,
                                    "seconds_to_target": hit[0] if hit else None,
                                    "steps_to_target": hit[1] if hit else None,
                                    "network_wait": t.get("network_wait_fraction", 0.0),
                                    "sent_per_step": t.get("bytes_sent_per_step", 0.0),
                                    "final": c[-1][2] if c else None,
                                    "seconds": c[-1][0] if c else None})
        for h in hosts:
            h.remove()
        return row

    if args.target_from:
        # The single host of an earlier run with the same flags (it takes as long as it takes).
        earlier = json.loads(args.target_from.read_text())
        alone = earlier["runs"][0]
        if (earlier.get("scenario") != "speedup" or alone["hosts"] != 1 or earlier["steps"] != args.steps
                or earlier.get("workload") != args.workload):
            raise ValueError(f"{args.target_from}: not a speedup result with --steps {args.steps} "
                             f"and --workload {args.workload}")
        log(f"one host alone: taken from {args.target_from}")
    else:
        alone = run(1)
    final = alone["per_host"][0]
    if final["final"] is None:
        raise RuntimeError("the single host never evaluated")
    results["target"] = final["final"]
    alone["per_host"][0].update(seconds_to_target=final["seconds"], steps_to_target=args.steps)
    results["runs"].append(alone)
    log(f"L* = {results['target']:.4f} ({metric_label(args)} of one host after {args.steps} steps, "
        f"{final['seconds']:.0f} s)")
    for count in args.hosts_list:
        results["runs"].append(run(count))
    t1 = final["seconds"]
    print(f"L* = {results['target']:.4f} ({metric_label(args)} of one host alone after {args.steps} steps)")
    print(f"{'hosts':>5} {'cores':>5} {'s to L* (slowest)':>18} {'speed-up':>9} {'steps to L*':>14} "
          f"{'waiting':>8} {'KiB/step':>9}")
    for r in results["runs"]:
        times = [p["seconds_to_target"] for p in r["per_host"]]
        steps = [p["steps_to_target"] for p in r["per_host"]]
        slowest = None if None in times else max(times)
        samples = None if None in steps else sum(steps)
        gain = t1 / slowest if slowest and t1 else None
        r.update(seconds_to_target=slowest, speedup=gain, steps_to_target_total=samples)
        waits = [p["network_wait"] for p in r["per_host"]]
        sent = max(p["sent_per_step"] for p in r["per_host"])
        print(f"{r['hosts']:>5} {min(r['hosts'], cores):>5} "
              f"{'not reached' if slowest is None else f'{slowest:.0f}':>18} "
              f"{'-' if gain is None else f'{gain:.2f}x':>9} "
              f"{'-' if samples is None else samples:>14} {max(waits) * 100:>7.2f}% {sent / 1024:>9.2f}")
    return results


def scenario_up(net, args):
    hosts = [net.add_host() for _ in range(args.hosts)]
    join = hosts[0].start([]).join_addr()
    for h in hosts[1:]:
        h.start([], bootstrap=join)
    all_connected(hosts)
    for h in hosts:
        print(f"{h.name:<8} {h.ip:<14} {(h.get('/status') or {}).get('peer_id', '-')}")
    log(f"{args.hosts} hosts up ({net.describe()['summary']}); Ctrl-C tears everything down")
    while all(h.alive() for h in hosts):
        time.sleep(1)
    raise RuntimeError("a node exited on its own")


def scenario_nat(net, args):
    """Pairs of hosts behind home routers (see testnet/nat.py)."""
    return nat.scenario_nat(net, args, (sh, Host, safetensors_file, file_digest, log))


SCENARIOS = {"nat": scenario_nat, "distribute": scenario_distribute, "churn": scenario_churn,
             "bittorrent": scenario_bittorrent,
             "bootstrap-loss": scenario_bootstrap_loss, "train": scenario_train,
             "speedup": scenario_speedup, "up": scenario_up}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--hosts", type=int, default=None, help="hosts (default 8; 4 for train)")
    parser.add_argument("--profile", choices=[*PROFILES, "custom"], default="dc")
    parser.add_argument("--up", type=float, help="custom upload, Mbit/s")
    parser.add_argument("--down", type=float, help="custom download, Mbit/s")
    parser.add_argument("--delay", type=float, help="custom one-way latency, ms")
    parser.add_argument("--loss", type=float, help="custom loss, percent")
    parser.add_argument("--slow-fetchers", metavar="UP/DOWN",
                        help="distribute: every second fetcher gets this link (Mbit/s), e.g. 20/50")
    parser.add_argument("--size", type=int, default=64, help="MiB to distribute (default 64)")
    parser.add_argument("--chunk-kib", type=int, default=None,
                        help="distribute: chunk size of the version (default: the node's choice by size)")
    parser.add_argument("--stages", default="all", help="distribute: comma-separated stages, or all")
    parser.add_argument("--kill", type=float, default=0.25, help="churn: fraction of fetchers killed")
    parser.add_argument("--steps", type=int, default=None,
                        help="train: local steps per host (600 digits, 300 text); speedup: the single host's budget")
    parser.add_argument("--workload", choices=["digits", "text"], default=None,
                        help="train/speedup: non-iid digits shards or the Austen text model (speedup: text)")
    parser.add_argument("--averaging", choices=["outer", "parameters"], default="outer",
                        help="train/speedup: outer steps on pseudo-gradients, or plain parameter averaging")
    parser.add_argument("--inner-steps", type=int, default=50, help="with outer: local steps per outer step")
    parser.add_argument("--compression", choices=["int8", "top-k", "f32"], default="int8",
                        help="with outer: how pseudo-gradients travel")
    parser.add_argument("--partition", choices=["by-label", "iid"], default="by-label",
                        help="train, digits: how the data is cut into shards")
    parser.add_argument("--eval-every", type=int, default=25, help="text: local steps between evaluations")
    parser.add_argument("--set", action="append", default=[], metavar="'FIELD = VALUE'",
                        help="train/speedup: an extra line of the run spec (e.g. 'outer_momentum = 0.9'); repeatable")
    parser.add_argument("--attack", action="append", default=[], metavar="ATTACK",
                        help="train: add an adversarial host (negate, scale=F, noise=D, oppose=C, nan, stall); repeatable")
    parser.add_argument("--churn", type=int, default=0,
                        help="train: hosts killed halfway and replaced by as many newcomers")
    parser.add_argument("--no-baseline", action="store_true", help="train: no single-host baseline")
    parser.add_argument("--target-from", type=Path, metavar="RESULT",
                        help="speedup: reuse the single host of an earlier result.json (same --steps)")
    parser.add_argument("--hosts-list", default="2,4,8",
                        help="speedup: host counts compared with one host alone")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per phase (default 600; 3600 with the text model)")
    parser.add_argument("--pairs", default=None,
                        help="nat: comma-separated PUBLISHER:FOLLOWER router kinds (full-cone, "
                             "port-restricted, symmetric); default: " + ",".join(nat.DEFAULT_PAIRS))
    parser.add_argument("--node-flag", action="append", default=[], metavar="FLAG",
                        help="a flag added to every node's command line (repeatable), e.g. "
                             "--node-flag=--availability-wait-ms=0")
    parser.add_argument("--bin", type=Path, default=DEFAULT_BIN)
    parser.add_argument("--out", type=Path, help="results dir (default testnet/run/netns/...)")
    parser.add_argument("--loopback", action="store_true", help="no namespaces: processes on 127.0.0.1")
    args = parser.parse_args()
    if args.hosts is None:
        args.hosts = 4 if args.scenario == "train" else 8
    if args.workload is None:
        args.workload = "text" if args.scenario == "speedup" else "digits"
    if args.steps is None:
        args.steps = 300 if args.workload == "text" else 600
    if args.timeout is None:
        args.timeout = 3600 if args.workload == "text" else 600
    try:
        args.hosts_list = [int(x) for x in args.hosts_list.split(",") if x]
    except ValueError:
        sys.exit("error: --hosts-list is a comma-separated list of host counts, e.g. 2,4,8")
    if any(not 2 <= x <= 64 for x in args.hosts_list):
        sys.exit("error: --hosts-list counts must be between 2 and 64")
    if not 1 <= args.inner_steps <= 100_000 or not 1 <= args.steps <= 10_000_000 or args.eval_every < 1:
        sys.exit("error: --inner-steps, --steps and --eval-every must be positive")
    if not 0 <= args.churn < args.hosts:
        sys.exit("error: --churn must be below --hosts")
    if not 2 <= args.hosts <= 200:
        sys.exit("error: --hosts must be between 2 and 200")
    if args.size < 1 or args.size > 4096:
        sys.exit("error: --size must be 1 to 4096 MiB")
    if not args.bin.exists():
        sys.exit(f"error: {args.bin} not found; build it with: cargo build --release -p p2p-node")
    out = args.out or ROOT / "testnet" / "run" / "netns" / f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    net = None

    def on_signal(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored
    code = 0
    try:
        net = Network(args, out)
        result = SCENARIOS[args.scenario](net, args)
        result.update(scenario=args.scenario, links=net.describe(),
                      date=time.strftime("%Y-%m-%d %H:%M:%S"))
        (out / "result.json").write_text(json.dumps(result, indent=1))
        log(f"wrote {out / 'result.json'}")
        if result.get("ok") is False:
            code = 1
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        code = 130
    except NamespacesUnavailable as e:
        log(f"error: {e}")
        code = 3
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:
        log(f"error: {e}")
        code = 1
    finally:
        if net is not None:
            net.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
