#!/usr/bin/env python3
"""Local testnet: N p2p-node processes on 127.0.0.1, each with its own data dir, ports and log.

Node 1 is the first contact; every other node is started with `--bootstrap <node 1>` and finds
the rest through Kademlia. The script waits until every node sees all others, prints a table of
peer ids and peer counts, and then keeps the network up until Ctrl-C (or `stop`), when it stops
every node with SIGTERM (nodes save their state and exit 0).

    testnet/local.py start [--nodes 5] [--detach]   # foreground unless --detach
    testnet/local.py status                         # table of a running testnet
    testnet/local.py stop                           # stop a detached testnet
    testnet/local.py check [--nodes 3]              # start, wait, print, stop; exit 1 on failure
    testnet/local.py train [--nodes 4] [--keep]     # the training demo (below)

`train` is the training demo: node 1 creates a digits run (`p2p-node train --create`), the
others join it through node 1, each trains on its own non-iid shard (a few labels only) and
averages parameters with random peers. It prints the nodes' test accuracy as it rises and
ends with a table of final accuracies against a single node trained alone on all the data for
the same total number of samples. `--keep` leaves the nodes serving until Ctrl-C.

Standard library only. Traffic stays on loopback; nodes run with --no-mdns.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "testnet" / "run" / "local"
DEFAULT_BIN = ROOT / "target" / "release" / "p2p-node"
DEFAULT_TRAIN_DIR = ROOT / "testnet" / "run" / "train"

# The run the demo trains: the example spec of the README, one shard per node.
DEMO_SPEC = """model = "digits-mlp"
dataset = "digits"
partition = "by-label"
shards = {shards}
steps = {steps}
batch_size = 32
learning_rate = 0.05
average_every = 10
checkpoint_every = 100
"""
DEMO_STEPS = 600


def log(msg):
    print(f"[testnet] {msg}", file=sys.stderr, flush=True)


def api_get(api, path, timeout=5):
    with urllib.request.urlopen(f"http://{api}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def node_dirs(base):
    return sorted((d for d in base.glob("node-*") if d.is_dir()), key=lambda d: int(d.name.split("-")[1]))


def wait_for(what, timeout, check, interval=0.2):
    """Calls `check` every `interval` seconds until it returns something true; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def read_join_addr(log_file):
    for line in log_file.read_text(errors="replace").splitlines():
        if "p2p-node --bootstrap " in line and "/ip4/127.0.0.1/tcp/" in line:
            return line.rsplit(" ", 1)[1]
    return None


def read_api(node_dir):
    try:
        return (node_dir / "data" / "api-addr").read_text().strip() or None
    except FileNotFoundError:
        return None


def start_node(binary, node_dir, bootstrap, command=()):
    """Starts one node (with `command`, e.g. a `train` subcommand and its flags); its stdout and
    stderr go to node_dir/node.log."""
    data = node_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "api-addr").unlink(missing_ok=True)
    # --kad-mode server: loopback is not reachable from other machines, so `auto` would make
    # every node a DHT client.
    args = [str(binary), *command, "--data-dir", str(data), "--no-mdns", "--kad-mode", "server",
            "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
            "--api-addr", "127.0.0.1:0"]
    for b in bootstrap:
        args += ["--bootstrap", b]
    logf = open(node_dir / "node.log", "wb")
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    (node_dir / "pid").write_text(str(proc.pid))
    return proc


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_all(base, timeout=30):
    pids = []
    for d in node_dirs(base):
        try:
            pid = int((d / "pid").read_text())
        except (FileNotFoundError, ValueError):
            continue
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            pids.append((d.name, pid))
    deadline = time.monotonic() + timeout
    for name, pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if alive(pid):
            log(f"{name} did not stop within {timeout}s; killing it")
            os.kill(pid, signal.SIGKILL)
    for d in node_dirs(base):
        (d / "pid").unlink(missing_ok=True)
    if pids:
        log(f"stopped {len(pids)} nodes")


