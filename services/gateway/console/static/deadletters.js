// Dead letters: the list or clusters by error, filters, and reprocess (with a merge patch) or discard,
// for the selected ones or for everything a filter selects, with a dry run and per-item outcomes.
"use strict";
const DeadLetterActs = (() => {
  const {h, fmt} = Weft;
  function outcomes(res) {
    const counts = Object.entries(res.counts || {}).map(([k, v]) => `${v} ${k}`).join(", ");
    return [h("h3", {}, `${res.dry_run ? "Dry run (nothing stored)" : "Done"}: ${counts || "nothing selected"}`),
      h("ul", {class: "outcomes", id: "outcome-list"}, ...(res.outcomes || []).map((o) => h("li", {class: o.outcome.startsWith("error") || o.outcome === "refused" ? "bad" : "", "data-outcome": o.outcome},
        h("a", {href: "/ui/deadletters/" + o.id, class: "mono"}, o.id.slice(0, 12)), ` ${o.outcome}`,
        o.step_id ? ` · ${o.step_id}` : "", o.detail ? ` · ${o.detail}` : "",
        o.execution_id ? [" · ", h("a", {href: "/ui/executions/" + o.execution_id}, "execution")] : "",
        o.preview ? h("pre", {}, fmt.json(o.preview)) : "")))];
  }
  return {outcomes};
})();

(() => {
  if (document.body.dataset.id !== undefined) return;  // the detail page has its own script below
  const {h, api, flash, fmt, badge, parseJson} = Weft;
  let offset = 0, nextOffset = null, filter = {};

  function readFilter() {
    const f = {status: document.getElementById("f-status").value};
    const map = {workflow: "f-workflow", step: "f-step", since: "f-since", error_contains: "f-error"};
    for (const [k, el] of Object.entries(map)) { const v = document.getElementById(el).value.trim(); if (v) f[k] = v; }
    return f;
  }

  function row(d) {
    return h("tr", {"data-id": d.id},
      Weft.can("admin") ? h("td", {}, h("input", {type: "checkbox", class: "pick", value: d.id})) : null,
      h("td", {}, h("a", {href: "/ui/deadletters/" + d.id, class: "mono"}, d.id.slice(0, 12))),
      h("td", {}, [d.workflow, d.step_id].filter(Boolean).join(" / ") || d.kind),
      h("td", {}, d.execution_id ? h("a", {href: "/ui/executions/" + d.execution_id, class: "mono"}, d.execution_id.slice(0, 8)) : ""),
      h("td", {}, `${d.error_type || ""}: ${d.error_message || d.reason || ""}`.slice(0, 160)),
      h("td", {}, badge(d.status)), h("td", {}, fmt.time(d.last_seen)));
  }

  function cluster(g) {
    return h("tr", {"data-cluster": g.id},
      h("td", {}, g.count), h("td", {}, g.kind), h("td", {}, `${g.error_type}: ${g.error}`.slice(0, 200)),
      h("td", {}, g.workflows.join(", ")), h("td", {}, g.steps.join(", ")), h("td", {}, fmt.time(g.last_seen)),
      h("td", {}, h("button", {class: "link", onclick: () => {
        document.getElementById("f-error").value = g.error_type; document.getElementById("f-view").value = "rows";
        if (g.workflows.length === 1) document.getElementById("f-workflow").value = g.workflows[0];
        load(0);
      }}, "show these")));
  }

  async function load(at) {
    filter = readFilter();
    const clusters = document.getElementById("f-view").value === "clusters";
    const q = new URLSearchParams(Object.assign({limit: "50", offset: String(at)}, filter));
    if (clusters) q.set("group_by", "error");
    const page = await api("GET", "/v1/deadletters?" + q);
    offset = at;
    document.getElementById("deadletters").hidden = clusters;
    document.getElementById("clusters").hidden = !clusters;
    if (clusters) {
      document.querySelector("#clusters tbody").replaceChildren(...page.groups.map(cluster));
      nextOffset = null;
    } else {
      const tbody = document.querySelector("#deadletters tbody");
      tbody.replaceChildren(...page.items.map(row));
      if (!page.items.length) tbody.append(h("tr", {}, h("td", {colspan: 7, class: "empty"}, "No dead letters match.")));
      nextOffset = page.next_offset;
    }
    document.getElementById("next").disabled = nextOffset === null || nextOffset === undefined;
    document.getElementById("prev").disabled = offset === 0;
  }

  async function act(verb) {
    const box = document.getElementById("outcomes");
    try {
      const body = {dry_run: document.getElementById("a-dry").checked};
      if (document.getElementById("a-target").value === "filter") body.filter = filter;
      else {
        const ids = [...document.querySelectorAll("#deadletters .pick:checked")].map((c) => c.value);
        if (!ids.length) throw new Error("select some dead letters first (or act on everything the filter selects)");
        body.ids = ids;
      }
      if (verb === "reprocess") {
        const patch = parseJson(document.getElementById("a-patch").value, "patch");
        if (patch !== null) body.patch = patch;
        const why = document.getElementById("a-reason").value.trim();
        if (why) body.why = why;
      } else {
        body.reason = document.getElementById("a-reason").value;
      }
      const res = await api("POST", "/v1/deadletters/" + verb, body);
      box.replaceChildren(...DeadLetterActs.outcomes(res));
      if (!res.dry_run) await load(offset);
    } catch (e) { box.replaceChildren(h("p", {class: "error", id: "act-error"}, e.message)); }
  }

  Weft.ready(async () => {
    const wfs = await api("GET", "/v1/workflows");
    document.getElementById("f-workflow").append(...wfs.items.map((w) => h("option", {}, w.workflow)));
    const params = new URLSearchParams(location.search);
    if (params.get("workflow")) document.getElementById("f-workflow").value = params.get("workflow");
    if (params.get("step")) document.getElementById("f-step").value = params.get("step");
    await load(0);
    document.getElementById("filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(0).catch((e) => flash(e.message, "bad")); });
    document.getElementById("next").addEventListener("click", () => load(nextOffset));
    document.getElementById("prev").addEventListener("click", () => load(Math.max(0, offset - 50)));
    const all = document.getElementById("select-all");
    if (all) all.addEventListener("change", () => document.querySelectorAll("#deadletters .pick").forEach((c) => { c.checked = all.checked; }));
    const rep = document.getElementById("a-reprocess");
    if (rep) {
      rep.addEventListener("click", () => act("reprocess"));
      document.getElementById("a-discard").addEventListener("click", () => act("discard"));
    }
  });
})();
