// herd gateway dashboard: polls /api/dashboard once a second and redraws. No framework, no
// third-party code; every value from the gateway goes into the page as text (textContent), never
// as HTML, because worker ids and reasons come from the network.
"use strict";

const POLL_MS = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function set(id, text, cls) {
  const node = document.getElementById(id);
  node.textContent = text;
  if (cls !== undefined) node.className = "big " + cls;
}

const fmt = {
  num: (n) => (n == null ? "–" : n >= 100 ? n.toFixed(0) : n.toFixed(1)),
  ms: (n) => (n == null ? "–" : n >= 100 ? n.toFixed(0) + " ms" : n.toFixed(1) + " ms"),
  pct: (n) => (n * 100).toFixed(n < 0.001 && n > 0 ? 3 : 1) + " %",
  time: (ms) => new Date(ms).toLocaleTimeString(),
  ago: (ms, now) => {
    const s = Math.max(0, Math.round((now - ms) / 1000));
    return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  },
};

function renderTotals(d) {
  const t = d.totals;
  set("req", fmt.num(t.req_per_s));
  set("error-rate", fmt.pct(t.error_rate), t.error_rate > 0.01 ? "bad" : t.error_rate > 0 ? "warn" : "good");
  set("errors", fmt.num(t.errors_per_s) + " errors/s");
  set("retries", fmt.num(t.retries_per_s) + "/s");
  set("retries-total", t.retries_total + " since start");
  set("budget", t.budget, t.budget === "ok" ? "good" : "bad");
  set("budget-refused", fmt.num(t.budget_refused_per_s) + "/s refused, " + t.budget_refused_total + " since start");
  const g = d.gateway;
  set("serving", g.serving + " serving", g.serving === 0 ? "bad" : g.panic ? "warn" : "good");
  set("worker-count", g.healthy + " healthy of " + g.workers + (g.panic ? " — PANIC MODE" : ""));
  const registry = d.redis.registry;
  const lease = d.redis.lease;
  const down = registry === "unreachable" || lease === false;
  set("redis", down ? "unreachable" : registry === "unknown" && lease == null ? "not used" : "reachable",
      down ? "bad" : registry === "unknown" && lease == null ? "" : "good");
  set("redis-detail", "registry: " + registry + (lease == null ? "" : ", lease: " + (lease ? "reachable" : "unreachable")));

  // TLS on: the certificate that expires first, colored as the alerts (< 3 days, < 14 days).
  const certs = (d.tls && d.tls.certificates) || [];
  document.getElementById("tls-card").hidden = certs.length === 0;
  if (certs.length > 0) {
    const soonest = Math.min(...certs.map((c) => c.days_left));
    set("tls", soonest.toFixed(soonest < 10 ? 1 : 0) + " days", soonest < 3 ? "bad" : soonest < 14 ? "warn" : "good");
    set("tls-detail", "left; " + certs.map((c) => c.name + ": " + c.days_left.toFixed(0) + " d").join(", "));
  }

  const status = document.getElementById("status");
  const ready = g.ready;
  status.textContent = ready ? (g.panic ? "panic mode" : "ready") : "not ready";
  status.className = "pill " + (ready ? (g.panic ? "warn" : "good") : "bad");
  status.dataset.ready = String(ready);
  document.getElementById("updated").textContent = "updated " + fmt.time(d.now_ms);
  document.getElementById("window").textContent = d.window_s ? "(rates over the last " + d.window_s + " s)" : "";
}

