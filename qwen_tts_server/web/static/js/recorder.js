// A recording made in the page (MediaRecorder), turned into a WAV clip the server can read.

import { el } from "./dom.js";
import { decodeToMono, encodeWav } from "./wav.js";

const MAX_SECONDS = 60; // the server takes reference clips of 1-60 s

/** Build the recorder inside `root`; returns {clip(): Blob|null, clear()}. */
export function createRecorder(root, { label = "Record" } = {}) {
  const button = el("button", { type: "button", class: "record" }, label);
  const status = el("span", { class: "record-status", role: "status", "aria-live": "polite" });
  const preview = el("audio", { controls: true, hidden: true, "aria-label": "Your recording" });
  const discard = el("button", { type: "button", class: "secondary", hidden: true }, "Discard");
  root.append(el("div", { class: "row" }, button, discard, status), preview);

  let recorder = null;
  let clip = null;
  let timer = 0;

  function show(blob, seconds) {
    clip = blob;
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
    discard.hidden = false;
    status.textContent = `Recorded ${seconds.toFixed(1)} s`;
    root.dataset.recorded = seconds.toFixed(2);
  }

  function clear() {
    clip = null;
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
    preview.hidden = true;
    discard.hidden = true;
    status.textContent = "";
    delete root.dataset.recorded;
  }

  async function start() {
    if (!navigator.mediaDevices?.getUserMedia) {
      status.textContent = "Recording needs a secure page: open this page over https, or as localhost.";
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false } });
    } catch (err) {
      status.textContent = `No microphone: ${err.message}`;
      return;
    }
    clear();
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
    recorder.addEventListener("stop", async () => {
      stream.getTracks().forEach((track) => track.stop());
      clearInterval(timer);
      setRecording(false);
      try {
        const { samples, sampleRate } = await decodeToMono(new Blob(chunks, { type: recorder.mimeType }));
        show(encodeWav(samples, sampleRate), samples.length / sampleRate);
      } catch (err) {
        status.textContent = `The recording could not be read: ${err.message}`;
      }
      recorder = null;
    });
    recorder.start();
    const began = performance.now();
    setRecording(true);
    timer = setInterval(() => {
      const seconds = (performance.now() - began) / 1000;
      status.textContent = `Recording… ${seconds.toFixed(0)} s`;
      if (seconds >= MAX_SECONDS) recorder?.stop();
    }, 250);
  }

  function setRecording(on) {
    button.textContent = on ? "Stop recording" : label;
    root.dataset.recording = String(on);
  }

  button.addEventListener("click", () => (recorder ? recorder.stop() : start()));
  discard.addEventListener("click", clear);
  return { clip: () => clip, clear };
}
