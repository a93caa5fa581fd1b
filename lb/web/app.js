// The LB's live page: the state the admin port streams on /events, drawn as tables.
// Every value from outside (names, addresses, reasons, config) goes in as text, never as
// HTML: elements are made with createElement and filled with textContent.
"use strict";

const BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, Infinity];
const KEEP = 600; // samples per endpoint: 5 minutes at one state every 0.5 s
const RATE_WINDOW = 4; // samples (2 s) for requests/s and 5xx/s
const LATENCY_WINDOW = 20; // samples (10 s) for p50 and p99
const STRIP = 60; // samples in the health and ejection strip

const history = new Map(); // "cluster endpoint" -> [{t, requests, r5xx, buckets, bad}]
let source = null;
let broken = false;
let clusterNames = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "width") node.style.width = v; // CSSOM: allowed by the page's CSP
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function ago(wall, now) {
  if (wall === null || wall === undefined) return "never";
  const s = Math.max(0, now - wall);
  return s < 1 ? "just now" : `${s.toFixed(0)} s ago`;
}

function ms(seconds) {
  if (seconds === null) return "–";
  if (seconds === Infinity) return "> 10 s";
  return seconds < 0.01 ? `≤ ${(seconds * 1000).toFixed(1)} ms` : `≤ ${(seconds * 1000).toFixed(0)} ms`;
}

function quantile(older, newer, q) {
  if (!older || !newer) return null;
  const d = newer.map((n, i) => n - (older[i] || 0));
  const total = d.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  let seen = 0;
  for (let i = 0; i < d.length; i++) {
    seen += d[i];
    if (seen >= q * total) return BOUNDS[i];
  }
  return Infinity;
}

function record(cluster, ep, now) {
  const key = `${cluster} ${ep.address}`;
  let h = history.get(key);
  if (!h) history.set(key, (h = []));
  h.push({
    t: now,
    requests: ep.requests,
    r5xx: ep.responses_5xx,
    buckets: ep.latency_buckets,
    bad: ep.ejected || ep.health === "unhealthy",
  });
  if (h.length > KEEP) h.splice(0, h.length - KEEP);
  return h;
}

function rate(h, field) {
  if (h.length < 2) return 0;
  const a = h[Math.max(0, h.length - 1 - RATE_WINDOW)];
  const b = h[h.length - 1];
  const dt = b.t - a.t;
  return dt > 0 ? Math.max(0, (b[field] - a[field]) / dt) : 0;
}

function sparkline(h) {
  const w = 120, ht = 22;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", ht);
  const rates = [];
  for (let i = 1; i < h.length; i++) {
    const dt = h[i].t - h[i - 1].t;
    rates.push(dt > 0 ? Math.max(0, (h[i].requests - h[i - 1].requests) / dt) : 0);
  }
  const top = Math.max(1, ...rates);
  const pts = rates.map((r, i) => `${((i / Math.max(1, KEEP - 2)) * w).toFixed(1)},${(ht - 1 - (r / top) * (ht - 2)).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.append(line);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = `requests/s over the last ${Math.round((h.length * 0.5) / 60)} min, peak ${top.toFixed(0)}/s`;
  svg.append(title);
  return svg;
}

function strip(h) {
  const node = el("span", { class: "history", title: "health and ejection, oldest first" });
  const tail = h.slice(-STRIP);
  for (let i = 0; i < STRIP - tail.length; i++) node.append(el("i", { class: "none" }));
  for (const s of tail) node.append(el("i", { class: s.bad ? "bad" : "" }));
  return node;
}

function share(ep) {
  const cell = el("td", {});
  if (ep.table_share !== null && ep.table_share !== undefined) {
    cell.append(el("span", { class: "bar", width: `${(ep.table_share * 80).toFixed(1)}px` }), ` ${(ep.table_share * 100).toFixed(1)}% table`, el("br"));
  }
  cell.append(el("span", { class: "bar weight", width: `${(ep.weight_share * 80).toFixed(1)}px` }), ` ${(ep.weight_share * 100).toFixed(1)}% weight`);
  return cell;
}

function workersNote(ep) {
  // With several workers: those whose own view differs from the admin worker's.
  if (!ep.workers || ep.workers.length < 2) return null;
  const out = ep.workers.filter((w) => !w.usable).map((w) => w.worker);
  return out.length ? el("span", { class: "muted workers" }, `not usable in worker${out.length > 1 ? "s" : ""} ${out.join(", ")}`) : null;
}

function stateCell(ep, now) {
  const cell = stateText(ep, now);
  const note = workersNote(ep);
  if (note) cell.append(el("br"), note);
  return cell;
}

function stateText(ep, now) {
  if (ep.ejected && ep.ejection) {
    const until = Math.max(0, ep.ejection.until - now).toFixed(0);
    return el("td", { class: "state" }, `ejected: ${ep.ejection.reason}`, el("br"), el("span", { class: "muted" }, `for ${until} s more, ejection #${ep.ejection.ejections}`));
  }
  if (ep.health === "unhealthy") {
    const why = ep.check && ep.check.error ? ep.check.error : "failing checks";
    return el("td", { class: "state" }, `unhealthy: ${why}`);
  }
  return el("td", { class: "state" }, ep.usable ? "usable" : "not usable");
}

