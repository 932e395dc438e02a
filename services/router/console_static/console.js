// pdserve operator console: polls the router's /console/api every POLL_MS and draws the
// cluster, the load charts, the recent requests and one request's waterfall. Read-only, no
// dependencies; every value from the server is inserted as text (never as HTML).
"use strict";

const POLL_MS = 2000;
const KEY_STORE = "pdserve.apiKey";
const ROLE_ORDER = ["router", "prefill", "decode", "kvstore"];
const state = { key: sessionStorage.getItem(KEY_STORE) || "", openId: null, timer: null };

// ---- small helpers ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") for (const [p, x] of Object.entries(v)) el.style.setProperty(p, String(x));
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const pct = (r) => (r === null || r === undefined ? "–" : `${(100 * r).toFixed(1)}%`);

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function clock(unixMs) {
  return new Date(unixMs).toLocaleTimeString([], { hour12: false });
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind || ""}`;
}

// ---- the API ----

class AuthNeeded extends Error {}

async function api(path) {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  const reply = await fetch(`/console/api/${path}`, { headers, cache: "no-store" });
  if (reply.status === 401) throw new AuthNeeded("the API key was refused");
  if (!reply.ok) {
    const body = await reply.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `${path}: HTTP ${reply.status}`);
  }
  return reply.json();
}

// ---- header ----

function renderOverview(o) {
  const items = [
    ["model", o.model], ["cluster", o.cluster_name],
    ["in flight", `${o.num_inflight} / ${o.max_inflight_requests}`],
    ["prefill", o.prefill_workers], ["decode", o.decode_workers],
    ["disagg ≥", `${o.disagg_threshold_tokens} tok`],
    ["redis", o.redis_ok ? "ok" : "down"], ["traces", o.trace_source],
  ];
  $("overview").replaceChildren(
    ...items.map(([k, v]) => h("span", { class: "kv" }, h("span", { class: "dim" }, k), " ", v)),
  );
  state.jaegerUrl = o.jaeger_url;
}

// ---- cluster ----

function meter(label, ratio, detail) {
  const width = ratio === null || ratio === undefined ? 0 : Math.min(100, Math.max(0, 100 * ratio));
  const level = width > 90 ? "hot" : width > 70 ? "warm" : "";
  return h("div", { class: "meter-row" },
    h("span", { class: "meter-label" }, label),
    h("span", { class: "meter", role: "meter", "aria-valuenow": width.toFixed(0),
                "aria-valuemin": 0, "aria-valuemax": 100, "aria-label": label },
      h("span", { class: `meter-fill ${level}`, style: { width: `${width}%` } })),
    h("span", { class: "meter-value" }, detail));
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("span", { class: "dim" }, label), h("b", {}, value));
}

function workerCard(w) {
  const body = [];
  if (w.role === "prefill" || w.role === "decode") {
    body.push(h("div", { class: "stats" },
      stat("running", w.running), stat("waiting", w.waiting),
      stat("step", w.step_ms === null || w.step_ms === undefined ? "–" : `${fmt(w.step_ms)} ms`),
      w.role === "decode" ? stat("cached blocks", w.num_cached_blocks ?? "–") : null));
    body.push(meter("KV pool", w.kv_used_ratio, `${pct(w.kv_used_ratio)} of ${w.num_kv_blocks} blocks`));
  } else if (w.role === "kvstore") {
    for (const t of w.tiers) {
      body.push(meter(t.tier, t.used_ratio, `${pct(t.used_ratio)} of ${bytes(t.capacity_bytes)}`));
    }
    const evicted = w.tiers.map((t) => `${t.tier} ${t.num_evicted ?? "–"}`).join(" · ");
    body.push(h("div", { class: "stats" },
      stat("hit rate", pct(w.hit_rate)),
      stat("hits / misses", `${w.num_hits ?? "–"} / ${w.num_misses ?? "–"}`),
      stat("evicted from tier", evicted)));
  } else if (w.role === "router") {
    body.push(h("div", { class: "stats" }, stat("in flight", w.running)));
  }
  return h("article", { class: `card role-${w.role}`, "data-testid": "worker",
                        "data-role": w.role, "data-worker-id": w.worker_id },
    h("div", { class: "card-head" },
      h("span", { class: `badge role-${w.role}` }, w.role),
      h("span", { class: `dot ${w.state}`, title: `heartbeat ${fmt(w.heartbeat_age_s)} s ago` }),
      h("span", { class: "dim" }, w.state)),
    h("div", { class: "worker-id", title: w.worker_id }, w.worker_id),
    h("div", { class: "dim small" }, `node ${w.node_id} · ${w.address}`),
    ...body);
}

function renderCluster(c) {
  const workers = [...c.workers].sort(
    (a, b) => ROLE_ORDER.indexOf(a.role) - ROLE_ORDER.indexOf(b.role));
  $("cluster").replaceChildren(...(workers.length
    ? workers.map(workerCard)
    : [h("p", { class: "dim" }, c.redis_ok ? "No worker registered." : "Redis is unreachable.")]));
}

// ---- load ----

function chart(title, series, unit, buckets) {
  const W = 320, H = 120, PAD = 26;
  const values = series.flatMap((s) => buckets.map((b) => s.get(b))).filter((v) => v !== null);
  const max = Math.max(1e-9, ...values) * 1.1;
  const x = (i) => PAD + (i / Math.max(1, buckets.length - 1)) * (W - PAD - 6);
  const y = (v) => H - 18 - (v / max) * (H - 30);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  add("line", { x1: PAD, y1: H - 18, x2: W - 6, y2: H - 18, class: "axis" });
  add("text", { x: 2, y: 12, class: "tick" }, `${fmt(max / 1.1, max < 10 ? 1 : 0)}`);
  add("text", { x: 2, y: H - 20, class: "tick" }, "0");
  add("text", { x: PAD, y: H - 4, class: "tick" }, `-${Math.round(buckets.length * state.bucketS / 60)} min`);
  add("text", { x: W - 30, y: H - 4, class: "tick" }, "now");
  series.forEach((s, k) => {
    let d = "";
    buckets.forEach((b, i) => {
      const v = s.get(b);
      if (v === null) return;
      d += `${d ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      add("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 1.8, class: `pt s${k}` });
    });
    if (d) add("path", { d, class: `line s${k}` });
  });
  const legend = h("div", { class: "legend" }, ...series.map((s, k) =>
    h("span", { class: `key s${k}` }, s.label)));
  return h("figure", { class: "chart" }, h("figcaption", {}, `${title} (${unit})`), svg, legend);
}

