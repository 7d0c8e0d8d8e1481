// Sluice dashboard: fills the server's page shells from the JSON API.
// Every value goes through escape() before it reaches the page.
const body = document.body;
const main = document.getElementById("main");
const page = body.dataset.page;

export function escape(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
const enc = encodeURIComponent;

function token() { return sessionStorage.getItem("sluice-token") || ""; }
function askToken() {
  const t = prompt("API token (kept in this tab's session storage):", token());
  if (t !== null) sessionStorage.setItem("sluice-token", t.trim());
  return token();
}
document.getElementById("token").addEventListener("click", () => { askToken(); location.reload(); });

// fetch with the token; asks for it once when the server answers 401.
async function api(path, opts = {}) {
  const go = () => fetch(path, {
    ...opts,
    headers: { ...(opts.body ? { "Content-Type": "application/json" } : {}), ...(token() ? { Authorization: `Bearer ${token()}` } : {}) },
  });
  let r = await go();
  if (r.status === 401 && askToken()) r = await go();
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = { detail: text }; }
  if (!r.ok) throw new Error(`${r.status} ${(json && (json.detail || json.title)) || ""}`);
  return json;
}

function render(html) { main.innerHTML = html; }
function fail(e) { render(`<p class="error">${escape(e.message || e)}</p>`); }
function table(cols, rows, empty = "nothing here") {
  if (!rows.length) return `<p>${escape(empty)}</p>`;
  return `<table><tr>${cols.map((c) => `<th>${escape(c)}</th>`).join("")}</tr>${rows.map((r) => `<tr>${r.join("")}</tr>`).join("")}</table>`;
}
const td = (v) => `<td>${escape(v)}</td>`;
const tdHtml = (html) => `<td>${html}</td>`;
const json = (v) => `<td><pre>${escape(JSON.stringify(v, null, 2))}</pre></td>`;
function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 120 ? `${Math.round(s)} s` : s < 7200 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
}
function poll(fn, ms = 2000) {
  const tick = async () => { try { await fn(); } catch (e) { fail(e); } setTimeout(tick, ms); };
  tick();
}

// An inline SVG line chart of the last points.
function chart(title, points, unit) {
  const w = 360, h = 110, max = Math.max(1, ...points);
  const step = points.length > 1 ? w / (points.length - 1) : w;
  const d = points.map((p, i) => `${i ? "L" : "M"}${(i * step).toFixed(1)},${(h - 18 - (p / max) * (h - 30)).toFixed(1)}`).join(" ");
  const last = points.length ? points[points.length - 1] : 0;
  return `<svg class="chart" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="${escape(title)}">
    <text x="8" y="14" font-size="12" fill="#667085">${escape(title)}: ${escape(last.toFixed(1))} ${escape(unit)} (max ${escape(max.toFixed(1))})</text>
    <path d="${d}" fill="none" stroke="#2f6fde" stroke-width="2"/></svg>`;
}

async function projections() { return (await api("/v1/projections")).projections || []; }
async function deadLetters() {
  try { return (await api("/v1/dlq")).entries; } catch { return null; }
}

