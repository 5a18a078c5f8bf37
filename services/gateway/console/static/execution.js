// One execution: the DAG (left to right), a Gantt of every attempt, the selected step, the history with a
// time-travel slider (state as of event N, from /v1/executions/{id}/at/{n}), controls and replay; live over SSE.
"use strict";
(() => {
  const {h, api, sse, flash, fmt, badge, parseJson} = Weft;
  const id = document.body.dataset.id;
  let history = [];      // every event so far, seq 1..N
  let current = null;    // the latest summary (GET /v1/executions/{id})
  let shown = null;      // what is drawn: the latest, or the state as of event N
  let travel = null;     // N while time-travelling, else null
  let selected = null;   // the selected step id
  let refreshing = null;

  const definition = () => (history[0] && history[0].definition) || {steps: []};
  const upto = () => (travel === null ? history : history.slice(0, travel));

  // ---- the DAG -------------------------------------------------------------------------------------
  function layout(steps) {
    const depth = {};
    const byId = Object.fromEntries(steps.map((s) => [s.id, s]));
    function d(sid, seen) {
      if (depth[sid] !== undefined) return depth[sid];
      if (seen.has(sid)) return 0;
      seen.add(sid);
      const needs = (byId[sid] && byId[sid].needs) || [];
      depth[sid] = needs.length ? 1 + Math.max(...needs.map((n) => d(n, seen))) : 0;
      return depth[sid];
    }
    steps.forEach((s) => d(s.id, new Set()));
    const columns = [];
    for (const s of steps) (columns[depth[s.id]] = columns[depth[s.id]] || []).push(s.id);
    const pos = {};
    columns.forEach((col, x) => col.forEach((sid, y) => { pos[sid] = {x: 20 + x * 240, y: 20 + y * 70}; }));
    const height = 40 + Math.max(1, ...columns.map((c) => c.length)) * 70;
    return {pos, width: 40 + columns.length * 240, height};
  }

  function renderDag(summary) {
    const steps = definition().steps || [];
    const status = Object.fromEntries((summary.steps || []).map((s) => [s.step_id, s]));
    const {pos, width, height} = layout(steps);
    const svg = h("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "workflow graph"});
    for (const s of steps) {
      for (const parent of s.needs || []) {
        if (!pos[parent]) continue;
        const a = pos[parent], b = pos[s.id];
        const x1 = a.x + 190, y1 = a.y + 22, x2 = b.x, y2 = b.y + 22, mid = (x1 + x2) / 2;
        const off = status[s.id] && status[s.id].status === "skipped";
        svg.append(h("path", {class: "edge" + (off ? " off" : ""), d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`}));
      }
    }
    for (const s of steps) {
      const st = status[s.id] || {status: "pending"};
      const p = pos[s.id];
      let sub = st.status;
      if (s.map) sub += ` · ${st.items === null || st.items === undefined ? "?" : st.items} items`;
      if (st.attempts > 1 && !s.map) sub += ` · ${st.attempts} tries`;
      const g = h("g", {class: `node n-${st.status}${selected === s.id ? " selected" : ""}`, "data-step": s.id,
                        "data-status": st.status, transform: `translate(${p.x},${p.y})`, onclick: () => select(s.id)},
        h("title", {}, `${s.id} (${s.type}): ${st.status}`),
        h("rect", {class: "f-" + st.status, width: 190, height: 44, rx: 6}),
        h("text", {x: 10, y: 18}, s.id.length > 26 ? s.id.slice(0, 25) + "…" : s.id),
        h("text", {x: 10, y: 35, class: "sub"}, sub));
      svg.append(g);
    }
    document.getElementById("dag").replaceChildren(svg);
  }

  // ---- the Gantt of attempts -----------------------------------------------------------------------
  function attempts(events) {
    const rows = new Map();
    const key = (e) => `${e.step_id}|${e.item === null || e.item === undefined ? "" : e.item}|${e.attempt}`;
    for (const e of events) {
      if (e.type === "StepScheduled") {
        rows.set(key(e), {step: e.step_id, item: e.item, attempt: e.attempt, scheduled: Date.parse(e.at),
                          notBefore: e.not_before ? Date.parse(e.not_before) : null, status: "queued", reason: e.reason});
      } else if ((e.type === "StepSucceeded" || e.type === "StepFailed") && e.attempt > 0 && rows.has(key(e))) {
        const r = rows.get(key(e));
        r.status = e.type === "StepSucceeded" ? "succeeded" : "failed";
        r.started = e.started_at ? Date.parse(e.started_at) : null;
        r.finished = Date.parse(e.finished_at || e.at);
        r.worker = e.worker_id;
        r.error = e.type === "StepFailed" ? `${e.error_type}: ${e.error_message}` : null;
      }
    }
    return [...rows.values()];
  }

  function renderGantt(events) {
    const rows = attempts(events);
    const box = document.getElementById("gantt");
    if (!rows.length) { box.replaceChildren(h("p", {class: "meta"}, "No attempts yet.")); return; }
    const last = events.length ? Date.parse(events[events.length - 1].at) : Date.now();
    const end = (current && ["running", "paused"].includes(current.status) && travel === null) ? Date.now() : last;
    const t0 = Math.min(...rows.map((r) => r.scheduled));
    const t1 = Math.max(end, ...rows.map((r) => r.finished || r.scheduled)) + 1;
    const left = 130, width = 300, rowH = 22;
    const x = (t) => left + ((t - t0) / (t1 - t0)) * width;
    const svg = h("svg", {width: left + width + 140, height: rows.length * rowH + 30});
    svg.append(h("line", {class: "axis", x1: left, y1: rows.length * rowH + 4, x2: left + width, y2: rows.length * rowH + 4}));
    svg.append(h("text", {x: left, y: rows.length * rowH + 20}, "0"));
    svg.append(h("text", {x: left + width - 40, y: rows.length * rowH + 20}, fmt.ms(t1 - t0)));
    rows.forEach((r, i) => {
      const y = i * rowH + 4;
      const label = `${r.step}${r.item !== null && r.item !== undefined ? "#" + r.item : ""} · ${r.attempt}`;
      const g = h("g", {class: "attempt", "data-step": r.step, "data-status": r.status});
      g.append(h("text", {x: 0, y: y + 12}, label));
      const ready = r.notBefore && r.notBefore > r.scheduled ? r.notBefore : r.scheduled;
      if (ready > r.scheduled) g.append(h("rect", {class: "f-backoff", x: x(r.scheduled), y, height: 14, width: Math.max(1, x(ready) - x(r.scheduled))},
                                         h("title", {}, `retry back-off ${fmt.ms(ready - r.scheduled)}`)));
      const started = r.started || (r.finished ? r.finished : null);
      const queuedEnd = started || end;
      g.append(h("rect", {class: "f-queued", x: x(ready), y, height: 14, width: Math.max(1, x(queuedEnd) - x(ready))},
                 h("title", {}, `queued ${fmt.ms(queuedEnd - ready)}`)));
      if (started) {
        const fin = r.finished || end;
        g.append(h("rect", {class: "f-" + (r.status === "queued" ? "running" : r.status), x: x(started), y, height: 14,
                            width: Math.max(2, x(fin) - x(started))},
                   h("title", {}, `${r.status} in ${fmt.ms(fin - started)}${r.worker ? " on " + r.worker : ""}${r.error ? "\n" + r.error : ""}`)));
        g.append(h("text", {x: left + width + 6, y: y + 12}, `${fmt.ms(fin - started)} ${r.worker || ""}`.slice(0, 26)));
      } else {
        g.append(h("text", {x: left + width + 6, y: y + 12}, r.status));
      }
      svg.append(g);
    });
    box.replaceChildren(svg, h("p", {class: "legend"}, ...["queued", "backoff", "running", "succeeded", "failed"].map(
      (k) => h("span", {}, h("i", {class: "l-" + k}), k === "backoff" ? "retry back-off" : k))));
  }

  // ---- steps, the selected step, the history -------------------------------------------------------
  function renderSteps(summary) {
    const tbody = document.querySelector("#steps tbody");
    tbody.replaceChildren(...(summary.steps || []).map((s) => h("tr", {"data-step": s.step_id, class: selected === s.step_id ? "selected" : "",
                                                                        onclick: () => select(s.step_id)},
      h("td", {}, s.step_id), h("td", {}, badge(s.status)), h("td", {}, s.attempts), h("td", {}, s.items === null ? "" : s.items),
      h("td", {}, s.error ? `${s.error.type}: ${s.error.message}` : (s.reused_from ? `reused from ${s.reused_from.slice(0, 8)}` : (s.skip_reason || ""))))));
  }

  function block(title, value, pre) {
    return [h("h3", {}, title), h("pre", {class: pre || ""}, typeof value === "string" ? value : fmt.json(value))];
  }

  function renderDetail() {
    const box = document.getElementById("step-detail");
    if (!selected) { box.replaceChildren(h("p", {class: "meta"}, "Select a step in the graph or the table.")); return; }
    const evs = upto().filter((e) => e.step_id === selected);
    const out = [h("h3", {}, `Step ${selected}`)];
    const scheduled = evs.filter((e) => e.type === "StepScheduled");
    if (scheduled.length) {
      const inputs = scheduled.filter((e) => e.attempt === scheduled[scheduled.length - 1].attempt);
      out.push(...block("Input", inputs.length === 1 ? inputs[0].input : inputs.map((e) => e.input), "input"));
    }
    const st = (shown.steps || []).find((s) => s.step_id === selected);
    if (st && st.output !== null && st.output !== undefined) out.push(...block("Output", st.output, "output"));
    const failed = evs.filter((e) => e.type === "StepFailed");
    if (failed.length) {
      const f = failed[failed.length - 1];
      out.push(...block("Error", `${f.error_type}: ${f.error_message} (attempt ${f.attempt}${f.worker_id ? ", " + f.worker_id : ""})`, "error"));
      if (f.traceback) out.push(...block("Traceback", f.traceback, "traceback"));
    }
    const dead = evs.filter((e) => e.type === "StepDeadLettered");
    if (dead.length) out.push(h("p", {}, "Dead-lettered: " + dead[dead.length - 1].reason + " ", h("a", {href: `/ui/deadletters?workflow=${encodeURIComponent(current.workflow)}&step=${encodeURIComponent(selected)}`, id: "dead-letters-link"}, "its dead letters")));
    box.replaceChildren(...out);
  }

  function detailOf(e) {
    if (e.error_type) return `${e.error_type}: ${e.error_message}`;
    if (e.type === "StepScheduled") return `attempt ${e.attempt} (${e.reason})`;
    if (e.type === "StepSucceeded") return `attempt ${e.attempt}${e.worker_id ? " on " + e.worker_id : ""}`;
    if (e.type === "ExecutionStarted") return `${e.workflow}@${e.version}${e.replay_of ? " replay of " + e.replay_of : ""}`;
    return e.reason || e.why || (e.by && e.by !== "user" ? "by " + e.by : "");
  }

  function renderHistory() {
    const tbody = document.querySelector("#history tbody");
    tbody.replaceChildren(...history.map((e) => h("tr", {"data-seq": e.seq, class: travel !== null && e.seq > travel ? "future" : ""},
      h("td", {}, e.seq), h("td", {}, fmt.time(e.at).slice(11)), h("td", {}, e.type),
      h("td", {}, e.step_id ? e.step_id + (e.item !== null && e.item !== undefined ? "#" + e.item : "") : ""),
      h("td", {}, detailOf(e)))));
  }

  function select(stepId) { selected = stepId; render(); }

  // ---- putting it together -------------------------------------------------------------------------
  function render() {
    if (!shown) return;
    document.getElementById("x-status").replaceWith(Object.assign(badge(shown.status), {id: "x-status"}));
    const meta = [`${current.workflow}@${current.version}`, `started ${fmt.time(current.started_at)}`];
    if (current.duration_ms !== undefined && current.duration_ms !== null) meta.push(`took ${fmt.ms(current.duration_ms)}`);
    if (current.replay_of) meta.push(`replay of ${current.replay_of}`);
    if (current.error) meta.push(`error in ${current.error.step_id}: ${current.error.type}: ${current.error.message}`);
    document.getElementById("x-meta").textContent = meta.join(" · ");
    const slider = document.getElementById("travel");
    slider.max = String(Math.max(1, history.length));
    slider.value = String(travel === null ? history.length : travel);
    document.getElementById("travel-label").textContent = travel === null ? `live · ${history.length} events` : `as of event ${travel} of ${history.length}`;
    document.getElementById("as-of").textContent = travel === null ? "" : `(as of event ${travel}: ${history[travel - 1].type})`;
    document.getElementById("travel-live").hidden = travel === null;
    renderDag(shown);
    renderSteps(shown);
    renderDetail();
    renderGantt(upto());
    renderHistory();
    for (const b of document.querySelectorAll("[data-control]")) {
      const allowed = {cancel: ["running", "paused"], pause: ["running"], resume: ["paused"], retry: ["failed"]}[b.dataset.control];
      b.disabled = travel !== null || !allowed.includes(current.status);
    }
  }

  async function refresh() {
    const latest = await api("GET", "/v1/executions/" + id);
    current = latest;
    if (travel === null) shown = latest;
    render();
  }

  function soon() {
    clearTimeout(refreshing);
    refreshing = setTimeout(() => refresh().catch((e) => flash(e.message, "bad")), 250);
  }

  async function travelTo(n) {
    if (n >= history.length) { travel = null; shown = current; render(); return; }
    const state = await api("GET", `/v1/executions/${id}/at/${n}`);
    travel = n; shown = state; render();
  }

  async function loadHistory() {
    const page = await api("GET", `/v1/executions/${id}/history?limit=10000`);
    history = page.items;
  }

  function follow() {
    sse(`/v1/executions/${id}/events?after=${history.length}`, (type, e) => {
      if (e.seq !== history.length + 1) return;  // a duplicate after a reconnect
      history.push(e); soon();
    }, {onEnd: soon});
  }

  function setupControls() {
    for (const b of document.querySelectorAll("[data-control]")) {
      b.addEventListener("click", async () => {
        const out = document.getElementById("control-result");
        try {
          const res = await api("POST", `/v1/executions/${id}/${b.dataset.control}`, {});
          out.textContent = `${b.dataset.control}: ${(res.applied || []).join(", ") || "nothing to do"}`;
          current = res; if (travel === null) shown = res; render();
          if (["resume", "retry"].includes(b.dataset.control)) follow();
        } catch (e) { out.textContent = e.message; }
      });
    }
  }

  function setupReplay() {
    const form = document.getElementById("replay-form");
    if (!form) return;
    let typing = null;
    document.getElementById("r-from").append(...(definition().steps || []).map((s) => h("option", {value: s.id}, s.id)));
    async function send(dry) {
      const box = document.getElementById("r-result");
      try {
        const body = {dry_run: dry, version: document.getElementById("r-version").value};
        const from = document.getElementById("r-from").value;
        if (from) body.from_step = from;
        const patch = parseJson(document.getElementById("r-patch").value, "input patch");
        if (patch !== null) body.input_patch = patch;
        const res = await api("POST", `/v1/executions/${id}/replay`, body);
        if (dry) {
          box.replaceChildren(h("h3", {}, "Dry run: nothing stored"),
            h("p", {id: "r-preview"}, h("b", {}, "re-runs: "), (res.run || []).join(", ") || "nothing", " · ",
              h("b", {}, "reuses: "), (res.reuse || []).join(", ") || "nothing",
              ` · version ${res.version}${res.dropped_steps && res.dropped_steps.length ? " · dropped " + res.dropped_steps.join(", ") : ""}`),
            ...block("Input of the replay", res.input));
        } else {
          const nid = res.execution_id || res.id;
          box.replaceChildren("Replay started: ", h("a", {href: "/ui/executions/" + nid, id: "r-link", class: "mono"}, nid));
        }
      } catch (e) { box.replaceChildren(h("p", {class: "error", id: "r-error"}, e.message)); }
    }
    document.getElementById("r-dry").addEventListener("click", () => send(true));
    // Check the patch as it is typed: a dry run validates it against the input schema and stores nothing.
    document.getElementById("r-patch").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => send(true), 700);
    });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); clearTimeout(typing); send(false); });
  }

  Weft.ready(async () => {
    await loadHistory();
    await refresh();
    setupControls();
    setupReplay();
    const slider = document.getElementById("travel");
    slider.addEventListener("input", () => { document.getElementById("travel-label").textContent = `event ${slider.value} of ${history.length}`; });
    slider.addEventListener("change", () => travelTo(Number(slider.value)).catch((e) => flash(e.message, "bad")));
    document.getElementById("travel-live").addEventListener("click", () => travelTo(history.length));
    follow();  // a finished execution's stream ends at once; retry and resume follow again
    setInterval(() => { if (current && current.status === "running" && travel === null) renderGantt(upto()); }, 1000);
  });
})();