function renderLoad(l) {
  state.bucketS = l.bucket_s;
  $("load-window").textContent = `(last ${Math.round(l.window_s / 60)} min, ${l.bucket_s} s buckets)`;
  const o = l.overall;
  $("load-summary").replaceChildren(
    stat("requests", o.requests), stat("errors", o.errors),
    stat("tokens/s", fmt(o.tokens_per_s, 2)),
    stat("TTFT p50 / p99", `${fmt(o.ttft_ms.p50)} / ${fmt(o.ttft_ms.p99)} ms`),
    stat("ITL p50 / p99", `${fmt(o.itl_ms.p50)} / ${fmt(o.itl_ms.p99)} ms`));
  const b = l.buckets;
  $("charts").replaceChildren(
    chart("TTFT", [
      { label: "p50", get: (x) => x.ttft_ms.p50 }, { label: "p99", get: (x) => x.ttft_ms.p99 },
    ], "ms", b),
    chart("ITL (mean per request)", [
      { label: "p50", get: (x) => x.itl_ms.p50 }, { label: "p99", get: (x) => x.itl_ms.p99 },
    ], "ms", b),
    chart("Throughput", [{ label: "output tokens/s", get: (x) => x.tokens_per_s }], "tokens/s", b));
}

// ---- requests ----

function routeBadge(route) {
  return h("span", { class: `badge route-${route}` }, route);
}