const pages = {
  async overview() {
    const rate = [], lag = [];
    let prev = null;
    poll(async () => {
      const [o, ps, dl] = await Promise.all([api("/ui/data/overview"), projections(), deadLetters()]);
      const now = Date.now();
      if (prev) rate.push(Math.max(0, (o.stream.last_position - prev.pos) / ((now - prev.at) / 1000)));
      prev = { pos: o.stream.last_position, at: now };
      lag.push(Math.max(0, ...ps.map((p) => p.lag_events)));
      for (const a of [rate, lag]) while (a.length > 150) a.shift();
      const dlCount = dl ? dl.length : ps.reduce((n, p) => n + p.dead_letters, 0);
      render(`<div class="cards">
        <div class="card"><b>${escape((rate[rate.length - 1] || 0).toFixed(1))}</b><span>events/s</span></div>
        <div class="card"><b>${escape(o.stream.last_position)}</b><span>appends (last position)</span></div>
        <div class="card"><b>${escape(o.stream.aggregates)}</b><span>aggregates</span></div>
        <div class="card"><b id="dead-letters">${escape(dlCount)}</b><span>dead letters</span></div>
        <div class="card"><b>${escape(o.stream.replicas)}</b><span>replicas</span></div>
      </div>
      <h2>Throughput and lag</h2><div class="cards">${chart("events/s", rate, "")}${chart("max projection lag", lag, "events")}</div>
      <h2>Projections</h2>${table(["projection", "state", "lag (events)", "lag (s)", "dead letters"], ps.map((p) => [
        tdHtml(`<a href="/ui/projections">${escape(p.name)}</a>`), td(p.state), td(p.lag_events), td(p.lag_seconds.toFixed(1)), td(p.dead_letters)]))}
      <h2>Server</h2><p>sluice ${escape(o.version)} · nats-server ${escape(o.server.version)} (${escape(o.server.name)}) · stream ${escape(o.stream.name)}, ${escape(o.stream.events)} events, ${escape(o.stream.bytes)} bytes</p>
      ${o.warnings.length ? `<ul>${o.warnings.map((w) => `<li class="warn">${escape(w)}</li>`).join("")}</ul>` : `<p class="ok">no durability warnings</p>`}
      <h2>Sagas</h2><div id="sagas"></div>`);
      document.getElementById("sagas").innerHTML = sagaTable(await sagaInstances(), true);
    }, 2000);
  },

  async streams() {
    const o = await api("/ui/data/overview");
    const from = Math.max(0, o.stream.last_position - 1000);
    const page = await api(`/v1/events?after=${from}&limit=1000`);
    const cats = new Map();
    for (const e of page.events) {
      const [c, ...rest] = e.stream.split("/");
      const ids = cats.get(c) || new Set();
      ids.add(rest.join("."));
      cats.set(c, ids);
    }
    render(`<form class="filters" id="find"><input name="category" placeholder="category" required><input name="id" placeholder="aggregate id" required><button>Open</button></form>
      <h2>Categories (in the last 1000 events)</h2>${table(["category", "aggregates seen", "latest"], [...cats].map(([c, ids]) => [
        td(c), td(ids.size), tdHtml([...ids].slice(-5).map((i) => `<a href="/ui/streams/${enc(c)}/${enc(i)}">${escape(i)}</a>`).join(" "))]))}`);
    document.getElementById("find").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(ev.target);
      location.href = `/ui/streams/${enc(f.get("category"))}/${enc(f.get("id"))}`;
    });
  },

  async stream() {
    const { category, id } = body.dataset;
    const s = await api(`/v1/streams/${enc(category)}/${enc(id)}`);
    render(`<h2>${escape(s.stream)}</h2>${table(["position", "type", "id", "source", "time", "data"], s.events.map((e) => [
      td(e.position), td(e.type), td(e.id), td(e.source), td(e.time), json(e.data)]), "no events")}`);
  },

  async events() {
    const q = new URLSearchParams(location.search);
    render(`<form class="filters"><input name="category" placeholder="category" value="${escape(q.get("category") || "")}">
      <input name="type" placeholder="type" value="${escape(q.get("type") || "")}"><input name="after" placeholder="after position" value="${escape(q.get("after") || "")}">
      <button>Filter</button> <label><input type="checkbox" id="live"> live tail</label></form><div id="log"></div><p id="more"></p>`);
    const params = new URLSearchParams();
    for (const k of ["category", "type", "after"]) if (q.get(k)) params.set(k, q.get(k));
    const rows = [];
    const draw = () => {
      document.getElementById("log").innerHTML = table(["position", "stream", "type", "time", "data"], rows.map((e) => [
        td(e.position), tdHtml(`<a href="/ui/streams/${e.stream.split("/").map(enc).join("/")}">${escape(e.stream)}</a>`), td(e.type), td(e.time), json(e.data)]), "no events");
    };
    let next = null;
    const more = async () => {
      if (next !== null) params.set("after", next);
      const p = await api(`/v1/events?${params}`);
      rows.push(...p.events);
      next = p.next ?? (p.events.length ? p.events[p.events.length - 1].position : next);
      draw();
      document.getElementById("more").innerHTML = p.events.length ? `<button id="next">Next page</button>` : "end of the log";
      const b = document.getElementById("next");
      if (b) b.addEventListener("click", () => more().catch(fail));
    };
    await more();
    let source = null;
    document.getElementById("live").addEventListener("change", (ev) => {
      if (source) { source.close(); source = null; }
      if (!ev.target.checked) return;
      const lp = new URLSearchParams(params);
      if (next !== null) lp.set("after", next);
      source = new EventSource(`/v1/events/live?${lp}`);
      source.onmessage = (m) => { const e = JSON.parse(m.data); rows.push(e); next = e.position; draw(); };
    });
  },

  async dlq() {
    if (!token()) askToken();
    poll(async () => {
      const l = await api("/v1/dlq");
      render(`<h2>Dead letters (${escape(l.entries.length)})</h2>${table(["id", "consumer", "stream", "position", "type", "reason", "age", "actions"], l.entries.map((d) => [
        td(d.id), td(d.consumer), td(d.stream), td(d.sequence), td(d.event_type), td(d.reason), td(age(d.stored_at)),
        tdHtml(`<button data-act="show" data-id="${escape(d.id)}">show</button> <button data-act="redrive" data-id="${escape(d.id)}">redrive</button>
          <button class="danger" data-act="discard" data-id="${escape(d.id)}">discard</button> <button class="danger" data-act="void" data-id="${escape(d.id)}" data-position="${escape(d.sequence)}">void</button>`)]), "no dead letters")}
        <div id="detail"></div>`);
      if (shown !== null) document.getElementById("detail").innerHTML = shown;
    }, 3000);
  },

  async projections() {
    poll(async () => {
      const ps = await projections();
      const rb = await Promise.all(ps.map((p) => api(`/v1/projections/${enc(p.name)}/rebuild`).catch(() => null)));
      render(table(["projection", "state", "checkpoint", "log end", "lag (events)", "lag (s)", "dead letters", "parked aggregates", "caught up", "rebuild", "error"], ps.map((p, i) => {
        const pct = p.stream_last_position ? Math.round((100 * p.checkpoint) / p.stream_last_position) : 100;
        const r = rb[i];
        const rpct = r ? Math.floor(r.percent) : 0;
        return [td(p.name), td(p.state), td(p.checkpoint), td(p.stream_last_position), td(p.lag_events), td(p.lag_seconds.toFixed(1)),
          td(p.dead_letters), tdHtml(`<span class="parked" data-name="${escape(p.name)}">${escape(p.parked_aggregates)}</span>`),
          tdHtml(`<div class="bar caught-up" title="${escape(pct)} %"><div style="width:${escape(Math.min(100, pct))}%"></div></div>`),
          tdHtml(`<button data-act="rebuild" data-name="${escape(p.name)}">rebuild</button>` + (r ? ` <span class="rebuild-state" data-name="${escape(p.name)}">${escape(r.state)} ${escape(rpct)} %</span>
            <div class="bar rebuild" data-name="${escape(p.name)}" title="${escape(rpct)} %"><div style="width:${escape(Math.min(100, rpct))}%"></div></div>` : "")),
          td((p.halted && `${p.halted.reason} at ${p.halted.position}`) || p.last_error || (r && r.error) || "")];
      })) + `<div id="detail"></div>`);
      if (shown !== null) document.getElementById("detail").innerHTML = shown;
    }, 1000);
  },

  async consumers() {
    poll(async () => {
      const l = await api("/v1/consumers");
      render(table(["stream", "consumer", "pending", "ack pending", "redelivered", "lag", "state", "actions"], l.consumers.map((c) => [
        td(c.stream), td(c.name), td(c.pending), td(c.ack_pending), td(c.redelivered), td(c.lag),
        td(c.paused ? `paused${c.pause_remaining_secs != null ? ` (${c.pause_remaining_secs} s left)` : ""}` : "running"),
        tdHtml(c.paused ? `<button data-act="resume" data-name="${escape(c.name)}">resume</button>` : `<button class="danger" data-act="pause" data-name="${escape(c.name)}">pause</button>`)]), "no durable consumers") + `<div id="detail"></div>`);
      if (shown !== null) document.getElementById("detail").innerHTML = shown;
    }, 2000);
  },

  async sagas() {
    render(sagaTable(await sagaInstances(), false));
  },

  async saga() {
    const { saga, id } = body.dataset;
    const s = await api(`/v1/streams/saga-${enc(saga)}/${enc(id)}`);
    render(`<h2>Saga ${escape(saga)} ${escape(id)}</h2><ol class="timeline">${s.events.map((e) =>
      `<li><b>${escape(e.type)}</b> at ${escape(e.time)} (position ${escape(e.position)})<pre>${escape(JSON.stringify(e.data, null, 2))}</pre></li>`).join("")}</ol>`);
  },
};

