// The Batch tab: paste lines, submit one job (POST api/v1/jobs), follow its events with a progress
// bar, list results as they finish, download all as a zip.

import { getJSON, request, saveBlob, sendJSON } from "./api.js";
import { languageOptions, speakerOptions } from "./catalog.js";
import { $, busy, el, fillSelect, showError } from "./dom.js";
import { events } from "./sse.js";

const LAST_JOB = "qtts.lastJob";
const PER_LINE_FIELD = { custom_voice: "speaker", voice_clone: "voice", voice_design: "instruct" };
const DEFAULT_LABELS = {
  custom_voice: "Default speaker",
  voice_clone: "Default voice",
  voice_design: "Voice description",
};
const TERMINAL = new Set(["completed", "partial", "failed", "cancelled"]);
const ITEM_STATUS = { queued: "Queued", running: "Running", done: "Done", failed: "Failed", cancelled: "Cancelled" };
const POLL_MS = 1000;

/** Lines to job items: "text", or "name|text" where name is the line's speaker, voice or description. */
export function parseLines(text, mode) {
  const items = [];
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = raw.trim();
    if (!line) return;
    const item = { custom_id: `line-${index + 1}`, text: line };
    const bar = line.indexOf("|");
    if (bar > 0) {
      item[PER_LINE_FIELD[mode]] = line.slice(0, bar).trim();
      item.text = line.slice(bar + 1).trim();
    }
    items.push(item);
  });
  return items;
}

export class Batch {
  constructor() {
    this.form = $("#batch-form");
    this.error = $("#batch-error");
    this.catalog = null;
    this.voices = [];
    this.job = null;
    this.texts = [];
    this.follow = null; // AbortController of the events being read
    $("#batch-mode").addEventListener("change", () => this.modeChanged());
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    $("#batch-cancel").addEventListener("click", () => this.cancel());
    $("#batch-download").addEventListener("click", () => this.downloadAll());
    document.addEventListener("qtts:voices", (event) => {
      this.voices = event.detail;
      if (this.mode === "voice_clone") this.modeChanged();
    });
  }

  get mode() {
    return $("#batch-mode").value;
  }

  setCatalog(catalog) {
    this.catalog = catalog;
    this.modeChanged();
  }

  modeChanged() {
    const mode = this.mode;
    const select = $("#batch-default");
    const text = $("#batch-default-text");
    $("#batch-default-label").textContent = DEFAULT_LABELS[mode];
    $("#batch-default-label").htmlFor = mode === "voice_design" ? "batch-default-text" : "batch-default";
    select.hidden = mode === "voice_design";
    text.hidden = mode !== "voice_design";
    if (mode === "custom_voice") fillSelect(select, speakerOptions(this.catalog?.speakers(null) ?? []));
    if (mode === "voice_clone") fillSelect(select, this.voices.map((voice) => ({ value: voice.name })));
    fillSelect($("#batch-language"), languageOptions(this.catalog?.languages(mode, null) ?? ["auto"]));
  }

  request() {
    const mode = this.mode;
    const items = parseLines($("#batch-lines").value, mode);
    const options = { mode, language: $("#batch-language").value || "auto" };
    options.response_format = $("#batch-format").value;
    const fallback = mode === "voice_design" ? $("#batch-default-text").value.trim() : $("#batch-default").value;
    if (fallback) options[PER_LINE_FIELD[mode]] = fallback;
    const label = $("#batch-label").value.trim();
    return { items, options, label: label || null };
  }

  async submit() {
    showError(this.error, null);
    try {
      await busy($("#batch-submit"), "Submitting…", async () => {
        const body = this.request();
        const job = await sendJSON("api/v1/jobs", body);
        this.texts = body.items.map((item) => item.text);
        localStorage.setItem(LAST_JOB, JSON.stringify({ id: job.id, texts: this.texts }));
        this.show(job);
      });
    } catch (err) {
      showError(this.error, err);
      return;
    }
    this.track();
  }

  /** Show the job of the last visit, following it if it is still running. */
  async resume() {
    const saved = JSON.parse(localStorage.getItem(LAST_JOB) || "null");
    if (!saved) return;
    try {
      this.texts = saved.texts ?? [];
      this.show(await getJSON(`api/v1/jobs/${encodeURIComponent(saved.id)}`));
    } catch {
      localStorage.removeItem(LAST_JOB); // gone, or another server
      return;
    }
    if (!TERMINAL.has(this.job.status)) this.track();
  }