function renderRequests(r) {
  const rows = r.requests.map((q) => h("tr", {
      class: q.request_id === state.openId ? "open" : null, tabindex: 0,
      "data-testid": "request-row", "data-request-id": q.request_id, "data-route": q.route,
      onclick: () => openRequest(q.request_id),
      onkeydown: (e) => { if (e.key === "Enter") openRequest(q.request_id); },
    },
    h("td", {}, clock(q.started_unix_ms + q.e2e_ms)),
    h("td", { class: "mono", title: q.request_id }, q.request_id),
    h("td", {}, routeBadge(q.route)),
    h("td", { class: "num" }, fmt(q.ttft_ms)), h("td", { class: "num" }, fmt(q.itl_ms)),
    h("td", { class: "num" }, fmt(q.e2e_ms)), h("td", { class: "num" }, q.num_prompt_tokens ?? "–"),
    h("td", { class: "num" }, q.num_output_tokens),
    h("td", { class: q.finish_reason === "error" ? "error" : "" }, q.finish_reason)));
  $("requests").tBodies[0].replaceChildren(...rows);
  const shown = rows.length < r.num_held ? `the newest ${rows.length} of ${r.num_held}` : `${rows.length}`;
  $("requests-count").textContent = `(${shown}, newest first; click one for its trace)`;
  $("no-requests").hidden = rows.length > 0;
}

// ---- one request ----

function openRequest(id) {
  if (location.hash !== `#request=${encodeURIComponent(id)}`) {
    location.hash = `request=${encodeURIComponent(id)}`;
    return; // the hashchange handler calls back
  }
  state.openId = id;
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  refreshDetail().then(() => $("detail").scrollIntoView({ block: "start" }));
}

function closeRequest() {
  state.openId = null;
  $("detail").hidden = true;
  history.replaceState(null, "", location.pathname);
}

function renderRoute(route, request) {
  if (!route) return [h("p", { class: "dim" }, "No routing decision recorded.")];
  const scores = Object.entries(route.scores || {}).flatMap(([role, byWorker]) =>
    Object.entries(byWorker).map(([w, s]) => h("li", {}, `${role} ${w}: ${fmt(s, 3)}`)));
  return [
    h("div", { class: "route-line" }, routeBadge(route.decision),
      route.prefill_worker ? ` prefill ${route.prefill_worker} → decode ${route.decode_worker}`
                           : ` decode ${route.decode_worker} prefilled locally`),
    h("p", { "data-testid": "route-reason" },
      h("span", { class: "dim" }, route.decision === "disaggregated" ? "why disaggregated: " : "why local: "),
      route.reason || "–",
      route.attempts > 1 ? ` (${route.attempts} routing attempts)` : ""),
    request.error ? h("p", { class: "error" }, request.error) : null,
    scores.length ? h("details", {}, h("summary", {}, "candidate scores"), h("ul", {}, scores)) : null,
  ];
}

function waterfallRow(row, totalNs, hops) {
  const hue = (hops.indexOf(row.hop) * 67 + 200) % 360;
  const left = row.start_ns === null ? 0 : (100 * row.start_ns) / totalNs;
  const width = row.kind === "span" ? Math.max(0.4, (100 * (row.duration_ns || 0)) / totalNs) : 0;
  const bar = row.kind === "link" ? "" : h("span", {
    class: row.kind === "event" ? "wf-mark" : "wf-bar",
    style: { left: `${left.toFixed(3)}%`, width: `${width.toFixed(3)}%`, "--hue": hue },
  });
  const label = row.kind === "event" ? `• ${row.name}` : row.kind === "link" ? `↳ ${row.name}` : row.name;
  const title = Object.entries(row.attributes || {}).map(([k, v]) => `${k} = ${v}`).join("\n");
  return h("div", {
      class: `wf-row kind-${row.kind}`, "data-testid": "wf-row", "data-kind": row.kind,
      "data-name": row.name, "data-hop": row.hop,
      "data-bytes": row.kv_bytes === null ? null : row.kv_bytes,
    },
    h("span", { class: "wf-hop", style: { "--hue": hue } }, row.kind === "span" ? row.hop : ""),
    h("span", { class: "wf-name", style: { "padding-left": `${row.depth * 0.9}em` }, title: title || null },
      label),
    h("span", { class: "wf-num" }, row.start_ns === null ? "" : fmt(row.start_ns / 1e6)),
    h("span", { class: "wf-num" }, row.duration_ns === null ? "" : fmt(row.duration_ns / 1e6)),
    h("span", { class: "wf-track" }, bar),
    h("span", { class: "wf-num", title: row.kv_bytes === null ? null : `${row.kv_bytes} bytes` }, row.bytes_text),
    h("span", { class: "wf-tier" }, row.tier),
    h("span", { class: row.status === "ERROR" ? "wf-status error" : "wf-status" }, row.status));
}

