"use strict";
// The fleet page. It reads /fleet/events (server-sent events, read with fetch rather than EventSource, which
// cannot send an API key in a header) and draws each snapshot; its buttons post to /fleet/actions. Everything
// drawn goes through textContent, never innerHTML: model names and errors come from the fleet.

const KEY = "cortex-fleet-key";
const CONFIRM_MS = 3000; // a second tap within this confirms an unload or a drain
const RETRY_MS = [500, 1000, 2000, 5000];
const DESTRUCTIVE = new Set(["unload", "drain"]);
const page = { snapshot: null, mayAct: false, confirming: new Map(), stream: null, retries: 0 };

const $ = (id) => document.getElementById(id);
const storedKey = () => sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
const authHeaders = () => (storedKey() ? { Authorization: "Bearer " + storedKey() } : {});

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  if (!n) return "0";
  return n >= 2 ** 30 ? (n / 2 ** 30).toFixed(2) + " GiB" : (n / 2 ** 20).toFixed(0) + " MiB";
}

function bar(parts, label) {
  // parts: [[class, fraction], ...], stacked left to right (CSSOM widths: the CSP forbids style attributes).
  const outer = el("div", { class: "bar", role: "img", "aria-label": label, title: label });
  for (const [cls, fraction] of parts) {
    const inner = el("span", { class: cls });
    inner.style.width = Math.max(0, Math.min(100, fraction * 100)).toFixed(1) + "%";
    if (fraction > 0) inner.style.minWidth = "3px"; // a small model on a big budget still shows
    outer.append(inner);
  }
  return outer;
}

function sparkline(values, unit, digits, slots, title) {
  // The newest point at the right edge; `slots` points fill the width (null: no request in that sample).
  const known = values.filter((v) => v !== null && v !== undefined);
  const last = known.length ? known[known.length - 1] : null;
  const width = 120, height = 24, max = Math.max(...known, 1e-9), step = (width - 4) / Math.max(1, slots - 1);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("aria-hidden", "true");
  const base = document.createElementNS(ns, "line");
  [["x1", 0], ["x2", width], ["y1", height - 0.5], ["y2", height - 0.5]].forEach(([k, v]) => base.setAttribute(k, v));
  svg.append(base);
  let run = [];
  const flush = () => {
    if (run.length > 1) {
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", run.map(([x, y]) => `${x},${y}`).join(" "));
      svg.append(line);
    } else if (run.length === 1) {
      const dot = document.createElementNS(ns, "circle");
      [["cx", run[0][0]], ["cy", run[0][1]], ["r", 2]].forEach(([k, v]) => dot.setAttribute(k, v));
      svg.append(dot);
    }
    run = [];
  };
  values.forEach((v, i) => {
    if (v === null || v === undefined) return flush();
    const x = width - 2 - (values.length - 1 - i) * step;
    run.push([x.toFixed(1), (height - 2 - (v / max) * (height - 4)).toFixed(1)]);
  });
  flush();
  return el("span", { class: "sparkwrap", title }, svg, el("span", { class: "sparkvalue" },
    last === null ? "–" : last.toFixed(digits) + unit));
}

function button(label, body, title) {
  if (!page.mayAct) return null;
  const signature = JSON.stringify(body);
  const confirming = page.confirming.has(signature);
  return el("button", {
    type: "button", class: "act" + (confirming ? " confirm" : ""), title,
    "data-action": body.action, "data-model": body.model, "data-worker": body.worker,
    onclick: (event) => act(body, event.currentTarget),
  }, confirming ? "sure? " + label : label);
}

function badge(text, kind) {
  return el("span", { class: "badge " + (kind || text) }, text);
}

