// hibiki's live dashboard: the overview from /api/overview every 10 s, and
// each segment's head count as it changes from /api/stream (Server-Sent
// Events). Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#06c755", "#2f6fed", "#f08c00", "#ae3ec9", "#0ca678", "#e8590c", "#1098ad", "#c2255c"];
const HOUR = 3600 * 1000;

const state = {
  segments: new Map(), // id -> {id, name, count, history: [[ms, n]], color}
  source: null,
  refresh: null,
  drawPending: false,
};

const fmt = (n) => Number(n).toLocaleString("en-US");

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function show(signedIn) {
  $("sign-in").hidden = signedIn;
  $("dashboard").hidden = !signedIn;
  $("who").hidden = !signedIn;
}

async function signIn(tenant, token) {
  await api("/api/session", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ tenant, token }),
  });
}

async function start() {
  // `hibiki dev` prints a link carrying the demo's sign-in in the fragment
  // (never sent to a server); use it once and drop it from the address bar.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("tenant") && fragment.get("token")) {
    history.replaceState(null, "", location.pathname);
    try {
      await signIn(fragment.get("tenant"), fragment.get("token"));
    } catch (e) {
      $("sign-in-error").textContent = e.message;
    }
  }
  try {
    render(await api("/api/overview"));
  } catch (e) {
    if (e.status === 401) {
      show(false);
      return;
    }
    throw e;
  }
  show(true);
  listen();
  clearInterval(state.refresh);
  state.refresh = setInterval(async () => {
    try {
      render(await api("/api/overview"));
    } catch (e) {
      if (e.status === 401) location.reload();
    }
  }, 10000);
}

function listen() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/stream");
  state.source = source;
  source.addEventListener("open", () => $("live").classList.add("on"));
  source.addEventListener("error", () => $("live").classList.remove("on"));
  source.addEventListener("count", (event) => {
    const c = JSON.parse(event.data);
    const s = segment(c.segment_id, c.segment_id);
    s.count = c.member_count;
    const last = s.history[s.history.length - 1];
    if (last && c.as_of_ms - last[0] < 1000) last[1] = c.member_count;
    else s.history.push([c.as_of_ms, c.member_count]);
    updateCount(s, true);
    scheduleDraw();
  });
}

function segment(id, name) {
  let s = state.segments.get(id);
  if (!s) {
    s = { id, name, count: 0, history: [], color: COLORS[state.segments.size % COLORS.length] };
    state.segments.set(id, s);
    renderSegments();
  }
  return s;
}

function render(view) {
  $("tenant-name").textContent = view.tenant;
  const notes = $("notes");
  notes.hidden = view.notes.length === 0;
  notes.textContent = view.notes.join(" · ");

  for (const v of view.segments) {
    const s = segment(v.id, v.name);
    s.name = v.name;
    // The stream is ahead of the overview; the overview fills the gaps.
    if (!state.source || state.source.readyState !== EventSource.OPEN) s.count = v.count;
    if (v.history.length > s.history.length) s.history = v.history;
  }
  renderSegments();
  scheduleDraw();

  $("events-per-second").textContent = view.events_per_second.toFixed(1);
  const hour = view.events.reduce((a, p) => a + p.total, 0);
  $("events-hour").textContent = `${fmt(hour)} events in the last hour`;
  drawRates(view.events);

  const rows = view.deliveries.map((d) => `<tr><td>${esc(d.endpoint)}</td><td>${fmt(d.accepted + d.already_accepted)}</td><td>${fmt(d.retrying)}</td><td>${fmt(d.dead_lettered)}</td></tr>`);
  $("deliveries").innerHTML = rows.join("") || `<tr><td colspan="4" class="empty">Nothing sent yet</td></tr>`;
  const dead = $("dead-letters");
  dead.textContent = fmt(view.dead_letters);
  dead.classList.toggle("some", view.dead_letters > 0);

  $("funnels").innerHTML = view.funnels.map(funnel).join("") || `<p class="empty">No scenario yet</p>`;
}

function funnel(f) {
  const top = Math.max(f.entered, 1);
  const bar = (label, n) => `<div class="bar"><span>${esc(label)}</span><div class="track"><div class="fill" style="width:${(100 * n) / top}%"></div></div><span class="n">${fmt(n)}</span></div>`;
  return `<div class="funnel"><h3>${esc(f.name)} ${f.enabled ? "" : '<span class="off">(disabled)</span>'}</h3>${bar("entered", f.entered)}${f.steps.map(([step, n]) => bar(step, n)).join("")}${bar("completed", f.completed)}</div>`;
}