function renderPair(d) {
  const box = document.getElementById("pair");
  const p = d.pair;
  box.replaceChildren();
  if (!p.enabled) {
    box.append(el("span", { class: "muted" }, "single gateway (failover off)"));
    return;
  }
  box.dataset.role = p.role;
  box.append(
    el("span", {}, "this gateway ", el("b", {}, p.id), " is ", el("b", { class: p.role === "active" ? "good" : "warn" }, p.role)),
    el("span", {}, "epoch ", el("b", {}, p.epoch)),
    el("span", {}, "address ", el("b", {}, p.holds_address ? "held here" : "not here")),
    el("span", {}, "peer ", el("b", { class: p.peer.reachable ? "good" : "bad" },
      (p.peer.id || "?") + (p.peer.reachable ? " reachable" : " unreachable") + (p.peer.role ? " (" + p.peer.role + ")" : ""))),
  );
  const last = p.last_transition;
  box.append(el("div", { class: "muted" }, last
    ? "last transition: " + last.from + " → " + last.to + ", " + fmt.ago(last.at_unix_ms, d.now_ms) + " — " + last.reason
      + " (" + p.transitions + " since start)"
    : "no transition since start"));
}

function renderWorkers(d) {
  const box = document.getElementById("machines");
  const tables = d.machines.map((m) => {
    const head = el("tr", {}, ...["worker", "address", "state", "in flight", "req/s", "p50", "p99", "errors/s",
      "errors", "ejections", "weight", "last change"].map((h, i) => el("th", { class: i >= 3 && i <= 10 ? "num" : "" }, h)));
    const rows = m.workers.map((w) => {
      const state = el("span", { class: "state " + w.state }, w.state.replace("_", " "));
      const change = w.last_change;
      return el("tr", { "data-worker": w.id, "data-state": w.state },
        el("td", {}, w.id), el("td", { class: "muted" }, w.addr), el("td", {}, state),
        el("td", { class: "num" }, w.in_flight), el("td", { class: "num" }, fmt.num(w.req_per_s)),
        el("td", { class: "num" }, fmt.ms(w.p50_ms)), el("td", { class: "num" }, fmt.ms(w.p99_ms)),
        el("td", { class: "num" + (w.errors_per_s > 0 ? " bad" : "") }, fmt.num(w.errors_per_s)),
        el("td", { class: "num" }, w.errors_total), el("td", { class: "num" }, w.ejections),
        el("td", { class: "num" }, w.weight),
        el("td", { class: "why" }, change.what + " " + fmt.ago(change.at_ms, d.now_ms) + ": " + change.reason));
    });
    const cols = el("colgroup", {}, el("col", { class: "id" }), el("col", { class: "addr" }), el("col", { class: "state" }),
      ...Array.from({ length: 8 }, () => el("col", { class: "n" })), el("col", { class: "why" }));
    return el("table", { class: "workers", "data-machine": m.machine },
      el("caption", {}, "machine " + m.machine + " — " + m.workers.length + " worker" + (m.workers.length === 1 ? "" : "s")),
      cols, el("thead", {}, head), el("tbody", {}, ...rows));
  });
  if (tables.length === 0) tables.push(el("p", { class: "bad" }, "no workers known"));
  box.replaceChildren(...tables);
}

function renderEvents(d) {
  const rows = d.events.map((e) => el("tr", { "data-seq": e.seq },
    el("td", {}, fmt.time(e.at_ms)), el("td", { class: "muted" }, e.subject), el("td", {}, e.name),
    el("td", {}, e.what), el("td", { class: "why" }, e.reason)));
  document.getElementById("events").replaceChildren(...rows);
}

async function poll() {
  try {
    const response = await fetch("/api/dashboard", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      window.location.href = "/dashboard";
      return;
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    const d = await response.json();
    renderTotals(d);
    renderPair(d);
    renderWorkers(d);
    renderEvents(d);
  } catch (error) {
    const status = document.getElementById("status");
    status.textContent = "gateway unreachable";
    status.className = "pill bad";
    status.dataset.ready = "unknown";
  }
  setTimeout(poll, POLL_MS);
}

function login(form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value;
    // The token goes in a header, not the address: it stays out of history and access logs.
    const response = await fetch("/dashboard/login", {
      method: "POST", credentials: "same-origin", headers: { Authorization: "Bearer " + token },
    });
    if (response.ok) window.location.href = "/dashboard";
    else document.getElementById("message").textContent = "Wrong token.";
  });
}

const form = document.getElementById("login");
if (form) login(form); else poll();