def all_see_each_other(dirs):
    """Whether every node's routing table holds the peer id of every other node."""
    try:
        apis = [read_api(d) for d in dirs]
        if not all(apis):
            return False
        ids = [api_get(api, "/status")["peer_id"] for api in apis]
        for api, own in zip(apis, ids):
            table = {p["peer_id"] for p in api_get(api, "/peers") if p["in_routing_table"]}
            if not set(ids) - {own} <= table:
                return False
        return True
    except OSError:
        return False


def snapshot(dirs):
    rows = []
    for d in dirs:
        api = read_api(d)
        row = {"node": d.name, "api": api or "-", "peer_id": "-", "connected": "-", "routing_table": "-"}
        if api:
            try:
                status = api_get(api, "/status")
                row.update(peer_id=status["peer_id"], connected=status["connected_peers"],
                           routing_table=status["routing_table_peers"])
            except OSError:
                row["peer_id"] = "(not answering)"
        rows.append(row)
    return rows


def print_table(rows):
    header = f"{'node':<8} {'peer id':<54} {'connected':>9} {'routing table':>13}  api"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['node']:<8} {r['peer_id']:<54} {r['connected']!s:>9} {r['routing_table']!s:>13}  {r['api']}")
    sys.stdout.flush()


def start(args):
    base = Path(args.dir)
    binary = Path(args.bin)
    if not binary.exists():
        sys.exit(f"error: {binary} not found; build it with: cargo build --release -p p2p-node")
    if args.nodes < 2:
        sys.exit("error: --nodes must be at least 2")
    stop_all(base)  # leftovers of an earlier run
    base.mkdir(parents=True, exist_ok=True)
    for d in node_dirs(base):
        if int(d.name.split("-")[1]) > args.nodes:
            (d / "pid").unlink(missing_ok=True)
    procs = []
    started = time.monotonic()
    try:
        first = base / "node-1"
        first.mkdir(parents=True, exist_ok=True)
        procs.append(start_node(binary, first, []))
        def first_join_addr():
            if procs[0].poll() is not None:
                fail_early(first)
            return read_join_addr(first / "node.log")

        join = wait_for("node-1 to print its join address", 60, first_join_addr)
        log(f"node-1 is the first contact: p2p-node --bootstrap {join}")
        for i in range(2, args.nodes + 1):
            d = base / f"node-{i}"
            d.mkdir(parents=True, exist_ok=True)
            procs.append(start_node(binary, d, [join]))
        dirs = [base / f"node-{i}" for i in range(1, args.nodes + 1)]

        def converged():
            for p, d in zip(procs, dirs):
                if p.poll() is not None:
                    fail_early(d)
            return snapshot(dirs) if all_see_each_other(dirs) else None

        rows = wait_for("every node to see all others", args.timeout, converged)
        log(f"{args.nodes} nodes see each other after {time.monotonic() - started:.1f}s")
        print_table(rows)
        if args.command == "check":
            return
        if args.detach:
            log(f"running in the background; logs in {base}/node-*/node.log; stop with: {sys.argv[0]} stop")
            procs = []  # leave them running
            return
        log("running; press Ctrl-C to stop")
        signal.signal(signal.SIGTERM, interrupt)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        raise RuntimeError("a node exited on its own; stopping the testnet")
    except KeyboardInterrupt:
        log("Ctrl-C: stopping")
    finally:
        if procs:
            stop_all(base)
            bad = [p.returncode for p in procs if p.returncode not in (0, None)]
            if bad:
                log(f"nodes exited with codes {bad}")


def training_status(node_dir):
    """The `training` object of a node's /status, or None."""
    api = read_api(node_dir)
    if not api:
        return None
    try:
        return api_get(api, "/status").get("training")
    except (OSError, ValueError):
        return None


def fmt_acc(t):
    return f"{t['accuracy']:.3f}" if t and t.get("accuracy") is not None else "  -  "


def labels_of(t):
    labels = (t or {}).get("shard_labels")
    return ",".join(map(str, labels)) if labels else "-"