function renderDetail(d) {
  const q = d.request, w = d.waterfall;
  const jaeger = state.jaegerUrl
    ? h("a", { href: `${state.jaegerUrl.replace(/\/$/, "")}/trace/${q.trace_id}`, target: "_blank",
               rel: "noopener" }, "open in Jaeger")
    : null;
  $("detail-meta").replaceChildren(
    stat("trace", q.trace_id), stat("TTFT", `${fmt(q.ttft_ms)} ms`), stat("e2e", `${fmt(q.e2e_ms)} ms`),
    stat("tokens", `${q.num_prompt_tokens ?? "–"} → ${q.num_output_tokens}`),
    ...[stat("finish", q.finish_reason), stat("hops", w.hops.join(", ")), jaeger].filter(Boolean));
  $("route").replaceChildren(...renderRoute(d.route, q).filter(Boolean));
  const head = h("div", { class: "wf-row wf-head" },
    ...["hop", "span", "start ms", "dur ms", "timeline", "bytes", "tier", "status"].map(
      (c) => h("span", {}, c)));
  $("waterfall").replaceChildren(head, ...w.rows.map((r) => waterfallRow(r, w.total_ns, w.hops)),
    h("p", { class: "dim small" }, `${w.num_spans} spans, ${fmt(w.total_ns / 1e6)} ms in all`));
}

async function refreshDetail() {
  if (!state.openId) return;
  const id = state.openId;
  try {
    const d = await api(`requests/${encodeURIComponent(id)}`);
    if (state.openId === id) renderDetail(d);
  } catch (e) {
    if (e instanceof AuthNeeded) throw e;
    $("waterfall").replaceChildren(h("p", { class: "error" }, e.message));
  }
}

// ---- polling and the key ----

async function refresh() {
  try {
    const [o, c, r, l] = await Promise.all(
      [api("overview"), api("cluster"), api("requests"), api("load")]);
    renderOverview(o);
    renderCluster(c);
    renderRequests(r);
    renderLoad(l);
    await refreshDetail();
    setStatus(`live · ${clock(Date.now())}`, "ok");
  } catch (e) {
    if (e instanceof AuthNeeded) return askForKey(state.key ? "That key was refused." : "");
    setStatus(`cannot reach the router: ${e.message}`, "bad");
  }
  state.timer = setTimeout(refresh, POLL_MS);
}

function askForKey(message) {
  clearTimeout(state.timer);
  $("main").hidden = true;
  $("key-form").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message;
  setStatus("API key needed", "bad");
  $("key-input").focus();
}

async function start() {
  const auth = await fetch("/console/api/auth", {
    headers: state.key ? { Authorization: `Bearer ${state.key}` } : {}, cache: "no-store",
  }).then((r) => r.json());
  $("forget-key").hidden = !auth.key_required;
  if (auth.key_required && !auth.key_ok) return askForKey(state.key ? "That key was refused." : "");
  $("key-form").hidden = true;
  $("main").hidden = false;
  onHash();
  refresh();
}

function onHash() {
  const m = location.hash.match(/^#request=(.+)$/);
  if (m) openRequest(decodeURIComponent(m[1]));
  else if (state.openId) closeRequest();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    start();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    state.key = "";
    askForKey("");
  });
  $("detail-close").addEventListener("click", closeRequest);
  window.addEventListener("hashchange", onHash);
  start().catch((e) => setStatus(`cannot reach the router: ${e.message}`, "bad"));
});
