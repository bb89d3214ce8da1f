#!/usr/bin/env python3
"""Turns scenario results (`result.json` from testnet/netns.py) into a Markdown report with SVG
plots: completion time per node against the lower bound and time per stage (distribute),
bytes the publisher uploaded, completion under churn, accuracy curves (train).

    testnet/report.py RESULT.json [RESULT.json ...] --out testnet/report/

Writes `report.md` and one SVG per plot into `--out`. Standard library only.
"""

import argparse
import json
import sys
from pathlib import Path
from xml.sax.saxutils import escape

COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 720, 360, 64, 170, 36, 48


def nice_max(v):
    """The smallest of 1, 2, 2.5, 5 times a power of ten at or above `v`, for an axis."""
    if v <= 0:
        return 1.0
    return next(step * 10 ** exp for exp in range(-3, 9) for step in (1, 2, 2.5, 5)
                if step * 10 ** exp >= v)


class Svg:
    """A plot area with axes: x from 0 to `x_max` (or categories), y from 0 to `y_max`."""

    def __init__(self, title, x_label, y_label, x_max, y_max):
        self.x_max, self.y_max = x_max, nice_max(y_max)
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
                      f'font-family="sans-serif" font-size="12">',
                      f'<rect width="{W}" height="{H}" fill="white"/>',
                      f'<text x="{W / 2 - PAD_R / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
                      f'<text x="{PAD_L + (W - PAD_L - PAD_R) / 2}" y="{H - 8}" text-anchor="middle">{escape(x_label)}</text>',
                      f'<text transform="translate(16 {PAD_T + (H - PAD_T - PAD_B) / 2}) rotate(-90)" '
                      f'text-anchor="middle">{escape(y_label)}</text>']
        for i in range(6):
            v = self.y_max * i / 5
            y = self.y(v)
            self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y}" y2="{y}" stroke="#eee"/>')
            self.parts.append(f'<text x="{PAD_L - 6}" y="{y + 4}" text-anchor="end">{v:g}</text>')
        self.parts.append(f'<line x1="{PAD_L}" x2="{PAD_L}" y1="{PAD_T}" y2="{H - PAD_B}" stroke="black"/>')
        self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{H - PAD_B}" y2="{H - PAD_B}" stroke="black"/>')
        self.legend = 0

    def x(self, v):
        return PAD_L + (W - PAD_L - PAD_R) * v / self.x_max

    def y(self, v):
        return H - PAD_B - (H - PAD_T - PAD_B) * min(v, self.y_max) / self.y_max

    def x_ticks(self, labels):
        for i, label in enumerate(labels):
            self.parts.append(f'<text x="{self.x(i + 0.5)}" y="{H - PAD_B + 16}" text-anchor="middle">{escape(str(label))}</text>')

    def x_axis_numbers(self):
        for i in range(6):
            v = self.x_max * i / 5
            self.parts.append(f'<text x="{self.x(v)}" y="{H - PAD_B + 16}" text-anchor="middle">{v:g}</text>')

    def key(self, color, label, dashed=False):
        y = PAD_T + 10 + 18 * self.legend
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        self.parts.append(f'<line x1="{W - PAD_R + 12}" x2="{W - PAD_R + 36}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"{dash}/>')
        self.parts.append(f'<text x="{W - PAD_R + 42}" y="{y + 4}">{escape(label)}</text>')
        self.legend += 1

    def bar(self, x0, width, value, color):
        y = self.y(value)
        self.parts.append(f'<rect x="{self.x(x0)}" y="{y}" width="{self.x(x0 + width) - self.x(x0)}" '
                          f'height="{H - PAD_B - y}" fill="{color}"/>')

    def hline(self, value, color, label):
        y = self.y(value)
        self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y}" y2="{y}" stroke="{color}" '
                          f'stroke-width="2" stroke-dasharray="6 4"/>')
        self.key(color, label, dashed=True)

    def polyline(self, points, color):
        pts = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        self.parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')

    def save(self, path):
        path.write_text("\n".join(self.parts + ["</svg>"]))


