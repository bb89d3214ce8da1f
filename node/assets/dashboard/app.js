// p2p-node dashboard: polls the node's JSON API and draws it. No framework, no build step;
// charts by uPlot (vendored, MIT).
"use strict";

const POLL_MS = 2000;
const PALETTE = ["#2f6fd6", "#e67e22", "#1f8a4c", "#8e44ad", "#c0392b", "#16a085", "#d35400", "#7f8c8d", "#2c3e50", "#b7950b"];
const charts = {};          // element id -> { plot, key }
let lastModels = new Map(); // version id -> { bytes, at }
let selfId = null;

const $ = (id) => document.getElementById(id);
const short = (id) => (id && id.length > 16 ? id.slice(0, 6) + "\u2026" + id.slice(-6) : id || "");
const fmt = (x, digits = 3) => (x === null || x === undefined || !isFinite(x) ? "\u2013" : Number(x).toFixed(digits));
function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return (n / Math.pow(1024, i)).toFixed(i ? 1 : 0) + " " + units[i];
}
function duration(s) {
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " days";
}
function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Date.now() / 1000 - unix);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function renderSummary(status) {
  const c = status.connections || {};
  const direct = (c.inbound_direct || 0) + (c.outbound_direct || 0);
  const relayed = (c.inbound_relayed || 0) + (c.outbound_relayed || 0);
  $("summary").textContent =
    `peer ${short(status.peer_id)} \u00b7 v${status.version} \u00b7 up ${duration(status.uptime_s)} \u00b7 ` +
    `${status.connected_peers} connected (${direct} direct, ${relayed} relayed; ` +
    `${(c.inbound_direct || 0) + (c.inbound_relayed || 0)} in, ${(c.outbound_direct || 0) + (c.outbound_relayed || 0)} out) \u00b7 ` +
    `${status.known_peers} known \u00b7 ${status.routing_table_peers} in routing table \u00b7 ` +
    `${status.reachability} (DHT ${status.kademlia_server ? "server" : "client"})` +
    (status.banned_peers ? ` \u00b7 ${status.banned_peers} banned` : "");
}

function renderTraining(t) {
  $("no-training").hidden = !!t;
  $("training-state").textContent = t ? `${t.model} \u00b7 ${t.state}` : "";
  const box = $("training-figures");
  box.replaceChildren();
  if (!t) return;
  const figures = [
    ["step", `${t.step} / ${t.steps}`],
    ["test loss", fmt(t.loss)],
    [t.bits_per_char !== null && t.bits_per_char !== undefined ? "bits/char" : "accuracy",
      t.bits_per_char !== null && t.bits_per_char !== undefined ? fmt(t.bits_per_char) : fmt(t.accuracy)],
    ["batch loss", fmt(t.batch_loss)],
    ["steps/s", fmt(t.steps_per_second, 1)],
    ["averaging rounds", `${t.averaging_rounds} (${t.averaging_failures} failed)`],
    ["waiting on network", `${Math.round((t.network_wait_fraction || 0) * 100)}%`],
    ["peers in run", t.run_peers],
  ];
  for (const [name, value] of figures) box.append(el("div", {}, el("span", { class: "muted" }, name), el("b", {}, value)));
}

// One series per peer: [[x...], [y...]] tables joined on time.
function seriesByPeer(points, field) {
  const byPeer = new Map();
  for (const p of points) {
    const y = p[field];
    if (y === null || y === undefined || !isFinite(y)) continue;
    if (!byPeer.has(p.peer)) byPeer.set(p.peer, [[], []]);
    const [xs, ys] = byPeer.get(p.peer);
    const x = p.unix_ms / 1000;
    if (xs.length && x <= xs[xs.length - 1]) continue; // uPlot wants increasing x
    xs.push(x); ys.push(y);
  }
  return byPeer;
}

function drawChart(id, tables, labels) {
  const node = $(id);
  let count = 0;
  for (const [xs] of tables) count += xs.length;
  node.dataset.points = String(count);
  node.dataset.series = String(tables.length);
  if (!tables.length) {
    if (charts[id]) { charts[id].plot.destroy(); delete charts[id]; }
    return;
  }
  const data = uPlot.join(tables);
  const key = labels.join("|");
  const width = Math.max(300, node.clientWidth || 500);
  if (!charts[id] || charts[id].key !== key) {
    if (charts[id]) charts[id].plot.destroy();
    const series = [{}].concat(labels.map((label, i) => ({
      label,
      stroke: PALETTE[i % PALETTE.length],
      width: label.startsWith("this node") ? 2 : 1.5,
      spanGaps: true,
      points: { show: true, size: 4 },
    })));
    const plot = new uPlot({ width, height: 220, series, scales: { x: { time: true } }, legend: { live: false } }, data, node);
    charts[id] = { plot, key };
  } else {
    charts[id].plot.setData(data);
  }
}

