// WAV in and out: a parser for a WAV stream that arrives in pieces (the server's streamed WAV has an
// open-ended header), and a 16-bit PCM encoder for what the page keeps or uploads.

/** Feed it bytes as they arrive; it returns Float32 samples (mono: channels are averaged) once the
 * header has been read. `format` is {sampleRate, channels} from then on. */
export class WavStreamParser {
  constructor() {
    this.format = null;
    this.pending = new Uint8Array(0);
  }

  push(bytes) {
    this.pending = concatBytes(this.pending, bytes);
    if (!this.format && !this.readHeader()) return new Float32Array(0);
    return this.takeSamples();
  }

  readHeader() {
    const data = this.pending;
    if (data.length < 12) return false;
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    if (ascii(data, 0, 4) !== "RIFF" || ascii(data, 8, 4) !== "WAVE") {
      throw new Error("the server's stream is not WAV audio");
    }
    let offset = 12;
    let format = null;
    while (offset + 8 <= data.length) {
      const id = ascii(data, offset, 4);
      const size = view.getUint32(offset + 4, true);
      if (id === "data") {
        if (!format) throw new Error("WAV stream without a fmt chunk");
        if (format.bitsPerSample !== 16) throw new Error(`unsupported WAV sample size ${format.bitsPerSample}`);
        this.format = format;
        this.pending = data.subarray(offset + 8);
        return true;
      }
      if (offset + 8 + size > data.length) return false; // the rest of this chunk has not arrived yet
      if (id === "fmt ") {
        format = {
          channels: view.getUint16(offset + 10, true),
          sampleRate: view.getUint32(offset + 12, true),
          bitsPerSample: view.getUint16(offset + 22, true),
        };
      }
      offset += 8 + size + (size % 2);
    }
    return false;
  }

  takeSamples() {
    const frameBytes = 2 * this.format.channels;
    const usable = this.pending.length - (this.pending.length % frameBytes);
    const bytes = this.pending.slice(0, usable); // a copy: aligned for the DataView below
    this.pending = this.pending.slice(usable);
    return int16ToFloat(bytes, this.format.channels);
  }
}

function int16ToFloat(bytes, channels) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const frames = bytes.length / (2 * channels);
  const out = new Float32Array(frames);
  for (let i = 0; i < frames; i++) {
    let sum = 0;
    for (let c = 0; c < channels; c++) sum += view.getInt16((i * channels + c) * 2, true);
    out[i] = sum / channels / 32768;
  }
  return out;
}

/** Mono Float32 samples as a 16-bit PCM WAV file. */
export function encodeWav(samples, sampleRate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const writeAscii = (offset, text) => [...text].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  writeAscii(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  writeAscii(8, "WAVE");
  writeAscii(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  writeAscii(36, "data");
  view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 32768 : s * 32767, true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}

/** Decode any audio the browser can (a recording, an upload) to mono samples. */
export async function decodeToMono(blob) {
  const context = new OfflineAudioContext(1, 1, 48000);
  const audio = await context.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const channel = audio.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / audio.numberOfChannels;
  }
  return { samples: mono, sampleRate: audio.sampleRate };
}

export function concatFloat(parts) {
  const out = new Float32Array(parts.reduce((n, part) => n + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

function concatBytes(a, b) {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function ascii(bytes, offset, length) {
  return String.fromCharCode(...bytes.subarray(offset, offset + length));
}
