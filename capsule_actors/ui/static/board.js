// capsule-actors task board: renders api/board, follows api/stream (server-sent events),
// shows a task's detail, and posts cancel/retry. Authentication is the HttpOnly cookie that the
// first page load (?token=...) set; the script never sees the token.
"use strict";
(function () {
  const COLUMNS = ["QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
  const LIVE = new Set(["QUEUED", "SCHEDULED", "RUNNING"]);
  const $ = (sel) => document.querySelector(sel);
  const state = {
    filters: { name: "", session: "", lock: "", id: "" },
    short: new Map(),    // task id -> its short form among the tasks shown (shortIds)
    offsets: Object.fromEntries(COLUMNS.map((c) => [c, 0])),
    pageSize: 50,
    clockSkew: 0,        // server time - browser time, seconds
    detailId: null,
    detailFlow: false,   // the detail shows a workflow: its steps change without events of its own
    detailTimer: null,
    refreshTimer: null,
    refreshing: false,
    again: false,
    firstLoad: true,
    authFailed: false,
  };

  // ---- helpers --------------------------------------------------------------------------------
  function esc(value) {
    return String(value == null ? "" : value).replace(/[&<>"']/g, (c) => (
      { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function now() { return Date.now() / 1000 + state.clockSkew; }
  function duration(s) {
    if (s == null || isNaN(s)) return "-";
    s = Math.max(0, s);
    if (s < 60) return s.toFixed(1) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
  }
  // A task's short id: its last 8 characters (the random part; ids start with the time), or as
  // many more as it takes to tell it from every other task shown, as git does (ids.short_ids).
  function shortIds(ids) {
    const out = new Map();
    let pending = Array.from(new Set(ids));
    for (let width = 8; pending.length; width += 4) {
      const groups = new Map();
      for (const id of pending) {
        const end = id.slice(-width);
        if (!groups.has(end)) groups.set(end, []);
        groups.get(end).push(id);
      }
      pending = [];
      for (const same of groups.values()) {
        if (same.length === 1 || width >= 32) for (const id of same) out.set(id, id.slice(-width));
        else pending.push(...same);
      }
    }
    return out;
  }
  function shortId(id) { return state.short.get(id) || String(id).slice(-8); }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "-"; }
  function timing(t) {
    if (t.started_at) return "elapsed " + duration((t.finished_at || now()) - t.started_at);
    if (t.state === "SCHEDULED" && t.run_at) return "due in " + duration(t.run_at - now());
    if (t.state === "QUEUED" && t.run_at && t.run_at > now()) return "retry in " + duration(t.run_at - now());
    if (LIVE.has(t.state)) return "waiting " + duration(now() - t.created_at);
    return "never started";
  }
  let toastTimer = null;
  function toast(text, isError) {
    const el = $("#toast");
    el.textContent = text;
    el.className = isError ? "error" : "";
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, isError ? 8000 : 4000);
  }
  function banner(text, isError) {
    const el = $("#banner");
    if (!text) { el.hidden = true; return; }
    el.textContent = text;
    el.className = isError ? "error" : "";
    el.hidden = false;
  }
  function authProblem(status) {
    state.authFailed = true;
    banner(status === 401
      ? "401: this page has no access token. Open the URL that `capsule-actors board` printed (http://127.0.0.1:PORT/?token=…)."
      : "403: the access token was refused. Open the URL that `capsule-actors board` printed.", true);
  }
  async function api(path, options) {
    const resp = await fetch(path, Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {}));
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    return { status: resp.status, ok: resp.ok, body: body };
  }
  function setLive(online, text) {
    const el = $("#live");
    el.className = "live " + (online ? "on" : "off");
    $("#live-text").textContent = text || (online ? "live" : "supervisor offline");
  }

  // ---- cards ----------------------------------------------------------------------------------
  // A workflow is one card (api/board leaves its steps out of the columns): its kind and size,
  // its steps per state, the running ones named; it opens into its steps like any card.
  function flowCounts(f, live) {
    const n = (s) => f.states[s] || 0;
    const parts = [];
    if (live || n("RUNNING")) parts.push(n("RUNNING") + " running");
    if (n("SUCCEEDED")) parts.push(n("SUCCEEDED") + " done");
    if (n("FAILED")) parts.push(n("FAILED") + " failed");
    if (n("CANCELLED")) parts.push(n("CANCELLED") + " cancelled");
    if (n("QUEUED") + n("SCHEDULED")) parts.push(n("QUEUED") + n("SCHEDULED") + " waiting");
    return parts.join(" \u00B7 ");
  }
  function flowCardHtml(t) {
    const f = t.flow;
    const live = LIVE.has(t.state);
    const ended = (f.states.SUCCEEDED || 0) + (f.states.FAILED || 0) + (f.states.CANCELLED || 0);
    const pct = f.steps ? Math.round((100 * ended) / f.steps) : 0;
    const more = (f.states.RUNNING || 0) - f.running.length;
    const running = f.running.map((s) => esc(s.name) + ' <span class="cpsl-id">' + esc(shortId(s.id)) + "</span>");
    const runs = running.length
      ? '<div class="cpsl-flow-running">\u25B6 ' + running.join(", ") + (more > 0 ? " +" + more + " more" : "") + "</div>"
      : "";
    const meta = [
      pct + "%",  // of its steps ended
      '<span class="elapsed">' + esc(timing(flowTimes(t))) + "</span>",
      '<span class="cpsl-id" title="' + esc(t.id) + '">' + esc(shortId(t.id)) + "</span>",
    ];
    if (t.session_id) meta.push("session " + esc(t.session_id));
    const err = t.error && t.state !== "SUCCEEDED" ? '<div class="cpsl-error">' + esc(t.error.slice(0, 300)) + "</div>" : "";
    const action = live  // a workflow's record is not retried (its failed steps are, from its detail)
      ? '<button type="button" class="danger" data-action="cancel" data-id="' + esc(t.id) + '">Cancel</button>' : "";
    return '<div class="cpsl-card cpsl-flow cpsl-' + esc(t.state) + (t.id === state.detailId ? " selected" : "") +
      '" data-task-id="' + esc(t.id) + '" data-state="' + esc(t.state) + '" data-started="' + esc(t.created_at || "") +
      '" data-finished="' + esc(t.finished_at || "") + '" data-created="' + esc(t.created_at || "") + '" data-run-at="">' +
      '<div class="cpsl-card-head"><span class="cpsl-name" title="workflow (' + esc(t.name) + ')">' +
      esc(f.kind) + ": " + esc(f.steps) + " step" + (f.steps === 1 ? "" : "s") + "</span>" +
      '<span class="cpsl-state">' + esc(t.state) + "</span></div>" +
      '<div class="cpsl-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="' + pct +
      '"><div style="width:' + pct + '%"></div></div>' +
      '<div class="cpsl-flow-sum">' + esc(flowCounts(f, live)) + "</div>" + runs +
      '<div class="cpsl-meta">' + meta.map((m) => "<span>" + m + "</span>").join("") + "</div>" + err +
      '<div class="card-actions">' + action + "</div></div>";
  }
  function flowTimes(t) {  // a workflow runs from its submit (its record never starts)
    return { state: t.state, started_at: t.created_at, finished_at: t.finished_at, created_at: t.created_at };
  }
  function cardHtml(t) {
    if (t.flow) return flowCardHtml(t);
    const pct = t.state === "SUCCEEDED" ? 100 : (t.progress == null ? null : Math.round(t.progress * 100));
    const meta = [
      pct == null ? "" : pct + "%",
      '<span class="elapsed">' + esc(timing(t)) + "</span>",
      "attempt " + esc(t.attempts),
      '<span class="cpsl-id" title="' + esc(t.id) + '">' + esc(shortId(t.id)) + "</span>",
    ];
    if (t.lock_key) meta.push("lock " + esc(t.lock_key));
    if (t.session_id) meta.push("session " + esc(t.session_id));
    const action = LIVE.has(t.state)
      ? '<button type="button" class="danger" data-action="cancel" data-id="' + esc(t.id) + '">Cancel</button>'
      : '<button type="button" class="primary" data-action="retry" data-id="' + esc(t.id) + '">Retry</button>';
    const err = t.error && t.state !== "SUCCEEDED" ? '<div class="cpsl-error">' + esc(t.error.slice(0, 300)) + "</div>" : "";
    return '<div class="cpsl-card cpsl-' + esc(t.state) + (t.id === state.detailId ? " selected" : "") +
      '" data-task-id="' + esc(t.id) + '" data-state="' + esc(t.state) + '" data-started="' + esc(t.started_at || "") +
      '" data-finished="' + esc(t.finished_at || "") + '" data-created="' + esc(t.created_at || "") +
      '" data-run-at="' + esc(t.run_at || "") + '">' +
      '<div class="cpsl-card-head"><span class="cpsl-name" title="' + esc(t.name) + '">' + esc(t.name) + "</span>" +
      '<span class="cpsl-state">' + esc(t.state) + "</span></div>" +
      '<div class="cpsl-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"' +
      (pct == null ? "" : ' aria-valuenow="' + pct + '"') + '><div style="width:' + (pct || 0) + '%"></div></div>' +
      '<div class="cpsl-meta">' + meta.filter((m) => m).map((m) => "<span>" + m + "</span>").join("") + "</div>" + err +
      '<div class="card-actions">' + action + "</div></div>";
  }

  function renderColumn(col, pageSize) {
    const section = document.getElementById("col-" + col.state);
    section.querySelector(".count").textContent = col.count.toLocaleString();
    const steps = section.querySelector(".steps");
    steps.hidden = !col.steps;
    steps.textContent = col.steps ? "+" + col.steps.toLocaleString() + " in workflows" : "";
    const cards = section.querySelector(".cards");
    // keyed update: a card whose task did not change keeps its element (no flicker, no lost click)
    const existing = new Map();
    for (const el of cards.querySelectorAll(":scope > .cpsl-card")) existing.set(el.dataset.taskId, el);
    const wanted = col.tasks.map((t) => {
      const sig = JSON.stringify(t) + shortId(t.id);
      let el = existing.get(t.id);
      if (!el || el.dataset.sig !== sig) {
        const tpl = document.createElement("template");
        tpl.innerHTML = cardHtml(t);
        el = tpl.content.firstElementChild;
        el.dataset.sig = sig;
      }
      el.classList.toggle("selected", t.id === state.detailId);
      return el;
    });
    if (wanted.length) cards.replaceChildren(...wanted);
    else cards.innerHTML = '<div class="empty">no tasks</div>';
    state.offsets[col.state] = col.offset;
    const pager = section.querySelector(".pager");
    if (col.count > pageSize) {
      const last = Math.min(col.offset + pageSize, col.count);
      const html = '<button type="button" data-page="-1"' + (col.offset <= 0 ? " disabled" : "") + ">‹</button>" +
        "<span>" + (col.offset + 1).toLocaleString() + "–" + last.toLocaleString() + " of " + col.count.toLocaleString() +
        "</span>" + '<button type="button" data-page="1"' + (last >= col.count ? " disabled" : "") + ">›</button>";
      if (pager.dataset.html !== html) { pager.innerHTML = html; pager.dataset.html = html; }  // untouched when unchanged
      pager.classList.add("on");
    } else {
      pager.innerHTML = "";
      pager.dataset.html = "";
      pager.classList.remove("on");
    }
  }

  function boardQuery(withNames) {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(state.filters)) if (v) p.set(k, v);
    for (const c of COLUMNS) if (state.offsets[c]) p.set("offset_" + c, state.offsets[c]);
    if (withNames) p.set("names", "1");
    return "api/board?" + p.toString();
  }

  async function refresh() {
    if (state.refreshing) { state.again = true; return; }
    state.refreshing = true;
    try {
      const withNames = state.firstLoad;
      const r = await api(boardQuery(withNames));
      if (r.status === 401 || r.status === 403) { authProblem(r.status); return; }
      if (!r.ok || !r.body) { banner("The board could not load its data (" + r.status + ").", true); return; }
      if (!state.authFailed) banner(null);
      const data = r.body;
      state.clockSkew = data.now - Date.now() / 1000;
      state.pageSize = data.page_size;
      state.short = shortIds(data.columns.flatMap((col) => col.tasks.flatMap((t) =>
        [t.id, ...(t.flow ? t.flow.running.map((s) => s.id) : [])])));
      for (const col of data.columns) renderColumn(col, data.page_size);
      if (data.names) {
        $("#names").innerHTML = data.names.map((n) => '<option value="' + esc(n) + '">').join("");
      }
      state.firstLoad = false;
      document.body.dataset.seq = data.seq;
      document.body.dataset.loaded = "1";
    } catch (e) {
      setLive(false, "disconnected");
    } finally {
      state.refreshing = false;
      if (state.again) { state.again = false; scheduleRefresh(0); }
    }
  }
  function scheduleDetail() {  // a workflow's detail follows its steps, at most ~3 times a second
    if (state.detailTimer) return;
    state.detailTimer = setTimeout(() => {
      state.detailTimer = null;
      if (state.detailId) showDetail(state.detailId);
    }, state.detailFlow ? 300 : 0);
  }
  function scheduleRefresh(delay) {
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refresh(); }, delay == null ? 150 : delay);
  }

  function tick() {  // elapsed / waiting times move every second without a request
    for (const card of document.querySelectorAll(".cpsl-card[data-task-id]")) {
      const t = {
        state: card.dataset.state,
        started_at: parseFloat(card.dataset.started) || null,
        finished_at: parseFloat(card.dataset.finished) || null,
        created_at: parseFloat(card.dataset.created) || null,
        run_at: parseFloat(card.dataset.runAt) || null,
      };
      const el = card.querySelector(".elapsed");
      if (el) el.textContent = timing(t);
    }
  }

  // ---- detail ---------------------------------------------------------------------------------
  function row(label, value) { return "<tr><th>" + esc(label) + "</th><td>" + value + "</td></tr>"; }
  async function showDetail(id) {
    state.detailId = id;
    for (const el of document.querySelectorAll(".cpsl-card.selected")) el.classList.remove("selected");
    const card = document.querySelector('.cpsl-card[data-task-id="' + CSS.escape(id) + '"]');
    if (card) card.classList.add("selected");
    const r = await api("api/tasks/" + encodeURIComponent(id));
    if (state.detailId !== id) return;
    if (r.status === 401 || r.status === 403) { authProblem(r.status); return; }
    const panel = $("#detail");
    panel.hidden = false;
    if (!r.ok) { $("#d-title").textContent = "task " + id; $("#d-body").textContent = (r.body && r.body.error) || String(r.status); return; }
    const t = r.body;
    state.clockSkew = t.now - Date.now() / 1000;
    state.detailFlow = !!t.flow;
    $("#d-title").textContent = !t.flow ? t.name : t.flow.kind === "workflow" ? "workflow" : t.flow.kind + " (workflow)";
    const pct = t.progress == null ? "-" : Math.round(t.progress * 100) + "%" + (t.message ? " — " + esc(t.message) : "");
    const args = t.args.bytes + " bytes, " + esc(t.args.format) + " (pickled; the board does not unpickle it)";
    const result = t.result ? t.result.bytes + " bytes, " + esc(t.result.format) + " (pickled)" : "-";
    const resultLabel = t.state === "SUCCEEDED" ? "result" : "exception";
    const action = LIVE.has(t.state)
      ? '<button type="button" class="danger" data-action="cancel" data-id="' + esc(t.id) + '">Cancel</button>'
      : t.flow ? "" : '<button type="button" class="primary" data-action="retry" data-id="' + esc(t.id) + '">Retry</button>';
    const events = t.events.map((e) =>
      "<tr><td>" + esc(e.seq) + "</td><td>" + esc(new Date(e.ts * 1000).toLocaleTimeString()) + '</td><td class="kind">' +
      esc(e.kind) + '</td><td class="data">' + esc(JSON.stringify(e.data).slice(0, 240)) + "</td></tr>").join("");
    $("#d-body").innerHTML =
      '<div class="card-actions" id="d-actions">' + action + "</div>" +
      '<table id="d-fields">' +
      row("id", '<span class="cpsl-id">' + esc(t.id) + "</span>") +
      row("state", '<span id="d-state">' + esc(t.state) + "</span>" +
        (t.record_state ? " (its record waits for its steps: " + esc(t.record_state) + ")" : "")) +
      (t.flow_id ? row("workflow", '<a href="#" class="cpsl-id" id="d-flow" data-open="' + esc(t.flow_id) + '">' +
        esc(t.flow_id) + "</a> (this task is one of its steps)") : "") +
      row("attempts", esc(t.attempts)) +
      row("progress", pct) +
      row("arguments", '<span id="d-args">' + args + "</span>") +
      row(resultLabel, result) +
      row("error", t.error ? '<span class="cpsl-error">' + esc(t.error) + "</span>" : "-") +
      row("lock key", esc(t.lock_key || "-")) +
      row("session", esc(t.session_id || "-") + (t.session_owner ? " (owner " + esc(t.session_owner) + ")" : "")) +
      row("actor slot", esc(t.slot || "-")) +
      row("created", esc(when(t.created_at))) +
      row("started", esc(when(t.started_at))) +
      row("finished", esc(when(t.finished_at))) +
      (t.run_at ? row("run at", esc(when(t.run_at))) : "") +
      row("timing", esc(timing(t))) +
      "</table>" +
      (t.flow ? flowSteps(t.flow) : "") +
      (t.traceback ? '<h3>Traceback</h3><pre id="d-traceback">' + esc(t.traceback) + "</pre>" : "") +
      "<h3>Events (" + esc(t.events_total) + ")</h3>" +
      '<table class="events" id="d-events">' + events + "</table>";
  }
  function inputText(spec) {
    if (spec == null) return "-";
    return typeof spec === "string" ? shortId(spec) : "[" + spec.map(inputText).join(", ") + "]";
  }
  function flowSteps(f) {  // a workflow opens into its steps: state per step, the running ones marked
    const running = f.step_rows.filter((s) => s.state === "RUNNING").length;
    const rows = f.step_rows.map((s) =>
      '<tr class="cpsl-step' + (s.state === "RUNNING" ? " running" : "") + '"><td><a href="#" class="cpsl-id" data-open="' +
      esc(s.id) + '">' + esc(shortId(s.id)) + "</a></td><td>" + esc(s.name) + '</td><td class="state">' +
      esc(s.state) + (s.state === "RUNNING" ? " \u25B6" : "") + "</td><td>" + esc(s.attempts) + "</td><td>" +
      esc(s.id === f.on_error ? "on_error" : inputText(f.inputs[s.id])) + '</td><td class="cpsl-error">' +
      esc(s.error || "") + "</td></tr>").join("");
    return "<h3>Steps (" + f.step_rows.length + ", " + running + ' running)</h3><table class="events" id="d-steps">' +
      "<tr><th>step</th><th>task</th><th>state</th><th>attempts</th><th>input</th><th>error</th></tr>" + rows + "</table>";
  }
  function closeDetail() {
    state.detailId = null;
    state.detailFlow = false;
    $("#detail").hidden = true;
    for (const el of document.querySelectorAll(".cpsl-card.selected")) el.classList.remove("selected");
  }

  // ---- actions --------------------------------------------------------------------------------
  async function act(action, id, button) {
    if (button) button.disabled = true;
    try {
      const r = await api("api/tasks/" + encodeURIComponent(id) + "/" + action,
        { method: "POST", headers: { "X-Requested-With": "capsule-board" } });
      if (r.status === 401 || r.status === 403) {
        toast((action === "cancel" ? "Cancel" : "Retry") + " refused: " + r.status +
          (r.status === 401 ? " (no access token)" : " (bad access token)"), true);
        authProblem(r.status);
        return;
      }
      if (!r.ok) { toast(action + " failed: " + r.status + " " + ((r.body && r.body.error) || ""), true); return; }
      if (action === "cancel") toast(r.body.cancelled ? "Cancelled " + shortId(id) : "Already finished: " + shortId(id));
      else toast("Retried " + shortId(id) + " as " + shortId(r.body.task_id) + (r.body.deduplicated ? " (joined a live one)" : ""));
      scheduleRefresh(0);
      if (state.detailId === id) showDetail(id);
    } catch (e) {
      toast(action + " failed: " + e, true);
    } finally {
      if (button) button.disabled = false;
    }
  }

  // ---- live feed ------------------------------------------------------------------------------
  function connect() {
    const source = new EventSource("api/stream");
    source.addEventListener("hello", (e) => {
      const d = JSON.parse(e.data);
      setLive(d.online);
      scheduleRefresh(0);  // (re)connected: catch up on anything missed
    });
    source.addEventListener("status", (e) => {
      const d = JSON.parse(e.data);
      setLive(d.online);
      scheduleRefresh(0);
    });
    source.addEventListener("tasks", (e) => {
      const d = JSON.parse(e.data);
      scheduleRefresh();
      if (state.detailId && (state.detailFlow || d.ids.indexOf(state.detailId) >= 0)) scheduleDetail();
    });
    source.onerror = () => {
      setLive(false, "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {  // refused (401/403) or the board stopped
        setTimeout(() => { refresh(); if (!state.authFailed) connect(); }, 2000);
      }
    };
  }

  // ---- wiring ---------------------------------------------------------------------------------
  let filterTimer = null;
  for (const key of ["name", "session", "lock", "id"]) {
    $("#f-" + key).addEventListener("input", (e) => {
      state.filters[key] = e.target.value.trim();
      for (const c of COLUMNS) state.offsets[c] = 0;
      clearTimeout(filterTimer);
      filterTimer = setTimeout(refresh, 200);
    });
  }
  $("#filters").addEventListener("submit", (e) => e.preventDefault());
  $("#f-clear").addEventListener("click", () => {
    for (const key of ["name", "session", "lock", "id"]) { $("#f-" + key).value = ""; state.filters[key] = ""; }
    for (const c of COLUMNS) state.offsets[c] = 0;
    refresh();
  });
  document.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-action]");
    if (button) { e.stopPropagation(); act(button.dataset.action, button.dataset.id, button); return; }
    const pageButton = e.target.closest("button[data-page]");
    if (pageButton) {
      const col = pageButton.closest(".column").dataset.state;
      state.offsets[col] = Math.max(0, state.offsets[col] + parseInt(pageButton.dataset.page, 10) * state.pageSize);
      refresh();
      return;
    }
    const step = e.target.closest("a[data-open]");
    if (step) { e.preventDefault(); showDetail(step.dataset.open); return; }
    const card = e.target.closest(".cpsl-card[data-task-id]");
    if (card) showDetail(card.dataset.taskId);
  });
  $("#d-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });

  refresh();
  connect();
  setInterval(tick, 1000);
})();
