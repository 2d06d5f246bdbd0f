// The dashboard: one EventSource, a snapshot first, then changes applied in order.
// Only the visible page of the table is rendered, so 10,000 instances stay cheap.
"use strict";

const PAGE = 100;
const FLASH_MS = 2500;
const $ = (id) => document.getElementById(id);

const st = {
  instances: new Map(),   // key -> instance
  services: new Map(),    // "ns\0name" -> {namespace, name, instances, history}
  elections: new Map(),   // "ns\0name" -> election
  locks: new Map(),       // "ns\0name" -> lock with a holder
  namespaces: new Map(),  // ns -> read_ms
  connection: null,
  allNamespaces: false,
  started: 0,
  offset: 0,              // server clock - browser clock
  selected: null,         // service key or null for all
  filter: "",
  page: 0,
  flash: new Map(),       // instance key -> {kind, until}
  changes: [],            // {kind, text, at}
  streamUp: null,        // null until the event stream first opens
};

const ikey = (i) => `${i.namespace}\u0000${i.name}\u0000${i.id}`;
const skey = (ns, name) => `${ns}\u0000${name}`;
const now = () => Date.now() + st.offset;
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function ago(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d`;
}

function serviceLabel(ns, name) {
  return st.allNamespaces ? `${ns} / ${name}` : name;
}

function count(ns, name, delta) {
  const k = skey(ns, name);
  let s = st.services.get(k);
  if (!s) { s = { namespace: ns, name, instances: 0, history: [] }; st.services.set(k, s); }
  s.instances = Math.max(0, s.instances + delta);
}

function note(kind, text) {
  st.changes.unshift({ kind, text, at: now() });
  st.changes.length = Math.min(st.changes.length, 50);
}

const handlers = {
  snapshot(d) {
    st.offset = d.now_ms - Date.now();
    st.started = d.started_ms;
    st.allNamespaces = d.all_namespaces;
    st.namespaces = new Map(d.namespaces.map((n) => [n.name, n.read_ms]));
    st.instances = new Map(d.instances.map((i) => [ikey(i), i]));
    st.services = new Map(d.services.map((s) => [skey(s.namespace, s.name), s]));
    st.elections = new Map(d.elections.map((e) => [skey(e.namespace, e.name), e]));
    st.locks = new Map(d.locks.map((l) => [skey(l.namespace, l.name), l]));
    st.connection = d.connection;
    st.ready = d.ready;
  },
  added(i) {
    const k = ikey(i);
    if (!st.instances.has(k)) count(i.namespace, i.name, +1);
    st.instances.set(k, i);
    st.flash.set(k, { kind: "added", until: now() + FLASH_MS });
    note("added", `${serviceLabel(i.namespace, i.name)} ${i.id} at ${i.address}:${i.port}`);
  },
  updated(i) {
    const k = ikey(i);
    if (!st.instances.has(k)) count(i.namespace, i.name, +1);
    st.instances.set(k, i);
    st.flash.set(k, { kind: "updated", until: now() + FLASH_MS });
    note("updated", `${serviceLabel(i.namespace, i.name)} ${i.id} at ${i.address}:${i.port}`);
  },
  removed(i) {
    const k = ikey(i);
    if (st.instances.delete(k)) count(i.namespace, i.name, -1);
    st.flash.delete(k);
    note("removed", `${serviceLabel(i.namespace, i.name)} ${i.id} at ${i.address}:${i.port}`);
  },
  revisions(list) {
    for (const r of list) {
      const i = st.instances.get(ikey(r));
      if (i) { i.create_revision = r.create_revision; i.lease = r.lease; }
    }
  },
  election(e) {
    const k = skey(e.namespace, e.name);
    const before = st.elections.get(k);
    st.elections.set(k, e);
    const leader = e.leader ? `${e.leader.proposal} leads (token ${e.leader.fencing_token})` : "no leader";
    if (!before || JSON.stringify(before.leader) !== JSON.stringify(e.leader)) {
      note(e.leader ? "updated" : "removed", `election ${serviceLabel(e.namespace, e.name)}: ${leader}`);
    }
  },
  lock(l) {
    const k = skey(l.namespace, l.name);
    const before = st.locks.get(k);
    if (l.holder) st.locks.set(k, l); else st.locks.delete(k);
    if (!before || !l.holder || before.holder.fencing_token !== l.holder.fencing_token) {
      note(l.holder ? "updated" : "removed", `lock ${serviceLabel(l.namespace, l.name)}: ${l.holder ? `held (token ${l.holder.fencing_token})` : "released"}`);
    }
  },
  connection(c) { st.connection = c; },
  tick(t) {
    const present = new Set();
    for (const c of t.counts) {
      const k = skey(c.namespace, c.name);
      present.add(k);
      if (!st.services.has(k)) st.services.set(k, { namespace: c.namespace, name: c.name, instances: c.instances, history: [] });
    }
    for (const [k, s] of st.services) {
      s.history.push([t.time_ms, present.has(k) ? s.instances : 0]);
      while (s.history.length && s.history[0][0] < t.time_ms - 10 * 60 * 1000) s.history.shift();
      if (!present.has(k) && s.instances === 0 && s.history.every((p) => p[1] === 0)) st.services.delete(k);
    }
  },
};

function sparkline(s) {
  const pts = s.history.map((p) => p[1]).concat([s.instances]);
  if (pts.length === 1) pts.unshift(pts[0]); // no sample yet: a flat line at the current count
  const max = Math.max(1, ...pts);
  const w = 100, h = 24;
  const step = pts.length > 1 ? w / (pts.length - 1) : w;
  const coords = pts.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / max) * (h - 4)).toFixed(1)}`).join(" ");
  return `<svg viewBox="0 0 ${w} ${h}" aria-label="instances over the last minutes"><polyline points="${coords}"/></svg>`;
}