def baseline_accuracy(log_file):
    """The accuracy in the baseline's closing line (`finished N local steps: test accuracy X`)."""
    for line in log_file.read_text(errors="replace").splitlines():
        if line.startswith("finished ") and "test accuracy " in line:
            return float(line.split("test accuracy ")[1].split(",")[0])
    return None


def train_demo(args):
    base = Path(args.dir)
    binary = Path(args.bin)
    if not binary.exists():
        sys.exit(f"error: {binary} not found; build it with: cargo build --release -p p2p-node")
    if not 2 <= args.nodes <= 16:
        sys.exit("error: --nodes must be between 2 and 16")
    stop_all(base)
    stop_all(base / "baseline")
    shutil.rmtree(base, ignore_errors=True)  # a fresh run every time, not a resumed one
    base.mkdir(parents=True)
    spec = base / "digits.toml"
    spec.write_text(DEMO_SPEC.format(shards=args.nodes, steps=DEMO_STEPS))
    # Same total samples as the whole network, all labels, alone.
    baseline_spec = base / "baseline.toml"
    baseline_spec.write_text(DEMO_SPEC.format(shards=1, steps=DEMO_STEPS * args.nodes)
                             .replace('"by-label"', '"iid"'))
    log(f"{args.nodes} nodes train the digits MLP on non-iid shards ({spec}), "
        f"{DEMO_STEPS} local steps each, averaging every 10 steps")
    procs = []
    dirs = [base / f"node-{i}" for i in range(1, args.nodes + 1)]
    started = time.monotonic()
    try:
        dirs[0].mkdir(parents=True)
        procs.append(start_node(binary, dirs[0], [], ["train", "--create", str(spec),
                                                     "--shard", f"0/{args.nodes}"]))

        def first_join_addr():
            if procs[0].poll() is not None:
                fail_early(dirs[0])
            return read_join_addr(dirs[0] / "node.log")

        join = wait_for("node-1 to print its join address", 60, first_join_addr)
        log(f"node-1 created the run; the others join with: p2p-node train --bootstrap {join}")
        for i, d in enumerate(dirs[1:], start=1):
            d.mkdir(parents=True)
            procs.append(start_node(binary, d, [join], ["train", "--shard", f"{i}/{args.nodes}"]))
        baseline_dir = base / "baseline" / "node-1"
        baseline_dir.mkdir(parents=True)
        baseline = start_node(binary, baseline_dir, [],
                              ["train", "--create", str(baseline_spec), "--shard", "0/1",
                               "--no-averaging", "--exit-when-done"])
        log("baseline: one more node trains alone on all the data "
            f"({DEMO_STEPS * args.nodes} steps, the network's total)")

        names = " ".join(f"{d.name:>7}" for d in dirs)
        print(f"{'time':>6}  {'steps':>9}  accuracy: {names}   rounds")
        sys.stdout.flush()
        last_row = None
        deadline = time.monotonic() + args.timeout
        while True:
            for p, d in zip(procs, dirs):
                if p.poll() is not None:
                    fail_early(d)
            statuses = [training_status(d) for d in dirs]
            if all(statuses):
                failed = [t["error"] for t in statuses if t.get("state") == "failed"]
                if failed:
                    raise RuntimeError(f"training failed: {failed[0]}")
                row = (min(t["step"] for t in statuses), tuple(fmt_acc(t) for t in statuses))
                if row != last_row:
                    last_row = row
                    accs = " ".join(f"{a:>7}" for a in row[1])
                    rounds = " ".join(str(t["averaging_rounds"]) for t in statuses)
                    print(f"{time.monotonic() - started:5.1f}s  {row[0]:>4}/{DEMO_STEPS:<4}  "
                          f"          {accs}   {rounds}")
                    sys.stdout.flush()
                settled = all(t["state"] == "finished"
                              and t["evaluated_after_rounds"] == t["averaging_rounds"]
                              for t in statuses)
                if settled and baseline.poll() is not None:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"training did not finish within {args.timeout}s")
            time.sleep(0.25)
        if baseline.returncode != 0:
            fail_early(baseline_dir)
        base_acc = baseline_accuracy(baseline_dir / "node.log")

        print()
        header = (f"{'node':<8} {'shard':<6} {'labels':<12} {'steps':>5} {'steps/s':>7} {'rounds':>6} "
                  f"{'KiB/round':>9} {'KiB/step':>8} {'waiting':>7} {'accuracy':>8}")
        print(header)
        print("-" * len(header))
        for d, t in zip(dirs, statuses):
            per_round = t["averaging_bytes_sent"] / max(t["averaging_rounds"], 1) / 1024
            per_step = t.get("bytes_sent_per_step", 0.0) / 1024
            waiting = t.get("network_wait_fraction", t["averaging_time_fraction"])
            print(f"{d.name:<8} {t['shard']:<6} {labels_of(t):<12} {t['step']:>5} "
                  f"{t['steps_per_second']:>7.0f} {t['averaging_rounds']:>6} {per_round:>9.1f} "
                  f"{per_step:>8.1f} {waiting:>7.0%} {fmt_acc(t):>8}")
        accs = [t["accuracy"] for t in statuses]
        print("-" * len(header))
        print(f"{'network':<8} {'':<6} {'0-9':<12} {DEMO_STEPS * args.nodes:>5} {'':>7} {'':>6} {'':>9} "
              f"{'':>8} {'':>7} {min(accs):.3f}-{max(accs):.3f}")
        print(f"{'baseline':<8} {'0/1':<6} {'0-9':<12} {DEMO_STEPS * args.nodes:>5} {'-':>7} {'-':>6} "
              f"{'-':>9} {'-':>8} {'-':>7} {base_acc if base_acc is None else format(base_acc, '.3f'):>8}")
        print(f"\nevery node, on the full test split, after {time.monotonic() - started:.0f}s; "
              "baseline: one node alone on all labels for the same total samples")
        sys.stdout.flush()
        if args.keep:
            log("nodes keep serving the model; press Ctrl-C to stop")
            signal.signal(signal.SIGTERM, interrupt)
            while all(p.poll() is None for p in procs):
                time.sleep(1)
    except KeyboardInterrupt:
        log("Ctrl-C: stopping")
    finally:
        stop_all(base)
        stop_all(base / "baseline")
        bad = [p.returncode for p in procs if p.returncode not in (0, None)]
        if bad:
            log(f"nodes exited with codes {bad}")


