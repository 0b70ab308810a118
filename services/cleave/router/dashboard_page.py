"""The HTML of ``GET /dashboard``: one self-contained page (inline CSS, vanilla JS, plots
drawn as inline SVG, nothing fetched but ``/dashboard/data``, polled every 2 s)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Cleave status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; gap: 24px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  header .muted { color: #aab; }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 14px; padding: 14px; }
  section { background: #fff; border-radius: 6px; padding: 10px 14px; box-shadow: 0 1px 2px #0002; }
  section.wide { grid-column: 1 / -1; }
  h2 { font-size: 14px; margin: 0 0 8px; color: #445; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 8px 3px 0; border-bottom: 1px solid #eee; vertical-align: top; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  .big { font-size: 32px; font-weight: 600; }
  .legend span { margin-right: 12px; font-size: 12px; }
  .legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
  .none { color: #889; font-style: italic; }
  .bad { color: #b00020; }
  svg.plot { width: 100%; height: auto; display: block; }
  svg.plot text { font-size: 10px; fill: #667; }
  code { font-size: 12px; }
</style>
</head>
<body>
<header><h1>Cleave status</h1><span id="model" class="muted"></span><span id="router" class="muted"></span>
  <span id="updated" class="muted">loading…</span></header>
<main>
  <section><h2>Pools</h2><table id="pools"></table></section>
  <section><h2>Prefill : decode ratio</h2><div id="pd-ratio" class="big">–</div>
    <div id="pd-detail" class="muted"></div></section>
  <section><h2>Time to first token (s)</h2><div id="ttft-plot"></div></section>
  <section><h2>Time per output token (s)</h2><div id="tpot-plot"></div></section>
  <section><h2>Requests per second</h2><div id="rate-plot"></div></section>
  <section><h2>KV cache hit rate (cached / prompt tokens)</h2><div id="kv-plot"></div></section>
  <section><h2>Expert load (tokens/s per replica)</h2><div id="expert-plot"></div><table id="experts"></table></section>
  <section><h2>Workers (running + waiting)</h2><table id="workers"></table></section>
  <section class="wide"><h2>Recent scaling decisions</h2><table id="decisions"></table></section>
  <section class="wide"><h2>Recent diagnoses</h2><table id="diagnoses"></table></section>
</main>
<script>
"use strict";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const HISTORY = 900;
const dataUrl = location.pathname.replace(/\\/$/, "") + "/data";
const state = { samples: [], last: 0 };

function esc(value) {
  return String(value).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}
function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  return Math.abs(v) >= 100 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString();
}

// One line plot as inline SVG: series = [{name, color, points: [[t, v|null], ...]}].
function plot(series, opts = {}) {
  const W = 560, H = 170, L = 44, R = 10, T = 8, B = 20;
  const all = series.flatMap(s => s.points);
  const now = all.length ? Math.max(...all.map(p => p[0])) : Date.now() / 1000;
  const t0 = all.length ? Math.min(...all.map(p => p[0])) : now - 60;
  const span = Math.max(now - t0, 60);
  const values = all.map(p => p[1]).filter(v => v !== null);
  let ymax = Math.max(opts.ymax || 0, ...values, opts.target ? opts.target * 1.25 : 0);
  if (!(ymax > 0)) ymax = 1;
  const x = t => L + (W - L - R) * (t - (now - span)) / span;
  const y = v => T + (H - T - B) * (1 - v / ymax);
  let svg = `<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`;
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4;
    svg += `<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#eee"/>`;
    svg += `<text x="${L - 4}" y="${y(v) + 3}" text-anchor="end">${fmt(v, 2)}</text>`;
  }
  svg += `<text x="${L}" y="${H - 4}">-${Math.round(span)} s</text><text x="${W - R}" y="${H - 4}" text-anchor="end">now</text>`;
  if (opts.target) {
    svg += `<line class="target" x1="${L}" x2="${W - R}" y1="${y(opts.target)}" y2="${y(opts.target)}" stroke="#d62728" stroke-dasharray="5,4"/>`;
    svg += `<text x="${W - R}" y="${y(opts.target) - 3}" text-anchor="end" style="fill:#d62728">target ${fmt(opts.target)}</text>`;
  }
  for (const s of series) {
    let run = [];
    const flush = () => {
      if (run.length === 1) svg += `<circle cx="${run[0][0]}" cy="${run[0][1]}" r="2" fill="${s.color}"/>`;
      if (run.length > 1) svg += `<polyline class="series" fill="none" stroke="${s.color}" stroke-width="1.8" points="${run.map(p => p.join(",")).join(" ")}"/>`;
      run = [];
    };
    for (const [t, v] of s.points) {
      if (v === null || v === undefined) flush(); else run.push([x(t).toFixed(1), y(v).toFixed(1)]);
    }
    flush();
  }
  svg += "</svg>";
  const legend = series.map(s => `<span><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("");
  return svg + `<div class="legend">${legend}</div>`;
}

function line(name, key, color) {
  return { name, color, points: state.samples.map(s => [s.t, s[key]]) };
}

function entriesTable(id, entries, error) {
  const el = document.getElementById(id);
  if (error) { el.innerHTML = `<tr><td class="bad">cannot read: ${esc(error)}</td></tr>`; return; }
  if (!entries.length) { el.innerHTML = `<tr><td class="none">none yet</td></tr>`; return; }
  const timeKeys = ["ts", "time", "timestamp", "at"];
  const rows = entries.map(e => {
    const tk = timeKeys.find(k => k in e);
    let when = tk ? e[tk] : "";
    if (typeof when === "number") when = new Date(when * (when < 1e12 ? 1000 : 1)).toLocaleTimeString();
    const rest = Object.entries(e).filter(([k]) => k !== tk)
      .map(([k, v]) => `<b>${esc(k)}</b>: ${esc(typeof v === "object" ? JSON.stringify(v) : v)}`).join("; ");
    return `<tr><td>${esc(when)}</td><td>${rest}</td></tr>`;
  });
  el.innerHTML = "<tr><th>when</th><th>entry</th></tr>" + rows.join("");
}

function render(d) {
  const cur = d.current;
  document.getElementById("model").textContent = "model " + d.model;
  document.getElementById("router").textContent = "router " + d.router;
  document.getElementById("updated").textContent = "updated " + new Date(d.now * 1000).toLocaleTimeString();
  if (cur) {
    document.getElementById("pools").innerHTML = "<tr><th>role</th><th class=num>live</th><th class=num>serving</th></tr>" +
      Object.entries(cur.pools).map(([role, n]) =>
        `<tr><td>${role}</td><td class="num" id="pool-${role}-live">${n.live}</td>` +
        `<td class="num" id="pool-${role}-serving">${n.serving}</td></tr>`).join("");
    const p = cur.pools.prefill.serving, dd = cur.pools.decode.serving;
    document.getElementById("pd-ratio").textContent = `${p} : ${dd}`;
    document.getElementById("pd-detail").textContent = cur.pd_ratio === null ? "no decode worker serving"
      : `${fmt(cur.pd_ratio)} prefill workers per decode worker`;
    document.getElementById("experts").innerHTML = Object.keys(cur.experts).length
      ? "<tr><th>replica</th><th class=num>calls/s</th><th class=num>tokens/s</th></tr>" +
        Object.entries(cur.experts).map(([id, e]) =>
          `<tr><td>${esc(id)}</td><td class="num">${fmt(e.calls_per_s)}</td><td class="num">${fmt(e.tokens_per_s)}</td></tr>`).join("")
      : `<tr><td class="none">no expert replicas (dense model or in-process experts)</td></tr>`;
    document.getElementById("workers").innerHTML = "<tr><th>worker</th><th>health</th><th class=num>running</th><th class=num>waiting</th></tr>" +
      Object.entries(cur.workers).map(([id, w]) =>
        `<tr><td>${esc(id)}</td><td>${esc(w.health)}</td><td class="num">${w.num_running}</td><td class="num">${w.num_waiting}</td></tr>`).join("");
  }
  const t = d.targets;
  document.getElementById("ttft-plot").innerHTML = plot(
    [line("p50", "ttft_p50", COLORS[0]), line("p90", "ttft_p90", COLORS[1])], { target: t.ttft_seconds });
  document.getElementById("tpot-plot").innerHTML = plot(
    [line("p50", "tpot_p50", COLORS[0]), line("p90", "tpot_p90", COLORS[1])], { target: t.tpot_seconds });
  document.getElementById("rate-plot").innerHTML = plot(
    [line("requests/s", "request_rate", COLORS[2]), line("5xx/s", "error_rate", "#d62728")], { ymax: 0.1 });
  document.getElementById("kv-plot").innerHTML = plot([line("hit rate", "kv_hit_rate", COLORS[3])], { ymax: 1 });
  const replicas = [...new Set(state.samples.flatMap(s => Object.keys(s.experts)))].sort();
  document.getElementById("expert-plot").innerHTML = replicas.length ? plot(replicas.map((id, i) => ({
    name: id, color: COLORS[i % COLORS.length],
    points: state.samples.map(s => [s.t, s.experts[id] ? s.experts[id].tokens_per_s : null]),
  })), { ymax: 1 }) : "";
  entriesTable("decisions", d.decisions, d.decisions_error);
  entriesTable("diagnoses", d.diagnoses, d.diagnoses_error);
}

async function poll() {
  try {
    const response = await fetch(`${dataUrl}?since=${state.last}`, { cache: "no-store" });
    const d = await response.json();
    state.samples.push(...d.samples);
    state.samples.splice(0, Math.max(0, state.samples.length - HISTORY));
    if (d.samples.length) state.last = d.samples[d.samples.length - 1].t;
    render(d);
  } catch (err) {
    document.getElementById("updated").innerHTML = `<span class="bad">cannot reach the router: ${esc(err)}</span>`;
  }
  setTimeout(poll, 2000);
}
poll();
</script>
</body>
</html>
"""
