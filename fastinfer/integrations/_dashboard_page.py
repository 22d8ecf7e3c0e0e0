"""The dashboard page: one HTML document with its CSS, JavaScript and SVG inline.

No build step and nothing fetched but the service's own ``/dashboard/data`` (the page's
Content-Security-Policy forbids anything else). Every value reaches the DOM through
``textContent`` or SVG attributes, never as markup.
"""

from __future__ import annotations

import json

__all__ = ["CSP", "render_page"]

#: sent with the page: inline code only, data from this origin only, nothing from elsewhere
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>fastinfer dashboard</title>
<style>
  :root { --bg: #f6f7f9; --card: #fff; --ink: #1d2430; --muted: #6b7687; --accent: #e8710a;
          --accent2: #1a73e8; --ok: #188038; --bad: #c5221f; --grid: #e3e6ea; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
         background: var(--bg); color: var(--ink); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 14px 22px;
           background: var(--card); border-bottom: 1px solid var(--grid); }
  header h1 { font-size: 18px; margin: 0; }
  #state { font-weight: 600; padding: 2px 10px; border-radius: 10px; background: var(--grid); }
  #state.ready { background: #e6f4ea; color: var(--ok); }
  #state.failed { background: #fce8e6; color: var(--bad); }
  #updated { color: var(--muted); margin-left: auto; }
  #error { display: none; background: #fce8e6; color: var(--bad); padding: 8px 22px; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 14px;
         padding: 16px 22px; }
  .card { background: var(--card); border: 1px solid var(--grid); border-radius: 8px;
          padding: 12px 16px; }
  .card h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em;
             color: var(--muted); margin: 0 0 6px; font-weight: 600; }
  .big { font-size: 30px; font-weight: 650; font-variant-numeric: tabular-nums; }
  .unit { font-size: 14px; color: var(--muted); font-weight: 400; margin-left: 3px; }
  .sub { color: var(--muted); font-variant-numeric: tabular-nums; }
  svg { display: block; width: 100%; }
  table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
  td { padding: 2px 0; } td.num { text-align: right; }
  .legend span { margin-right: 12px; } .sw { display: inline-block; width: 10px; height: 3px;
  vertical-align: middle; margin-right: 4px; }
</style>
</head>
<body>
<header>
  <h1>fastinfer</h1><span id="state">connecting</span><span id="phase" class="sub"></span>
  <span id="updated">waiting for data</span>
</header>
<div id="error"></div>
<main>
  <section class="card"><h2>Request rate</h2>
    <div class="big"><span id="rate">-</span><span class="unit">req/s</span></div>
    <div class="sub" id="statuses">-</div>
    <svg id="spark-rate" viewBox="0 0 300 60" preserveAspectRatio="none" height="60"></svg>
  </section>
  <section class="card"><h2>Latency (HTTP)</h2>
    <div class="big"><span id="p50">-</span><span class="unit">ms p50</span>
      &nbsp;<span id="p99">-</span><span class="unit">ms p99</span></div>
    <div class="sub legend"><span><i class="sw" style="background:var(--accent2)"></i>p50</span>
      <span><i class="sw" style="background:var(--accent)"></i>p99</span></div>
    <svg id="spark-latency" viewBox="0 0 300 60" preserveAspectRatio="none" height="60"></svg>
  </section>
  <section class="card"><h2>Queue depth</h2>
    <div class="big"><span id="queue">-</span><span class="unit">waiting</span></div>
    <div class="sub"><span id="inflight">-</span> batch(es) running</div>
    <svg id="spark-queue" viewBox="0 0 300 60" preserveAspectRatio="none" height="60"></svg>
  </section>
  <section class="card"><h2>Batch sizes <span id="batch-scope" class="sub"></span></h2>
    <div class="sub">mean <span id="batch-mean">-</span></div>
    <svg id="batches" viewBox="0 0 300 110" height="110"></svg>
  </section>
  <section class="card"><h2>Setup phases</h2>
    <svg id="phases" viewBox="0 0 300 20" height="20"></svg>
  </section>
  <section class="card"><h2>Outcomes (since start)</h2>
    <table id="outcomes"><tbody></tbody></table>
  </section>
