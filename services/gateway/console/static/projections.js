// Projections: each status view's position, lag and rate, refreshed; rebuild (admin) with its progress.
"use strict";
(() => {
  const {h, api, flash, fmt} = Weft;

  function rebuildCell(p) {
    if (p.rebuilding) {
      const total = Math.max(1, p.rebuilding.head || p.head);
      const bar = h("i", {});
      bar.style.width = `${Math.min(100, (100 * (p.rebuilding.position || 0)) / total)}%`;
      return h("span", {class: "rebuilding"}, h("span", {class: "bar"}, bar), ` ${p.rebuilding.position || 0} / ${total}`);
    }
    if (!Weft.can("admin") || (Weft.me().workflows !== null)) return p.needs_rebuild ? "needs a rebuild" : "";
    return h("button", {"data-rebuild": p.name, onclick: async () => {
      try { await api("POST", `/v1/projections/${p.name}/rebuild`); flash(`rebuilding ${p.name}`); await load(); } catch (e) { flash(e.message, "bad"); }
    }}, p.needs_rebuild ? "Rebuild (needed)" : "Rebuild");
  }

  async function load() {
    const res = await api("GET", "/v1/projections");
    document.querySelector("#projections tbody").replaceChildren(...res.items.map((p) => h("tr", {"data-view": p.name},
      h("td", {}, p.name), h("td", {class: "position"}, p.position), h("td", {}, p.head), h("td", {class: "lag"}, p.lag),
      h("td", {}, p.events_per_s ? p.events_per_s.toFixed(1) : "0"), h("td", {}, p.applied),
      h("td", {}, `${p.version ?? ""}${p.needs_rebuild ? " → " + p.code_version : ""}`),
      h("td", {class: "rebuilt"}, p.rebuilt_at ? fmt.time(p.rebuilt_at) + ` (gen ${p.generation})` : ""),
      h("td", {}, rebuildCell(p)))));
  }

  Weft.ready(async () => {
    await load();
    setInterval(() => load().catch(() => {}), 2000);
  });
})();