function renderServices() {
  const list = [...st.services.values()].sort((a, b) => (a.namespace + a.name).localeCompare(b.namespace + b.name));
  $("service-count").textContent = `(${list.length})`;
  const all = `<li data-service="" class="${st.selected === null ? "selected" : ""}"><span>All services</span><span class="count">${st.instances.size}</span><span></span></li>`;
  $("services").innerHTML = all + list.map((s) => {
    const k = skey(s.namespace, s.name);
    const cls = [st.selected === k ? "selected" : "", s.instances === 0 ? "zero" : ""].join(" ");
    return `<li data-service="${esc(k)}" class="${cls}"><span>${esc(serviceLabel(s.namespace, s.name))}</span><span class="count">${s.instances}</span>${sparkline(s)}</li>`;
  }).join("");
}

function renderElections() {
  const list = [...st.elections.values()].sort((a, b) => (a.namespace + a.name).localeCompare(b.namespace + b.name));
  if (!list.length) { $("elections").innerHTML = `<p class="muted">none seen</p>`; return; }
  $("elections").innerHTML = list.map((e) => {
    const l = e.leader;
    const facts = l
      ? `fencing token <span class="mono token">${l.fencing_token}</span> · lease <span class="mono">${esc(l.lease)}</span> · ${e.candidates} candidate${e.candidates === 1 ? "" : "s"} · since ${ago(now() - e.since_ms)}`
      : `nobody leads, for ${ago(now() - e.since_ms)}`;
    return `<div class="election ${l ? "" : "noleader"}" data-election="${esc(e.namespace + "/" + e.name)}">
      <div class="name">${esc(serviceLabel(e.namespace, e.name))}</div>
      <div class="leader">${l ? esc(l.proposal) : "NO LEADER"}</div>
      <div class="facts">${facts}</div></div>`;
  }).join("");
}

function renderLocks() {
  const list = [...st.locks.values()].sort((a, b) => (a.namespace + a.name).localeCompare(b.namespace + b.name));
  if (!list.length) { $("locks").innerHTML = `<p class="muted">none held</p>`; return; }
  $("locks").innerHTML = list.map((l) => `<div class="election" data-lock="${esc(l.namespace + "/" + l.name)}">
      <div class="name">${esc(serviceLabel(l.namespace, l.name))}</div>
      <div class="facts">held under lease <span class="mono">${esc(l.holder.lease)}</span> · fencing token <span class="mono token">${l.holder.fencing_token}</span> · ${l.waiters} waiting · for ${ago(now() - l.since_ms)}</div></div>`).join("");
}

function age(i) {
  if (i.since_ms != null) return ago(now() - i.since_ms);
  const read = st.namespaces.get(i.namespace);
  return read ? `≥ ${ago(now() - read)}` : "";
}

