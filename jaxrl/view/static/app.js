// jaxrl run browser: one page, hash routes (#/runs, #/curves, #/evals, #/replays, #/play).
// Plain JS, no build step, no network beyond this server. Charts are hand-drawn SVG.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const ORES = ["iron", "copper", "cobalt", "platinum"];
const HAZARD = ["#64748b", "#eab308", "#f97316", "#ef4444"];
let timers = [];  // intervals/cleanup of the current page, cleared on every route change
let RUNS = [];

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}
const svgEl = (tag, attrs = {}) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
};

async function api(url, opts) {
  const r = await fetch(url, opts);
  let body;
  try { body = await r.json(); } catch { throw new Error(`${url}: HTTP ${r.status}`); }
  if (!r.ok || body.error) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}
const post = (url, body) => api(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
const q = (params) => new URLSearchParams(params).toString();

function showError(e) {
  const m = document.getElementById("message");
  m.hidden = false;
  m.textContent = String((e && e.message) || e);
}
function clearError() { document.getElementById("message").hidden = true; }
const fmt = (v) => typeof v === "number" ? (Number.isInteger(v) ? String(v) : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : String(+v.toPrecision(4))) : v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
const isNum = (v) => typeof v === "number" && isFinite(v);

function route() {
  const [path, query] = (location.hash.slice(1) || "/runs").split("?");
  return {page: path.replace(/^\//, "") || "runs", params: Object.fromEntries(new URLSearchParams(query || ""))};
}
function setParams(params) {  // update the hash without re-rendering the page
  const {page} = route();
  history.replaceState(null, "", `#/${page}?${q(Object.fromEntries(Object.entries(params).filter(([, v]) => v !== "" && v !== undefined)))}`);
}

async function render() {
  timers.forEach((t) => t());
  timers = [];
  clearError();
  const {page, params} = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const main = document.getElementById("main");
  main.replaceChildren();
  main.dataset.page = page;
  const pages = {runs: pageRuns, curves: pageCurves, evals: pageEvals, replays: pageReplays, play: pagePlay};
  try {
    RUNS = (await api("/api/runs")).runs;
    await (pages[page] || pageRuns)(main, params);
  } catch (e) { showError(e); }
}
window.addEventListener("hashchange", render);
window.addEventListener("load", render);
const goodRuns = () => RUNS.filter((r) => !r.error);
function runSelect(value, onchange, {blank = false} = {}) {
  const sel = h("select", {onchange: (e) => onchange(e.target.value)},
    blank ? h("option", {value: ""}, "(none)") : null,
    goodRuns().map((r) => h("option", {value: r.id, selected: r.id === value}, r.id)));
  return sel;
}

// ---- Runs ---------------------------------------------------------------------------------
const MAIN = ["loss", "ppl", "reward", "return", "sentiment", "pass@"];
function mainMetrics(last) {
  return Object.keys(last || {}).filter((k) => k !== "step" && isNum(last[k]))
    .sort((a, b) => (MAIN.some((w) => b.includes(w)) - MAIN.some((w) => a.includes(w))) || a.localeCompare(b)).slice(0, 4);
}

function runFilter(text) {
  // "loss<0.5", "eval_return_mean>=80" compare a last metric; anything else matches id/recipe/status.
  const m = text.trim().match(/^([\w@./-]+)\s*(<=|>=|<|>|==?)\s*(-?[\d.eE+-]+)$/);
  if (!m) return (r) => !text.trim() || [r.id, r.recipe, r.status].some((v) => String(v || "").includes(text.trim()));
  const [, key, op, num] = m, x = +num;
  const cmp = {"<": (a) => a < x, "<=": (a) => a <= x, ">": (a) => a > x, ">=": (a) => a >= x, "=": (a) => a === x, "==": (a) => a === x}[op];
  return (r) => isNum((r.last_metrics || {})[key]) && cmp(r.last_metrics[key]);
}

async function pageRuns(main, params) {
  const filter = h("input", {id: "run-filter", type: "search", placeholder: "filter: name, or loss<0.5", value: params.filter || "", style: "width:260px",
    onchange: (e) => { location.hash = `#/runs?${q({filter: e.target.value})}`; }});
  main.append(h("h2", {}, "Runs"), h("div", {class: "controls"}, filter));
  const table = h("table", {id: "runs-table"}, h("tr", {}, ["run", "status", "recipe", "last step", "last metrics", "notes"].map((t) => h("th", {}, t))));
  for (const r of RUNS.filter(runFilter(params.filter || ""))) {
    const last = r.last_metrics || {};
    const notes = [r.error, r.config_error, ...(r.warnings || [])].filter(Boolean);
    table.append(h("tr", {"data-run": r.id, style: "cursor:pointer", onclick: () => { location.hash = `#/runs?${q({run: r.id})}`; }},
      h("td", {}, r.id),
      h("td", {}, h("span", {class: `status ${r.status}`, title: r.why}, r.status)),
      h("td", {}, r.recipe || ""),
      h("td", {class: "num"}, last.step ?? ""),
      h("td", {}, mainMetrics(last).map((k) => `${k}=${fmt(last[k])}`).join("  ")),
      h("td", {}, notes.map((n) => h("div", {class: r.error ? "error" : "warn"}, n)))));
  }
  main.append(table);
  const r = RUNS.find((x) => x.id === params.run);
  if (!r) return;
  const sec = h("section", {id: "run-detail"}, h("h3", {}, r.id), h("div", {}, r.path, " — ", h("span", {class: `status ${r.status}`}, r.status), " ", r.why));
  if (r.error) sec.append(h("div", {class: "error"}, r.error));
  else {
    sec.append(h("p", {}, h("a", {href: `#/curves?${q({runs: r.id})}`}, "curves"), " · ", h("a", {href: `#/evals?${q({run: r.id})}`}, "evaluations"),
      r.replays.length ? [" · ", h("a", {href: `#/replays?${q({run: r.id, a: r.replays[0]})}`}, `replays (${r.replays.length})`)] : null));
    const last = r.last_metrics || {};
    sec.append(h("h4", {}, "last metrics"), kvTable(last));
    sec.append(h("h4", {}, "checkpoints"), h("div", {}, r.checkpoints.length ? r.checkpoints.join(", ") : "none"));
    sec.append(h("h4", {}, "config"), r.config_error ? h("div", {class: "error"}, r.config_error) : h("pre", {}, toYaml(r.config)));
  }
  main.append(sec);
}
function kvTable(obj) {
  return h("table", {}, Object.entries(obj).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {class: isNum(v) ? "num" : ""}, renderValue(v)))));
}
function toYaml(v, indent = "") {
  if (v === null || typeof v !== "object") return JSON.stringify(v);
  if (Array.isArray(v)) return v.every((x) => x === null || typeof x !== "object") ? JSON.stringify(v) : v.map((x) => `\n${indent}- ${toYaml(x, indent + "  ")}`).join("");
  return Object.entries(v).map(([k, x]) => (x && typeof x === "object" && !Array.isArray(x) && Object.keys(x).length) ? `${indent}${k}:\n${toYaml(x, indent + "  ")}` : `${indent}${k}: ${toYaml(x, indent + "  ")}`).join("\n");
}

