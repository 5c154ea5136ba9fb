// probewire web UI: a small single-page app over the agent's JSON API (/api/openapi.json).
// No build step; charts are drawn by uPlot, vendored into the package at build time.
"use strict";

const REFRESH_MS = 2000;
const main = document.getElementById("main");
const statusEl = document.getElementById("status");
let timer = null;
let pageToken = 0;
let rerender = null;  // draws the current page again from the data it last fetched
const sortState = {};  // table id -> {key, asc}
const charts = [];

// ---------- helpers ----------------------------------------------------------------------
async function api(path) {
  const resp = await fetch(path, {cache: "no-store"});
  if (!resp.ok) {
    const err = new Error(`${path}: HTTP ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;"}[c]));
}

function fmtRate(v) {
  if (v == null) return "–";
  if (v === 0) return "0/s";
  return (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toFixed(3)) + "/s";
}
function fmtPct(v) { return v == null ? "–" : (100 * v).toFixed(v > 0 && v < 0.01 ? 2 : 1) + "%"; }
function fmtSec(v) {
  if (v == null) return "–";
  if (v < 1e-3) return (v * 1e6).toFixed(0) + " µs";
  if (v < 1) return (v * 1e3).toFixed(v < 0.01 ? 2 : 1) + " ms";
  return v.toFixed(2) + " s";
}
function fmtNum(v) { return v == null ? "–" : Math.round(v).toLocaleString("en-US"); }
function fmtBytes(v) {
  if (v == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : v.toFixed(0)) + " " + u[i];
}
function errClass(ratio) { return ratio >= 0.05 ? "bad" : ratio > 0 ? "warn" : ""; }
function serviceHref(name) { return "#/service/" + encodeURIComponent(name); }

// A sortable table. cols: [{key, label, fmt?, num?, cls?(row)}]; rows: objects.
function table(id, cols, rows, opts = {}) {
  if (!rows.length) return `<div class="empty" data-testid="${id}-empty">${esc(opts.empty || "nothing yet")}</div>`;
  const st = sortState[id] || opts.sort || null;
  if (st) {
    const col = cols.find(c => c.key === st.key);
    const val = r => (col && col.sortValue ? col.sortValue(r) : r[st.key]);
    rows = rows.slice().sort((a, b) => {
      const x = val(a), y = val(b);
      const c = (x == null) - (y == null) || (x < y ? -1 : x > y ? 1 : 0);
      return st.asc ? c : -c;
    });
  }
  const head = cols.map(c => {
    const cls = ["sortable", c.num ? "num" : "", st && st.key === c.key ? "sorted" : "",
      st && st.key === c.key && st.asc ? "asc" : ""].join(" ");
    return `<th class="${cls}" data-table="${id}" data-key="${c.key}">${esc(c.label)}</th>`;
  }).join("");
  const body = rows.map(r => {
    const attrs = opts.rowAttrs ? opts.rowAttrs(r) : "";
    const tds = cols.map(c => {
      const v = c.fmt ? c.fmt(r[c.key], r) : esc(r[c.key] ?? "");
      const cls = [c.num ? "num" : "", c.cls ? c.cls(r) : ""].join(" ");
      return `<td class="${cls}" data-col="${c.key}">${v}</td>`;
    }).join("");
    return `<tr ${attrs}>${tds}</tr>`;
  }).join("");
  return `<table data-testid="${id}"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

document.addEventListener("click", ev => {
  const th = ev.target.closest("th.sortable");
  if (th) {
    const id = th.dataset.table, key = th.dataset.key;
    const cur = sortState[id];
    sortState[id] = {key, asc: cur && cur.key === key ? !cur.asc : false};
    if (rerender) rerender();
    return;
  }
  const link = ev.target.closest("[data-href]");
  if (link) location.hash = link.dataset.href;
});

function setStatus(text) { statusEl.textContent = text; }

// ---------- service map ------------------------------------------------------------------
function layout(nodes, edges) {
  // Columns by longest path from the callers (cycles are cut by the visit order).
  const rank = Object.fromEntries(nodes.map(n => [n.id, 0]));
  for (let i = 0; i < nodes.length; i++) {
    let changed = false;
    for (const e of edges) {
      if (e.client === e.server) continue;
      if (rank[e.server] < rank[e.client] + 1 && rank[e.client] + 1 < nodes.length) {
        rank[e.server] = rank[e.client] + 1; changed = true;
      }
    }
    if (!changed) break;
  }
  const cols = {};
  for (const n of nodes) (cols[rank[n.id]] = cols[rank[n.id]] || []).push(n);
  const W = 190, H = 52, GX = 230, GY = 60, PAD = 40;
  const pos = {};
  let maxRows = 0;
  for (const [c, list] of Object.entries(cols)) {
    list.sort((a, b) => a.id.localeCompare(b.id));
    maxRows = Math.max(maxRows, list.length);
    list.forEach((n, i) => { pos[n.id] = {x: PAD + c * (W + GX), y: PAD + i * (H + GY)}; });
  }
  const ncols = Object.keys(cols).length;
  return {pos, W, H, width: PAD * 2 + ncols * W + (ncols - 1) * GX,
          height: PAD * 2 + maxRows * H + (maxRows - 1) * GY};
}

function mapSvg(graph) {
  const {nodes, edges} = graph;
  if (!nodes.length) return `<div class="card empty" data-testid="map-empty">No traffic seen yet. Calls between processes on this host, and to databases and caches, appear here.</div>`;
  const L = layout(nodes, edges);
  const parts = [`<svg class="map" data-testid="service-map" viewBox="0 0 ${Math.max(L.width, 600)} ${L.height + 10}" style="max-height:${L.height + 40}px">`,
    `<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker></defs>`];
  for (const e of edges) {
    const a = L.pos[e.client], b = L.pos[e.server];
    if (!a || !b) continue;
    let d, lx, ly;
    if (e.client === e.server) {
      d = `M${a.x + L.W - 30},${a.y} c 0,-40 40,-40 30,0`;
      lx = a.x + L.W; ly = a.y - 30;
    } else {
      const x1 = a.x + L.W, y1 = a.y + L.H / 2, x2 = b.x, y2 = b.y + L.H / 2;
      const mx = (x1 + x2) / 2;
      d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 2},${y2}`;
      lx = mx; ly = (y1 + y2) / 2 - 8;
    }
    const cls = (e.error_ratio >= 0.05 ? "edge err" : "edge") + (e.connection_type ? " " + e.connection_type : "");
    parts.push(`<g class="${cls}" data-testid="edge" data-client="${esc(e.client)}" data-server="${esc(e.server)}" data-type="${esc(e.connection_type || "")}" data-rate="${e.rate}" data-requests="${e.requests}">
      <title>${esc(e.client)} → ${esc(e.server)}: ${fmtNum(e.requests)} requests, ${fmtNum(e.failed)} failed</title>
      <path d="${d}" marker-end="url(#arrow)"/>
      <text x="${lx}" y="${ly - 16}" text-anchor="middle">${fmtRate(e.rate)} · ${fmtPct(e.error_ratio)} err<tspan x="${lx}" dy="14">p99 ${fmtSec(e.p99_seconds)}</tspan></text></g>`);
  }
  for (const n of nodes) {
    const p = L.pos[n.id];
    const hot = (n.saturated_by || []).length > 0;
    const sub = hot ? `saturated: ${n.saturated_by.join(", ")}`
      : n.kind === "database" ? (n.db_system || "database")
      : n.kind === "service" ? `${fmtRate(n.rate)} served` : n.kind;
    parts.push(`<g class="node ${n.kind}${hot ? " saturated" : ""}" data-testid="node" data-service="${esc(n.id)}" data-kind="${esc(n.kind)}" data-saturated="${hot}" data-href="${serviceHref(n.id)}" transform="translate(${p.x},${p.y})">
      ${hot ? `<title>${esc(n.id)} is saturated: ${esc(n.saturated_by.join(", "))}</title>` : ""}
      <rect width="${L.W}" height="${L.H}"/>
      <text class="name" x="12" y="21">${esc(n.id.length > 24 ? n.id.slice(0, 23) + "…" : n.id)}</text>
      <text class="sub" x="12" y="39">${esc(sub)}</text></g>`);
  }
  parts.push("</svg>");
  return parts.join("");
}

const SERVICE_COLS = [
  {key: "name", label: "service", fmt: v => `<a href="${serviceHref(v)}">${esc(v)}</a>`},
  {key: "kind", label: "kind"},
  {key: "rate", label: "rate", num: true, fmt: fmtRate},
  {key: "error_ratio", label: "errors", num: true, fmt: fmtPct, cls: r => errClass(r.error_ratio)},
  {key: "p50_seconds", label: "p50", num: true, fmt: fmtSec},
  {key: "p99_seconds", label: "p99", num: true, fmt: fmtSec},
  {key: "requests", label: "requests", num: true, fmt: fmtNum},
  {key: "routes", label: "routes", num: true},
];

async function pageMap(token) {
  const [graph, svcs] = await Promise.all([api("/api/graph"), api("/api/services")]);
  if (token !== pageToken) return;
  (rerender = () => { main.innerHTML = `<h1>Service map</h1>${mapSvg(graph)}
    <h2>Services <span class="muted">(rates over the last ${Math.round(svcs.window_seconds)} s)</span></h2>
    ${table("services", SERVICE_COLS, svcs.services, {rowAttrs: r => `class="link" data-href="${serviceHref(r.name)}"`})}`; })();
}

async function pageServices(token) {
  const svcs = await api("/api/services");
  if (token !== pageToken) return;
  (rerender = () => { main.innerHTML = `<h1>Services</h1>
    ${table("services", SERVICE_COLS, svcs.services, {rowAttrs: r => `class="link" data-href="${serviceHref(r.name)}"`, empty: "No services seen yet."})}`; })();
}

// ---------- one service ------------------------------------------------------------------
const ROUTE_COLS = [
  {key: "method", label: "method"},
  {key: "route", label: "route"},
  {key: "requests", label: "requests", num: true, fmt: fmtNum},
  {key: "rate", label: "rate", num: true, fmt: fmtRate},
  {key: "errors", label: "errors", num: true, fmt: fmtNum, cls: r => errClass(r.error_ratio)},
  {key: "error_ratio", label: "error %", num: true, fmt: fmtPct, cls: r => errClass(r.error_ratio)},
  {key: "p50_seconds", label: "p50", num: true, fmt: fmtSec},
  {key: "p99_seconds", label: "p99", num: true, fmt: fmtSec},
  {key: "statuses", label: "statuses", sortValue: r => Object.keys(r.statuses).join(),
   fmt: v => Object.entries(v).map(([k, n]) => `<span class="pill">${esc(k)}: ${fmtNum(n)}</span>`).join(" ")},
];
const EDGE_COLS = (peerKey, label) => [
  {key: peerKey, label, fmt: v => `<a href="${serviceHref(v)}">${esc(v)}</a>`},
  {key: "rate", label: "rate", num: true, fmt: fmtRate},
  {key: "requests", label: "requests", num: true, fmt: fmtNum},
  {key: "error_ratio", label: "errors", num: true, fmt: fmtPct, cls: r => errClass(r.error_ratio)},
  {key: "p50_seconds", label: "p50", num: true, fmt: fmtSec},
  {key: "p99_seconds", label: "p99", num: true, fmt: fmtSec},
];
const DB_CALL_COLS = [
  {key: "db_system", label: "system"},
  {key: "server_address", label: "address"}, {key: "server_port", label: "port"},
  {key: "operation", label: "operation"}, {key: "collection", label: "table / collection"},
  {key: "namespace", label: "database"},
  {key: "requests", label: "calls", num: true, fmt: fmtNum},
  {key: "errors", label: "errors", num: true, fmt: fmtNum, cls: r => errClass(r.error_ratio)},
  {key: "p50_seconds", label: "p50", num: true, fmt: fmtSec},
  {key: "p99_seconds", label: "p99", num: true, fmt: fmtSec},
  {key: "error_types", label: "error codes", sortValue: r => Object.keys(r.error_types).join(),
   fmt: v => Object.entries(v).map(([k, n]) => `<span class="pill">${esc(k)}: ${fmtNum(n)}</span>`).join(" ")},
];
const DB_OP_COLS = DB_CALL_COLS.filter(c => !["server_address", "server_port", "error_types"].includes(c.key));
const DNS_COLS = [
  {key: "question_name", label: "name"}, {key: "question_type", label: "type"},
  {key: "requests", label: "lookups", num: true, fmt: fmtNum},
  {key: "errors", label: "errors", num: true, fmt: fmtNum, cls: r => errClass(r.error_ratio)},
  {key: "p50_seconds", label: "p50", num: true, fmt: fmtSec},
  {key: "p99_seconds", label: "p99", num: true, fmt: fmtSec},
  {key: "error_types", label: "errors by type", sortValue: r => Object.keys(r.error_types).join(),
   fmt: v => Object.entries(v).map(([k, n]) => `<span class="pill">${esc(k)}: ${fmtNum(n)}</span>`).join(" ")},
];
const CALL_COLS = [
  {key: "server_address", label: "address"}, {key: "server_port", label: "port"},
  {key: "method", label: "method"}, {key: "route", label: "route"},
  {key: "requests", label: "requests", num: true, fmt: fmtNum},
  {key: "errors", label: "errors", num: true, fmt: fmtNum},
  {key: "p99_seconds", label: "p99", num: true, fmt: fmtSec},
];

function stat(k, v, testid) {
  return `<div class="stat" data-testid="${testid}"><div class="v">${v}</div><div class="k">${esc(k)}</div></div>`;
}

function chart(el, title, series, data, yfmt) {
  if (typeof uPlot === "undefined") {
    el.innerHTML = `<h3>${esc(title)}</h3><div class="empty">chart library missing (run make build)</div>`;
    return;
  }
  el.innerHTML = `<h3>${esc(title)}</h3>`;
  const colors = ["#2563eb", "#dc2626", "#16a34a"];
  const opts = {
    width: Math.max(el.clientWidth - 4, 300), height: 180,
    scales: {x: {time: true}},
    axes: [{}, {values: (u, vals) => vals.map(yfmt), size: 70}],
    series: [{}, ...series.map((s, i) => ({label: s, stroke: colors[i], width: 1.5,
      value: (u, v) => yfmt(v), spanGaps: false}))],
    legend: {show: true},
  };
  charts.push(new uPlot(opts, data, el));
}

async function pageService(token, name) {
  let svc;
  try {
    svc = await api("/api/services/" + encodeURIComponent(name));
  } catch (e) {
    if (token === pageToken) main.innerHTML = `<h1>${esc(name)}</h1><div class="card empty">${e.status === 404 ? "No such service (yet)." : esc(e.message)}</div>`;
    return;
  }
  let hist = null;
  try { hist = await api("/api/history?service=" + encodeURIComponent(name)); } catch (e) { /* no history yet */ }
  if (token !== pageToken) return;
  (rerender = () => renderService(svc, hist))();
}

function renderService(svc, hist) {
  charts.splice(0).forEach(c => c.destroy());
  const isDb = svc.kind === "database";
  main.innerHTML = `<h1 data-testid="service-name">${esc(svc.name)} <span class="muted">${esc(isDb ? svc.db_system || "database" : svc.kind)}</span></h1>
    <div class="cards">
      ${stat("requests/s (last " + Math.round(svc.window_seconds) + " s)", fmtRate(svc.rate), "stat-rate")}
      ${stat(isDb ? "error ratio" : "error ratio (5xx)", fmtPct(svc.error_ratio), "stat-errors")}
      ${stat("p50", fmtSec(svc.p50_seconds), "stat-p50")}
      ${stat("p99", fmtSec(svc.p99_seconds), "stat-p99")}
      ${stat("requests served", fmtNum(svc.requests), "stat-requests")}
    </div>
    ${saturationCards(svc.saturation)}
    <div class="charts" data-testid="charts">
      <div class="card chart" id="c-rate"></div><div class="card chart" id="c-err"></div>
      <div class="card chart" id="c-lat"></div>
    </div>
    ${isDb || svc.db_operations.length ? "<h2>Operations served</h2>" + table("db-operations", DB_OP_COLS, svc.db_operations, {sort: {key: "requests", asc: false}, empty: "No operations seen yet.", rowAttrs: r => `data-operation="${esc(r.operation)}" data-collection="${esc(r.collection)}"`}) : ""}
    ${isDb && !svc.route_list.length ? "" : "<h2>Routes</h2>" + table("routes", ROUTE_COLS, svc.route_list, {sort: {key: "requests", asc: false}, empty: "This service served no HTTP requests.", rowAttrs: r => `data-method="${esc(r.method)}" data-route="${esc(r.route)}"`})}
    <h2>Outgoing dependencies</h2>
    ${table("outgoing", EDGE_COLS("server", "calls"), svc.outgoing, {empty: "No calls to other services seen."})}
    ${svc.client_calls.length ? "<h2>Outgoing HTTP calls by address</h2>" + table("client-calls", CALL_COLS, svc.client_calls) : ""}
    ${svc.db_calls.length ? "<h2>Database and cache calls</h2>" + table("db-calls", DB_CALL_COLS, svc.db_calls, {sort: {key: "requests", asc: false}, rowAttrs: r => `data-operation="${esc(r.operation)}" data-collection="${esc(r.collection)}"`}) : ""}
    ${svc.dns_lookups.length ? "<h2>DNS lookups</h2>" + table("dns-lookups", DNS_COLS, svc.dns_lookups, {sort: {key: "requests", asc: false}}) : ""}
    <h2>Callers</h2>
    ${table("incoming", EDGE_COLS("client", "caller"), svc.incoming, {empty: "No callers seen."})}`;
  const h = hist && hist.time && hist.time.length ? hist : null;
  const ts = h ? h.time : [];
  const pick = col => (h ? h[col] : []);
  if (!h) {
    ["c-rate", "c-err", "c-lat"].forEach(id => { document.getElementById(id).innerHTML = `<h3>history</h3><div class="empty">The first point appears within ${hist ? hist.interval_seconds : 5} s.</div>`; });
    return;
  }
  chart(document.getElementById("c-rate"), "Rate (requests/s), last 15 min", ["rate"], [ts, pick("rate")], v => v == null ? "" : fmtRate(v));
  chart(document.getElementById("c-err"), "Errors (5xx ratio)", ["error ratio"], [ts, pick("error_ratio")], v => v == null ? "" : fmtPct(v));
  chart(document.getElementById("c-lat"), "Duration", ["p50", "p99"], [ts, pick("p50_seconds"), pick("p99_seconds")], v => v == null ? "" : fmtSec(v));
}

// ---------- saturation -------------------------------------------------------------------
// The fourth golden signal next to RED: waiting for a CPU, CPU used, disk latency, accept
// queue overflows (serve/saturation.py, over the last minute).
function saturationCards(s) {
  if (!s) return "";
  const hot = new Set(s.saturated_by);
  const cls = reason => (hot.has(reason) ? "bad" : "");
  return `<h2>Saturation <span class="muted">(last ${Math.round(s.window_seconds || 60)} s)</span></h2>
    <div class="cards" data-testid="saturation">
      ${stat("run-queue wait p99", `<span class="${cls("cpu run queue")}">${fmtSec(s.runqueue_p99_seconds)}</span>`, "stat-runq-p99")}
      ${stat("CPU (cores)", s.cpu_cores.toFixed(2), "stat-cpu")}
      ${stat("disk p99", `<span class="${cls("disk latency")}">${fmtSec(s.disk_p99_seconds)}</span>`, "stat-disk-p99")}
      ${stat("listen overflows", `<span class="${cls("listen queue overflow")}">${fmtNum(s.listen_overflows_window)}</span>`, "stat-overflows")}
      ${stat("OOM kills", `<span class="${cls("OOM kill")}">${fmtNum(s.oom_kills_window)}</span>`, "stat-oom")}
    </div>`;
}

const SATURATION_COLS = [
  {key: "service_name", label: "service", fmt: v => `<a href="${serviceHref(v)}">${esc(v)}</a>`},
  {key: "cpu_cores", label: "CPU (cores)", num: true, fmt: v => v.toFixed(2)},
  {key: "cpu_seconds", label: "CPU s", num: true, fmt: v => v.toFixed(1)},
  {key: "runqueue_p99_seconds", label: "run-queue p99", num: true, fmt: fmtSec,
   cls: r => r.saturated_by.includes("cpu run queue") ? "bad" : ""},
  {key: "disk_p99_seconds", label: "disk p99", num: true, fmt: fmtSec,
   cls: r => r.saturated_by.includes("disk latency") ? "bad" : ""},
  {key: "listen_overflows", label: "listen overflows", num: true, fmt: fmtNum,
   cls: r => r.listen_overflows_window ? "bad" : ""},
  {key: "oom_kills", label: "OOM kills", num: true, fmt: fmtNum, cls: r => r.oom_kills_window ? "bad" : ""},
  {key: "saturated_by", label: "saturated by", sortValue: r => r.saturated_by.join(),
   fmt: v => v.map(x => `<span class="pill">${esc(x)}</span>`).join(" ")},
];
const OOM_COLS = [
  {key: "pid", label: "pid", num: true}, {key: "comm", label: "comm"},
  {key: "service_name", label: "service"}, {key: "cgroup", label: "cgroup at its limit"},
  {key: "trigger_pid", label: "allocating pid", num: true},
];

async function pageSaturation(token) {
  const data = await api("/api/saturation");
  if (token !== pageToken) return;
  (rerender = () => { main.innerHTML = `<h1>Saturation <span class="muted">(windowed figures: last ${Math.round(data.window_seconds)} s)</span></h1>
    ${table("saturation", SATURATION_COLS, data.services, {sort: {key: "cpu_cores", asc: false}, empty: "No saturation data yet (probes.saturation)."})}
    <h2>OOM kills</h2>
    ${table("oom-kills", OOM_COLS, data.oom_kills.slice().reverse(), {empty: "No process was OOM-killed since the agent started."})}`; })();
}

// ---------- TCP --------------------------------------------------------------------------
const TCP_COLS = [
  {key: "service_name", label: "service", fmt: v => `<a href="${serviceHref(v)}">${esc(v)}</a>`},
  {key: "direction", label: "side"},
  {key: "peer", label: "peer"},
  {key: "opened", label: "opened", num: true, fmt: fmtNum},
  {key: "active", label: "open now", num: true, fmt: fmtNum},
  {key: "failed", label: "failed", num: true, fmt: fmtNum, cls: r => r.failed ? "bad" : ""},
  {key: "retransmits", label: "retransmits", num: true, fmt: fmtNum, cls: r => r.retransmits ? "warn" : ""},
  {key: "resets_sent", label: "RST sent", num: true, fmt: fmtNum},
  {key: "resets_received", label: "RST recv", num: true, fmt: fmtNum},
  {key: "rtt_avg_seconds", label: "RTT avg", num: true, fmt: fmtSec},
  {key: "rtt_p99_seconds", label: "RTT p99", num: true, fmt: fmtSec},
  {key: "bytes_sent", label: "sent", num: true, fmt: fmtBytes},
  {key: "bytes_received", label: "received", num: true, fmt: fmtBytes},
];

async function pageTcp(token) {
  const data = await api("/api/tcp");
  if (token !== pageToken) return;
  const rows = data.peers.map(p => ({...p, peer: p.direction === "client"
    ? `${p.server_address}:${p.server_port}` : `listening :${p.server_port}`}));
  const sum = k => rows.reduce((a, r) => a + (r[k] || 0), 0);
  (rerender = () => { main.innerHTML = `<h1>TCP health</h1>
    <div class="cards">
      ${stat("connections opened", fmtNum(sum("opened")), "tcp-opened")}
      ${stat("open now", fmtNum(sum("active")), "tcp-active")}
      ${stat("failed connects", fmtNum(sum("failed")), "tcp-failed")}
      ${stat("retransmits", fmtNum(sum("retransmits")), "tcp-retransmits")}
      ${stat("resets", fmtNum(sum("resets_sent") + sum("resets_received")), "tcp-resets")}
    </div>
    ${table("tcp", TCP_COLS, rows, {sort: {key: "opened", asc: false}, empty: "No TCP connections seen yet."})}
    <p class="muted">Bytes and RTT are counted when a connection closes.</p>`; })();
}

// ---------- events -----------------------------------------------------------------------
const feed = {since: 0, rows: [], paused: false, kind: ""};
const FEED_MAX = 500;

function eventRow(e) {
  const detail = e.kind === "exec" ? esc(e.argv && e.argv.length ? e.argv.join(" ") : e.filename)
    : `exit ${e.exit_signal ? "signal " + e.exit_signal : "code " + e.exit_code} after ${e.lifetime_s == null ? "?" : e.lifetime_s.toFixed(3) + " s"}`;
  return `<tr data-kind="${e.kind}"><td><span class="pill ${e.kind}">${e.kind}</span></td><td class="num">${e.pid}</td><td class="num">${e.ppid}</td><td>${esc(e.comm)}</td><td>${esc(e.service_name)}</td><td>${detail}</td></tr>`;
}

async function pageEvents(token, first) {
  if (first) {
    main.innerHTML = `<h1>Live events</h1>
      <div class="toolbar"><label>kind <select id="ev-kind"><option value="">all</option><option>exec</option><option>exit</option></select></label>
      <button id="ev-pause">pause</button><span class="muted" id="ev-count"></span></div>
      <table class="feed" data-testid="events"><thead><tr><th>kind</th><th class="num">pid</th><th class="num">ppid</th><th>comm</th><th>service</th><th>detail</th></tr></thead><tbody id="ev-body"></tbody></table>`;
    feed.since = 0; feed.rows = [];
    document.getElementById("ev-kind").value = feed.kind;
    document.getElementById("ev-kind").onchange = ev => { feed.kind = ev.target.value; feed.since = 0; feed.rows = []; refresh(); };
    document.getElementById("ev-pause").onclick = ev => { feed.paused = !feed.paused; ev.target.textContent = feed.paused ? "resume" : "pause"; };
  }
  if (feed.paused) return;
  const q = new URLSearchParams({since_ns: String(feed.since), limit: String(FEED_MAX)});
  if (feed.kind) q.set("kind", feed.kind);
  const data = await api("/api/events?" + q);
  if (token !== pageToken) return;
  if (data.events.length) {
    feed.since = data.events[data.events.length - 1].timestamp_ns;
    feed.rows = data.events.slice().reverse().map(eventRow).concat(feed.rows).slice(0, FEED_MAX);
  }
  document.getElementById("ev-body").innerHTML = feed.rows.join("");
  document.getElementById("ev-count").textContent = `${feed.rows.length} shown, newest first`;
}

// ---------- security ---------------------------------------------------------------------
const RULE_COLS = [
  {key: "id", label: "rule"},
  {key: "severity", label: "severity", fmt: v => `<span class="pill ${esc(v)}">${esc(v)}</span>`},
  {key: "action", label: "action", fmt: v => v === "kill" ? `<span class="pill killed">kill</span>` : "alert"},
  {key: "alerts", label: "alerts", num: true, fmt: fmtNum},
  {key: "kills", label: "kills", num: true, fmt: fmtNum},
  {key: "kernel_criteria", label: "decided in the kernel", sortValue: r => r.kernel_criteria.join(),
   fmt: v => v.map(k => `<span class="pill">${esc(k)}</span>`).join(" ") || "–"},
  {key: "description", label: "what it catches"},
];

function procName(p) {
  const path = p.exe || p.filename || "";
  return p.comm || path.split("/").pop() || "?";
}

// The alert's lineage, oldest ancestor on the left and the process that matched on the right.
function ancestrySvg(alert) {
  const chain = alert.ancestry.slice().reverse().concat([alert.process]);
  const W = 150, H = 46, GAP = 26, PAD = 2;
  const width = PAD * 2 + chain.length * W + (chain.length - 1) * GAP;
  const parts = [`<svg class="ancestry" data-testid="ancestry" viewBox="0 0 ${width} ${H + PAD * 2}" width="${width}" height="${H + PAD * 2}">`];
  chain.forEach((p, i) => {
    const x = PAD + i * (W + GAP);
    if (i) parts.push(`<path d="M${x - GAP},${PAD + H / 2} L${x - 4},${PAD + H / 2}" marker-end="url(#arrow)"/>`);
    const subject = i === chain.length - 1;
    const server = !subject && alert.service_name && p.service_name === alert.service_name;
    const cls = ["proc", subject ? "subject" : "", server ? "server" : "", p.exited ? "exited" : ""].join(" ");
    const name = p.evicted ? "…" : procName(p);
    const title = p.evicted ? `pid ${p.pid} (no longer in the tree)` :
      `${p.exe || p.filename}\n${(p.argv || []).join(" ")}\nuser ${p.user} · service ${p.service_name}${p.exited ? " · exited" : ""}`;
    parts.push(`<g class="${cls}" data-testid="ancestor" data-pid="${p.pid}" transform="translate(${x},${PAD})"><title>${esc(title)}</title>
      <rect width="${W}" height="${H}"/>
      <text class="name" x="8" y="18">${esc(name.length > 19 ? name.slice(0, 18) + "…" : name)}</text>
      <text x="8" y="35">pid ${p.pid}${p.service_name && !p.evicted ? " · " + esc(p.service_name.slice(0, 12)) : ""}</text></g>`);
  });
  parts.push("</svg>");
  return parts.join("");
}

function alertCard(a) {
  const when = new Date(a.time * 1000).toLocaleTimeString();
  const conn = a.evidence && a.evidence.connection;
  const why = [a.evidence.stdin_tcp || a.evidence.stdout_tcp ? "stdio is a TCP socket" : "",
    a.evidence.exe_memfd ? "memfd image" : a.evidence.exe_deleted ? "deleted image" : "",
    a.evidence.listener_depth ? `listening ancestor ${a.evidence.listener_depth} up` : "",
    a.in_container ? `in container ${a.container_id ? a.container_id.slice(0, 12) : ""}` : "",
    conn ? `connection to ${conn.address}:${conn.port} by pid ${conn.pid}` : ""].filter(Boolean).join(" · ");
  return `<div class="alert ${esc(a.severity)}" data-testid="alert" data-rule="${esc(a.rule)}" data-pid="${a.process.pid}" data-id="${a.id}">
    <div class="head"><span class="pill ${esc(a.severity)}">${esc(a.severity)}</span>
      <span class="rule">${esc(a.rule)}</span>${a.action === "killed" ? `<span class="pill killed">killed</span>` : ""}
      <span>service <a data-testid="alert-service" href="${serviceHref(a.service_name)}">${esc(a.service_name)}</a></span>
      <span class="muted">${esc(when)} · pid ${a.process.pid} · user ${esc(a.process.user)}</span></div>
    <div class="cmd">${esc(a.process.exe || a.process.filename)}  ${esc(a.process.argv.join(" "))}</div>
    ${why ? `<div class="muted">${esc(why)}</div>` : ""}
    <div class="card" style="margin:6px 0 0;overflow-x:auto">${ancestrySvg(a)}</div></div>`;
}

async function pageSecurity(token) {
  const [data, rules] = await Promise.all([api("/api/security/alerts?limit=200"), api("/api/security/rules")]);
  if (token !== pageToken) return;
  (rerender = () => {
    if (!data.enabled) {
      main.innerHTML = `<h1>Security</h1><div class="card empty" data-testid="security-off">Security monitoring is off (security.enabled: false).</div>`;
      return;
    }
    const kills = rules.rules.reduce((n, r) => n + r.kills, 0);
    const alerts = data.alerts.slice().reverse();
    main.innerHTML = `<h1>Security</h1>
      <svg width="0" height="0" style="position:absolute"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker></defs></svg>
      <div class="cards">
        ${stat("alerts since start", fmtNum(data.total), "security-total")}
        ${stat("execs killed", fmtNum(kills), "security-kills")}
        ${stat("rules", fmtNum(rules.rules.length), "security-rules-count")}
        ${stat("processes in the tree", fmtNum(data.stats.processes + data.stats.exited_kept), "security-processes")}
      </div>
      <h2>Alerts <span class="muted">(newest first; each with its ancestry, the matching process on the right)</span></h2>
      <div data-testid="security-alerts">${alerts.length ? alerts.map(alertCard).join("") : `<div class="card empty" data-testid="security-alerts-empty">No alerts.</div>`}</div>
      <h2>Rules</h2>${table("security-rules", RULE_COLS, rules.rules)}`;
  })();
}

// ---------- agent ------------------------------------------------------------------------
const HOOK_COLS = [
  {key: "probe", label: "probe"}, {key: "hook", label: "hook"},
  {key: "section", label: "program chosen"},
  {key: "attached", label: "attached", fmt: v => v ? "yes" : `<span class="bad">no</span>`},
  {key: "avg_ns", label: "ns/event", num: true, fmt: (v, r) => r.run_cnt ? v.toFixed(0) : "–"},
  {key: "run_cnt", label: "runs", num: true, fmt: fmtNum},
  {key: "fallback_reason", label: "why not the preferred program"},
];
const PROBE_COLS = [
  {key: "probe", label: "probe"},
  {key: "events", label: "ring records", num: true, fmt: fmtNum},
  {key: "dropped", label: "dropped", num: true, fmt: fmtNum, cls: r => r.dropped ? "bad" : ""},
];

async function pageAgent(token) {
  const [info, probes] = await Promise.all([api("/api/agent"), api("/api/probes")]);
  if (token !== pageToken) return;
  const types = Object.entries(probes.hook_types).map(([k, v]) =>
    `<span class="pill" title="${esc(v.reason || "")}">${esc(k)}: ${v.available ? "yes" : "no"}</span>`).join(" ");
  (rerender = () => { main.innerHTML = `<h1>Agent</h1>
    <div class="cards">
      ${stat("version", esc(info.version), "agent-version")}
      ${stat("uptime", fmtSec(info.uptime_seconds), "agent-uptime")}
      ${stat("start-up (load + attach)", fmtSec(info.startup_seconds), "agent-startup")}
      ${stat("pid", info.pid, "agent-pid")}
      ${stat("listen", esc(info.listen), "agent-listen")}
    </div>
    <h2>Ring buffers</h2>${table("probe-drops", PROBE_COLS, info.probes)}
    <h2>Hooks</h2>${table("hooks", HOOK_COLS, probes.probes)}
    <h2>Hook types on this kernel</h2><div class="card">${types || "–"}</div>`; })();
}

// ---------- routing ----------------------------------------------------------------------
function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [page, ...rest] = h.split("/");
  return {page: page || "map", arg: rest.length ? decodeURIComponent(rest.join("/")) : null};
}

async function refresh(first = false) {
  const token = pageToken;
  const {page, arg} = route();
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.page === page || (page === "service" && a.dataset.page === "services")));
  try {
    if (page === "service") await pageService(token, arg);
    else if (page === "services") await pageServices(token);
    else if (page === "tcp") await pageTcp(token);
    else if (page === "saturation") await pageSaturation(token);
    else if (page === "events") await pageEvents(token, first);
    else if (page === "agent") await pageAgent(token);
    else if (page === "security") await pageSecurity(token);
    else await pageMap(token);
    if (token === pageToken) { setStatus("updated " + new Date().toLocaleTimeString()); document.body.dataset.loaded = page; }
  } catch (e) {
    setStatus("agent unreachable: " + e.message);
  }
}

function navigate() {
  pageToken++;
  rerender = null;
  clearTimeout(timer);
  charts.splice(0).forEach(c => c.destroy());
  delete document.body.dataset.loaded;
  const loop = async (first) => {
    const token = pageToken;
    await refresh(first);
    // The service page redraws its charts each time: refresh it less often.
    if (token === pageToken) timer = setTimeout(() => loop(false), route().page === "service" ? 5000 : REFRESH_MS);
  };
  loop(true);
}

window.addEventListener("hashchange", navigate);
navigate();