def distribute(result, out, stem):
    runs, t_min = result["runs"], result["t_min"]
    lines = [f"### Distribution: {result['hosts']} hosts, {result['size_mib']} MiB "
             f"({result['links']['summary']})", "",
             f"Lower bound T_min = max(S/u_pub, S/d_min, N·S/(u_pub + Σu_i)) = **{t_min:.2f} s**.", "",
             "| stage | median | slowest | median / T_min | slowest / T_min | publisher uploaded (copies) |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['stage']} | {r['median']:.2f} s | {r['slowest']:.2f} s | "
                     f"{r['median'] / t_min:.2f} | {r['slowest'] / t_min:.2f} | {r['publisher_copies']:.2f} |")
    n = max(len(r["times"]) for r in runs)
    svg = Svg("Completion time per node, by stage", "stage (one bar per fetching node, sorted)",
              "seconds after publishing", len(runs), max(max(r["times"]) for r in runs))
    for i, r in enumerate(runs):
        for j, t in enumerate(sorted(r["times"])):
            svg.bar(i + 0.1 + 0.8 * j / n, 0.8 / n * 0.9, t, COLORS[i % len(COLORS)])
    svg.x_ticks([r["stage"] for r in runs])
    svg.hline(t_min, "black", "lower bound")
    svg.save(out / f"{stem}-times.svg")
    svg = Svg("Bytes the publisher uploaded", "stage", "copies of the version", len(runs),
              max(max(r["publisher_copies"] for r in runs), 1.0))
    for i, r in enumerate(runs):
        svg.bar(i + 0.2, 0.6, r["publisher_copies"], COLORS[i % len(COLORS)])
    svg.x_ticks([r["stage"] for r in runs])
    svg.hline(1.0, "#888", "one copy")
    svg.save(out / f"{stem}-publisher.svg")
    lines += ["", f"![completion times]({stem}-times.svg)", "", f"![publisher upload]({stem}-publisher.svg)", ""]
    last = runs[-1]
    if last.get("traffic"):
        hosts = list(last["traffic"])
        mib = [(last["traffic"][h]["bytes_uploaded"] / 2**20, last["traffic"][h]["bytes_downloaded"] / 2**20)
               for h in hosts]
        svg = Svg(f"Bytes per node, stage {last['stage']}", "host (1 is the publisher)", "MiB",
                  len(hosts), max(max(m) for m in mib))
        for i, (up, down) in enumerate(mib):
            svg.bar(i + 0.1, 0.38, up, COLORS[0])
            svg.bar(i + 0.52, 0.38, down, COLORS[1])
        svg.x_ticks([h.replace("host-", "") for h in hosts])
        svg.key(COLORS[0], "uploaded")
        svg.key(COLORS[1], "downloaded")
        svg.save(out / f"{stem}-bytes.svg")
        lines += [f"![bytes per node]({stem}-bytes.svg)", ""]
    if last.get("publisher_timeline"):
        tl = last["publisher_timeline"]
        svg = Svg(f"Publisher upload over time, stage {last['stage']}", "seconds after publishing",
                  "MiB uploaded", nice_max(max(max(r["times"]) for r in runs[-1:])), tl[-1][1] / 2**20)
        svg.x_axis_numbers()
        svg.polyline([(0, 0)] + [(t, b / 2**20) for t, b in tl], COLORS[0])
        svg.hline(result["size_bytes"] / 2**20, "#888", "one copy")
        svg.save(out / f"{stem}-publisher-timeline.svg")
        lines += [f"![publisher timeline]({stem}-publisher-timeline.svg)", ""]
    return lines


def churn(result, out, stem):
    rows = result["rows"]
    ok = sum(r["identical"] for r in rows)
    lines = [f"### Churn: {result['hosts']} hosts, {result['size_mib']} MiB ({result['links']['summary']})", "",
             f"Killed with SIGKILL: {', '.join(result['killed'])} (fetchers halfway, then the publisher "
             f"once a full copy existed elsewhere). **{ok}/{len(rows)}** surviving and new hosts "
             "finished with identical bytes.", "", "| host | kind | done after |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['host']} | {'new' if r['new'] else 'survivor'} | {r['time']:.2f} s |")
    svg = Svg("Completion under churn", "host", "seconds after publishing", len(rows),
              max(r["time"] for r in rows))
    for i, r in enumerate(rows):
        svg.bar(i + 0.2, 0.6, r["time"], COLORS[1] if r["new"] else COLORS[0])
    svg.x_ticks([r["host"].replace("host-", "") for r in rows])
    svg.key(COLORS[0], "survivor")
    svg.key(COLORS[1], "newcomer")
    svg.save(out / f"{stem}-churn.svg")
    return lines + ["", f"![churn]({stem}-churn.svg)", ""]


def bootstrap_loss(result, out, stem):
    return [f"### Bootstrap loss: {result['hosts']} hosts ({result['links']['summary']})", "",
            "| step | seconds |", "|---|---|",
            f"| network formed through host-1 | {result['formed']:.2f} |",
            f"| host-1 killed; 2 newcomers joined through host-2 and see every member | {result['newcomers_joined']:.2f} |",
            f"| 2 members restarted without --bootstrap and rejoined from their peer caches | {result['restarted_rejoined']:.2f} |", ""]


