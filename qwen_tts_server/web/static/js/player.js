// The result player: Web Audio, so a stream plays chunk by chunk as it arrives, and the same player
// replays, pauses and seeks the whole result afterwards. Draws the waveform as audio comes in.

import { concatFloat, encodeWav } from "./wav.js";
import { Waveform } from "./waveform.js";
import { formatSeconds } from "./dom.js";

const START_LEAD_S = 0.05; // scheduled this far ahead, so the first chunk starts cleanly

export class Player extends EventTarget {
  constructor({ canvas, playButton, timeLabel }) {
    super();
    this.waveform = new Waveform(canvas);
    this.playButton = playButton;
    this.timeLabel = timeLabel;
    this.context = null;
    this.samples = new Float32Array(0);
    this.sampleRate = 24000;
    this.sources = [];
    this.streaming = false;
    this.playing = false;
    this.offset = 0; // seconds into the audio where the current playback began
    this.startedAt = 0; // context time at which `offset` plays
    this.marks = {};
    playButton.addEventListener("click", () => this.toggle());
    canvas.addEventListener("click", (event) => this.seekTo(event));
    this.tick = this.tick.bind(this);
  }

  /** Create or resume the AudioContext: call it from a click, as browsers require. */
  async unlock() {
    this.context ??= new AudioContext({ latencyHint: "interactive" });
    if (this.context.state !== "running") await this.context.resume();
  }

  get duration() {
    return this.samples.length / this.sampleRate;
  }

  // ----- streaming -----
  beginStream(sampleRate) {
    this.stop();
    this.samples = new Float32Array(0);
    this.sampleRate = sampleRate;
    this.streaming = true;
    this.underruns = 0;
    this.nextTime = 0;
    this.waveform.reset(sampleRate);
    this.playButton.disabled = false;
    this.setPlaying(true);
  }

  /** Schedule a chunk right after the previous one (or now, after an underrun) and draw it. */
  pushSamples(samples) {
    if (!this.streaming || samples.length === 0) return;
    if (this.playing) this.scheduleNext(samples);
    this.samples = concatFloat([this.samples, samples]);
    this.waveform.append(samples);
    this.updateTime();
  }

  scheduleNext(samples) {
    const now = this.context.currentTime;
    if (this.nextTime === 0) {
      this.nextTime = now + START_LEAD_S;
      this.offset = 0;
      this.startedAt = this.nextTime;
      this.marks.playbackAt = performance.now() + START_LEAD_S * 1000; // when the first sample sounds
      requestAnimationFrame(this.tick);
    } else if (this.nextTime < now + 0.01) {
      this.underruns += 1; // the audio ran out before this chunk came: a short gap
      const gap = now + 0.02 - this.nextTime;
      this.nextTime += gap;
      this.startedAt += gap;
    }
    this.schedule(samples, this.nextTime);
    this.nextTime += samples.length / this.sampleRate;
  }

  endStream() {
    this.streaming = false;
    this.updateTime();
    this.dispatchEvent(new Event("ready"));
  }

  // ----- a whole result -----
  load(samples, sampleRate) {
    this.stop();
    this.streaming = false;
    this.samples = samples;
    this.sampleRate = sampleRate;
    this.waveform.reset(sampleRate);
    this.waveform.append(samples);
    this.offset = 0;
    this.playButton.disabled = samples.length === 0;
    this.updateTime();
  }

  wav() {
    return encodeWav(this.samples, this.sampleRate);
  }

  // ----- transport -----
  async toggle() {
    if (this.playing) this.pause();
    else await this.play();
  }

  async play(from = this.offset) {
    await this.unlock();
    this.stopSources();
    if (from >= this.duration - 0.01) from = 0;
    if (this.streaming) {
      // resume a paused stream: play what has arrived from `from`, later chunks follow it
      this.nextTime = this.context.currentTime + START_LEAD_S;
    }
    const start = this.context.currentTime + START_LEAD_S;
    this.offset = from;
    this.startedAt = start;
    const first = Math.floor(from * this.sampleRate);
    this.schedule(this.samples.subarray(first), start);
    if (this.streaming) this.nextTime = start + (this.samples.length - first) / this.sampleRate;
    this.setPlaying(true);
    requestAnimationFrame(this.tick);
  }

  pause() {
    if (!this.playing) return;
    this.offset = this.position();
    this.stopSources();
    this.setPlaying(false);
  }

  stop() {
    this.stopSources();
    this.offset = 0;
    this.setPlaying(false);
  }

  seekTo(event) {
    if (this.duration === 0) return;
    const box = event.currentTarget.getBoundingClientRect();
    const seconds = ((event.clientX - box.left) / box.width) * this.duration;
    if (this.playing) this.play(seconds);
    else {
      this.offset = seconds;
      this.waveform.setProgress(seconds / this.duration);
      this.updateTime();
    }
  }

  position() {
    if (!this.playing || !this.context) return this.offset;
    return Math.min(this.duration, this.offset + Math.max(0, this.context.currentTime - this.startedAt));
  }

  schedule(samples, when) {
    if (samples.length === 0) return;
    const buffer = this.context.createBuffer(1, samples.length, this.sampleRate);
    buffer.copyToChannel(samples, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    source.start(when);
    source.addEventListener("ended", () => {
      this.sources = this.sources.filter((s) => s !== source);
    });
    this.sources.push(source);
  }

  stopSources() {
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        // never started
      }
    }
    this.sources = [];
  }

  setPlaying(playing) {
    this.playing = playing;
    this.playButton.textContent = playing ? "Pause" : "Play";
    this.playButton.setAttribute("aria-label", playing ? "Pause" : "Play");
  }

  tick() {
    if (!this.playing) return;
    const position = this.position();
    if (!this.streaming && position >= this.duration - 0.005) {
      this.offset = 0;
      this.setPlaying(false);
      this.waveform.setProgress(1);
      this.updateTime(this.duration);
      this.dispatchEvent(new Event("ended"));
      return;
    }
    this.waveform.setProgress(this.duration ? position / this.duration : 0);
    this.updateTime(position);
    requestAnimationFrame(this.tick);
  }

  updateTime(position = this.position()) {
    this.timeLabel.textContent = `${formatSeconds(position)} / ${formatSeconds(this.duration)}`;
  }
}