// ---- Curves -------------------------------------------------------------------------------
function withTime(rows) {
  // metrics.jsonl rows carry steps_per_sec over the last logging interval; integrate it.
  let t = 0, prev = 0;
  for (const r of rows) {
    if (isNum(r.time)) t = r.time;
    else if (isNum(r.steps_per_sec) && r.steps_per_sec > 0) t += (r.step - prev) / r.steps_per_sec;
    prev = r.step;
    r._time = t;
  }
  return rows;
}
function ema(ys, weight) {  // debiased EMA, as wandb's default smoothing
  let s = 0, n = 0;
  return ys.map((y) => { s = weight * s + (1 - weight) * y; n += 1; return weight ? s / (1 - weight ** n) : y; });
}
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function drawChart(svg, series, {log = false, xlabel = "step", smooth = 0}) {
  svg.replaceChildren();
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), L = 60, R = 12, T = 10, B = 34;
  const keep = (p) => isNum(p[0]) && isNum(p[1]) && (!log || p[1] > 0);
  const all = series.flatMap((s) => s.pts.filter(keep));
  if (!all.length) {
    svg.append(Object.assign(svgEl("text", {x: W / 2 - 80, y: H / 2}), {textContent: log ? "no positive values to draw on a log scale" : "no data for this metric"}));
    return;
  }
  const fy = (y) => (log ? Math.log10(y) : y);
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => fy(p[1]))), Math.max(...all.map((p) => fy(p[1])))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), sy = (y) => T + (1 - (fy(y) - y0) / (y1 - y0)) * (H - T - B);
  const axes = svgEl("g", {class: "axes"});
  for (const tx of niceTicks(x0, x1)) {
    axes.append(svgEl("line", {x1: sx(tx), x2: sx(tx), y1: T, y2: H - B, stroke: "#eee"}));
    axes.append(Object.assign(svgEl("text", {x: sx(tx) - 12, y: H - B + 14}), {textContent: fmt(tx)}));
  }
  const yt = log ? niceTicks(Math.floor(y0), Math.ceil(y1), Math.min(6, Math.ceil(y1) - Math.floor(y0) || 1)).filter((v) => v >= y0 && v <= y1 && Number.isInteger(v)).map((e) => 10 ** e) : niceTicks(y0, y1);
  for (const ty of yt) {
    axes.append(svgEl("line", {x1: L, x2: W - R, y1: sy(ty), y2: sy(ty), stroke: "#eee"}));
    axes.append(Object.assign(svgEl("text", {x: 4, y: sy(ty) + 4}), {textContent: fmt(ty)}));
  }
  axes.append(svgEl("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#999"}));
  axes.append(Object.assign(svgEl("text", {x: W / 2, y: H - 4}), {textContent: xlabel}));
  svg.append(axes);
  const line = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
  for (const s of series) {
    const pts = s.pts.filter(keep);
    if (!pts.length) continue;
    const sm = ema(pts.map((p) => p[1]), smooth).map((y, i) => [pts[i][0], y]).filter(keep);
    svg.append(svgEl("path", {d: line(pts), class: "raw", "data-run": s.name, stroke: s.color, "stroke-opacity": smooth ? 0.25 : 1, fill: "none", "stroke-width": 1}));
    if (smooth) svg.append(svgEl("path", {d: line(sm), class: "smooth", "data-run": s.name, stroke: s.color, fill: "none", "stroke-width": 2}));
    if (pts.length < 30) for (const p of pts) svg.append(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2, fill: s.color}));
  }
}

