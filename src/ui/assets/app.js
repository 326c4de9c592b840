// The overview's live parts: savings, fills and upstreams, polled from the JSON API.
// Data only ever reaches the page through textContent and attributes set one by one.
"use strict";

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

function size(n) {
  if (n === null || n === undefined) return "-";
  let v = n, u = 0;
  while (v >= 1024 && u < UNITS.length - 1) { v /= 1024; u++; }
  return u === 0 ? n + " B" : v.toFixed(1) + " " + UNITS[u];
}

function pct(r) {
  return r === null || r === undefined ? "-" : (r * 100).toFixed(1) + "%";
}

function ago(ms, now) {
  if (ms === null || ms === undefined) return "-";
  const s = Math.max(0, Math.floor((now - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return Math.floor(s / 86400) + "d ago";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setText(id, text) {
  const e = document.getElementById(id);
  if (e) e.textContent = text;
}

async function get(path) {
  const r = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function renderSummary(s) {
  const h = s.last_hour, t = s.since_start;
  setText("about", "v" + s.version + " · up since " + new Date(s.started_ms).toLocaleString());
  setText("hit-ratio-hour", pct(h.hit_ratio));
  setText("hit-ratio-total", pct(t.hit_ratio));
  setText("requests-hour", h.from_cache + " from cache, " + h.from_upstream + " upstream, " + h.errors + " errors");
  setText("requests-total", t.from_cache + " from cache, " + t.from_upstream + " upstream");
  setText("bytes-cache-hour", size(h.bytes_from_cache));
  setText("bytes-cache-total", size(t.bytes_from_cache) + " since start");
  setText("bytes-fetched-hour", size(h.bytes_fetched_upstream));
  setText("bytes-fetched-total", size(t.bytes_fetched_upstream) + " since start");
  const chart = document.getElementById("chart");
  const max = Math.max(1, ...s.minutes.map(m => m.bytes_from_cache + m.bytes_from_upstream));
  while (chart.children.length < s.minutes.length) {
    const bar = el("div", "bar");
    bar.appendChild(el("div", "upstream"));
    bar.appendChild(el("div", "cache"));
    chart.appendChild(bar);
  }
  s.minutes.forEach((m, i) => {
    const bar = chart.children[i];
    bar.title = new Date(m.start_ms).toLocaleTimeString() + ": " + size(m.bytes_from_cache) +
      " from cache, " + size(m.bytes_from_upstream) + " while fetched, hit ratio " + pct(m.hit_ratio);
    bar.children[0].style.height = (100 * m.bytes_from_upstream / max) + "%";
    bar.children[1].style.height = (100 * m.bytes_from_cache / max) + "%";
  });
}

function renderFills(f) {
  const list = document.getElementById("fill-list");
  const seen = new Set();
  for (const x of f.fills) {
    seen.add(x.digest);
    let item = list.querySelector('[data-digest="' + CSS.escape(x.digest) + '"]');
    if (!item) {
      item = el("div", "fill");
      item.dataset.digest = x.digest;
      const head = el("div", "fill-head");
      head.appendChild(el("span", "name", x.upstream + "/" + x.repository));
      head.appendChild(el("span", "digest muted", x.digest.slice(0, 19)));
      head.appendChild(el("span", "muted", "from " + x.origin));
      item.appendChild(head);
      item.appendChild(el("progress"));
      item.appendChild(el("div", "fill-stats muted"));
      list.appendChild(item);
    }
    const bar = item.querySelector("progress");
    if (x.total) {
      bar.max = x.total;
      bar.value = x.bytes;
    } else {
      bar.removeAttribute("value");
    }
    const stats = size(x.bytes) + (x.total ? " of " + size(x.total) : "") + " · " +
      size(Math.round(x.bytes_per_second)) + "/s · " + x.followers +
      (x.followers === 1 ? " client following" : " clients following") + " · " + x.state;
    item.querySelector(".fill-stats").textContent = stats;
  }
  for (const item of Array.from(list.querySelectorAll(".fill"))) {
    if (!seen.has(item.dataset.digest)) item.remove();
  }
  const empty = list.querySelector(".empty");
  if (f.fills.length === 0 && !empty) list.appendChild(el("p", "empty", "none"));
  if (f.fills.length > 0 && empty) empty.remove();
}

function renderUpstreams(u, now) {
  const body = document.getElementById("upstream-rows");
  const rows = u.upstreams.map(x => {
    const tr = el("tr");
    tr.appendChild(el("td", "name", x.name + (x.default ? " (default)" : "")));
    tr.appendChild(el("td", "muted", x.url));
    let reach = "not contacted yet", cls = "health-unknown";
    if (x.offline) { reach = "offline mode"; }
    else if (x.reachable === true) { reach = "yes, " + ago(x.last_contact_ms, now); cls = "health-up"; }
    else if (x.reachable === false) { reach = "no, " + ago(x.last_contact_ms, now); cls = "health-down"; }
    tr.appendChild(el("td", cls, reach));
    const e = x.last_error;
    tr.appendChild(el("td", e ? "error" : "muted", e ? e.message + " (" + ago(e.at_ms, now) + ")" : "-"));
    const l = x.latency_ms;
    const avg = l.avg_last_hour === null ? "-" : Math.round(l.avg_last_hour) + " ms";
    tr.appendChild(el("td", "num", (l.last === null ? "-" : l.last + " ms") + " / " + avg));
    const rl = x.ratelimit_remaining;
    tr.appendChild(el("td", "num", rl ? String(rl.value) : "-"));
    tr.appendChild(el("td", "num", x.requests_last_hour + (x.errors_last_hour ? " (" + x.errors_last_hour + " failed)" : "")));
    return tr;
  });
  body.replaceChildren(...rows);
}

let ticks = 0;

async function tick() {
  const live = document.getElementById("live");
  try {
    const fills = get("api/fills");
    const summary = get("api/summary");
    const upstreams = ticks % 5 === 0 ? get("api/upstreams") : null;
    renderFills(await fills);
    const s = await summary;
    renderSummary(s);
    if (upstreams) renderUpstreams(await upstreams, s.now_ms);
    live.textContent = "live";
    live.className = "live";
  } catch (e) {
    live.textContent = "not answering";
    live.className = "live stale";
  }
  ticks++;
  setTimeout(tick, 1000);
}

tick();