function matches(i, f) {
  if (!f) return true;
  const meta = Object.entries(i.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  return `${i.namespace} ${i.name} ${i.id} ${i.address}:${i.port} ${i.version} ${i.weight} ${meta}`.toLowerCase().includes(f);
}

function renderTable() {
  const f = st.filter.trim().toLowerCase();
  const sel = st.selected;
  const rows = [];
  for (const [k, i] of st.instances) {
    if (sel !== null && skey(i.namespace, i.name) !== sel) continue;
    if (matches(i, f)) rows.push([k, i]);
  }
  rows.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  st.page = Math.min(st.page, pages - 1);
  const t = now();
  const html = rows.slice(st.page * PAGE, (st.page + 1) * PAGE).map(([k, i]) => {
    const fl = st.flash.get(k);
    const cls = fl && fl.until > t ? `flash-${fl.kind}` : "";
    const meta = Object.entries(i.metadata || {}).map(([mk, mv]) => `${esc(mk)}=${esc(mv)}`).join(", ");
    const rev = i.create_revision != null ? `created at revision ${i.create_revision}` : "create revision not read yet";
    return `<tr class="${cls}" data-key="${esc(i.namespace + "/" + i.name + "/" + i.id)}">
      <td>${esc(serviceLabel(i.namespace, i.name))}</td><td class="mono id">${esc(i.id)}</td>
      <td class="mono">${esc(i.address)}:${i.port}</td><td>${esc(i.version || "-")}</td><td>${i.weight}</td>
      <td class="meta">${meta || "-"}</td><td title="${rev}${i.lease ? `, lease ${esc(i.lease)}` : ""}">${age(i)}</td></tr>`;
  }).join("");
  $("rows").innerHTML = html;
  const s = sel === null ? null : st.services.get(sel);
  $("table-title").textContent = s ? serviceLabel(s.namespace, s.name) : "All instances";
  $("shown").textContent = `${rows.length} shown of ${st.instances.size}`;
  $("page").textContent = `page ${st.page + 1} of ${pages}`;
  $("prev").disabled = st.page === 0;
  $("next").disabled = st.page >= pages - 1;
}

function renderChanges() {
  const t = now();
  $("changes").innerHTML = st.changes.map((c) =>
    `<li class="${c.at + FLASH_MS > t ? c.kind : "old"}">${new Date(c.at - st.offset).toLocaleTimeString()} ${c.kind} ${esc(c.text)}</li>`).join("");
}

function renderConnection() {
  const c = st.connection;
  const conn = $("conn"), banner = $("banner");
  if (st.streamUp === false) {
    conn.className = "conn lost"; conn.textContent = "dashboard server unreachable";
    banner.hidden = false; banner.textContent = "Lost the dashboard server; reconnecting by itself…";
    return;
  }
  if (!c) return;
  const lost = c.lost_since_ms != null;
  conn.className = `conn ${lost ? "lost" : c.connected ? "ok" : "unknown"}`;
  conn.textContent = lost ? "etcd lost" : c.connected ? `etcd connected · revision ${c.revision}` : "probing etcd…";
  banner.hidden = !lost;
  if (lost) banner.textContent = `Lost etcd ${ago(now() - c.lost_since_ms)} ago: no endpoint answers. Showing what was seen last; reconnecting by itself…`;
  const eps = c.endpoints.map((e) => e.reachable
    ? `${esc(e.endpoint)} (etcd ${esc(e.version)})`
    : `<span class="bad">${esc(e.endpoint)} unreachable: ${esc(e.error)}</span>`).join(", ");
  $("footer").innerHTML = `endpoints: ${eps} · last revision ${c.revision} · registry ${esc(c.registry_state)} · watch errors recovered ${c.watch_errors}` +
    (c.last_error ? ` · last error: ${esc(c.last_error)}` : "") + ` · dashboard up ${ago(now() - st.started)}`;
  const ns = [...st.namespaces.keys()];
  $("scope").textContent = st.allNamespaces ? `all namespaces (${ns.length})` : `namespace ${ns[0] || "…"}`;
}

let queued = false;
function render() {
  if (queued) return;
  queued = true;
  requestAnimationFrame(() => {
    queued = false;
    renderServices(); renderElections(); renderLocks(); renderTable(); renderChanges(); renderConnection();
  });
}

function connect() {
  const es = new EventSource("/api/events");
  for (const [name, apply] of Object.entries(handlers)) {
    es.addEventListener(name, (ev) => { apply(JSON.parse(ev.data)); render(); });
  }
  es.onopen = () => { st.streamUp = true; render(); };
  // EventSource reconnects by itself; the server starts again from a snapshot.
  es.onerror = () => { st.streamUp = false; render(); };
}

$("filter").addEventListener("input", (e) => { st.filter = e.target.value; st.page = 0; render(); });
$("prev").addEventListener("click", () => { st.page = Math.max(0, st.page - 1); render(); });
$("next").addEventListener("click", () => { st.page += 1; render(); });
$("services").addEventListener("click", (e) => {
  const li = e.target.closest("li");
  if (!li) return;
  st.selected = li.dataset.service || null;
  st.page = 0;
  render();
});
// Ages and highlights move with time.
setInterval(render, 1000);
connect();