function drawWorker(w) {
  const m = { budget: w.memory_budget || 0, used: w.memory_used || 0, reserved: w.memory_reserved || 0 };
  const total = m.budget || 1;
  const memory = `${bytes(m.used)} used + ${bytes(m.reserved)} reserved of ${bytes(m.budget)}`;
  const device = (w.device_name && w.device_name !== w.device ? w.device_name + " · " : "") + w.device +
    ((w.devices || 1) > 1 ? ` ×${w.devices}` : "");
  const pinned = new Set(w.pinned || []);
  const rows = (w.models || []).map((s) => el("li", { "data-worker-model": s.id, "data-state": s.state },
    el("span", { class: "name" }, s.id), " ", badge(s.state), pinned.has(s.id) ? badge("pinned") : null,
    s.state === "loading" ? bar([["progress", s.progress || 0]], `loading ${Math.round(100 * (s.progress || 0))}%`) : null,
    s.state === "loading" ? el("span", { class: "muted" }, ` ${Math.round(100 * (s.progress || 0))}%`) : null,
    s.state === "ready" ? el("span", { class: "muted" }, ` ${s.in_flight || 0} running · ${s.queue_depth || 0} queued`) : null,
    s.error ? el("div", { class: "error" }, s.error) : null,
    el("span", { class: "buttons" },
      pinned.has(s.id) ? button("unpin", { action: "unpin", model: s.id }) : button("pin here", { action: "pin", model: s.id, worker: w.worker_id }),
      s.state !== "unloading" && !pinned.has(s.id) ? button("unload", { action: "unload", model: s.id, worker: w.worker_id }, "unload from " + w.worker_id) : null)));
  const cold = (w.cold || []).map((c) => el("li", { "data-worker-model": c.id, "data-state": "cold", class: "cold" },
    el("span", { class: "name" }, c.id), " ", el("span", { class: "muted" }, bytes(c.memory)),
    el("span", { class: "buttons" }, w.draining ? null : button("load here", { action: "load", model: c.id, worker: w.worker_id }))));
  return el("article", { class: "card worker", "data-worker": w.worker_id, "data-draining": w.draining ? "yes" : "no" },
    el("header", {}, el("h3", {}, w.worker_id), w.draining ? badge("draining") : null,
      el("span", { class: "buttons" }, w.draining ? button("undrain", { action: "undrain", worker: w.worker_id })
        : button("drain", { action: "drain", worker: w.worker_id }))),
    el("p", { class: "muted" }, `${w.host} · ${device} · ${w.slots_free || 0}/${w.slots_total || 0} slots free · evicts by ${w.eviction || "lru"}`),
    bar([["used", m.used / total], ["reserved", m.reserved / total]], memory),
    el("p", { class: "muted small" }, memory),
    el("ul", { class: "models" }, rows, cold));
}

function drawModel(m) {
  const samples = page.snapshot.samples || 60, every = page.snapshot.sample_s || 5;
  const where = m.on.map((o) => el("li", { "data-on": o.worker, "data-state": o.state },
    `${o.state} on ${o.worker}`, o.state === "loading" ? bar([["progress", o.progress || 0]], `${Math.round(100 * (o.progress || 0))}%`) : null,
    o.state === "loading" ? ` ${Math.round(100 * (o.progress || 0))}%` : null, o.error ? el("div", { class: "error" }, o.error) : null));
  const placement = m.placement || {};
  const placedOn = placement.workers && placement.workers.length ? placement.workers.join(", ") : "nowhere";
  const pin = m.pin ? (m.pin.worker ? `pinned on ${m.pin.worker}` : `pinned ×${m.pin.replicas || 1}`) : null;
  return el("article", { class: "card model", "data-model": m.id, "data-state": m.state },
    el("header", {}, el("h3", {}, m.id), badge(m.state), pin ? badge(pin, "pinned") : null),
    m.aliases.length ? el("p", { class: "muted small" }, "also " + m.aliases.join(", ")) : null,
    where.length ? el("ul", { class: "on" }, where) : null,
    el("p", { class: "muted" }, `${m.in_flight} running · ${m.queue_depth} queued · needs ${bytes(m.memory)}`),
    m.placement ? el("p", { class: "reason" }, el("b", {}, `placed on ${placedOn}: `), placement.error ? el("span", { class: "error" }, placement.error) : placement.reason || "") : null,
    el("div", { class: "sparks" },
      el("span", { class: "muted small" }, "tokens/s"), sparkline(m.tokens_per_s, "", 1, samples,
        `tokens generated per second through this gateway, every ${every} s`),
      el("span", { class: "muted small" }, "TTFT"), sparkline(m.ttft_s, " s", 2, samples,
        `mean time to first token of this gateway's requests, every ${every} s`)),
    el("div", { class: "buttons" },
      m.state === "cold" || m.state === "failed" ? button("load", { action: "load", model: m.id }) : null,
      !m.pin && m.state !== "cold" ? button("unload", { action: "unload", model: m.id }, "unload everywhere") : null,
      m.pin ? button("unpin", { action: "unpin", model: m.id }) : button("pin", { action: "pin", model: m.id })));
}

