"""The `nat` scenario of testnet/netns.py: hosts behind home routers.

Each NATed host is two namespaces: a router, whose WAN side sits on the testnet's bridge (the
"internet", 10.S.0.0/16) and masquerades its LAN (192.168.N.0/24), and the host behind it.
Router kinds (Linux netfilter, RFC 4787 terms):

- `full-cone`: endpoint-independent mapping (MASQUERADE keeps the source port) and
  endpoint-independent filtering of the node's port (what a full-cone router does once the
  node has sent from its port: anyone may send to the mapping), emulated by forwarding the
  node's port 4001 (TCP and UDP) to the host.
- `port-restricted`: endpoint-independent mapping, address-and-port-dependent filtering
  (conntrack lets in only replies to what the host sent).
- `symmetric`: endpoint-dependent mapping (`MASQUERADE --random-fully`: a random public port
  per destination), address-and-port-dependent filtering.

The scenario: a public hub (bootstrap, AutoNAT server, relay); then, pair by pair, a publisher
behind one router and, once the publisher is reachable (public, or holding a relay
reservation), a follower behind another. When the pair's path is settled (direct, or a hole
punch failed) and the follower is not done, a public seeder joins and follows the model: the
other holder that pairs without a direct path fetch from. Per pair it reports how the follower reaches the publisher (direct or
relayed), the seconds from the first relayed connection to a direct one, the bytes that
crossed a relay (the follower's libp2p bandwidth counters of circuit connections), whether
the download completed and whether the bytes are identical. Needs iptables (apt-get install
iptables); no mDNS (`--no-mdns`) and no UPnP (the node has none) leave the namespaces.
"""

import json
import re
import subprocess
import time
from datetime import datetime

from local import wait_for

DEFAULT_PAIRS = ["full-cone:full-cone", "port-restricted:port-restricted", "symmetric:symmetric",
                 "full-cone:symmetric", "port-restricted:symmetric"]
KINDS = ("full-cone", "port-restricted", "symmetric")
PORT = 4001
API = "127.0.0.1:7000"


def ns_sh(sh, ns, *args, check=True):
    return sh("ip", "netns", "exec", ns, *args, check=check)


