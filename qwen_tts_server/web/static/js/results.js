// A result (one spoken text) and its downloads in every format.
//
// A streamed result is WAV kept in this browser; a whole result is a file on the server. Another
// format is asked of the server: the same request again, with the same seed, in that format.

import { saveBlob, saveUrl, sendJSON } from "./api.js";
import { getAudio } from "./store.js";

export const FORMATS = ["wav", "mp3", "flac", "opus", "aac", "pcm"];

export const MODE_LABELS = { custom_voice: "Custom voice", voice_design: "Voice design", voice_clone: "Voice clone" };

export function newResultId() {
  return `r${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

export function filename(result, format) {
  const stem = (result.text || "speech")
    .slice(0, 32)
    .replace(/[^\p{L}\p{N}]+/gu, "-")
    .replace(/^-|-$/g, "");
  return `${stem || "speech"}-${result.id}.${format}`;
}

/** Save `result` as a file in `format`; `onChange(result)` when a new server file was made for it. */
export async function downloadResult(result, format, { onChange, onStatus = () => {} } = {}) {
  const name = filename(result, format);
  const known = result.files?.[format];
  if (known) {
    try {
      await saveUrl(known, name);
      return;
    } catch (err) {
      if (![403, 404].includes(err.status)) throw err; // expired on the server: make it again below
    }
  }
  if (format === "wav" && result.local) {
    const blob = await getAudio(result.id);
    if (blob) {
      saveBlob(blob, name);
      return;
    }
  }
  onStatus(`Asking the server for ${format.toUpperCase()} (the same request and seed)…`);
  const body = await sendJSON(result.path, { ...result.request, stream: false, response_format: format });
  const url = body.items[0].url;
  result.files = { ...result.files, [format]: url };
  onChange?.(result);
  await saveUrl(url, name);
  onStatus("");
}
