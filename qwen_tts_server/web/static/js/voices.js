// The Voices tab: the voice library (api/v1/voices): create from a recording, an upload or a
// description; use one for cloning; delete.

import { getJSON, request, sendJSON } from "./api.js";
import { languageOptions } from "./catalog.js";
import { $, $$, busy, el, fillSelect, formatTime, showError, showMatching } from "./dom.js";
import { createRecorder } from "./recorder.js";
import { uploadClip } from "./uploads.js";

const SOURCE_LABELS = {
  upload: "from a clip",
  file: "from a clip",
  url: "from a URL",
  path: "from a server file",
  design: "designed",
};
const CONFIRM_MS = 4000;

export class Voices {
  constructor({ onUse }) {
    this.onUse = onUse;
    this.form = $("#voice-form");
    this.list = $("#voice-list");
    this.error = $("#voice-error");
    this.listError = $("#voices-error");
    this.progress = $("#voice-progress");
    this.recorder = createRecorder($("#voice-recorder"));
    this.voices = [];
    for (const radio of $$('input[name="voice-source"]', this.form)) {
      radio.addEventListener("change", () => showMatching(this.form, "source", this.source));
    }
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.create();
    });
    $("#voices-refresh").addEventListener("click", () => this.refresh());
  }

  /** A designed voice's sample is spoken by the VoiceDesign model: its languages. */
  setCatalog(catalog) {
    fillSelect($("#voice-language"), languageOptions(catalog.languages("voice_design", null)));
  }

  get source() {
    return $('input[name="voice-source"]:checked', this.form).value;
  }

  async refresh() {
    showError(this.listError, null);
    try {
      const { voices } = await getJSON("api/v1/voices");
      this.voices = voices;
    } catch (err) {
      showError(this.listError, err);
      return;
    }
    this.render();
    document.dispatchEvent(new CustomEvent("qtts:voices", { detail: this.voices }));
  }

  render() {
    $("#voices-empty").hidden = this.voices.length > 0;
    this.list.replaceChildren(...this.voices.map((voice) => this.item(voice)));
  }

  item(voice) {
    const kind = voice.mode === "icl" ? "reference + transcript" : "timbre only";
    const meta = [SOURCE_LABELS[voice.source] ?? voice.source, kind, voice.model, formatTime(voice.created_at * 1000)];
    const description = voice.description ? ` · ${voice.description}` : null;
    const use = el("button", { type: "button", onclick: () => this.onUse(voice.name) }, "Use");
    use.setAttribute("aria-label", `Use ${voice.name}`);
    const remove = el("button", { type: "button", class: "secondary" }, "Delete");
    remove.setAttribute("aria-label", `Delete ${voice.name}`);
    remove.addEventListener("click", () => this.confirmDelete(remove, voice));
    return el(
      "li",
      { class: "entry", dataset: { voice: voice.name } },
      el("p", { class: "entry-text" }, el("strong", {}, voice.name), description),
      el("p", { class: "meta" }, meta.filter(Boolean).join(" · ")),
      el("div", { class: "row" }, use, remove),
    );
  }

  /** Two steps, no dialog: the first click asks, a second within a few seconds deletes. */
  async confirmDelete(button, voice) {
    if (button.dataset.confirm !== "yes") {
      button.dataset.confirm = "yes";
      button.textContent = "Click again to delete";
      button.setAttribute("aria-label", `Click again to delete ${voice.name}`);
      setTimeout(() => {
        delete button.dataset.confirm;
        button.textContent = "Delete";
        button.setAttribute("aria-label", `Delete ${voice.name}`);
      }, CONFIRM_MS);
      return;
    }
    showError(this.listError, null);
    try {
      await request(`api/v1/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
    } catch (err) {
      showError(this.listError, err);
    }
    await this.refresh();
  }

  async body() {
    const body = { name: $("#voice-name").value.trim() };
    if (this.source === "design") {
      body.description = $("#voice-description").value;
      body.language = $("#voice-language").value || "auto";
      return body;
    }
    const clip = this.source === "upload" ? $("#voice-file").files[0] : this.recorder.clip();
    if (!clip) throw new Error(this.source === "upload" ? "Choose an audio clip first." : "Record a clip first.");
    body.ref_audio = await uploadClip(clip);
    const transcript = $("#voice-ref-text").value.trim();
    if (transcript) body.ref_text = transcript;
    return body;
  }

  async create() {
    showError(this.error, null);
    this.progress.replaceChildren();
    try {
      await busy($("#voice-create"), "Creating…", async () => {
        const body = await this.body();
        if (body.description) this.progress.textContent = "Designing a sample, then cloning it…";
        const voice = await sendJSON("api/v1/voices", body);
        this.progress.replaceChildren(`Created “${voice.name}”.`);
        if (voice.sample_url) {
          const label = `Sample of ${voice.name}`;
          const sample = el("audio", { controls: true, src: voice.sample_url, "aria-label": label });
          this.progress.append(" Its sample: ", sample);
        }
        $("#voice-name").value = "";
      });
    } catch (err) {
      this.progress.textContent = "";
      showError(this.error, err);
      return;
    }
    await this.refresh();
  }
}