function renderCharts(history) {
  const points = history.points || [];
  for (const [id, field, ownField] of [["loss-chart", "loss", "batch_loss"], ["accuracy-chart", "accuracy", null]]) {
    const byPeer = seriesByPeer(points, field);
    const modelOf = new Map(points.map((p) => [p.peer, p.model]));
    const tables = [], labels = [];
    const peers = [...byPeer.keys()].sort((a, b) => (a === selfId ? -1 : b === selfId ? 1 : a.localeCompare(b)));
    for (const peer of peers) {
      tables.push(byPeer.get(peer));
      labels.push(peer === selfId ? "this node (test)" : `peer ${short(peer)} (${modelOf.get(peer)})`);
    }
    if (ownField) {
      const own = seriesByPeer(points.filter((p) => p.own), ownField).get(selfId);
      if (own) { tables.push(own); labels.push("this node (batch)"); }
    }
    drawChart(id, tables, labels);
  }
}

function renderModels(models) {
  const body = $("models").tBodies[0];
  body.replaceChildren();
  const now = Date.now();
  const seen = new Map();
  for (const m of models) {
    const before = lastModels.get(m.id);
    const rate = before && now > before.at ? ((m.bytes_downloaded - before.bytes) * 1000) / (now - before.at) : 0;
    seen.set(m.id, { bytes: m.bytes_downloaded, at: now });
    const bar = el("span", { class: "bar" }, el("span", { style: `width:${Math.round(m.progress * 100)}%` }));
    body.append(el("tr", { "data-version": m.id },
      el("td", {}, m.model), el("td", {}, m.version), el("td", { class: "mono" }, m.id.slice(0, 12)),
      el("td", {}, `${m.chunks_held} / ${m.chunks}`),
      el("td", {}, bar, " ", `${Math.round(m.progress * 100)}%`, m.published ? " (published here)" : ""),
      el("td", {}, m.peers_serving), el("td", {}, rate > 0 ? bytes(rate) + "/s" : "\u2013"),
      el("td", {}, bytes(m.bytes_uploaded))));
  }
  lastModels = seen;
  if (!models.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no versions held yet")));
}

function renderPeers(peers) {
  const body = $("peers").tBodies[0];
  body.replaceChildren();
  const rank = (p) => (p.connected ? 0 : p.banned_until_unix ? 2 : 1);
  peers.sort((a, b) => rank(a) - rank(b) || b.last_seen_unix - a.last_seen_unix);
  $("peer-count").textContent = `${peers.filter((p) => p.connected).length} connected, ${peers.length} known`;
  for (const p of peers) {
    const state = p.banned_until_unix ? el("span", { class: "banned" }, "banned")
      : p.connected ? el("span", { class: "on" }, "connected") : el("span", { class: "off" }, "known");
    body.append(el("tr", { "data-peer": p.peer_id },
      el("td", { class: "mono", title: p.peer_id }, short(p.peer_id)), el("td", {}, state),
      el("td", {}, p.path || "\u2013"), el("td", {}, p.source),
      el("td", {}, p.connected ? "now" : ago(p.last_seen_unix)),
      el("td", { class: "addrs mono" }, (p.addrs || []).slice(0, 2).join(" "))));
  }
}

function renderEvents(events) {
  const list = $("events");
  list.replaceChildren();
  const recent = events.slice(-50).reverse();
  for (const e of recent) {
    const time = new Date(e.unix_ms).toLocaleTimeString();
    list.append(el("li", {}, el("span", { class: "muted" }, time + " "), el("span", { class: "kind " + e.kind }, e.kind),
      " ", e.text, e.peer ? el("span", { class: "muted mono" }, " " + short(e.peer)) : ""));
  }
  if (!recent.length) list.append(el("li", { class: "muted" }, "nothing yet"));
}

async function poll() {
  try {
    const [status, peers, models, history] = await Promise.all(
      ["/status", "/peers", "/models", "/history"].map(getJson));
    selfId = status.peer_id;
    $("error").hidden = true;
    renderSummary(status);
    renderTraining(status.training);
    renderCharts(history);
    renderModels(models);
    renderPeers(peers);
    renderEvents(history.events || []);
    document.body.dataset.updated = String(Date.now());
  } catch (e) {
    $("error").hidden = false;
    $("error").textContent = "cannot reach the node: " + e.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
