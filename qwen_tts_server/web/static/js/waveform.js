// A waveform on a canvas: min/max peaks per pixel column, the played part in the accent colour.

export class Waveform {
  constructor(canvas) {
    this.canvas = canvas;
    this.peaks = []; // [min, max] per block of samples, kept as audio arrives
    this.blockSize = 256;
    this.pending = new Float32Array(0);
    this.sampleRate = 24000;
    this.progress = 0; // 0..1 of the audio played
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  reset(sampleRate = 24000) {
    this.peaks = [];
    this.pending = new Float32Array(0);
    this.sampleRate = sampleRate;
    this.progress = 0;
    this.draw();
  }

  /** Add samples (Float32, mono) to the picture. */
  append(samples) {
    const all = new Float32Array(this.pending.length + samples.length);
    all.set(this.pending);
    all.set(samples, this.pending.length);
    let offset = 0;
    for (; offset + this.blockSize <= all.length; offset += this.blockSize) {
      let min = 0;
      let max = 0;
      for (let i = offset; i < offset + this.blockSize; i++) {
        if (all[i] < min) min = all[i];
        if (all[i] > max) max = all[i];
      }
      this.peaks.push([min, max]);
    }
    this.pending = all.slice(offset);
    this.draw();
  }

  setProgress(fraction) {
    this.progress = Math.max(0, Math.min(1, fraction));
    this.draw();
  }

  get seconds() {
    return (this.peaks.length * this.blockSize + this.pending.length) / this.sampleRate;
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    const context = canvas.getContext("2d");
    const style = getComputedStyle(canvas);
    context.clearRect(0, 0, width, height);
    const middle = height / 2;
    context.fillStyle = style.getPropertyValue("--wave-axis") || "#888";
    context.fillRect(0, Math.floor(middle), width, Math.max(1, ratio));
    const count = this.peaks.length;
    if (count === 0) return;
    const played = style.getPropertyValue("--wave-played") || "#0a58ca";
    const rest = style.getPropertyValue("--wave") || "#555";
    const perColumn = count / width;
    for (let x = 0; x < width; x++) {
      const from = Math.floor(x * perColumn);
      const to = Math.max(from + 1, Math.floor((x + 1) * perColumn));
      if (from >= count) break;
      let min = 0;
      let max = 0;
      for (let i = from; i < Math.min(to, count); i++) {
        if (this.peaks[i][0] < min) min = this.peaks[i][0];
        if (this.peaks[i][1] > max) max = this.peaks[i][1];
      }
      context.fillStyle = x / width < this.progress ? played : rest;
      const top = middle - max * middle * 0.95;
      const bottom = middle - min * middle * 0.95;
      context.fillRect(x, top, 1, Math.max(ratio, bottom - top));
    }
    canvas.setAttribute("aria-label", `Waveform of ${this.seconds.toFixed(1)} seconds of audio`);
  }
}
