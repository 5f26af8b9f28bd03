// What the server is doing, in the header: ready, busy (queues full), starting, or unreachable.

import { apiUrl } from "./api.js";

const POLL_MS = 5000;

export function watchServer(element) {
  async function check() {
    let text;
    let state;
    try {
      const response = await fetch(apiUrl("ready"), { cache: "no-store" });
      const body = await response.json();
      state = body.status;
      const loaded = body.loaded_models ?? [];
      const plural = loaded.length > 1 ? "s" : "";
      const models = loaded.length ? `${loaded.length} model${plural} loaded` : "no model loaded yet";
      const full = (body.saturated_models ?? []).join(", ");
      const queue = body.queue_depth ? ` · ${body.queue_depth} waiting` : "";
      text = {
        ready: `Server ready · ${models}${queue}`,
        saturated: `Server busy: queue full for ${full}; new requests are turned away until it drains`,
        starting: "Server starting…",
      }[state] ?? `Server: ${state}`;
      element.title = loaded.join(", ");
    } catch {
      state = "down";
      text = "Server unreachable";
    }
    element.textContent = text;
    element.dataset.state = state;
  }
  check();
  setInterval(() => document.visibilityState === "visible" && check(), POLL_MS);
}