async function pageCurves(main, params) {
  const chosen = new Set((params.runs || goodRuns().slice(0, 2).map((r) => r.id).join(",")).split(",").filter((id) => goodRuns().some((r) => r.id === id)));
  const st = {metric: params.metric || "", x: params.x || "step", smooth: params.smooth ?? "0.6", log: params.log === "1", live: params.live !== "0"};
  const data = {};  // run id -> {rows, offset, line, file_id, warnings}
  const sync = () => setParams({runs: [...chosen].join(","), metric: st.metric, x: st.x, smooth: st.smooth, log: st.log ? "1" : "0", live: st.live ? "1" : "0"});
  const metricSel = h("select", {id: "metric", onchange: (e) => { st.metric = e.target.value; sync(); redraw(); }});
  const svg = svgEl("svg", {class: "chart", id: "chart", width: 900, height: 380});
  const legend = h("div", {class: "legend"}), warns = h("div", {id: "curve-warnings"});
  const runBoxes = h("div", {class: "controls"}, "runs:", goodRuns().map((r) => h("label", {}, h("input", {type: "checkbox", "data-run": r.id, checked: chosen.has(r.id), onchange: (e) => { e.target.checked ? chosen.add(r.id) : chosen.delete(r.id); sync(); refresh(); }}), r.id)));
  const smoothVal = h("span", {id: "smooth-value"}, st.smooth);
  main.append(h("h2", {}, "Curves"), runBoxes,
    h("div", {class: "controls"},
      h("label", {}, "metric ", metricSel),
      h("label", {}, "x ", h("select", {id: "xaxis", onchange: (e) => { st.x = e.target.value; sync(); redraw(); }}, ["step", "time"].map((x) => h("option", {value: x, selected: x === st.x}, x === "time" ? "time (s)" : x)))),
      h("label", {}, "smoothing ", h("input", {id: "smoothing", type: "range", min: 0, max: 0.99, step: 0.01, value: st.smooth, oninput: (e) => { st.smooth = e.target.value; smoothVal.textContent = st.smooth; sync(); redraw(); }}), smoothVal),
      h("label", {}, h("input", {id: "logscale", type: "checkbox", checked: st.log, onchange: (e) => { st.log = e.target.checked; sync(); redraw(); }}), "log scale"),
      h("label", {}, h("input", {id: "live", type: "checkbox", checked: st.live, onchange: (e) => { st.live = e.target.checked; sync(); }}), "live refresh")),
    svg, legend, warns);

  function redraw() {
    const keys = new Set();
    for (const id of chosen) for (const r of data[id]?.rows || []) for (const [k, v] of Object.entries(r)) if (k !== "step" && !k.startsWith("_") && isNum(v)) keys.add(k);
    const sorted = [...keys].sort((a, b) => (MAIN.some((w) => b.includes(w)) - MAIN.some((w) => a.includes(w))) || a.localeCompare(b));
    if (!st.metric || !keys.has(st.metric)) st.metric = st.metric && !sorted.length ? st.metric : sorted[0] || "";
    metricSel.replaceChildren(...sorted.map((k) => h("option", {value: k, selected: k === st.metric}, k)));
    const series = [...chosen].map((id) => ({name: id, color: COLORS[goodRuns().findIndex((r) => r.id === id) % COLORS.length],
      pts: (data[id]?.rows || []).filter((r) => isNum(r[st.metric])).map((r) => [st.x === "time" ? r._time : r.step, r[st.metric]])}));
    drawChart(svg, series, {log: st.log, xlabel: st.x === "time" ? "time (s, from steps_per_sec)" : "step", smooth: +st.smooth});
    legend.replaceChildren(...series.map((s) => h("span", {"data-run": s.name}, h("span", {class: "swatch", style: `background:${s.color}`}), `${s.name} (${s.pts.length} points)`)));
    warns.replaceChildren(...[...chosen].flatMap((id) => (data[id]?.warnings || []).map((w) => h("div", {class: "warn"}, `${id}: ${w}`))));
  }
  async function refresh() {
    try {
      await Promise.all([...chosen].map(async (id) => {
        const d = data[id] || {rows: [], offset: 0, line: 0, file_id: "", warnings: []};
        const got = await api(`/api/metrics?${q({run: id, offset: d.offset, line: d.line, file_id: d.file_id})}`);
        const rows = got.reset || !d.file_id ? got.rows : d.rows.concat(got.rows);
        data[id] = {rows: withTime(rows), offset: got.offset, line: got.line, file_id: got.file_id,
                    warnings: [...new Set([...(got.reset ? [] : d.warnings), ...got.warnings])].filter((w) => got.warnings.includes(w) || !w.includes("incomplete"))};
      }));
      redraw();
    } catch (e) { showError(e); }
  }
  await refresh();
  const timer = setInterval(() => { if (st.live) refresh(); }, 2000);
  timers.push(() => clearInterval(timer));

  // Config diff: only the keys whose values differ.
  const ids = goodRuns().map((r) => r.id);
  let a = params.a || ids[0] || "", b = params.b || ids[1] || ids[0] || "";
  const out = h("div", {id: "diff"});
  const doDiff = async () => {
    try {
      const d = await api(`/api/diff?${q({a, b})}`);
      out.replaceChildren(d.rows.length ? h("table", {id: "diff-table"}, h("tr", {}, h("th", {}, "key"), h("th", {}, a), h("th", {}, b)),
        d.rows.map((r) => h("tr", {}, h("td", {}, r.key), h("td", {}, r.only === "b" ? "—" : fmt(r.a)), h("td", {}, r.only === "a" ? "—" : fmt(r.b)))))
        : h("p", {}, "the two configs are identical"));
    } catch (e) { out.replaceChildren(h("div", {class: "error"}, e.message)); }
  };
  main.append(h("h3", {}, "Config diff"), h("div", {class: "controls"}, "A ", runSelect(a, (v) => { a = v; }), " B ", runSelect(b, (v) => { b = v; }), h("button", {id: "diff-button", onclick: doDiff}, "Diff")), out);
}