def interrupt(_signum, _frame):
    raise KeyboardInterrupt


def fail_early(node_dir):
    tail = (node_dir / "node.log").read_text(errors="replace").strip().splitlines()[-5:]
    raise RuntimeError(f"{node_dir.name} exited early:\n  " + "\n  ".join(tail))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="start", choices=["start", "stop", "status", "check", "train"])
    parser.add_argument("--nodes", type=int, default=None,
                        help="number of nodes (default 5; 4 for train)")
    parser.add_argument("--dir", default=None,
                        help="where data dirs and logs go (default testnet/run/local, or "
                             "testnet/run/train for train)")
    parser.add_argument("--bin", default=str(DEFAULT_BIN), help="p2p-node binary")
    parser.add_argument("--detach", action="store_true", help="leave the nodes running and return")
    parser.add_argument("--keep", action="store_true", help="train: keep serving after the table")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for discovery (default 120), or for training (600)")
    args = parser.parse_args()
    training = args.command == "train"
    if args.nodes is None:
        args.nodes = 4 if training else 5
    if args.dir is None:
        args.dir = str(DEFAULT_TRAIN_DIR if training else DEFAULT_DIR)
    if args.timeout is None:
        args.timeout = 600 if training else 120
    try:
        if training:
            train_demo(args)
        elif args.command in ("start", "check"):
            start(args)
        elif args.command == "stop":
            stop_all(Path(args.dir))
        else:
            print_table(snapshot(node_dirs(Path(args.dir))))
    except (TimeoutError, RuntimeError) as e:
        log(f"error: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
