#!/usr/bin/env python3
"""Testnet with real links: each host a Linux network namespace with its own address, joined
by veth pairs to a bridge, its upload and download shaped with `tc`, running one p2p-node.

    testnet/netns.py distribute [--hosts 8] [--profile dc] [--size 64] [--stages all]
    testnet/netns.py churn [--hosts 8] [--kill 0.25]
    testnet/netns.py bootstrap-loss [--hosts 8]
    testnet/netns.py train [--hosts 4]
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
        if not self.loopback:
            self.setup_bridge()

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
        for h in self.hosts:
            h.kill()
        if not self.loopback:
            for h in self.hosts:
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
        return {"profile": self.args.profile, **l, "netem": self.netem, "shaped": self.shaping or self.netem,
                "loopback": self.loopback,
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
        l = net.link
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
        cmd = [str(self.net.args.bin), *args, "--data-dir", str(data), "--no-mdns",
               "--listen", f"/ip4/{self.ip}/tcp/{port}",
               "--listen", f"/ip4/{self.ip}/udp/{port}/quic-v1",
               "--api-addr", f"{self.ip}:{0 if self.net.loopback else 7000}"]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        self.log_file = self.dir / "node.log"
        with open(self.log_file, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        return self

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


def lower_bound(size_bytes, fetchers, link):
    """The fluid-model lower bound: T_min = max(S/u_pub, S/d_min, N*S/(u_pub + sum u_i))."""
    up, down = link["up"] * 1e6 / 8, link["down"] * 1e6 / 8
    return max(size_bytes / up, size_bytes / down, fetchers * size_bytes / (up + fetchers * up))


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
    join = hosts[0].start(["--stage", stage, "--chunk-size-kib", str(net.args.chunk_kib)]).join_addr()
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
    t_min = lower_bound(size, args.hosts - 1, net.link)
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
    return {"hosts": args.hosts, "size_mib": args.size, "size_bytes": size, "t_min": t_min, "runs": runs}


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


def scenario_train(net, args):
    steps = args.steps
    spec = net.out / "digits.toml"
    spec.write_text(DEMO_SPEC.format(shards=args.hosts, steps=steps))
    base = net.out / "baseline.toml"
    base.write_text(DEMO_SPEC.format(shards=1, steps=steps * args.hosts).replace("by-label", "iid"))
    hosts = [net.add_host() for _ in range(args.hosts)]
    baseline_host = net.add_host()
    t0 = time.monotonic()
    join = hosts[0].start(["train", "--create", str(spec), "--shard", f"0/{args.hosts}"]).join_addr()
    for i, h in enumerate(hosts[1:], start=1):
        h.start(["train", "--shard", f"{i}/{args.hosts}"], bootstrap=join)
    baseline_host.start(["train", "--create", str(base), "--shard", "0/1", "--no-averaging"])
    curves = {h.name: [] for h in hosts + [baseline_host]}

    def sample():
        done = True
        for h in hosts + [baseline_host]:
            h.check_alive()
            t = (h.get("/status") or {}).get("training")
            if not t:
                done = False
                continue
            if t.get("state") == "failed":
                raise RuntimeError(f"{h.name}: training failed: {t.get('error')}")
            point = [round(time.monotonic() - t0, 2), t["step"], t.get("accuracy")]
            c = curves[h.name]
            if t.get("accuracy") is not None and (not c or c[-1][1:] != point[1:]):
                c.append(point)
            settled = t["state"] == "finished" and t["evaluated_after_rounds"] == t["averaging_rounds"]
            done = done and settled
        return done

    wait_for("training to finish", args.timeout, sample, 0.25)
    finals = {}
    for h in hosts + [baseline_host]:
        finals[h.name] = (h.get("/status") or {}).get("training") or {}
        h.stop()
    print(f"{'host':<10} {'shard':<6} {'steps':>6} {'steps/s':>8} {'rounds':>7} {'accuracy':>9}")
    for h in hosts:
        t = finals[h.name]
        print(f"{h.name:<10} {t.get('shard', '-'):<6} {t.get('step', 0):>6} {t.get('steps_per_second', 0):>8.0f} "
              f"{t.get('averaging_rounds', 0):>7} {t.get('accuracy') or 0:>9.3f}")
    b = finals[baseline_host.name]
    print(f"{'baseline':<10} {'0/1':<6} {b.get('step', 0):>6} {b.get('steps_per_second', 0):>8.0f} "
          f"{'-':>7} {b.get('accuracy') or 0:>9.3f}")
    return {"hosts": args.hosts, "steps": steps, "curves": curves,
            "final": {k: v.get("accuracy") for k, v in finals.items()},
            "steps_per_second": {k: v.get("steps_per_second") for k, v in finals.items()},
            "baseline": baseline_host.name}


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


SCENARIOS = {"distribute": scenario_distribute, "churn": scenario_churn,
             "bootstrap-loss": scenario_bootstrap_loss, "train": scenario_train, "up": scenario_up}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--hosts", type=int, default=None, help="hosts (default 8; 4 for train)")
    parser.add_argument("--profile", choices=[*PROFILES, "custom"], default="dc")
    parser.add_argument("--up", type=float, help="custom upload, Mbit/s")
    parser.add_argument("--down", type=float, help="custom download, Mbit/s")
    parser.add_argument("--delay", type=float, help="custom one-way latency, ms")
    parser.add_argument("--loss", type=float, help="custom loss, percent")
    parser.add_argument("--size", type=int, default=64, help="MiB to distribute (default 64)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="distribute: chunk size of the version")
    parser.add_argument("--stages", default="all", help="distribute: comma-separated stages, or all")
    parser.add_argument("--kill", type=float, default=0.25, help="churn: fraction of fetchers killed")
    parser.add_argument("--steps", type=int, default=600, help="train: local steps per host")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per phase")
    parser.add_argument("--bin", type=Path, default=DEFAULT_BIN)
    parser.add_argument("--out", type=Path, help="results dir (default testnet/run/netns/...)")
    parser.add_argument("--loopback", action="store_true", help="no namespaces: processes on 127.0.0.1")
    args = parser.parse_args()
    if args.hosts is None:
        args.hosts = 4 if args.scenario == "train" else 8
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