// Saga instances from the recent log: the streams of categories `saga-<name>`,
// each with its last event type as its state.
async function sagaInstances() {
  const o = await api("/ui/data/overview");
  const from = Math.max(0, o.stream.last_position - 1000);
  const page = await api(`/v1/events?after=${from}&limit=1000`);
  const last = new Map();
  for (const e of page.events) if (e.stream.startsWith("saga-")) last.set(e.stream, e);
  return [...last.values()].map((e) => {
    const [cat, ...rest] = e.stream.split("/");
    return { saga: cat.slice(5), id: rest.join("."), state: e.type, time: e.time };
  });
}
function sagaTable(list, summary) {
  const by = new Map();
  for (const s of list) by.set(s.state, (by.get(s.state) || 0) + 1);
  const counts = table(["last event (state)", "instances"], [...by].map(([k, n]) => [td(k), td(n)]), "no saga activity in the last 1000 events");
  if (summary) return counts;
  return counts + `<h2>Instances</h2>` + table(["saga", "id", "state", "since"], list.map((s) => [
    td(s.saga), tdHtml(`<a href="/ui/sagas/${enc(s.saga)}/${enc(s.id)}">${escape(s.id)}</a>`), td(s.state), td(s.time)]));
}

let shown = null;
main.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-act]");
  if (!b) return;
  const { act, id, position, name } = b.dataset;
  try {
    if (act === "rebuild") {
      if (!confirm(`Rebuild projection ${name}? It is rebuilt beside the live tables and switched in when it has caught up.`)) return;
      await api(`/v1/projections/${enc(name)}/rebuild`, { method: "POST" });
      shown = `<p class="ok">rebuild of ${escape(name)} started</p>`;
      return;
    }
    if (act === "show") {
      shown = `<h2>Dead letter ${escape(id)}</h2><pre>${escape(JSON.stringify(await api(`/v1/dlq/${enc(id)}`), null, 2))}</pre>`;
      document.getElementById("detail").innerHTML = shown;
      return;
    }
    if (act === "pause" || act === "resume") {
      if (!confirm(`${act} consumer ${name}?`)) return;
      await api(`/v1/consumers/${enc(name)}/${act}`, { method: "POST", body: JSON.stringify(act === "pause" ? { for_secs: 3600 } : {}) });
      shown = `<p class="ok">${escape(act)} of ${escape(name)} done</p>`;
      return;
    }
    let reason = null;
    if (act === "discard" || act === "void") {
      reason = prompt(`Why ${act} ${act === "void" ? `the event at position ${position}` : `dead letter ${id}`}? (kept for audit)`);
      if (!reason) return;
    }
    if (!confirm(`${act} dead letter ${id}?`)) return;
    const path = act === "void" ? `/v1/events/${enc(position)}/void` : `/v1/dlq/${enc(id)}/${act}`;
    await api(path, { method: "POST", body: JSON.stringify(reason ? { reason } : {}) });
    shown = `<p class="ok">${escape(act)} of ${escape(id)} done</p>`;
    const d = document.getElementById("detail");
    if (d) d.innerHTML = shown;
  } catch (e) {
    shown = `<p class="error">${escape(act)} failed: ${escape(e.message)}</p>`;
    const d = document.getElementById("detail");
    if (d) d.innerHTML = shown;
  }
});

(pages[page] || (() => render("<p>unknown page</p>")))().catch(fail);