</main>
<script>
"use strict";
const DATA_URL = __DATA_URL__;
const KEEP = 120;
const series = { rate: [], p50: [], p99: [], queue: [] };
const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
function fmt(x, digits) {
  if (x === null || x === undefined || !isFinite(x)) return "-";
  return Number(x).toFixed(digits);
}
function push(name, value) {
  const s = series[name];
  s.push(value === null || value === undefined ? null : Number(value));
  if (s.length > KEEP) s.shift();
}
function spark(id, names, colors) {
  const svg = document.getElementById(id);
  clear(svg);
  const all = names.flatMap((n) => series[n]).filter((v) => v !== null);
  const top = Math.max(1e-9, ...all) * 1.1;
  for (let g = 1; g < 4; g++) {
    svg.appendChild(el("line", { x1: 0, x2: 300, y1: g * 15, y2: g * 15,
      stroke: "#e3e6ea", "stroke-width": 1 }));
  }
  names.forEach((name, i) => {
    const s = series[name];
    const pts = [];
    s.forEach((v, j) => {
      if (v === null) return;
      const x = (300 * (j + KEEP - s.length)) / (KEEP - 1);
      pts.push(x.toFixed(1) + "," + (58 - (56 * v) / top).toFixed(1));
    });
    if (pts.length) {
      svg.appendChild(el("polyline", { points: pts.join(" "), fill: "none",
        stroke: colors[i], "stroke-width": 2, "vector-effect": "non-scaling-stroke" }));
    }
  });
  svg.appendChild(el("text", { x: 298, y: 10, "text-anchor": "end", "font-size": 9,
    fill: "#6b7687" }, "max " + fmt(top / 1.1, top > 10 ? 0 : 2)));
}
function bars(rows) {
  const svg = document.getElementById("batches");
  clear(svg);
  if (!rows.length) {
    svg.appendChild(el("text", { x: 150, y: 55, "text-anchor": "middle", fill: "#6b7687",
      "font-size": 12 }, "no batches yet"));
    return;
  }
  const top = Math.max(...rows.map((r) => r.count));
  const w = 300 / rows.length;
  rows.forEach((r, i) => {
    const h = (70 * r.count) / top;
    svg.appendChild(el("rect", { x: i * w + 3, y: 88 - h, width: Math.max(1, w - 6), height: h,
      fill: "#e8710a", rx: 2 }));
    svg.appendChild(el("text", { x: i * w + w / 2, y: 102, "text-anchor": "middle",
      "font-size": 10, fill: "#1d2430" }, r.label));
    svg.appendChild(el("text", { x: i * w + w / 2, y: 84 - h, "text-anchor": "middle",
      "font-size": 9, fill: "#6b7687" }, String(r.count)));
  });
}
function phases(readiness) {
  const svg = document.getElementById("phases");
  clear(svg);
  const items = Object.entries(readiness.phases || {});
  const running = readiness.ready ? null : readiness.phase;
  const total = items.reduce((a, [, v]) => a + v, 0) || 1;
  const rowH = 20;
  const height = Math.max(1, items.length + (running ? 1 : 0)) * rowH;
  svg.setAttribute("viewBox", "0 0 300 " + height);
  svg.setAttribute("height", height);
  items.forEach(([name, seconds], i) => {
    const y = i * rowH;
    svg.appendChild(el("rect", { x: 110, y: y + 4, width: Math.max(1, (150 * seconds) / total),
      height: 12, fill: "#1a73e8", rx: 2 }));
    svg.appendChild(el("text", { x: 0, y: y + 14, "font-size": 11, fill: "#1d2430" }, name));
    svg.appendChild(el("text", { x: 300, y: y + 14, "font-size": 11, "text-anchor": "end",
      fill: "#6b7687" }, fmt(seconds, seconds < 10 ? 2 : 1) + " s"));
  });
  if (running) {
    svg.appendChild(el("text", { x: 0, y: items.length * rowH + 14, "font-size": 11,
      fill: "#e8710a" }, running + " (now)"));
  }
}
function outcomes(d) {
  const body = document.querySelector("#outcomes tbody");
  clear(body);
  const rows = [];
  for (const [k, v] of Object.entries(d.requests || {})) rows.push(["requests " + k, v]);
  for (const [k, v] of Object.entries(d.refused || {})) rows.push(["refused by HTTP: " + k, v]);
  for (const [k, v] of Object.entries(d.compile_cache || {})) rows.push(["compile cache " + k, v]);
  rows.push(["HTTP requests", d.http_requests]);
  for (const [name, value] of rows) {
    const tr = document.createElement("tr");
    const a = document.createElement("td");
    a.textContent = name;
    const b = document.createElement("td");
    b.className = "num";
    b.textContent = fmt(value, 0);
    tr.append(a, b);
    body.appendChild(tr);
  }
}
function render(d) {
  const r = d.readiness || {};
  const state = document.getElementById("state");
  state.textContent = r.ready ? "ready" : (r.phase === "failed" ? "setup failed" : "starting");
  state.className = r.ready ? "ready" : (r.phase === "failed" ? "failed" : "");
  document.getElementById("phase").textContent = r.ready ? "" : "phase: " + r.phase;
  document.getElementById("rate").textContent = fmt(d.request_rate, 1);
  document.getElementById("p50").textContent = fmt(d.latency_p50_ms, 1);
  document.getElementById("p99").textContent = fmt(d.latency_p99_ms, 1);
  document.getElementById("queue").textContent = fmt(d.queue_depth, 0);
  document.getElementById("inflight").textContent = fmt(d.batches_in_flight, 0);
  document.getElementById("batch-mean").textContent = fmt(d.batch_size_mean, 1);
  document.getElementById("batch-scope").textContent =
    d.batch_sizes_scope === "window" ? "(last " + fmt(d.window_seconds, 0) + " s)" : "(since start)";
  const statuses = Object.entries(d.status_rates || {})
    .filter(([, v]) => v > 0).map(([k, v]) => k + " " + fmt(v, 1) + "/s");
  document.getElementById("statuses").textContent = statuses.join("  ") || "no requests";
  push("rate", d.request_rate); push("p50", d.latency_p50_ms); push("p99", d.latency_p99_ms);
  push("queue", d.queue_depth);
  spark("spark-rate", ["rate"], ["#1a73e8"]);
  spark("spark-latency", ["p50", "p99"], ["#1a73e8", "#e8710a"]);
  spark("spark-queue", ["queue"], ["#188038"]);
  bars(d.batch_sizes || []);
  phases(r);
  outcomes(d);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
function problem(text) {
  const e = document.getElementById("error");
  e.textContent = text;
  e.style.display = text ? "block" : "none";
}
async function tick() {
  try {
    const resp = await fetch(DATA_URL, { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    problem("");
  } catch (err) {
    problem("cannot read " + DATA_URL + ": " + err.message + " (retrying every second)");
  } finally {
    setTimeout(tick, 1000);
  }
}
tick();
</script>
</body>
</html>
"""


def render_page(data_url: str) -> str:
    """The page, polling ``data_url`` (a path on the same origin)."""
    return _PAGE.replace("__DATA_URL__", json.dumps(data_url).replace("<", "\\u003c"))
