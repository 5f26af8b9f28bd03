"""Frames and codec on one GPU at once: how much the codec slows the frames, and whether giving it SMs of
its own (a CUDA green context) helps.

At 64 clients a server's frame took 11.6 ms on the GPU where 64 rows alone take ~8 ms: the codec thread's
kernels share the SMs. The frames are ~1,900 small kernels in a row, each of which waits for free SMs when a
codec kernel holds them; stream priorities only order blocks not yet started. A green context gives the codec
a fixed share of the SMs, so the frames' kernels always find the rest free. This measures, on one engine and
one streaming decoder sharing its weights (no server, no HTTP):

* the frame alone (64 rows, CUDA graphs, on the engine's high-priority step stream, as the server runs it);
* the codec alone: 16 streams' 12-frame chunks in a loop (one captured graph), flat out, on the engine's
  low-priority codec stream, then on a green context's stream of N SMs for each N of `--sms`;
* both at once, the codec held to `--codec-rate` audio-s/s (what the frames produce at c64) or flat out,
  on the low-priority stream and on each green context.

    python -m bench.codec_overlap --size 1.7B --rows 64 --sms 33,50,66 --codec-modes snake,step --out "$OUT"
    python -m bench.codec_overlap --size tiny --device cpu --rows 2 --seconds 0.5   # smoke test (no overlap)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.sequence import Sequence
from qwen_tts_server.engine.fast.stream_codec import StreamingDecoder

from .bench_engines import build_model
from .profile_step import fill, server_rows, sync_device
from .tables import markdown_table

FRAME_S = 0.08  # audio seconds a frame


def green_stream(device: torch.device, sms: int) -> torch.cuda.Stream:
    """A stream whose kernels run on `sms` SMs of their own (a CUDA green context; torch >= 2.10)."""
    from torch.cuda.green_contexts import GreenContext

    try:
        ctx = GreenContext.create(num_sms=sms, device_id=device.index or 0)
    except TypeError:  # torch 2.10: positional
        ctx = GreenContext.create(sms, device.index or 0)
    _keep.append(ctx)
    return ctx.Stream()


_keep: list[Any] = []  # green contexts live as long as the process: their streams outlive the measurements


class Frames:
    """An engine whose rows stay full: each measurement refills them with requests longer than it runs."""

    def __init__(self, tts: Any, rows: int, max_len: int, compile: bool) -> None:
        self.tts, self.rows = tts, rows
        self.engine = FastEngine(tts, max_slots=server_rows(rows), max_len=max_len, compile=compile)
        self.engine.warm_up(codec=False)
        self.frames = max_len - 200  # a request's frames: longer than any measurement's steps
        self.seqs: list[Sequence] = []

    def refill(self) -> None:
        for seq in self.seqs:
            self.engine.cancel(seq)
        while self.engine.scheduler.running or self.engine.scheduler.waiting:
            self.engine.step()
        self.seqs = fill(self.engine, self.tts, self.rows, self.frames)
        for _ in range(3):
            self.engine.step()

    def ms_per_step(self, steps: int) -> float:
        self.refill()
        device = self.engine.runner.device
        stream = self.engine.step_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            sync_device(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                self.engine.step()
            sync_device(device)
        return 1000 * (time.perf_counter() - t0) / steps


class Codec:
    """`batch` streams decoding `chunk`-frame chunks of random codes in a loop, on a thread of its own."""

    def __init__(self, decoder: torch.nn.Module, batch: int, chunk: int, device: torch.device, mode: str) -> None:
        self.decoder = StreamingDecoder(decoder)
        self.batch, self.chunk = batch, chunk
        if device.type == "cuda":
            self.decoder.enable(mode)
            self.decoder.capture(batch, chunk)
        gen = torch.Generator().manual_seed(0)
        self.codes = [torch.randint(0, 2048, (chunk, 16), generator=gen).to(device) for _ in range(batch)]
        self.audio_s = 0.0

    @contextlib.contextmanager
    def running(self, stream: torch.cuda.Stream | None, rate: float | None) -> Iterator[None]:
        """Decode until the block ends, at most `rate` audio-s/s (None: flat out), on `stream`."""
        stop = threading.Event()
        thread = threading.Thread(target=self._loop, args=(stop, stream, rate), daemon=True)
        self.audio_s = 0.0
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _loop(self, stop: threading.Event, stream: torch.cuda.Stream | None, rate: float | None) -> None:
        per_call = self.batch * self.chunk * FRAME_S
        states = [self.decoder.new_state() for _ in range(self.batch)]
        t0 = time.perf_counter()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while not stop.is_set():
                if rate is not None and self.audio_s >= rate * (time.perf_counter() - t0):
                    time.sleep(0.0005)
                    continue
                self.decoder.decode(states, self.codes)  # ends with the audio copied to the host
                self.audio_s += per_call
                if states[0].frames > 2000:
                    states = [self.decoder.new_state() for _ in range(self.batch)]

    def flat_out(self, stream: torch.cuda.Stream | None, seconds: float) -> float:
        with self.running(stream, None):
            time.sleep(seconds)
        return self.audio_s / seconds


def measure(
    frames: Frames, codec: Codec, args: argparse.Namespace, device: torch.device, green: bool
) -> list[dict[str, Any]]:
    """The rows for one codec: the frame alone, then per stream the codec alone, held, and flat out beside the
    frames. `green`: also on a green context of each `--sms`."""
    steps = max(20, int(args.seconds / 0.008))
    rows: list[dict[str, Any]] = []

    def row(codec_on: str, rate: float | None, frame_ms: float | None, codec_rate: float | None) -> None:
        audio = None if frame_ms is None else round(frames.rows * FRAME_S / (frame_ms / 1000), 1)
        rows.append(
            {
                "codec": codec.decoder.compiles,
                "codec stream": codec_on,
                "codec held to": "-" if rate is None else rate,
                "frame ms": None if frame_ms is None else round(frame_ms, 2),
                "frames' audio-s/s": audio,
                "codec audio-s/s": None if codec_rate is None else round(codec_rate, 1),
            }
        )
        print(rows[-1], flush=True)

    row("(none)", None, frames.ms_per_step(steps), None)
    streams: list[tuple[str, torch.cuda.Stream | None]] = [("low priority", frames.engine.codec_stream)]
    if device.type == "cuda" and green:
        streams += [(f"green, {n} SMs", green_stream(device, n)) for n in args.sms]
    for name, stream in streams:
        row(f"{name}, alone", None, None, codec.flat_out(stream, args.seconds))
        for rate in (args.codec_rate, None):
            t0 = time.perf_counter()
            with codec.running(stream, rate):
                ms = frames.ms_per_step(steps)
            row(name, rate, ms, codec.audio_s / (time.perf_counter() - t0))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--codec-batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=12)
    p.add_argument(
        "--codec-modes",
        type=lambda s: s.split(","),
        default=["snake"],
        help="what of the codec compiles (QTTS_COMPILE_CODEC), one codec each; green contexts for the first only",
    )
    p.add_argument("--codec-rate", type=float, default=320.0, help="audio-s/s the codec is held to beside frames")
    p.add_argument("--sms", type=lambda s: [int(x) for x in s.split(",") if x], default=[33, 66])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tts = build_model(args.size, device=device, dtype=dtype)
    t0 = time.perf_counter()
    frames = Frames(tts, args.rows, args.max_len, args.compile and device.type == "cuda")
    print(f"frames' warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for i, mode in enumerate(args.codec_modes):
        t0 = time.perf_counter()
        codec = Codec(frames.engine.codec.decoder, args.codec_batch, args.chunk, device, mode)
        print(f"codec {mode}: capture {time.perf_counter() - t0:.1f} s", flush=True)
        rows += measure(frames, codec, args, device, green=i == 0)
        del codec
    print(markdown_table(list(rows[0]), ([r[k] if r[k] is not None else "-" for k in r] for r in rows)))
    if args.out:
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        date = datetime.date.today().isoformat()
        path = Path(args.out) / f"{date}-{card.replace(' ', '-')}-codec-overlap.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"card": card, "date": date, "commit": args.commit, "torch": torch.__version__, "args": vars(args)}
        path.write_text(json.dumps({**data, "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
