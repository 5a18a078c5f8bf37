// Workflows: each with its latest version and statistics (counts by status, p50/p95, failure rate).
"use strict";
(() => {
  const {h, api, fmt} = Weft;
  Weft.ready(async () => {
    const [wfs, stats] = await Promise.all([api("GET", "/v1/workflows"), api("GET", "/v1/stats/workflows")]);
    const by = Object.fromEntries(stats.items.map((s) => [s.workflow, s]));
    const n = (v) => (v === null || v === undefined ? "" : v);
    document.querySelector("#workflows tbody").replaceChildren(...wfs.items.map((w) => {
      const s = by[w.workflow] || {};
      return h("tr", {"data-workflow": w.workflow},
        h("td", {}, h("a", {href: "/ui/workflows/" + encodeURIComponent(w.workflow)}, w.workflow)),
        h("td", {}, w.version), h("td", {}, fmt.time(w.published_at)), h("td", {}, n(s.total)), h("td", {}, n(s.running)),
        h("td", {}, n(s.completed)), h("td", {}, n(s.failed)), h("td", {}, n(s.cancelled)),
        h("td", {}, fmt.ms(s.p50_ms)), h("td", {}, fmt.ms(s.p95_ms)),
        h("td", {}, s.failure_rate === null || s.failure_rate === undefined ? "" : (100 * s.failure_rate).toFixed(1) + " %"));
    }));
  });
})();