function renderSegments() {
  const box = $("segments");
  if (state.segments.size === 0) {
    box.innerHTML = `<p class="empty">No segment yet</p>`;
    return;
  }
  for (const s of state.segments.values()) {
    let card = box.querySelector(`[data-id="${CSS.escape(s.id)}"]`);
    if (!card) {
      box.querySelector(".empty")?.remove();
      card = document.createElement("div");
      card.className = "segment";
      card.dataset.id = s.id;
      card.style.setProperty("--c", s.color);
      card.innerHTML = `<div class="name"></div><div class="count">0</div>`;
      box.appendChild(card);
    }
    card.dataset.name = s.name;
    card.querySelector(".name").textContent = s.name;
    card.querySelector(".name").title = s.name;
    updateCount(s, false);
  }
}

function updateCount(s, bump) {
  const card = $("segments").querySelector(`[data-id="${CSS.escape(s.id)}"]`);
  if (!card) return;
  const el = card.querySelector(".count");
  el.textContent = fmt(s.count);
  if (bump) {
    el.classList.add("bump");
    clearTimeout(el.bumpTimer);
    el.bumpTimer = setTimeout(() => el.classList.remove("bump"), 600);
  }
}

function scheduleDraw() {
  if (state.drawPending) return;
  state.drawPending = true;
  requestAnimationFrame(() => {
    state.drawPending = false;
    drawChart();
  });
}

function drawChart() {
  const svg = $("chart");
  const [W, H, L, B] = [800, 220, 44, 20];
  const now = Date.now();
  const from = now - HOUR;
  let max = 1;
  for (const s of state.segments.values()) for (const [, n] of s.history) max = Math.max(max, n);
  const x = (t) => L + ((t - from) / HOUR) * (W - L - 6);
  const y = (n) => H - B - (n / max) * (H - B - 10);
  let out = "";
  for (let i = 0; i <= 4; i++) {
    const n = (max * i) / 4;
    out += `<line class="grid-line" x1="${L}" x2="${W}" y1="${y(n)}" y2="${y(n)}"/><text class="axis" x="${L - 6}" y="${y(n) + 4}" text-anchor="end">${fmt(Math.round(n))}</text>`;
  }
  for (const m of [60, 45, 30, 15, 0]) {
    const anchor = m === 60 ? "start" : m === 0 ? "end" : "middle";
    out += `<text class="axis" x="${x(now - m * 60000)}" y="${H - 4}" text-anchor="${anchor}">${m ? `-${m} min` : "now"}</text>`;
  }
  for (const s of state.segments.values()) {
    const pts = s.history.filter(([t]) => t >= from);
    if (pts.length === 0) continue;
    // A step line: a count holds until it changes, up to now.
    let d = `M${x(pts[0][0]).toFixed(1)},${y(pts[0][1]).toFixed(1)}`;
    for (let i = 1; i < pts.length; i++) d += `H${x(pts[i][0]).toFixed(1)}V${y(pts[i][1]).toFixed(1)}`;
    d += `H${x(now).toFixed(1)}`;
    out += `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"/>`;
  }
  svg.innerHTML = out;
  $("legend").innerHTML = [...state.segments.values()].map((s) => `<span><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("");
}

function drawRates(points) {
  const svg = $("rates");
  if (points.length === 0) {
    svg.innerHTML = "";
    return;
  }
  const max = Math.max(1, ...points.map((p) => p.total));
  const step = 300 / Math.max(1, points.length - 1);
  let d = `M0,60`;
  points.forEach((p, i) => (d += `L${(i * step).toFixed(1)},${(58 - (p.total / max) * 54).toFixed(1)}`));
  d += `L${((points.length - 1) * step).toFixed(1)},60Z`;
  svg.innerHTML = `<path d="${d}"/>`;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("sign-in-error").textContent = "";
  try {
    await signIn($("tenant").value, $("token").value);
    await start();
  } catch (e) {
    $("sign-in-error").textContent = e.message;
  }
});

$("sign-out").addEventListener("click", async () => {
  await api("/api/session", { method: "DELETE" }).catch(() => {});
  location.reload();
});

setInterval(scheduleDraw, 15000); // the chart's "now" moves on
start().catch((e) => {
  show(false);
  $("sign-in-error").textContent = e.message;
});
