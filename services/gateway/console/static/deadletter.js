// One dead letter: payload, error, traceback, the history around the failure, what was done; reprocess
// (merge patch, dry run) or discard (with a reason).
"use strict";
(() => {
  const {h, api, fmt, badge, parseJson} = Weft;
  const ref = document.body.dataset.id;
  let dl = null;

  function render() {
    document.getElementById("dl-id").textContent = dl.id;
    document.getElementById("dl-status").replaceWith(Object.assign(badge(dl.status), {id: "dl-status"}));
    const meta = [dl.kind, dl.workflow, dl.step_id && `step ${dl.step_id}${dl.item !== null && dl.item !== undefined ? "#" + dl.item : ""}`,
                  dl.attempt && `attempt ${dl.attempt}`, `delivered ${dl.delivered}×`, `first seen ${fmt.time(dl.first_seen)}`].filter(Boolean);
    const p = document.getElementById("dl-meta");
    p.replaceChildren(meta.join(" · "));
    if (dl.execution_id) p.append(" · ", h("a", {href: "/ui/executions/" + dl.execution_id, id: "dl-execution"}, "execution " + dl.execution_id));
    document.getElementById("dl-error").replaceChildren(h("h2", {}, "Error"),
      h("pre", {class: "error"}, `${dl.error_type || ""}: ${dl.error_message || ""}${dl.reason ? "\n(" + dl.reason + ")" : ""}`),
      ...(dl.traceback ? [h("h3", {}, "Traceback"), h("pre", {class: "traceback"}, dl.traceback)] : []));
    document.getElementById("dl-payload").replaceChildren(h("h2", {}, "Payload"), h("pre", {class: "payload"}, fmt.json(dl.payload)));
    document.querySelector("#history tbody").replaceChildren(...(dl.history || []).map((e) => h("tr", {class: e.type === "StepDeadLettered" ? "selected" : ""},
      h("td", {}, e.seq), h("td", {}, fmt.time(e.at).slice(11)), h("td", {}, e.type),
      h("td", {}, e.step_id ? e.step_id + (e.item !== null && e.item !== undefined ? "#" + e.item : "") : ""),
      h("td", {}, e.error_type ? `${e.error_type}: ${e.error_message}` : (e.reason || "")))));
    const acts = dl.acts || [];
    document.getElementById("dl-acts").replaceChildren(h("h2", {}, "What was done"),
      acts.length ? h("ul", {}, ...acts.map((a) => h("li", {}, `${fmt.time(a.at)} ${a.type} by ${a.by || "?"}${a.why ? ": " + a.why : ""}`)))
                  : h("p", {class: "meta"}, "Nothing yet."));
    for (const id of ["a-reprocess", "a-discard", "a-dry"]) { const b = document.getElementById(id); if (b) b.disabled = dl.status !== "open"; }
  }

  async function load() { dl = await api("GET", "/v1/deadletters/" + encodeURIComponent(ref)); render(); }

  async function act(verb, dry) {
    const box = document.getElementById("outcomes");
    try {
      const body = {ids: [dl.id], dry_run: dry};
      const reason = document.getElementById("a-reason").value.trim();
      if (verb === "reprocess") {
        const patch = parseJson(document.getElementById("a-patch").value, "patch");
        if (patch !== null) body.patch = patch;
        if (reason) body.why = reason;
      } else body.reason = reason;
      const res = await api("POST", "/v1/deadletters/" + verb, body);
      box.replaceChildren(...DeadLetterActs.outcomes(res));
      if (!dry) await load();
    } catch (e) { box.replaceChildren(h("p", {class: "error", id: "act-error"}, e.message)); }
  }

  Weft.ready(async () => {
    await load();
    const rep = document.getElementById("a-reprocess");
    if (rep) {
      rep.addEventListener("click", () => act("reprocess", false));
      document.getElementById("a-dry").addEventListener("click", () => act("reprocess", true));
      document.getElementById("a-discard").addEventListener("click", () => act("discard", false));
    }
  });
})();
