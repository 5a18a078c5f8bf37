// The executions list: filters, cursor paging, live status changes over /v1/changes (SSE).
"use strict";
(() => {
  const {h, api, sse, flash, fmt, badge, parseJson} = Weft;
  const tbody = document.querySelector("#executions tbody");
  const cursors = [];  // the cursor of each page shown so far (null: the first)
  let next = null;
  let filters = {};
  // Rows per page: 25, or ?limit=N (1..100) in the address.
  const size = Math.min(100, Math.max(1, Number(new URLSearchParams(location.search).get("limit")) || 25));

  function utc(local) { return local ? new Date(local).toISOString() : null; }

  function readFilters() {
    const f = {};
    for (const name of ["workflow", "status", "id"]) {
      const v = document.getElementById("f-" + name).value.trim();
      if (v) f[name] = v;
    }
    for (const name of ["since", "until"]) {
      const v = utc(document.getElementById("f-" + name).value);
      if (v) f[name] = v;
    }
    return f;
  }

  function row(x) {
    return h("tr", {"data-id": x.id},
      h("td", {}, h("a", {href: "/ui/executions/" + x.id, class: "mono"}, x.id)),
      h("td", {}, `${x.workflow}@${x.version}`),
      h("td", {class: "status"}, badge(x.status)),
      h("td", {}, fmt.time(x.started_at)),
      h("td", {}, fmt.ms(x.duration_ms)));
  }

  async function load(cursor) {
    const q = new URLSearchParams(Object.assign({limit: String(size)}, filters));
    if (cursor) q.set("cursor", cursor);
    const page = await api("GET", "/v1/executions?" + q);
    tbody.replaceChildren(...page.items.map(row));
    if (!page.items.length) tbody.append(h("tr", {}, h("td", {colspan: 5, class: "empty"}, "No executions match.")));
    next = page.next_cursor;
    document.getElementById("next").disabled = !next;
    document.getElementById("first").disabled = cursors.length <= 1;
    document.getElementById("count").textContent = `page ${cursors.length}`;
  }

  function matches(change) {
    if (filters.workflow && change.workflow !== filters.workflow) return false;
    if (filters.status && change.status !== filters.status) return false;
    if (filters.id && !change.execution_id.startsWith(filters.id.toLowerCase())) return false;
    if (filters.until) return false;  // a bounded range in the past: nothing new belongs in it
    return true;
  }

  async function live(type, change) {
    const existing = tbody.querySelector(`tr[data-id="${change.execution_id}"]`);
    if (existing) {
      // Status from the event; duration and the rest from the execution itself once it has finished.
      existing.querySelector(".status").replaceChildren(badge(change.status));
      existing.classList.add("flash-row");
      if (["completed", "failed", "cancelled"].includes(change.status)) {
        try { existing.replaceWith(row(await api("GET", "/v1/executions/" + change.execution_id))); } catch (e) { /* gone */ }
      }
      return;
    }
    if (type === "change" && change.type === "ExecutionStarted" && cursors.length === 1 && matches(change)) {
      try {
        const x = await api("GET", "/v1/executions/" + change.execution_id);
        if (tbody.querySelector(`tr[data-id="${x.id}"]`)) return;
        const empty = tbody.querySelector(".empty");
        if (empty) empty.parentElement.remove();
        const r = row(x); r.classList.add("flash-row");
        tbody.prepend(r);
        while (tbody.children.length > size) tbody.lastElementChild.remove();
      } catch (e) { /* not visible to this key */ }
    }
  }

  Weft.ready(async () => {
    const wfs = await api("GET", "/v1/workflows");
    const names = wfs.items.map((w) => w.workflow);
    document.getElementById("f-workflow").append(...names.map((n) => h("option", {}, n)));
    const startSelect = document.getElementById("s-workflow");
    if (startSelect) startSelect.append(...names.filter(Weft.canWorkflow).map((n) => h("option", {}, n)));
    const params = new URLSearchParams(location.search);
    for (const name of ["workflow", "status", "id"]) if (params.get(name)) document.getElementById("f-" + name).value = params.get(name);
    filters = readFilters();
    cursors.push(null);
    // The list comes from the executions view, which trails the log: follow the changes from the
    // view's position read before the list, not from "now", or a change in between is missed until a
    // reload. What the list already shows comes again, and `live` takes it as it is.
    let since = null;
    try { since = (await api("GET", "/v1/projections")).items.find((v) => v.name === "executions").position; } catch (e) { /* from now */ }
    await load(null);
    sse(since === null || since === undefined ? "/v1/changes" : "/v1/changes?after=" + since, live);

    document.getElementById("filters").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      filters = readFilters();
      cursors.length = 0; cursors.push(null);
      try { await load(null); } catch (e) { flash(e.message, "bad"); }
    });
    document.getElementById("next").addEventListener("click", async () => {
      if (!next) return;
      cursors.push(next);
      try { await load(next); } catch (e) { flash(e.message, "bad"); }
    });
    document.getElementById("first").addEventListener("click", async () => {
      cursors.length = 0; cursors.push(null);
      await load(null);
    });
    const form = document.getElementById("start-form");
    if (form) form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = document.getElementById("s-result");
      try {
        const input = parseJson(document.getElementById("s-input").value, "input");
        const x = await api("POST", "/v1/executions", {workflow: startSelect.value, input: input === null ? {} : input});
        out.replaceChildren("started ", h("a", {href: "/ui/executions/" + x.id, class: "mono", id: "started-link"}, x.id));
        await live("change", {execution_id: x.id, workflow: x.workflow, status: x.status, type: "ExecutionStarted"});
      } catch (e) { out.replaceChildren(h("span", {class: "error"}, e.message)); }
    });
  });
})();
