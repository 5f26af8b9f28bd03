// A streaming synthesis request ("stream": true, WAV): the body is read as it arrives and handed on
// as samples, so playback starts with the first chunk while the rest is still being generated.

import { ApiError, request } from "./api.js";
import { WavStreamParser } from "./wav.js";

/**
 * POST `body` to `path` with stream on and read the audio as it comes.
 * onStart({sampleRate}) once the WAV header is in; onSamples(Float32Array) for every piece.
 * Resolves when the server ends the stream. Times (performance.now()) go into `marks`.
 */
export async function streamSpeech(path, body, { signal, marks, onStart, onSamples }) {
  marks.requestAt = performance.now();
  const json = { ...body, stream: true, response_format: "wav" };
  const response = await request(path, { method: "POST", json, signal });
  marks.headersAt = performance.now();
  const reader = response.body.getReader();
  const parser = new WavStreamParser();
  let started = false;
  for (;;) {
    const { done, value } = await reader.read().catch((err) => {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`The audio stream broke off (${err.message}).`);
    });
    if (done) break;
    const samples = parser.push(value);
    if (!started && parser.format) {
      started = true;
      onStart(parser.format);
    }
    if (samples.length) {
      marks.firstChunkAt ??= performance.now();
      onSamples(samples);
    }
  }
  marks.endAt = performance.now();
  if (!started) throw new Error("the stream ended before any audio came");
}
