// The Speak tab: custom voice, voice design and voice clone; streamed or whole; the result panel.

import { request, sendJSON } from "./api.js";
import { languageOptions, speakerOptions } from "./catalog.js";
import { $, $$, busy, el, fillSelect, showError, showMatching } from "./dom.js";
import { createRecorder } from "./recorder.js";
import { downloadResult, newResultId } from "./results.js";
import { putAudio } from "./store.js";
import { streamSpeech } from "./stream.js";
import { uploadClip } from "./uploads.js";
import { decodeToMono } from "./wav.js";

const PATHS = {
  custom_voice: "api/v1/custom-voice",
  voice_design: "api/v1/voice-design",
  voice_clone: "api/v1/voice-clone",
};
const SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_duration_s"];

export class Speak {
  constructor({ player, history }) {
    this.player = player;
    this.history = history;
    this.catalog = null;
    this.form = $("#speak-form");
    this.error = $("#speak-error");
    this.progress = $("#speak-progress");
    this.result = $("#result");
    this.current = null; // the result on show
    this.controller = null;
    this.recorder = createRecorder($("#clone-recorder"));

    for (const radio of $$('input[name="mode"]', this.form)) radio.addEventListener("change", () => this.modeChanged());
    for (const radio of $$('input[name="clone-source"]', this.form)) {
      radio.addEventListener("change", () => this.sourceChanged());
    }
    $("#model").addEventListener("change", () => this.modelChanged());
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    $("#stop-button").addEventListener("click", () => this.controller?.abort());
    $("#download-button").addEventListener("click", () => this.download());
    document.addEventListener("qtts:voices", (event) => this.fillVoices(event.detail));
  }

  get mode() {
    return $('input[name="mode"]:checked', this.form).value;
  }

  setMode(mode) {
    $(`input[name="mode"][value="${mode}"]`, this.form).checked = true;
    this.modeChanged();
  }

  /** Pick a saved voice for cloning (from the Voices tab's "Use"). */
  useVoice(name) {
    this.setMode("voice_clone");
    $('input[name="clone-source"][value="voice"]', this.form).checked = true;
    this.sourceChanged();
    $("#clone-voice").value = name;
    $("#text").focus();
  }

  setCatalog(catalog) {
    this.catalog = catalog;
    this.modeChanged();
  }

  // ----- the form follows the mode and model -----
  modeChanged() {
    const mode = this.mode;
    showMatching(this.form, "mode", mode);
    if (!this.catalog) return;
    const fallback = this.catalog.defaults[mode];
    const models = this.catalog.modelsFor(mode).map((model) => ({
      value: model.name === fallback ? "" : model.name,
      label: model.name === fallback ? `${model.name} (default)` : model.name,
    }));
    if (!models.some((model) => model.value === "")) models.unshift({ value: "", label: `${fallback} (default)` });
    models.sort((a, b) => (a.value === "" ? -1 : b.value === "" ? 1 : 0));
    fillSelect($("#model"), models, "");
    this.sourceChanged();
    this.modelChanged();
  }

  modelChanged() {
    const mode = this.mode;
    const model = $("#model").value || null;
    fillSelect($("#language"), languageOptions(this.catalog.languages(mode, model)));
    if (mode !== "custom_voice") return;
    const speakers = this.catalog.speakers(model);
    fillSelect($("#speaker"), speakerOptions(speakers));
    const instruct = $("#instruct");
    const note = $("#instruct-note");
    const accepts = this.catalog.acceptsInstruct(model);
    instruct.disabled = !accepts;
    note.hidden = accepts && speakers.length > 0;
    note.textContent = !accepts
      ? "This model does not take a style: pick a 1.7B model for one."
      : "This model is not on the server's disk yet: its speakers are known once it is downloaded.";
  }

  sourceChanged() {
    const source = $('input[name="clone-source"]:checked', this.form).value;
    showMatching($('[data-mode="voice_clone"]', this.form), "source", source);
  }