  /** Follow the job's events; if they cannot be read or stop early, poll the job instead. */
  async track() {
    this.follow?.abort();
    const follow = (this.follow = new AbortController());
    const id = this.job.id;
    try {
      const path = `api/v1/jobs/${encodeURIComponent(id)}/events`;
      const seen = {};
      for await (const { event, data } of events(path, { signal: follow.signal })) {
        seen[event] = (seen[event] ?? 0) + 1; // shown on the job's card as data-events: progress=5 item=3 end=1
        $("#batch-job").dataset.events = Object.entries(seen).map(([name, n]) => `${name}=${n}`).join(" ");
        if (event === "progress") this.progress(data);
        else if (event === "item") this.itemDone(data);
        else if (event === "end") {
          this.show(data);
          return;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(this.error, err);
    }
    await this.poll(id, follow.signal);
  }

  async poll(id, signal) {
    while (!signal.aborted && this.job?.id === id && !TERMINAL.has(this.job.status)) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      try {
        this.show(await getJSON(`api/v1/jobs/${encodeURIComponent(id)}`, { signal }));
      } catch (err) {
        if (err.name !== "AbortError") showError(this.error, err);
        return;
      }
    }
  }

  async cancel() {
    if (!this.job) return;
    try {
      const job = await request(`api/v1/jobs/${encodeURIComponent(this.job.id)}`, { method: "DELETE" });
      const body = await job.json().catch(() => null);
      if (body?.id) this.show(body);
    } catch (err) {
      showError(this.error, err);
    }
  }

  async downloadAll() {
    if (!this.job) return;
    showError(this.error, null);
    const url = this.job.archive_url || `api/v1/jobs/${encodeURIComponent(this.job.id)}/archive`;
    try {
      await busy($("#batch-download"), "Preparing zip…", async () => {
        const response = await request(url);
        saveBlob(await response.blob(), `${this.job.label || this.job.id}.zip`.replace(/[^\w.-]+/g, "-"));
      });
    } catch (err) {
      showError(this.error, err);
    }
  }

  // ----- rendering -----
  show(job) {
    // A submitted job's view may come without its items: every item is queued then.
    const queued = () => this.texts.map((_, index) => ({ index, status: "queued" }));
    const known = this.job?.id === job.id ? this.job.items : null;
    this.job = { ...job, items: job.items ?? known ?? queued() };
    job = this.job;
    $("#batch-job").hidden = false;
    $("#batch-job").dataset.job = job.id;
    $("#batch-items").replaceChildren(...job.items.map((item) => this.itemRow(item)));
    this.progress({ ...job.progress, status: job.status });
  }

  progress(progress) {
    const job = this.job;
    if (progress.status) job.status = progress.status;
    job.progress = { ...job.progress, ...progress };
    const { total = 0, done = 0, failed = 0, cancelled = 0, audio_s: audio, eta_s: eta } = job.progress;
    const finished = done + failed + cancelled;
    const bar = $("#batch-progress");
    bar.max = Math.max(1, total);
    bar.value = finished;
    bar.setAttribute("aria-valuetext", `${finished} of ${total} finished`);
    const parts = [`${capitalize(job.status)}`, `${done} of ${total} done`];
    if (failed) parts.push(`${failed} failed`);
    if (cancelled) parts.push(`${cancelled} cancelled`);
    if (audio) parts.push(`${audio.toFixed(1)} s of audio`);
    if (!TERMINAL.has(job.status) && eta != null) parts.push(`about ${Math.ceil(eta)} s left`);
    $("#batch-summary").textContent = parts.join(" · ");
    $("#batch-job").dataset.status = job.status;
    const over = TERMINAL.has(job.status);
    $("#batch-cancel").hidden = over;
    $("#batch-download").hidden = !over || done === 0;
  }

  itemDone(item) {
    const row = $(`#batch-items li[data-index="${item.index}"]`);
    const fresh = this.itemRow(item);
    if (row) row.replaceWith(fresh);
    else $("#batch-items").append(fresh);
    const position = this.job.items.findIndex((known) => known.index === item.index);
    if (position >= 0) this.job.items[position] = item;
  }

  itemRow(item) {
    const text = this.texts[item.index] ?? item.custom_id ?? `Item ${item.index + 1}`;
    const status = el("span", { class: `badge ${item.status}` }, ITEM_STATUS[item.status] ?? item.status);
    const row = el(
      "li",
      { class: "entry", dataset: { index: item.index, status: item.status } },
      el("p", { class: "entry-text" }, status, " ", text),
    );
    if (item.status === "done" && item.url) {
      const seconds = item.duration_s != null ? `${item.duration_s.toFixed(1)} s` : "";
      row.append(
        el("audio", { controls: true, preload: "none", src: item.url, "aria-label": `Play: ${text}` }),
        el("p", { class: "meta" }, seconds, " · ", el("a", { href: item.url, download: "" }, "Download")),
      );
    } else if (item.error) {
      const message = typeof item.error === "string" ? item.error : (item.error.message ?? JSON.stringify(item.error));
      row.append(el("p", { class: "item-error" }, message));
    }
    return row;
  }
}

function capitalize(text) {
  return text ? text.charAt(0).toUpperCase() + text.slice(1) : "";
}