// ---- Evaluations --------------------------------------------------------------------------
function renderValue(v) {
  if (v === null || typeof v !== "object") return fmt(v);
  if (Array.isArray(v)) {
    if (v.length && v.every((x) => x && typeof x === "object" && !Array.isArray(x))) return rowsTable(v);
    return v.length > 20 ? `[${v.slice(0, 20).map(fmt).join(", ")}, … ${v.length} items]` : `[${v.map(fmt).join(", ")}]`;
  }
  const vals = Object.values(v);
  if (vals.length && vals.every((x) => x && typeof x === "object" && !Array.isArray(x) && Object.values(x).every((y) => y === null || typeof y !== "object"))) {
    const cols = [...new Set(vals.flatMap(Object.keys))];  // e.g. policy x {mean, median, std}
    return h("table", {class: "matrix"}, h("tr", {}, h("th", {}, ""), cols.map((c) => h("th", {}, c))),
      Object.entries(v).map(([k, row]) => h("tr", {}, h("th", {}, k), cols.map((c) => h("td", {class: isNum(row[c]) ? "num" : ""}, fmt(row[c]))))));
  }
  return kvTable(v);
}
function rowsTable(rows, cellClass) {
  const cols = [...new Set(rows.flatMap(Object.keys))];
  return h("table", {}, h("tr", {}, cols.map((c) => h("th", {}, c))),
    rows.map((r) => h("tr", {}, cols.map((c) => h("td", {class: cellClass ? cellClass(r[c]) : isNum(r[c]) ? "num" : ""}, typeof r[c] === "string" ? r[c] : renderValue(r[c]))))));
}