function drawDecision(d) {
  const when = d.updated_at ? new Date(d.updated_at * 1000).toLocaleTimeString() : "";
  const to = d.workers && d.workers.length ? d.workers.join(", ") : "none";
  return el("li", { "data-decision": d.model },
    el("span", { class: "muted small" }, when), " ", el("b", {}, d.model), ` → ${to}: `,
    d.error ? el("span", { class: "error" }, d.error) : d.reason || "", d.by ? el("span", { class: "muted small" }, ` (${d.by})`) : null);
}

function redraw() {
  const s = page.snapshot;
  if (!s) return;
  $("gateway").textContent = `gateway ${s.gateway} · ${s.auth === "open" ? "open (no API keys)" : "API keys"}` +
    (s.broker === "connected" ? "" : " · NATS disconnected");
  $("worker-count").textContent = `(${s.workers.length})`;
  $("model-count").textContent = `(${s.models.length})`;
  $("workers").replaceChildren(...(s.workers.length ? s.workers.map(drawWorker) : [el("p", { class: "muted" }, "No live workers.")]));
  $("models").replaceChildren(...s.models.map(drawModel));
  $("decisions").replaceChildren(...(s.decisions.length ? s.decisions.map(drawDecision) : [el("li", { class: "muted" }, "None yet.")]));
  $("fleet").hidden = false;
}

function setStatus(status, text) {
  const node = $("status");
  node.dataset.status = status;
  node.textContent = text;
}

let toastTimer = null;
function toast(text, isError) {
  const node = $("toast");
  node.textContent = text;
  node.className = "toast" + (isError ? " error" : "");
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.hidden = true; }, isError ? 10000 : 4000);
}

async function act(body, target) {
  const signature = JSON.stringify(body);
  if (DESTRUCTIVE.has(body.action) && !page.confirming.has(signature)) {
    page.confirming.set(signature, setTimeout(() => { page.confirming.delete(signature); redraw(); }, CONFIRM_MS));
    redraw();
    return;
  }
  clearTimeout(page.confirming.get(signature));
  page.confirming.delete(signature);
  if (target) target.disabled = true;
  toast(`${body.action} ${body.model || body.worker}…`);
  try {
    const res = await fetch("/fleet/actions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    toast(res.ok ? data.message : (data.error && data.error.message) || `${res.status} ${res.statusText}`, !res.ok);
  } catch (err) {
    toast(`The gateway did not answer: ${err}`, true);
  }
  redraw();
}

function showLogin(why) {
  $("login-why").textContent = why;
  $("login").hidden = false;
  $("fleet").hidden = true;
  setStatus("key", "needs a key");
}

function handle(frame) {
  let event = "message", data = "";
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return; // a keep-alive comment
  const body = JSON.parse(data);
  if (event === "hello") {
    page.mayAct = body.may_act;
    $("forget").hidden = !storedKey();
  } else if (event === "denied") {
    page.denied = body.message;
  } else if (event === "fleet") {
    page.snapshot = body;
    page.retries = 0;
    setStatus("live", "live");
    $("status").dataset.at = Date.now();
    $("status").title = "last change " + new Date().toLocaleTimeString();
    redraw();
  }
}

async function connect() {
  if (page.stream) page.stream.abort();
  const stream = new AbortController();
  page.stream = stream;
  try {
    const res = await fetch("/fleet/events", { headers: { Accept: "text/event-stream", ...authHeaders() }, cache: "no-store", signal: stream.signal });
    if (res.status === 401 || res.status === 403) {
      const data = await res.json().catch(() => ({}));
      return showLogin((data.error && data.error.message) || "This gateway needs an API key to show its fleet.");
    }
    if (!res.ok || !res.body) throw new Error(`${res.status} ${res.statusText}`);
    $("login").hidden = true;
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handle(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (err) {
    if (stream.signal.aborted) return;
  }
  if (stream.signal.aborted) return;
  if (page.denied) {
    const why = page.denied;
    page.denied = null;
    return showLogin(why);
  }
  // The gateway went away (restart, network): try again, backing off a little.
  setStatus("retrying", "reconnecting…");
  setTimeout(connect, RETRY_MS[Math.min(page.retries++, RETRY_MS.length - 1)]);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  (($("remember").checked) ? localStorage : sessionStorage).setItem(KEY, key);
  $("key").value = "";
  connect();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  $("forget").hidden = true;
  connect();
});
connect();