  fillVoices(voices) {
    const options = voices.map((voice) => ({ value: voice.name, label: `${voice.name} (${voice.mode})` }));
    if (options.length === 0) options.push({ value: "", label: "No saved voices yet" });
    fillSelect($("#clone-voice"), options);
  }

  // ----- the request -----
  async body(mode) {
    const text = $("#text").value;
    const body = { text, language: $("#language").value || "auto" };
    const model = $("#model").value;
    if (model) body.model = model;
    if (mode === "custom_voice") {
      body.speaker = $("#speaker").value;
      const instruct = $("#instruct").value.trim();
      if (instruct && !$("#instruct").disabled) body.instruct = instruct;
    } else if (mode === "voice_design") {
      body.instruct = $("#design").value;
    } else {
      Object.assign(body, await this.reference());
    }
    for (const field of SAMPLING_FIELDS) {
      const value = $(`#${field}`).value;
      if (value !== "") body[field] = Number(value);
    }
    if ($("#greedy").checked) body.do_sample = false;
    const seed = $("#seed").value;
    body.seed = seed !== "" ? Number(seed) : Math.floor(Math.random() * 2 ** 31);
    return body;
  }

  /** The clone's reference: a saved voice, or an uploaded / recorded clip (uploaded once). */
  async reference() {
    const source = $('input[name="clone-source"]:checked', this.form).value;
    if (source === "voice") {
      const voice = $("#clone-voice").value;
      return voice ? { voice } : {};
    }
    const clip = source === "upload" ? $("#clone-file").files[0] : this.recorder.clip();
    if (!clip) throw new Error(source === "upload" ? "Choose an audio clip first." : "Record a clip first.");
    const reference = { ref_audio: await uploadClip(clip) };
    const transcript = $("#ref-text").value.trim();
    if (transcript) reference.ref_text = transcript;
    if ($("#x-vector").checked) reference.x_vector_only = true;
    return reference;
  }

  async submit() {
    showError(this.error, null);
    await this.player.unlock(); // first thing in the click: browsers only start audio from a gesture
    const mode = this.mode;
    this.result.dataset.run = String(Number(this.result.dataset.run || 0) + 1); // one per request
    this.setState("working");
    this.controller = new AbortController();
    $("#stop-button").disabled = false;
    try {
      await busy($("#speak-button"), "Speaking…", async () => {
        const body = await this.body(mode);
        const result = {
          id: newResultId(),
          createdAt: Date.now(),
          mode,
          path: PATHS[mode],
          text: body.text,
          voiceLabel: body.speaker || body.voice || body.instruct || (body.ref_audio ? "your clip" : ""),
          request: body,
          files: {},
        };
        const loaded = this.catalog?.isLoaded(mode, body.model);
        this.say(loaded ? "Generating…" : "Loading the model (first use), then generating…");
        if ($("#stream").checked) await this.streamed(result);
        else await this.whole(result, $("#format").value);
        const used = this.catalog?.model(mode, body.model);
        if (used) used.state = "loaded"; // the server loaded it for this request
        this.history.add(result);
        this.show(result);
      });
    } catch (err) {
      this.setState(err.name === "AbortError" ? "stopped" : "error");
      this.say(err.name === "AbortError" ? "Stopped." : "");
      if (err.name === "AbortError") this.player.endStream();
      showError(this.error, err);
    } finally {
      $("#stop-button").disabled = true;
      this.controller = null;
    }
  }

  async streamed(result) {
    const marks = {};
    let announced = false;
    this.player.marks = marks;
    this.setState("waiting");
    await streamSpeech(result.path, result.request, {
      signal: this.controller.signal,
      marks,
      onStart: ({ sampleRate }) => {
        this.player.beginStream(sampleRate);
        this.setState("streaming");
      },
      onSamples: (samples) => {
        if (!announced) this.say("Playing while the rest is generated…");
        announced = true;
        this.player.pushSamples(samples);
        this.stamp(marks);
      },
    });
    this.player.endStream();
    this.stamp(marks);
    const { duration, sampleRate } = this.player;
    Object.assign(result, { format: "wav", local: true, durationS: duration, sampleRate });
    try {
      await putAudio(result.id, this.player.wav());
    } catch {
      result.local = false; // no IndexedDB (a private window): downloads ask the server again
    }
    const seconds = (marks.endAt - marks.requestAt) / 1000;
    const speed = (duration / seconds).toFixed(1);
    result.stats = [
      `First audio after ${((marks.firstChunkAt - marks.requestAt) / 1000).toFixed(2)} s`,
      `${duration.toFixed(1)} s of audio in ${seconds.toFixed(1)} s (${speed}× real time)`,
      gaps(this.player.underruns),
    ];
  }