function checkCell(ep, now) {
  const c = ep.check;
  if (!c) return el("td", { class: "muted" }, ep.health === "unchecked" ? "no active checks" : "–");
  const result = c.ok === null ? "not yet" : c.ok ? "passed" : `failed${c.error ? ` (${c.error})` : ""}`;
  const progress = c.ok === false ? `fall ${Math.min(c.fall, c.fall_needed)}/${c.fall_needed}` : `rise ${Math.min(c.rise, c.rise_needed)}/${c.rise_needed}`;
  return el("td", {}, result, el("br"), el("span", { class: "muted" }, `${ago(c.at, now)}, ${progress}`));
}

function clusterSection(c, now, routes) {
  const head = el("h2", {}, `cluster ${c.name}`);
  const mine = routes.filter((r) => r.cluster === c.name).map((r) => `${r.host || "any host"} ${r.prefix}`);
  const table = c.table ? `${c.table.kind} table of ${c.table.size}, ${c.table_builds} builds${c.table_building ? ", building" : ""}` : "no hash table";
  const meta = el("p", { class: "muted" },
    `${c.policy}${c.hash_on.length ? ` on ${c.hash_on.join(", ")}` : ""}; ${c.endpoints_usable} of ${c.endpoints_total} endpoints usable; ${table}`);
  const factor = c.hash_balance_factor; // bounded loads: each endpoint's headroom is shown
  const cols = ["endpoint", "weight", "state", "last check", "active", "req/s", "5xx/s", "p50", "p99", "last 5 min", "share", factor ? "headroom / spills" : "spills", "history"];
  const t = el("table", {}, el("tr", {}, ...cols.map((x) => el("th", {}, x))));
  for (const ep of c.endpoints) {
    const h = record(c.name, ep, now);
    const older = h[Math.max(0, h.length - 1 - LATENCY_WINDOW)];
    const newest = h[h.length - 1];
    const cls = ep.ejected ? "ejected" : ep.health === "unhealthy" ? "unhealthy" : "ok";
    t.append(el("tr", { class: cls, "data-endpoint": ep.address },
      el("td", {}, ep.name || ep.address, ep.name ? el("br") : null, ep.name ? el("span", { class: "muted" }, ep.address) : null),
      el("td", { class: "num" }, ep.weight),
      stateCell(ep, now),
      checkCell(ep, now),
      el("td", { class: "num" }, ep.active_requests),
      el("td", { class: "num" }, rate(h, "requests").toFixed(1)),
      el("td", { class: "num" }, rate(h, "r5xx").toFixed(1)),
      el("td", { class: "num" }, ms(quantile(older.buckets, newest.buckets, 0.5))),
      el("td", { class: "num" }, ms(quantile(older.buckets, newest.buckets, 0.99))),
      el("td", {}, sparkline(h)),
      share(ep),
      el("td", { class: "num" }, factor ? `${ep.headroom} / ${ep.spills}` : ep.spills),
      el("td", {}, strip(h)),
    ));
  }
  const routed = el("p", { class: "muted routes" }, `routes: ${mine.join("; ") || "–"}`);
  return el("div", { class: "cluster", "data-cluster": c.name }, head, meta, routed, t);
}

