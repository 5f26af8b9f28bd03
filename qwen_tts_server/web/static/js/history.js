// This browser's results: metadata in localStorage, streamed audio in IndexedDB.

import { $, el, formatTime, showError } from "./dom.js";
import { FORMATS, MODE_LABELS, downloadResult } from "./results.js";
import { clearAudio, deleteAudio, getAudio } from "./store.js";

const STORAGE_KEY = "qtts.history";
const MAX_ENTRIES = 100;

export function loadEntries() {
  try {
    return JSON.parse(localStorage.getItem(STORAGE_KEY)) || [];
  } catch {
    return [];
  }
}

function saveEntries(entries) {
  localStorage.setItem(STORAGE_KEY, JSON.stringify(entries));
}

export class History {
  constructor() {
    this.list = $("#history-list");
    this.empty = $("#history-empty");
    this.error = $("#history-error");
    $("#history-clear").addEventListener("click", () => this.clear());
    this.render();
  }

  add(result) {
    const entries = [result, ...loadEntries().filter((entry) => entry.id !== result.id)];
    for (const dropped of entries.splice(MAX_ENTRIES)) if (dropped.local) deleteAudio(dropped.id);
    saveEntries(entries);
    this.render();
  }

  update(result) {
    saveEntries(loadEntries().map((entry) => (entry.id === result.id ? result : entry)));
  }

  remove(id) {
    const entries = loadEntries();
    const entry = entries.find((e) => e.id === id);
    if (entry?.local) deleteAudio(id);
    saveEntries(entries.filter((e) => e.id !== id));
    this.render();
  }

  async clear() {
    saveEntries([]);
    await clearAudio();
    this.render();
  }

  render() {
    const entries = loadEntries();
    this.empty.hidden = entries.length > 0;
    this.list.replaceChildren(...entries.map((entry) => this.item(entry)));
  }

  item(entry) {
    const audio = el("audio", { controls: true, preload: "none", "aria-label": `Play: ${entry.text}` });
    const source = entry.files?.[entry.format];
    if (entry.local) getAudio(entry.id).then((blob) => blob && (audio.src = URL.createObjectURL(blob)));
    else if (source) audio.src = source;
    const options = FORMATS.map((f) => el("option", { value: f }, f.toUpperCase()));
    const format = el("select", { "aria-label": "Download format" }, options);
    format.value = entry.format || "wav";
    const download = el("button", { type: "button" }, "Download");
    download.addEventListener("click", async () => {
      showError(this.error, null);
      try {
        await downloadResult(entry, format.value, { onChange: (changed) => this.update(changed) });
      } catch (err) {
        showError(this.error, err);
      }
    });
    const remove = el("button", { type: "button", class: "secondary", onclick: () => this.remove(entry.id) }, "Delete");
    const seconds = `${(entry.durationS ?? 0).toFixed(1)} s`;
    const meta = [MODE_LABELS[entry.mode], entry.voiceLabel, seconds, formatTime(entry.createdAt)];
    return el(
      "li",
      { class: "entry", dataset: { id: entry.id } },
      el("p", { class: "entry-text" }, entry.text),
      el("p", { class: "meta" }, meta.filter(Boolean).join(" · ")),
      audio,
      el("div", { class: "row" }, format, download, remove),
    );
  }
}
