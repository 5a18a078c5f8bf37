// One workflow: statistics, versions, a line diff between two versions, and a backfill (dry run, then launch
// with live progress: its executions finishing, counted from /v1/changes).
"use strict";
(() => {
  const {h, api, sse, fmt} = Weft;
  const name = document.body.dataset.workflow;
  const path = "/v1/workflows/" + encodeURIComponent(name);

  function lines(definition) { return JSON.stringify(definition, null, 2).split("\n"); }

  // A plain LCS line diff: definitions are small (a few hundred lines); past 3000 lines say so instead.
  function diff(a, b) {
    if (a.length * b.length > 9e6) return null;
    const m = a.length, n = b.length;
    const t = Array.from({length: m + 1}, () => new Uint16Array(n + 1));
    for (let i = m - 1; i >= 0; i--) for (let j = n - 1; j >= 0; j--) t[i][j] = a[i] === b[j] ? t[i + 1][j + 1] + 1 : Math.max(t[i + 1][j], t[i][j + 1]);
    const out = [];
    let i = 0, j = 0;
    while (i < m && j < n) {
      if (a[i] === b[j]) { out.push([" ", a[i]]); i++; j++; } else if (t[i + 1][j] >= t[i][j + 1]) out.push(["-", a[i++]]); else out.push(["+", b[j++]]);
    }
    while (i < m) out.push(["-", a[i++]]);
    while (j < n) out.push(["+", b[j++]]);
    return out;
  }

  async function showDiff() {
    const va = document.getElementById("d-a").value, vb = document.getElementById("d-b").value;
    const [a, b] = await Promise.all([api("GET", `${path}/versions/${va}`), api("GET", `${path}/versions/${vb}`)]);
    const d = diff(lines(a.definition), lines(b.definition));
    const box = document.getElementById("diff");
    if (d === null) { box.replaceChildren(h("p", {}, "Too large to compare here.")); return; }
    const changed = d.filter(([k]) => k !== " ").length;
    // Three lines of context around each change; the rest folds into "…".
    const near = d.map((_, i) => d.slice(Math.max(0, i - 3), i + 4).some(([k]) => k !== " "));
    const rows = [];
    d.forEach(([k, text], i) => {
      if (near[i] || !changed) rows.push(h("pre", {class: k === "+" ? "add" : k === "-" ? "del" : ""}, `${k} ${text}`));
      else if (i === 0 || near[i - 1]) rows.push(h("pre", {class: "meta"}, "  …"));
    });
    box.replaceChildren(h("p", {class: "meta", id: "diff-summary"}, changed ? `${changed} changed lines (${va} → ${vb})` : "identical"), ...rows);
  }

  async function stats() {
    const s = (await api("GET", "/v1/stats/workflows?workflow=" + encodeURIComponent(name))).items[0];
    const box = document.getElementById("stats");
    if (!s) { box.replaceChildren(h("p", {class: "meta"}, "No executions yet.")); return; }
    box.replaceChildren(h("p", {id: "stats-line"},
      ...["running", "paused", "completed", "failed", "cancelled"].map((k) => h("span", {class: "stat"}, Weft.badge(k), ` ${s[k]}  `)),
      ` · total ${s.total} · p50 ${fmt.ms(s.p50_ms) || "–"} · p95 ${fmt.ms(s.p95_ms) || "–"} · failure rate ` +
      (s.failure_rate === null ? "–" : (100 * s.failure_rate).toFixed(1) + " %")));
  }

  function progress(ids, after) {
    const pending = new Set(ids), total = ids.length;
    const bar = h("i", {}), label = h("span", {id: "b-progress"}, `0 of ${total} finished`);
    bar.style.width = "0%";
    const done = () => {
      const finished = total - pending.size;
      bar.style.width = `${total ? (100 * finished) / total : 100}%`;
      label.textContent = `${finished} of ${total} finished`;
    };
    const stream = sse(`/v1/changes?after=${after}`, (type, c) => {
      if (pending.has(c.execution_id) && ["completed", "failed", "cancelled"].includes(c.status)) { pending.delete(c.execution_id); done(); }
      if (!pending.size) stream.stop();
    });
    done();
    return h("p", {}, h("span", {class: "bar"}, bar), " ", label);
  }

  async function backfill(dry) {
    const box = document.getElementById("b-result");
    try {
      const from = document.getElementById("b-from").value, to = document.getElementById("b-to").value;
      if (!from || !to) throw new Error("give the time range (from, to)");
      const body = {workflow: name, from: new Date(from).toISOString(), to: new Date(to).toISOString(), dry_run: dry};
      const v = document.getElementById("b-version").value;
      if (v) body.version = Number(v);
      const type = document.getElementById("b-type").value.trim();
      if (type) body.event_type = type;
      const head = dry ? 0 : ((await api("GET", "/v1/projections")).items[0] || {head: 0}).head;  // follow from here
      const res = await api("POST", "/v1/backfills", body);
      const counts = ["total", "would_start", "started", "skipped", "failed", "remaining"].filter((k) => res[k])
        .map((k) => `${k.replace("_", " ")} ${res[k]}`).join(" · ") || "no recorded events in the range";
      const items = res.items || [];
      const started = items.filter((i) => i.outcome === "started").map((i) => i.execution_id);
      box.replaceChildren(h("h3", {id: "b-summary"}, `${dry ? "Dry run (nothing started)" : "Backfill " + (res.id || "")}: ${counts}`),
        ...(dry ? [] : [progress(started, head)]),
        h("ul", {}, ...items.slice(0, 200).map((i) => h("li", {"data-outcome": i.outcome}, `${i.outcome} · event ${i.id} at ${fmt.time(i.time)} `,
          i.execution_id && i.outcome !== "would_start" ? h("a", {href: "/ui/executions/" + i.execution_id, class: "mono"}, i.execution_id.slice(0, 8)) : ""))));
    } catch (e) { box.replaceChildren(h("p", {class: "error", id: "b-error"}, e.message)); }
  }

  Weft.ready(async () => {
    const versions = (await api("GET", path + "/versions")).items;
    document.querySelector("#versions tbody").replaceChildren(...versions.map((v) => h("tr", {},
      h("td", {}, v.version), h("td", {}, fmt.time(v.published_at)), h("td", {class: "mono"}, v.content_hash.slice(0, 19)))));
    for (const sel of ["d-a", "d-b"]) document.getElementById(sel).append(...versions.map((v) => h("option", {value: v.version}, v.version)));
    if (versions.length > 1) document.getElementById("d-a").value = String(versions[versions.length - 2].version);
    document.getElementById("d-b").value = String(versions[versions.length - 1].version);
    document.getElementById("diff-form").addEventListener("submit", (ev) => { ev.preventDefault(); showDiff().catch((e) => Weft.flash(e.message, "bad")); });
    await stats();
    const form = document.getElementById("backfill-form");
    if (form) {
      document.getElementById("b-version").append(...versions.map((v) => h("option", {value: v.version}, v.version)));
      const now = new Date(Date.now() - new Date().getTimezoneOffset() * 60000);
      document.getElementById("b-to").value = new Date(now.getTime() + 60000).toISOString().slice(0, 19);
      document.getElementById("b-from").value = new Date(now.getTime() - 86400000).toISOString().slice(0, 19);
      document.getElementById("b-dry").addEventListener("click", () => backfill(true));
      form.addEventListener("submit", (ev) => { ev.preventDefault(); backfill(false); });
    }
  });
})();