class NatHost:
    """A router namespace of `kind` and a host namespace behind it, running one node."""

    def __init__(self, net, index, kind, sh, host_cls):
        if kind not in KINDS:
            raise ValueError(f"unknown NAT kind '{kind}'; expected one of {', '.join(KINDS)}")
        self.net, self.index, self.kind, self.sh = net, index, kind, sh
        # Borrow Host's process handling (start/kill/logs) without its bridge link.
        self._host = host_cls.__new__(host_cls)
        h = self._host
        h.net, h.index, h.name = net, index, f"nat-{index}-{kind}"
        h.dir = net.out / h.name
        h.proc, h.log_file, h.cpus, h.others = None, None, None, []
        tag = net.tag
        self.router, self.ns = f"pn{tag}r{index}", f"pn{tag}-{index}"
        h.ns = self.ns
        self.wan_ip = f"10.{net.subnet}.1.{index}"
        self.lan_ip = f"192.168.{index}.2"
        h.ip = self.lan_ip
        self.outer = f"pn{tag}w{index}"
        h.outer = self.outer
        sh("ip", "netns", "add", self.router)
        sh("ip", "netns", "add", self.ns)
        # WAN: router <-> bridge.
        sh("ip", "link", "add", f"pn{tag}x{index}", "type", "veth", "peer", "name", self.outer)
        sh("ip", "link", "set", f"pn{tag}x{index}", "netns", self.router)
        sh("ip", "-n", self.router, "link", "set", f"pn{tag}x{index}", "name", "wan")
        sh("ip", "-n", self.router, "addr", "add", f"{self.wan_ip}/16", "dev", "wan")
        sh("ip", "link", "set", self.outer, "master", net.bridge, "up")
        # LAN: router <-> host.
        sh("ip", "link", "add", f"pn{tag}l{index}", "type", "veth", "peer", "name", f"pn{tag}m{index}")
        sh("ip", "link", "set", f"pn{tag}l{index}", "netns", self.router)
        sh("ip", "link", "set", f"pn{tag}m{index}", "netns", self.ns)
        sh("ip", "-n", self.router, "link", "set", f"pn{tag}l{index}", "name", "lan")
        sh("ip", "-n", self.ns, "link", "set", f"pn{tag}m{index}", "name", "eth0")
        sh("ip", "-n", self.router, "addr", "add", f"192.168.{index}.1/24", "dev", "lan")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.lan_ip}/24", "dev", "eth0")
        for ns, devs in ((self.router, ("lo", "wan", "lan")), (self.ns, ("lo", "eth0"))):
            for dev in devs:
                sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.ns, "route", "add", "default", "via", f"192.168.{index}.1")
        ns_sh(sh, self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ipt = ["ip", "netns", "exec", self.router, "iptables"]
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        if kind == "symmetric":
            masquerade.append("--random-fully")
        sh(*ipt, *masquerade)
        if kind == "full-cone":
            for proto in ("tcp", "udp"):
                sh(*ipt, "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", proto, "--dport", str(PORT),
                   "-j", "DNAT", "--to-destination", f"{self.lan_ip}:{PORT}")
                sh(*ipt, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-p", proto, "-d", self.lan_ip,
                   "--dport", str(PORT), "-j", "ACCEPT")
        sh(*ipt, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate",
           "ESTABLISHED,RELATED", "-j", "ACCEPT")
        sh(*ipt, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-j", "DROP")
        # Like a home router, unsolicited packets to the router itself are dropped silently:
        # a TCP reset or ICMP unreachable would kill the other side's half of a hole punch.
        sh(*ipt, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
           "-j", "ACCEPT")
        sh(*ipt, "-A", "INPUT", "-i", "wan", "-j", "DROP")

    @property
    def name(self):
        return self._host.name

    def start(self, args, bootstrap):
        h = self._host
        h.dir.mkdir(parents=True, exist_ok=True)
        data = h.dir / "data"
        data.mkdir(exist_ok=True)
        cmd = ["ip", "netns", "exec", self.ns, str(self.net.args.bin), *args, "--data-dir", str(data),
               "--no-mdns", "--listen", f"/ip4/{self.lan_ip}/tcp/{PORT}",
               "--listen", f"/ip4/{self.lan_ip}/udp/{PORT}/quic-v1", "--api-addr", API,
               "--bootstrap", bootstrap]
        h.log_file = h.dir / "node.log"
        with open(h.log_file, "ab") as f:
            h.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, env={"RUST_LOG": "p2p_node=info,libp2p_dcutr=debug,libp2p_autonat=debug",
                                                                   "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        return self

    def join_addr(self):
        return self._host.join_addr()

    def check_alive(self):
        self._host.check_alive()

    def get_text(self, path):
        code = ("import sys,urllib.request;"
                f"sys.stdout.write(urllib.request.urlopen('http://{API}'+sys.argv[1],timeout=5).read().decode())")
        r = ns_sh(self.sh, self.ns, "python3", "-c", code, path, check=False)
        return r.stdout if r.returncode == 0 else None

    def get(self, path):
        text = self.get_text(path)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def relayed_bytes(self):
        """Bytes both ways over relayed (circuit) connections, from the node's bandwidth
        counters."""
        text = self.get_text("/metrics") or ""
        total = 0
        for line in text.splitlines():
            if line.startswith("libp2p_bandwidth_bytes_total") and "p2p-circuit" in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def log_times(self, pattern, peer):
        """Times (seconds since the epoch) of log lines matching `pattern` that name `peer`."""
        out = []
        if not self._host.log_file or not self._host.log_file.exists():
            return out
        for line in self._host.log_file.read_text(errors="replace").splitlines():
            if pattern in line and peer in line:
                m = re.match(r"\x1b?\[?[0-9;]*m?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
                if m:
                    out.append(datetime.fromisoformat(m.group(1) + "+00:00").timestamp())
        return out

    def kill(self):
        self._host.kill()

    def remove(self):
        self.sh("ip", "link", "del", self.outer, check=False)
        self.sh("ip", "netns", "del", self.ns, check=False)
        self.sh("ip", "netns", "del", self.router, check=False)


def peer_id_of(net, host):
    """Creates `host`'s identity ahead of its start and returns its peer id."""
    data = host._host.dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(net.args.bin), "id", "--data-dir", str(data)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"p2p-node id: {r.stderr.strip()}")
    return r.stdout.strip()


def run_pair(net, i, kinds, pub, fol, pub_id, join, tools, args):
    """One publisher behind `kinds[0]`, one follower behind `kinds[1]`; a public seeder
    follows the model once the pair's path is settled, if the follower is not done."""
    _, _, safetensors_file, file_digest, log = tools
    model = f"nat-{i}"
    file = safetensors_file(net.out / f"{model}.safetensors", args.size, seed=i)
    expected = file_digest(file)
    pub.start(["--publish", str(file), "--model", model], join)
    fol_id = peer_id_of(net, fol)

    def reachable():
        pub.check_alive()
        s = pub.get("/status") or {}
        return s.get("reachability") == "public" or (s.get("relay") or {}).get("reservations")

    wait_for(f"the {kinds[0]} publisher to be reachable (public, or a relay reservation)", 120, reachable, 0.5)
    started = time.time()
    fol.start(["--follow", model, "--trust", f"{model}={pub_id}"], join)
    done = {}

    def complete():
        pub.check_alive()
        fol.check_alive()
        if "at" in done:
            return True
        for m in fol.get("/models") or []:
            if m["model"] == model and m["complete"]:
                done["at"] = time.time()
                done["digest"] = file_digest(m["path"])
                return True
        return False

    def direct():
        return any(p.get("path") == "direct" for p in (fol.get("/peers") or []) if p.get("peer_id") == pub_id)

    def settled():
        complete()
        return direct() or fol.log_times("hole punching failed", pub_id) or pub.log_times(
            "hole punching failed", fol_id)

    try:
        wait_for(f"pair {i}: a direct path or a failed hole punch", 90, settled, 0.5)
    except TimeoutError as e:
        log(str(e))
    seeder = None
    if direct():
        try:
            wait_for(f"pair {i}: the download over the direct path", args.timeout, complete, 0.5)
        except TimeoutError as e:
            log(str(e))
    if not complete():
        log(f"pair {i}: not complete; a public seeder joins")
        seeder = net.add_host()
        seeder.start(["--follow", model, "--trust", f"{model}={pub_id}"], bootstrap=join)
    try:
        wait_for(f"pair {i} ({kinds[0]} -> {kinds[1]}) to complete", args.timeout, complete, 0.5)
    except TimeoutError as e:
        log(str(e))
    peers = {p["peer_id"]: p for p in fol.get("/peers") or []}
    status = fol.get("/status") or {}
    relayed_at = fol.log_times("relayed connection", pub_id) + pub.log_times("relayed connection", fol_id)
    punched_at = fol.log_times("hole punched", pub_id) + pub.log_times("hole punched", fol_id)
    row = {
        "pair": i, "publisher": kinds[0], "follower": kinds[1],
        "path": (peers.get(pub_id) or {}).get("path") or "none",
        "hole_punch_follower": (status.get("relay") or {}).get("hole_punch"),
        "hole_punch_publisher": ((pub.get("/status") or {}).get("relay") or {}).get("hole_punch"),
        "seconds_to_direct": round(min(punched_at) - min(relayed_at), 2) if relayed_at and punched_at else None,
        "relayed_bytes": fol.relayed_bytes(),
        "seeder": seeder is not None,
        "complete": "at" in done,
        "seconds_to_complete": round(done["at"] - started, 2) if "at" in done else None,
        "identical": done.get("digest") == expected,
        "publisher_reachability": (pub.get("/status") or {}).get("reachability"),
        "follower_reachability": status.get("reachability"),
    }
    for h in (pub, fol, seeder):
        if h:
            h.kill()
    return row


def scenario_nat(net, args, tools):
    """See the module's header."""
    sh, host_cls, _, _, log = tools
    if not subprocess.run(["sh", "-c", "command -v iptables"], capture_output=True).stdout:
        raise RuntimeError("the nat scenario needs iptables: apt-get install iptables")
    net.nat_hosts = []
    pairs = [p.split(":") for p in (args.pairs.split(",") if args.pairs else DEFAULT_PAIRS)]
    for p in pairs:
        if len(p) != 2 or any(k not in KINDS for k in p):
            raise ValueError(f"--pairs takes KIND:KIND items, KIND one of {', '.join(KINDS)}")
    hosts = []
    for i, kinds in enumerate(pairs):
        pub = NatHost(net, 2 * i + 10, kinds[0], sh, host_cls)
        fol = NatHost(net, 2 * i + 11, kinds[1], sh, host_cls)
        net.nat_hosts += [pub, fol]
        hosts.append((pub, fol, peer_id_of(net, pub)))
    hub = net.add_host()
    join = hub.start([]).join_addr()
    # A second public peer (another relay; both run `--kad-mode server`, which declares them
    # reachable, so they relay at once).
    net.add_host().start([], bootstrap=join).join_addr()
    wait_for("the hub to be confirmed public", 120,
             lambda: (hub.get("/status") or {}).get("reachability") == "public", 0.5)
    rows = []
    for i, kinds in enumerate(pairs):
        pub, fol, pub_id = hosts[i]
        log(f"pair {i}: publisher behind {kinds[0]}, follower behind {kinds[1]}")
        rows.append(run_pair(net, i, kinds, pub, fol, pub_id, join, tools, args))
        log(f"pair {i}: {json.dumps(rows[-1])}")
    hub_status = hub.get("/status") or {}
    print(f"{'publisher':<16} {'follower':<16} {'path':<8} {'to direct':>9} {'relayed':>9} "
          f"{'seeder':>6} {'complete':>9} {'bytes':>9}")
    for r in rows:
        to_direct = f"{r['seconds_to_direct']:.2f}s" if r["seconds_to_direct"] is not None else "-"
        print(f"{r['publisher']:<16} {r['follower']:<16} {r['path']:<8} {to_direct:>9} "
              f"{r['relayed_bytes'] / 1024:>7.1f}Ki {'yes' if r['seeder'] else 'no':>6} "
              f"{str(r['complete']):>9} "
              f"{'identical' if r['identical'] else 'DIFFERENT':>9}")
    ok = all(r["complete"] and r["identical"] and r["relayed_bytes"] < 256 * 1024 for r in rows)
    return {"ok": ok, "pairs": rows, "size_mib": args.size,
            "hub_relay": hub_status.get("relay"), "hub_reachability": hub_status.get("reachability")}