def train(result, out, stem):
    curves, base = result["curves"], result["baseline"]
    text = result.get("workload") == "text"
    metric = "validation loss" if text else "test accuracy"
    setup = (f"{result.get('averaging', 'parameters')} averaging"
             + (f", {result['inner_steps']} inner steps, {result['compression']}"
                if result.get("averaging") == "outer" else ""))
    extra = "".join(f", {line}" for line in result.get("set") or [])
    if result.get("replaced"):
        extra += f"; {', '.join(result['replaced'])} killed halfway and replaced by newcomers"
    if result.get("attack"):
        extra += f"; attackers: {', '.join(result['attack'])}"
    lines = [f"### Training: {result['hosts']} hosts, {'Austen text' if text else 'non-iid digits'} shards, "
             f"{result['steps']} local steps, {setup}{extra} ({result['links']['summary']})", ""]
    if "rows" in result:
        lines += [f"| host | role | steps | outer steps | KiB sent/step | waiting | {metric} |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            m = "-" if r["metric"] is None else f"{r['metric']:.3f}"
            lines.append(f"| {r['host']} | {r['role']} | {r['steps']} | {r['outer_step']} | "
                         f"{r['sent_per_step'] / 1024:.2f} | {r['network_wait'] * 100:.1f}% | {m} |")
        if result.get("f32_bytes_per_step"):
            lines += ["", f"Full f32 parameters every step: {result['f32_bytes_per_step'] / 1024:.1f} KiB/step "
                          f"({result['parameters']} parameters); the most any host sent: "
                          f"{result['max_sent_per_step'] / 1024:.2f} KiB/step, "
                          f"{result['f32_bytes_per_step'] / max(result['max_sent_per_step'], 1e-9):.0f}x fewer."]
    else:
        lines += ["| host | final test accuracy | training steps/s |", "|---|---|---|"]
        speeds = result.get("steps_per_second", {})
        for name, acc in result["final"].items():
            label = "baseline (one node, all data, same total samples)" if name == base else name
            acc_text = f"{acc:.3f}" if acc is not None else "-"
            speed = speeds.get(name)
            lines.append(f"| {label} | {acc_text} | {speed:.0f} |" if speed else f"| {label} | {acc_text} | - |")
    t_max = max((c[-1][0] for c in curves.values() if c), default=1)
    y_max = max((p[2] for c in curves.values() for p in c if p[2] is not None), default=1.0) if text else 1.0
    svg = Svg(f"{metric.capitalize()} over time", "seconds", metric, nice_max(t_max), y_max)
    svg.x_axis_numbers()
    for i, (name, c) in enumerate(curves.items()):
        color = "black" if name == base else COLORS[i % len(COLORS)]
        svg.polyline([(p[0], p[2]) for p in c if p[2] is not None], color)
        svg.key(color, "baseline" if name == base else name)
    svg.save(out / f"{stem}-accuracy.svg")
    return lines + ["", f"![{metric}]({stem}-accuracy.svg)", ""]


def speedup(result, out, stem):
    text = result.get("workload", "text") == "text"
    metric = "validation loss" if text else "test accuracy"
    setup = ""
    if result.get("averaging") == "outer":
        setup = (f"; outer steps, {result['inner_steps']} inner steps, {result['compression']}"
                 + "".join(f", {line}" for line in result.get("set", [])))
    lines = [f"### Speed-up: time to L* = {result['target']:.4f} ({metric} of one host alone after "
             f"{result['steps']} steps){setup}; {result['links']['summary']}", "",
             "| hosts | seconds to L* (slowest host) | speed-up | local steps to L*, all hosts together | waiting | KiB sent/step |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        t = r.get("seconds_to_target")
        waits = max(p["network_wait"] for p in r["per_host"])
        sent = max(p["sent_per_step"] for p in r["per_host"])
        steps = r.get("steps_to_target_total")
        gain = r.get("speedup")
        lines.append(f"| {r['hosts']} | {'not reached' if t is None else f'{t:.0f}'} | "
                     f"{'-' if not gain else f'{gain:.2f}x'} | "
                     f"{'-' if steps is None else steps} | {waits * 100:.2f}% | {sent / 1024:.1f} |")
    t_max = max((p["curve"][-1][1] for r in result["runs"] for p in r["per_host"] if p["curve"]), default=1)
    y_max = max((q[2] for r in result["runs"] for p in r["per_host"] for q in p["curve"]), default=1.0)
    svg = Svg(f"{metric.capitalize()} per local step", "local steps of each host", metric, nice_max(t_max), y_max)
    svg.x_axis_numbers()
    i = 0
    for r in result["runs"]:
        for p in r["per_host"]:
            color = "black" if r["hosts"] == 1 else COLORS[i % len(COLORS)]
            i += r["hosts"] != 1
            svg.polyline([(q[1], q[2]) for q in p["curve"]], color)
            svg.key(color, "one host alone" if r["hosts"] == 1 else f"{p['host']} of {r['hosts']}")
    svg.save(out / f"{stem}-curves.svg")
    return lines + ["", f"![curves]({stem}-curves.svg)", ""]


RENDER = {"distribute": distribute, "churn": churn, "bootstrap-loss": bootstrap_loss, "train": train,
          "speedup": speedup}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("testnet/report"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# p2p-node testnet report", ""]
    for i, path in enumerate(args.results):
        try:
            result = json.loads(path.read_text())
            render = RENDER[result["scenario"]]
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {path}: not a scenario result ({e})")
        lines += render(result, args.out, f"{i + 1}-{result['scenario']}")
        lines += [f"<sub>{path} · {result.get('date', '')}</sub>", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