function render(state) {
  const now = state.time;
  const reg = document.getElementById("registry");
  if (state.registry) {
    const up = state.registry.mesh_registry_connected === 1;
    const age = state.registry.mesh_registry_snapshot_age_seconds;
    const streams = state.registry.mesh_registry_change_streams;
    const feed = streams === undefined ? "" : streams === 1 ? ", change streams" : ", polling";
    reg.textContent = `registry: ${up ? "connected" : "not connected"}${feed}${age !== undefined ? `, endpoint set ${age.toFixed(0)} s old` : ""}`;
    reg.className = `pill ${up ? "ok" : "bad"}`;
  } else {
    reg.textContent = "static endpoints (no registry)";
    reg.className = "pill";
  }
  const workers = state.workers > 1 ? ` · ${state.workers} workers${state.workers_silent ? `, ${state.workers_silent} silent` : ""}` : "";
  document.getElementById("updated").textContent = `updated ${new Date(now * 1000).toLocaleTimeString()}${workers}${state.draining ? " · draining" : ""}`;
  const panics = state.clusters.filter((c) => c.panic);
  const banner = document.getElementById("panic");
  banner.classList.toggle("hidden", panics.length === 0);
  banner.textContent = panics.map((c) => `cluster ${c.name} in panic (${c.panic_mode}): ${c.endpoints_usable} of ${c.endpoints_total} usable`).join("; ");
  const box = document.getElementById("clusters");
  box.replaceChildren(...state.clusters.map((c) => clusterSection(c, now, state.routes || [])));
  const names = state.clusters.map((c) => c.name);
  if (names.join("\n") !== clusterNames.join("\n")) {
    clusterNames = names;
    const sel = document.getElementById("keycluster");
    sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  }
}

function logEvent(e) {
  const log = document.getElementById("log");
  const when = new Date(e.at * 1000).toLocaleTimeString();
  const who = e.endpoint ? ` ${e.endpoint}` : "";
  log.prepend(el("li", { class: e.kind }, `${when} ${e.cluster}${who}: ${e.kind} ${e.detail}`));
  while (log.children.length > 200) log.lastChild.remove();
}

function showBroken(text) {
  broken = true;
  document.getElementById("stream-text").textContent = text;
  document.getElementById("stream").classList.remove("hidden");
}

function connect() {
  if (source) source.close();
  broken = false;
  document.getElementById("stream").classList.add("hidden");
  document.getElementById("log").replaceChildren();
  source = new EventSource("/events");
  source.addEventListener("state", (ev) => render(JSON.parse(ev.data)));
  source.addEventListener("log", (ev) => logEvent(JSON.parse(ev.data)));
  source.onerror = () => {
    source.close();
    source = null;
    showBroken("The live stream stopped: the figures below are not updated.");
  };
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    if (source) source.close(); // paused while nobody looks
    source = null;
  } else if (!broken) {
    connect();
  }
});

document.getElementById("retry").addEventListener("click", connect);

document.getElementById("keyform").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = document.getElementById("key").value;
  const cluster = document.getElementById("keycluster").value;
  const out = document.getElementById("keyanswer");
  const q = new URLSearchParams({ key, cluster });
  try {
    const r = await fetch(`/ring?${q}`);
    const a = await r.json();
    if (!r.ok) {
      out.replaceChildren(el("dt", {}, "error"), el("dd", {}, a.error || r.status));
      return;
    }
    const next = (a.next || []).map((n) => `${n.address}${n.usable ? "" : " (not usable)"}`).join(", ") || "–";
    const rows = [
      ["hash input", a.hash_input], ["key hash", a.key_hash], ["home", a.home ?? "–"],
      ["chosen", a.endpoint ?? "none usable"], ["why", a.reason ?? "–"], ["tried next", next],
    ];
    out.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]));
  } catch (err) {
    out.replaceChildren(el("dt", {}, "error"), el("dd", {}, String(err)));
  }
});

connect();
