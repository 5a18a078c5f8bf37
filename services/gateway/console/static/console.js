// Weft console: what every page shares. The API key lives in sessionStorage (this tab only) and goes
// out as the Authorization header; nothing is kept in a cookie, so other sites cannot act with it.
"use strict";
const Weft = (() => {
  const KEY = "weft.key";
  const body = document.body;
  const auth = body.dataset.auth === "on";
  let me = null;
  let onReady = null;

  function key() { return sessionStorage.getItem(KEY); }

  // h("a", {href: "/x", class: "y"}, "text", child): DOM without innerHTML (no markup from data, ever).
  function h(tag, attrs, ...children) {
    const svg = ["svg", "g", "rect", "path", "text", "line", "title", "circle"].includes(tag);
    const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  class ApiError extends Error {
    constructor(status, payload) {
      const err = (payload && payload.error) || {};
      const problems = (err.problems || []).map((p) => `${p.field}: ${p.message}`).join("; ");
      super(`${status}: ${err.message || "request failed"}${problems ? " (" + problems + ")" : ""}`);
      this.status = status; this.payload = payload;
    }
  }

  function headers(extra) {
    const out = Object.assign({Accept: "application/json"}, extra || {});
    const k = key();
    if (k) out.Authorization = "Bearer " + k;
    return out;
  }

  async function api(method, path, data) {
    const init = {method, headers: headers(data === undefined ? {} : {"Content-Type": "application/json"}),
                  credentials: "omit", cache: "no-store"};
    if (data !== undefined) init.body = JSON.stringify(data);
    const res = await fetch(path, init);
    const text = await res.text();
    let payload = null;
    try { payload = text ? JSON.parse(text) : null; } catch (e) { payload = {error: {message: text}}; }
    if (res.status === 401 && auth) { signOut("Your key was refused: " + ((payload && payload.error && payload.error.message) || "")); }
    if (!res.ok) throw new ApiError(res.status, payload);
    return payload;
  }

  // Server-Sent Events over fetch (EventSource cannot send the Authorization header).
  // Reconnects after a drop, resuming from the last id; stops when `stop()` is called or on `event: end`.
  function sse(path, onEvent, opts) {
    opts = opts || {};
    let last = null, stopped = false, controller = null;
    const liveDot = document.getElementById("live");
    async function run() {
      while (!stopped) {
        controller = new AbortController();
        try {
          const hs = headers({Accept: "text/event-stream"});
          if (last !== null) hs["Last-Event-ID"] = String(last);
          const res = await fetch(path, {headers: hs, signal: controller.signal, credentials: "omit", cache: "no-store"});
          if (!res.ok) { if (res.status === 401 || res.status === 403 || res.status === 404) return; throw new Error(res.status); }
          if (liveDot) liveDot.classList.add("on");
          const reader = res.body.getReader();
          const decoder = new TextDecoder();
          let buffer = "";
          for (;;) {
            const {value, done} = await reader.read();
            if (done) break;
            buffer += decoder.decode(value, {stream: true});
            let cut;
            while ((cut = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
              let id = null, type = "message", data = "";
              for (const line of block.split("\n")) {
                if (line.startsWith("id: ")) id = line.slice(4);
                else if (line.startsWith("event: ")) type = line.slice(7);
                else if (line.startsWith("data: ")) data += line.slice(6);
              }
              if (id !== null) last = id;  // an id alone (a heartbeat) moves the resume point too
              if (!data) continue;
              if (type === "end") { stopped = true; if (opts.onEnd) opts.onEnd(); }
              else onEvent(type, JSON.parse(data));
            }
          }
        } catch (e) {
          if (stopped) break;
        } finally {
          if (liveDot) liveDot.classList.remove("on");
        }
        if (!stopped) await new Promise((r) => setTimeout(r, 1000));
      }
    }
    run();
    return {stop() { stopped = true; if (controller) controller.abort(); }};
  }

  function flash(text, kind) {
    const el = document.getElementById("flash");
    el.textContent = text; el.className = "flash " + (kind || "ok"); el.hidden = false;
    clearTimeout(flash.t); flash.t = setTimeout(() => { el.hidden = true; }, 8000);
  }

  function can(scope) { return !!me && me.scopes.includes(scope); }
  function canWorkflow(name) { return !!me && (me.workflows === null || me.workflows.includes(name)); }

  // Controls a key cannot use are not offered (the API refuses them anyway).
  function applyScopes(root) {
    for (const el of (root || document).querySelectorAll("[data-scope]")) {
      if (!can(el.dataset.scope)) el.remove();
    }
  }

  function signOut(why) {
    sessionStorage.removeItem(KEY);
    me = null;
    document.getElementById("main").hidden = true;
    showSignin(why);
  }

  function showSignin(message) {
    document.getElementById("signin").hidden = false;
    document.getElementById("signin-error").textContent = message || "";
    document.getElementById("signout").hidden = true;
    document.getElementById("who").textContent = "";
  }

  async function start() {
    if (auth && !key()) { showSignin(); return; }
    try {
      me = await api("GET", "/v1/whoami");
    } catch (e) {
      if (auth) { sessionStorage.removeItem(KEY); showSignin(e.message); } else { flash(e.message, "bad"); }
      return;
    }
    document.getElementById("signin").hidden = true;
    const who = me.auth ? `key ${me.key_id}${me.name ? " (" + me.name + ")" : ""} · ${me.scopes.join(", ")}` +
      (me.workflows ? ` · workflows: ${me.workflows.join(", ") || "none"}` : "") : "auth off · admin";
    document.getElementById("who").textContent = who;
    document.getElementById("signout").hidden = !me.auth;
    applyScopes(document);
    document.getElementById("main").hidden = false;
    if (onReady) {
      try { await onReady(me); } catch (e) { flash(e.message, "bad"); }
    }
  }

  document.getElementById("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = document.getElementById("signin-key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    document.getElementById("signin-key").value = "";
    start();
  });
  document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));

  function ready(fn) { onReady = fn; if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start(); }

  const fmt = {
    time(iso) { return iso ? iso.replace("T", " ").replace(/\+00:00$|Z$/, "").slice(0, 23) : ""; },
    ms(v) { if (v === null || v === undefined) return ""; return v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`; },
    json(v) { return JSON.stringify(v, null, 2); },
  };

  function badge(status) { return h("span", {class: "badge s-" + status}, status); }

  function parseJson(text, what) {
    const t = (text || "").trim();
    if (!t) return null;
    try { return JSON.parse(t); } catch (e) { throw new Error(`${what}: not JSON (${e.message})`); }
  }

  return {h, api, sse, flash, can, canWorkflow, applyScopes, ready, fmt, badge, parseJson, me: () => me};
})();