async function pageEvals(main, params) {
  const run = params.run || goodRuns()[0]?.id;
  main.append(h("h2", {}, "Evaluations"), h("div", {class: "controls"}, "run ", runSelect(run, (v) => { location.hash = `#/evals?${q({run: v})}`; })));
  if (!run) return main.append(h("p", {}, "no readable run"));
  const {files} = await api(`/api/evals?${q({run})}`);
  if (!files.length) main.append(h("p", {}, "no result.json or other evaluation JSON in this run"));
  for (const f of files) main.append(h("section", {class: "eval-file", "data-path": f.path}, h("h3", {}, f.path), f.error ? h("div", {class: "error"}, f.error) : renderValue(f.data)));

  const box = h("input", {id: "sample-search", type: "search", placeholder: "search samples", value: params.q || ""});
  const out = h("div", {id: "samples"}), pager = h("span");
  let offset = 0;
  const LIMIT = 25;
  async function search() {
    try {
      const got = await api(`/api/samples?${q({run, q: box.value, offset, limit: LIMIT})}`);
      setParams({run, q: box.value});
      out.replaceChildren(h("div", {id: "sample-count"}, `${got.total} matching rows`), ...got.warnings.map((w) => h("div", {class: "warn"}, w)),
        got.rows.length ? rowsTable(got.rows, (v) => typeof v === "string" && v.length > 40 ? "sample" : isNum(v) ? "num" : "") : "");
      pager.replaceChildren(h("button", {disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - LIMIT); search(); }}, "‹ prev"),
        ` ${got.total ? offset + 1 : 0}–${Math.min(offset + LIMIT, got.total)} `,
        h("button", {disabled: offset + LIMIT >= got.total, onclick: () => { offset += LIMIT; search(); }}, "next ›"));
    } catch (e) { out.replaceChildren(h("div", {class: "error"}, e.message)); }
  }
  let debounce;
  box.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(() => { offset = 0; search(); }, 250); });
  main.append(h("h3", {}, "samples.jsonl"), h("div", {class: "controls"}, box, pager), out);
  await search();
}