  async whole(result, format) {
    this.setState("waiting");
    const started = performance.now();
    const signal = this.controller.signal;
    const body = await sendJSON(result.path, { ...result.request, response_format: format }, { signal });
    const item = body.items[0];
    Object.assign(result, {
      format,
      local: false,
      files: { [format]: item.url },
      durationS: item.duration_s,
      sampleRate: item.sample_rate,
      model: body.model,
      warnings: body.warnings ?? [],
    });
    const ms = (value) => value.toFixed(0);
    const { total_ms: total, model_ms: load, generate_ms: generate, encode_ms: encode } = body.timing;
    result.stats = [
      `${item.duration_s.toFixed(1)} s of audio in ${((performance.now() - started) / 1000).toFixed(1)} s`,
      `Server: ${ms(total)} ms (model ${ms(load)}, generate ${ms(generate)}, encode ${ms(encode)})`,
      item.finish_reason === "eos" ? "The speech ended by itself" : `Cut short: ${item.finish_reason}`,
      `Model: ${body.model}`,
    ];
    const audio = await (await request(item.url, { signal })).blob();
    const decoded =
      format === "pcm" ? pcmToFloat(await audio.arrayBuffer(), item.sample_rate) : await decodeToMono(audio);
    this.player.load(decoded.samples, decoded.sampleRate);
    this.player.play();
  }

  // ----- the result panel -----
  show(result) {
    this.current = result;
    this.setState("done");
    this.say("Done.");
    $("#result-empty").hidden = true;
    const stats = [...(result.stats ?? []), `Seed ${result.request.seed}`];
    $("#result-stats").replaceChildren(...stats.filter(Boolean).map((line) => el("li", {}, line)));
    $("#result-warnings").replaceChildren(...(result.warnings ?? []).map((line) => el("li", {}, `Server: ${line}`)));
    $("#result-download").hidden = false;
    $("#download-format").value = result.format;
    $("#download-note").textContent = result.local
      ? "WAV is kept in this browser; other formats are made by the server from the same request and seed."
      : `The ${result.format.toUpperCase()} file stays on the server until it expires; ` +
        "other formats are made again from the same seed.";
  }

  async download() {
    if (!this.current) return;
    showError(this.error, null);
    try {
      await busy($("#download-button"), "Preparing…", () =>
        downloadResult(this.current, $("#download-format").value, {
          onChange: (result) => this.history.update(result),
          onStatus: (text) => this.say(text),
        }),
      );
    } catch (err) {
      showError(this.error, err);
    }
  }

  say(text) {
    this.progress.textContent = text;
  }

  setState(state) {
    this.result.dataset.state = state;
    if (state !== "done") $("#result-empty").hidden = true;
  }

  /** Timings on the result element (ms since the page loaded): what users see, and what tests read. */
  stamp(marks) {
    for (const [key, value] of Object.entries(marks)) {
      if (typeof value === "number") this.result.dataset[key] = value.toFixed(1);
    }
  }
}

function gaps(count) {
  if (!count) return null;
  return `${count} short gap${count > 1 ? "s" : ""}: the audio came slower than real time`;
}

function pcmToFloat(buffer, sampleRate) {
  const ints = new Int16Array(buffer, 0, Math.floor(buffer.byteLength / 2));
  const samples = new Float32Array(ints.length);
  for (let i = 0; i < ints.length; i++) samples[i] = ints[i] / 32768;
  return { samples, sampleRate };
}