// ---- Prospector replays -------------------------------------------------------------------
class ReplaySource {
  // Frames come in pages: the first over HTTP, the rest over a websocket (HTTP if it is down);
  // only a few pages around the cursor are kept, so a long replay never loads whole.
  constructor(run, path, pageSize) { Object.assign(this, {run, path, ps: pageSize, pages: new Map(), pending: new Map(), wsPages: 0, httpPages: 0}); }
  async open() {
    const first = await api(`/api/replay?${q({run: this.run, path: this.path, start: 0, count: this.ps})}`);
    this.header = first.header; this.total = first.total;
    this.pages.set(0, first.frames); this.httpPages += 1;
    await new Promise((resolve) => {
      this.ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/replay?${q({run: this.run, path: this.path})}`);
      this.ws.onopen = resolve;
      this.ws.onerror = () => { this.ws = null; resolve(); };
      this.ws.onmessage = (ev) => {
        const msg = JSON.parse(ev.data);
        if (msg.error) { showError(msg.error); return; }
        const p = Math.floor(msg.start / this.ps);
        this.pages.set(p, msg.frames); this.wsPages += 1;
        this.pending.get(p)?.resolve(); this.pending.delete(p);
      };
    });
    return this;
  }
  load(p) {
    if (this.pages.has(p)) return Promise.resolve();
    if (this.pending.has(p)) return this.pending.get(p).promise;
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    this.pending.set(p, {promise, resolve});
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({start: p * this.ps, count: this.ps}));
    else api(`/api/replay?${q({run: this.run, path: this.path, start: p * this.ps, count: this.ps})}`)
      .then((got) => { this.pages.set(p, got.frames); this.httpPages += 1; resolve(); this.pending.delete(p); })
      .catch((e) => { showError(e); resolve(); this.pending.delete(p); });
    return promise;
  }
  async frame(i) {
    const p = Math.floor(i / this.ps);
    await this.load(p);
    if ((i % this.ps) > this.ps / 2 && (p + 1) * this.ps < this.total) this.load(p + 1);  // prefetch
    for (const k of this.pages.keys()) if (Math.abs(k - p) > 3) this.pages.delete(k);  // keep a window
    return (this.pages.get(p) || [])[i - p * this.ps];
  }
  close() { if (this.ws) this.ws.close(); }
}

function drawFrame(canvas, f, title) {
  const c = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  c.fillStyle = "#0b1020"; c.fillRect(0, 0, W, H);
  c.font = "12px system-ui, sans-serif";
  c.fillStyle = "#e2e8f0";
  if (!f) { c.fillText("no frame", 10, 20); return; }
  const ship = f.ship, sec = f.sector;
  c.fillText(`${title || ""}  t=${f.t ?? 0}  ${f.action_name || ""}`, 10, 18);
  c.fillStyle = f.reward > 0 ? "#4ade80" : f.reward < 0 ? "#f87171" : "#94a3b8";
  c.fillText(`reward ${fmt(f.reward ?? 0)}${f.valid === false ? "  INVALID" : ""}${f.terminated ? "  DESTROYED" : f.truncated ? "  TIME UP" : ""}`, 10, 34);
  // The belt: 12 sectors on a ring, stations at 0, 4, 8.
  const cx = 120, cy = 150, rad = 85;
  c.strokeStyle = "#334155"; c.beginPath(); c.arc(cx, cy, rad, 0, 2 * Math.PI); c.stroke();
  for (let k = 0; k < 12; k++) {
    const a = -Math.PI / 2 + (k * Math.PI) / 6, x = cx + rad * Math.cos(a), y = cy + rad * Math.sin(a);
    c.fillStyle = k === ship.sector ? HAZARD[sec.hazard] : "#1e293b";
    c.strokeStyle = "#94a3b8";
    if (k % 4 === 0) { c.fillRect(x - 11, y - 11, 22, 22); c.strokeRect(x - 11, y - 11, 22, 22); }
    else { c.beginPath(); c.arc(x, y, 11, 0, 2 * Math.PI); c.fill(); c.stroke(); }
    c.fillStyle = "#e2e8f0"; c.fillText(k % 4 === 0 ? `S${k}` : String(k), x - 7, y + 4);
    if (k === ship.sector) {  // the ship, just inside the ring
      const sx = cx + (rad - 26) * Math.cos(a), sy = cy + (rad - 26) * Math.sin(a);
      c.fillStyle = "#f8fafc"; c.beginPath();
      c.moveTo(sx + 9 * Math.cos(a), sy + 9 * Math.sin(a));
      c.lineTo(sx + 7 * Math.cos(a + 2.4), sy + 7 * Math.sin(a + 2.4));
      c.lineTo(sx + 7 * Math.cos(a - 2.4), sy + 7 * Math.sin(a - 2.4)); c.fill();
    }
  }
  // The current sector's asteroids: size ~ units left, cyan when richness is known.
  c.fillStyle = "#e2e8f0";
  c.fillText(`sector ${sec.index}  hazard ${sec.hazard}${sec.scanned ? "  scanned" : ""}`, 250, 60);
  sec.asteroids_left.forEach((u, i) => {
    const x = 270 + (i % 4) * 55, y = 95 + Math.floor(i / 4) * 60, r = u > 0 ? 5 + u / 3.5 : 3;
    c.fillStyle = u === 0 ? "#334155" : sec.asteroids_known[i] ? "#22d3ee" : "#a8a29e";
    c.beginPath(); c.arc(x, y, r, 0, 2 * Math.PI); c.fill();
    c.fillStyle = "#e2e8f0"; c.fillText(`${i}:${u}`, x - 10, y + 26);
  });
  // Gauges and prices.
  const cargo = ship.cargo.reduce((a, b) => a + b, 0);
  [["fuel", ship.fuel, 60, "#facc15"], ["hull", ship.hull, 100, "#f87171"], ["cargo", cargo, ship.capacity, "#60a5fa"]].forEach(([name, v, max, col], i) => {
    const y = 258 + i * 16;
    c.fillStyle = "#e2e8f0"; c.fillText(name, 10, y + 9);
    c.fillStyle = "#1e293b"; c.fillRect(50, y, 120, 10);
    c.fillStyle = col; c.fillRect(50, y, 120 * Math.max(0, Math.min(1, v / max)), 10);
    c.fillStyle = "#e2e8f0"; c.fillText(`${v}/${max}`, 176, y + 9);
  });
  c.fillText(`credits ${ship.credits}   cargo ${ship.cargo.map((u, j) => `${ORES[j][0]}${u}`).join(" ")}`, 250, 230);
  c.fillText("prices  " + ORES.map((o) => o.slice(0, 4).padEnd(6)).join(""), 250, 252);
  (f.prices || []).forEach((row, s) => c.fillText(`S${s * 4}`.padEnd(8) + row.map((p) => String(p).padEnd(7)).join(""), 250, 268 + s * 15));
}

async function pageReplays(main, params) {
  const withReplays = goodRuns().filter((r) => r.replays.length);
  const run = params.run || withReplays[0]?.id;
  main.append(h("h2", {}, "Prospector replays"));
  const info = RUNS.find((r) => r.id === run);
  if (!info || info.error) return main.append(h("p", {}, withReplays.length ? "choose a run" : "no run has replays (eval_prospector with replay_episodes=N, the PPO recipe, or a saved human game writes them)"));
  const a = params.a || info.replays[0], b = params.b || "";
  const ps = Math.max(1, Math.min(1000, +params.page || 100));
  const go = (p) => { location.hash = `#/replays?${q(Object.fromEntries(Object.entries({run, a, b, page: params.page, ...p}).filter(([, v]) => v)))}`; };
  const pick = (value, key, blank) => h("select", {id: `replay-${key}`, onchange: (e) => go({[key]: e.target.value})}, blank ? h("option", {value: ""}, "(none)") : null, info.replays.map((p) => h("option", {value: p, selected: p === value}, p)));
  main.append(h("div", {class: "controls"}, "run ", runSelect(run, (v) => { location.hash = `#/replays?${q({run: v})}`; }), " replay ", pick(a, "a"), " compare with ", pick(b, "b", true)));
  const sources = [];
  try {
    for (const p of [a, b].filter(Boolean)) sources.push(await new ReplaySource(run, p, ps).open());
  } catch (e) { sources.forEach((s) => s.close()); throw e; }
  timers.push(() => sources.forEach((s) => s.close()));
  const total = Math.max(...sources.map((s) => s.total));
  const canvases = sources.map(() => h("canvas", {width: 520, height: 320}));
  const labels = sources.map(() => h("div", {class: "frame-info"}));
  const player = h("div", {id: "player", "data-total": total, "data-index": 0, "data-state": "paused"});
  const scrub = h("input", {id: "scrub", type: "range", min: 0, max: Math.max(0, total - 1), value: 0, style: "width:400px", oninput: (e) => show(+e.target.value)});
  const speed = h("select", {id: "speed"}, [1, 2, 5, 10, 20, 50, 200].map((s) => h("option", {value: s, selected: s === 10}, `${s} steps/s`)));
  const playBtn = h("button", {id: "play", onclick: () => (playing ? pause() : play())}, "▶ play");
  const pos = h("span", {id: "position"});
  let i = 0, playing = false, timer = null, busy = false;
  async function show(k) {
    i = Math.max(0, Math.min(total - 1, k));
    scrub.value = i; player.dataset.index = i; pos.textContent = `step ${i + 1} / ${total}`;
    const frames = await Promise.all(sources.map((s) => s.frame(Math.min(i, s.total - 1))));
    frames.forEach((f, n) => {
      const s = sources[n];
      drawFrame(canvases[n], f, s.header.policy);
      labels[n].textContent = f ? `episode ${f.episode}  t=${f.t}  action ${f.action} (${f.action_name})  reward ${fmt(f.reward)}  credits ${f.ship.credits}${i >= s.total ? "  (ended)" : ""}` : "";
    });
    player.dataset.ws = sources.map((s) => s.wsPages).join(",");
  }
  function pause(state = "paused") { playing = false; clearTimeout(timer); playBtn.textContent = "▶ play"; player.dataset.state = state; }
  function play() {
    if (i >= total - 1) i = -1;
    playing = true; playBtn.textContent = "⏸ pause"; player.dataset.state = "playing";
    const tick = async () => {
      if (!playing) return;
      if (busy) { timer = setTimeout(tick, 5); return; }
      busy = true;
      await show(i + 1);
      busy = false;
      if (i >= total - 1) pause("ended");
      else timer = setTimeout(tick, 1000 / +speed.value);
    };
    tick();
  }
  timers.push(() => pause());
  player.append(h("div", {class: "controls"},
      h("button", {id: "first", onclick: () => { pause(); show(0); }}, "« start"),
      h("button", {id: "back", onclick: () => { pause(); show(i - 1); }}, "◀ step"), playBtn,
      h("button", {id: "forward", onclick: () => { pause(); show(i + 1); }}, "step ▶"), scrub, speed, pos),
    h("div", {class: "players"}, sources.map((s, n) => h("div", {class: "player"},
      h("div", {}, h("b", {}, s.path), `  policy ${s.header.policy || "?"}, seed ${s.header.seed}, ${s.header.episodes} episode(s), ${s.total} steps`),
      canvases[n], labels[n]))));
  main.append(player);
  await show(0);
}

// ---- Human play ---------------------------------------------------------------------------
function actionLabel(a) {
  if (a === 0) return "wait";
  if (a < 13) return `warp ${a - 1}`;
  if (a < 25) return `scan ${a - 13}`;
  if (a < 57) return `mine ${Math.floor((a - 25) / 4)} p${(a - 25) % 4}`;
  if (a < 61) return `sell ${ORES[a - 57]}`;
  if (a < 65) return `jettison ${ORES[a - 61]}`;
  return ["sell all", "refuel", "repair", "upgrade cargo"][a - 65];
}

async function pagePlay(main, params) {
  const {bots} = await api("/api/play/bots");
  const seed = h("input", {id: "seed", type: "number", value: params.seed || 0, style: "width:80px"});
  const maxSteps = h("input", {id: "max-steps", type: "number", value: params.max_steps || 200, style: "width:80px"});
  const canvas = h("canvas", {id: "play-canvas", width: 520, height: 320});
  const status = h("div", {id: "play-status"});
  const buttons = [];
  const group = (name, from, to, label) => h("div", {class: "group"}, h("b", {}, name),
    Array.from({length: to - from}, (_, k) => { const a = from + k; const b = h("button", {"data-action": a, title: actionLabel(a), onclick: () => act(a)}, label(a)); buttons[a] = b; return b; }));
  const pad = h("div", {class: "actions", id: "actions"},
    group("", 0, 1, () => "wait (w)"),
    group("warp to", 1, 13, (a) => a - 1), group("scan", 13, 25, (a) => a - 13),
    ...Array.from({length: 8}, (_, n) => group(`mine ${n}`, 25 + n * 4, 29 + n * 4, (a) => `p${(a - 25) % 4}`)),
    group("sell", 57, 61, (a) => ORES[a - 57]), group("jettison", 61, 65, (a) => ORES[a - 61]),
    group("station", 65, 69, (a) => ["sell all (x)", "refuel (f)", "repair (r)", "upgrade (u)"][a - 65]));
  const saveRun = runSelect(params.run || goodRuns()[0]?.id, () => {});
  saveRun.id = "save-run";
  const botSel = h("select", {id: "save-bot"}, h("option", {value: ""}, "(no bot)"), bots.map((b) => h("option", {value: b, selected: b === "market_timer"}, b)));
  const saved = h("div", {id: "saved"});
  let game = null, queue = Promise.resolve();
  function update(g) {
    game = {...g, sid: g.sid || game.sid};  // only a new game's answer carries its sid
    drawFrame(canvas, g.frame, "you");
    status.dataset.steps = g.steps;
    status.dataset.done = g.done;
    status.textContent = `seed ${g.seed} · step ${g.steps}/${g.max_steps} · return ${fmt(g.total)}${g.done ? " · episode over: save it or start again" : ""}`;
    g.mask.forEach((ok, a) => { buttons[a].disabled = !ok || g.done; });
  }
  async function start() {
    try { saved.replaceChildren(); update(await post("/api/play/new", {seed: +seed.value, max_steps: +maxSteps.value})); }
    catch (e) { showError(e); }
  }
  function act(choose) {  // an action, or a function of the game as it is when its turn comes
    queue = queue.then(async () => {
      if (!game || game.done) return;
      const a = typeof choose === "function" ? choose(game) : choose;
      if (!game.mask[a]) { status.textContent = `${actionLabel(a)} is not valid now`; return; }
      try { update(await post(`/api/play/${game.sid}/step`, {action: a})); } catch (e) { showError(e); }
    });
    return queue;
  }
  const keys = {w: 0, x: 65, f: 66, r: 67, u: 68};
  const onKey = (e) => {
    if (!game || e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    const here = (g) => g.frame.ship.sector;  // read when the queued step runs, not now
    let a = keys[e.key];
    if (e.key === "ArrowRight") a = (g) => 1 + ((here(g) + 1) % 12);
    if (e.key === "ArrowLeft") a = (g) => 1 + ((here(g) + 11) % 12);
    if (e.key === "s") a = (g) => 13 + here(g);
    if (/^[1-8]$/.test(e.key)) a = 25 + (+e.key - 1) * 4 + 1;  // mine asteroid n at power 1
    if (a !== undefined) { e.preventDefault(); act(a); }
  };
  document.addEventListener("keydown", onKey);
  timers.push(() => document.removeEventListener("keydown", onKey));
  async function save() {
    await queue;
    if (!game) return;
    try {
      const got = await post(`/api/play/${game.sid}/save`, {run: saveRun.value, bot: botSel.value});
      const link = `#/replays?${q({run: got.run, a: got.replay, ...(got.bot ? {b: got.bot.replay} : {})})}`;
      saved.replaceChildren(h("p", {}, `saved ${got.steps} steps to ${got.run}/${got.replay}: return ${fmt(got.return)}`),
        got.bot ? h("p", {}, `${got.bot.name} on the same seed: ${fmt(got.bot.return_same_steps)} over the first ${got.steps} steps, ${fmt(got.bot.return)} over its whole episode (${got.bot.steps} steps)`) : null,
        h("a", {href: link, id: "watch-link"}, got.bot ? "watch both side by side" : "watch the replay"));
    } catch (e) { showError(e); }
  }
  main.append(h("h2", {}, "Human play"),
    h("div", {class: "controls"}, h("label", {}, "seed ", seed), h("label", {}, "max steps ", maxSteps), h("button", {id: "new-game", onclick: start}, "new game")),
    h("p", {}, "keys: w wait · ← → warp to the next sector · s scan here · 1–8 mine asteroid at power 1 · x sell all · f refuel · r repair · u upgrade"),
    h("div", {class: "players"}, h("div", {}, canvas, status), pad),
    h("div", {class: "controls"}, "save to run ", saveRun, " compare with ", botSel, h("button", {id: "save", onclick: save}, "save replay")), saved);
  await start();
}
