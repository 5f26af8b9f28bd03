"""Frames and codec on one GPU at once: how much the codec slows the frames, and whether giving it SMs of
its own (a CUDA green context) helps.

At 64 clients a server's frame took 11.6 ms on the GPU where 64 rows alone take ~8 ms: the codec thread's
kernels share the SMs. The frames are ~1,900 small kernels in a row, each of which waits for free SMs when a
codec kernel holds them; stream priorities only order blocks not yet started. A green context gives the codec
a fixed share of the SMs, so the frames' kernels always find the rest free. This measures, on one engine and
one streaming decoder sharing its weights (no server, no HTTP):

* the frame alone: `--rows` requests of a c64 run's text (100 frames' worth), all admitted before the timing,
  CUDA graphs, on the engine's high-priority step stream, the GIL switch interval the server sets;
* the codec alone: 16 streams' 12-frame chunks in a loop (one captured graph), flat out, on the engine's
  low-priority codec stream, then on a green context's stream for each `--sms` (SMs asked for: the driver
  rounds up to the card's granularity): first the graph captured on an ordinary stream and replayed there,
  then one captured on the green stream itself (which of the two keeps to the green context's SMs is one of
  the things this finds out);
* both at once, the codec held to `--codec-rate` audio-s/s (about what the frames produce at c64) or flat
  out; both rates are read over the frames' timed window only.

`--trace DIR` then profiles (torch.profiler, CUDA only) the codec alone and both at once flat out on each stream,
~0.3 s each, and keeps `bench.trace_summary`'s summary of each (busy time per CUDA stream, how long the two
streams overlapped, the top kernels) in the report: where the codec's kernel time goes, and whether a green
context lets the two run at once rather than by turns.

    python -m bench.codec_overlap --size 1.7B --rows 64 --sms 32,64 --codec-modes snake,step --out "$OUT"
    python -m bench.codec_overlap --size tiny --device cpu --rows 2 --seconds 0.5   # smoke test (no overlap)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qwen_tts_server.engine.fast.engine import GIL_SWITCH_INTERVAL_S, FastEngine
from qwen_tts_server.engine.fast.sequence import Sequence
from qwen_tts_server.engine.fast.stream_codec import StreamingDecoder

from . import trace_summary
from .bench_engines import build_model
from .profile_step import frames_only_request, server_rows, sync_device
from .tables import markdown_table

FRAME_S = 0.08  # audio seconds a frame
TEXT_FRAMES = 100  # the requests' text: what bench_http's 100-frame requests say
SETTLE_S = 0.2  # the codec's thread runs this long before a timed window opens
TRACE_S = 0.3  # a traced window: long enough for dozens of steps and codec calls, short enough to stay small


def green_stream(device: torch.device, sms: int) -> torch.cuda.Stream:
    """A stream whose kernels run on `sms` SMs of their own (a CUDA green context; torch >= 2.10)."""
    from torch.cuda.green_contexts import GreenContext

    ctx = GreenContext.create(num_sms=sms, device_id=device.index or 0)
    _keep.append(ctx)
    return ctx.Stream()


_keep: list[Any] = []  # green contexts live as long as the process: their streams outlive the measurements


class Frames:
    """An engine whose rows are all busy while it is timed: each measurement refills them."""

    def __init__(self, tts: Any, rows: int, max_len: int, compile: bool) -> None:
        self.tts, self.rows = tts, rows
        self.engine = FastEngine(tts, max_slots=server_rows(rows), max_len=max_len, compile=compile)
        self.engine.warm_up(codec=False)
        self.seqs: list[Sequence] = []

    def refill(self, frames: int) -> None:
        """Every row running a request of at least `frames` frames, none waiting."""
        engine = self.engine
        for seq in self.seqs:
            engine.cancel(seq)
        while engine.scheduler.running or engine.scheduler.waiting:
            engine.step()
        requests = (frames_only_request(self.tts, i, frames, text_frames=TEXT_FRAMES) for i in range(self.rows))
        self.seqs = [engine.submit(seq) for seq in requests]
        while engine.scheduler.waiting or len(engine.scheduler.running) < self.rows:
            engine.step()
        for _ in range(3):
            engine.step()

    def ms_per_step(self, steps: int, on_start: Any = None) -> float:
        """Mean ms a step over `steps` steps of full rows; `on_start()` runs as the timing starts."""
        device = self.engine.runner.device
        stream = self.engine.step_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            sync_device(device)
            if on_start is not None:
                on_start()
            t0 = time.perf_counter()
            for _ in range(steps):
                self.engine.step()
            sync_device(device)
            ms = 1000 * (time.perf_counter() - t0) / steps
        if len(self.engine.scheduler.running) != self.rows:
            raise RuntimeError(f"rows ran out during the timing ({len(self.engine.scheduler.running)} of {self.rows})")
        return ms


class Codec:
    """`batch` streams decoding `chunk`-frame chunks of random codes in a loop, on a thread of its own."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        batch: int,
        chunk: int,
        device: torch.device,
        mode: str,
        capture_stream: torch.cuda.Stream | None = None,
    ) -> None:
        self.decoder = StreamingDecoder(decoder, capture_stream=capture_stream)
        self.batch, self.chunk = batch, chunk
        if device.type == "cuda":
            self.decoder.enable(mode)
            self.decoder.capture(batch, chunk)
        gen = torch.Generator().manual_seed(0)
        self.codes = [torch.randint(0, 2048, (chunk, 16), generator=gen).to(device) for _ in range(batch)]
        self.audio_s = 0.0  # decoded so far by the running loop
        self._error: BaseException | None = None

    @contextlib.contextmanager
    def running(self, stream: torch.cuda.Stream | None, rate: float | None) -> Iterator[None]:
        """Decode until the block ends, at most `rate` audio-s/s (None: flat out), on `stream`; a failure of the
        loop is raised here."""
        stop = threading.Event()
        thread = threading.Thread(target=self._loop, args=(stop, stream, rate), daemon=True)
        self.audio_s, self._error = 0.0, None
        thread.start()
        try:
            time.sleep(SETTLE_S)
            yield
        finally:
            stop.set()
            thread.join()
        if self._error is not None:
            raise RuntimeError("the codec's loop failed") from self._error

    def _loop(self, stop: threading.Event, stream: torch.cuda.Stream | None, rate: float | None) -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._decode_until(stop, rate)
        except BaseException as exc:  # raised again by `running`
            self._error = exc

    def _decode_until(self, stop: threading.Event, rate: float | None) -> None:
        per_call = self.batch * self.chunk * FRAME_S
        states = [self.decoder.new_state() for _ in range(self.batch)]
        t0 = time.perf_counter()
        while not stop.is_set():
            if rate is not None and self.audio_s >= rate * (time.perf_counter() - t0):
                time.sleep(0.0005)
                continue
            self.decoder.decode(states, self.codes)  # ends with the audio copied to the host
            self.audio_s += per_call
            if states[0].frames > 2000:
                states = [self.decoder.new_state() for _ in range(self.batch)]

    def rate_over(self, seconds: float, stream: torch.cuda.Stream | None) -> float:
        """Audio-s/s flat out over a window of about `seconds`, decodes finished in it."""
        window = Window()
        with self.running(stream, None):
            window.mark(self)
            time.sleep(seconds)
            window.mark(self)
        return window.rate()


@dataclasses.dataclass
class Window:
    """The codec's decoded audio at the two ends of a timed window."""

    audio_s: list[float] = dataclasses.field(default_factory=list)
    at: list[float] = dataclasses.field(default_factory=list)

    def mark(self, codec: Codec) -> None:
        self.audio_s.append(codec.audio_s)
        self.at.append(time.perf_counter())

    def rate(self) -> float:
        return (self.audio_s[1] - self.audio_s[0]) / (self.at[1] - self.at[0])


def stream_choices(frames: Frames, device: torch.device, sms: list[int]) -> list[tuple[str, Any]]:
    """The codec's streams: the engine's low-priority one, then a green context's per `sms` (where torch has
    them)."""
    low = frames.engine.codec_stream
    out: list[tuple[str, Any]] = [("low priority" if low is not None else "default stream", low)]
    if device.type != "cuda" or not sms:
        return out
    try:
        out += [(f"green, {n} SMs asked", green_stream(device, n)) for n in sms]
    except (ImportError, AttributeError, RuntimeError) as exc:
        print(f"no green contexts here ({type(exc).__name__}: {exc}): their rows are left out", flush=True)
    return out


def traced(path: Path, run: Any) -> dict[str, Any]:
    """`run()` under the profiler; its trace written to `path` and summarized."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    prof.export_chrome_trace(str(path))
    return trace_summary.summarize(trace_summary.load_events(path), top=8)


def trace_streams(frames: Frames, codec: Codec, streams: list[tuple[str, Any]], folder: Path) -> dict[str, Any]:
    """Summaries of the codec alone (on the first stream), then of both at once flat out on each stream."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = max(10, int(TRACE_S / 0.008))
    out = {"codec alone": traced(folder / "codec-alone.json", lambda: codec.rate_over(TRACE_S, streams[0][1]))}
    for i, (name, stream) in enumerate(streams):
        frames.refill(steps + 20)

        def both(stream: Any = stream) -> None:
            with codec.running(stream, None):
                frames.ms_per_step(steps)

        out[f"both, {name}"] = traced(folder / f"both-{i}.json", both)
    return out


def measure(
    frames: Frames, codec: Codec, args: argparse.Namespace, device: torch.device, green: bool, save: Any
) -> dict[str, Any] | None:
    """Rows for one codec: the frame alone, then per stream the codec alone, held and flat out beside the
    frames. `green`: green contexts too. `save(row)` keeps each row as it comes. Returns the traces' summaries
    where `--trace` asks for them (CUDA only)."""
    steps = max(20, int(args.seconds / 0.008))

    def row(codec_on: str, rate: float | None, frame_ms: float | None, codec_rate: float | None) -> None:
        audio = None if frame_ms is None else round(frames.rows * FRAME_S / (frame_ms / 1000), 1)
        save(
            {
                "codec": codec.decoder.compiles if codec_rate is not None else "-",
                "codec stream": codec_on,
                "codec held to": "-" if rate is None else rate,
                "frame ms": None if frame_ms is None else round(frame_ms, 2),
                "frames' audio-s/s": audio,
                "codec audio-s/s": None if codec_rate is None else round(codec_rate, 1),
            }
        )

    def beside(codec: Codec, name: str, stream: Any, rates: tuple[float | None, ...]) -> None:
        """The codec alone on `stream`, then beside the frames held to each of `rates`."""
        row(f"{name}, alone", None, None, codec.rate_over(args.seconds, stream))
        for rate in rates:
            frames.refill(steps + 20)
            window = Window()
            with codec.running(stream, rate):
                ms = frames.ms_per_step(steps, on_start=functools.partial(window.mark, codec))
                window.mark(codec)
            row(name, rate, ms, window.rate())

    frames.refill(steps + 20)
    row("(none)", None, frames.ms_per_step(steps), None)
    streams = stream_choices(frames, device, args.sms if green else [])
    for name, stream in streams:
        beside(codec, name, stream, (args.codec_rate, None))
    for name, stream in streams[1:]:  # the same, its graph captured on the green stream itself
        there = Codec(codec.decoder.decoder, codec.batch, codec.chunk, device, codec.decoder.compiles, stream)
        beside(there, f"{name}, captured there", stream, (None,))
    if args.trace is None or device.type != "cuda":
        return None
    return trace_streams(frames, codec, streams, Path(args.trace) / codec.decoder.compiles)


def print_traces(mode: str, summaries: dict[str, Any]) -> None:
    """Per trace: the window, the device's busy time, the streams' overlap, each stream's busy time and top
    kernel."""
    for name, s in summaries.items():
        print(
            f"trace {mode} / {name}: window {s['window_ms']} ms, busy {s['device_busy_ms']}, streams overlap "
            f"{s['streams_overlap_ms']}"
        )
        for stream, t in s["streams"].items():
            tops = "; ".join(f"{k['name'][:50]} {k['ms']} ms x{k['count']}" for k in t["top"][:4])
            print(f"  stream {stream}: {t['kernels']} kernels, busy {t['busy_ms']} ms | {tops}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
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
    p.add_argument("--sms", type=lambda s: [int(x) for x in s.split(",") if x], default=[32, 64])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--trace", default=None, metavar="DIR", help="profile each stream choice; traces go here")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as a serving engine sets it
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    path = Path(args.out) / f"{date}-{card.replace(' ', '-')}-codec-overlap.json" if args.out else None
    data = {"card": card, "date": date, "commit": args.commit, "torch": torch.__version__, "args": vars(args)}
    rows: list[dict[str, Any]] = []
    traces: dict[str, Any] = {}

    def save(row: dict[str, Any] | None = None) -> None:
        if row is not None:
            rows.append(row)
            print(row, flush=True)
        if path is not None:  # after every row: a call cut off keeps what it measured
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**data, "rows": rows, "traces": traces}, indent=2) + "\n")

    tts = build_model(args.size, device=device, dtype=dtype)
    t0 = time.perf_counter()
    frames = Frames(tts, args.rows, args.max_len, args.compile and device.type == "cuda")
    print(f"frames' warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    for i, mode in enumerate(args.codec_modes):
        t0 = time.perf_counter()
        codec = Codec(frames.engine.codec.decoder, args.codec_batch, args.chunk, device, mode)
        print(f"codec {mode}: capture {time.perf_counter() - t0:.1f} s", flush=True)
        summaries = measure(frames, codec, args, device, green=i == 0, save=save)
        if summaries is not None:
            traces[mode] = summaries
            print_traces(mode, summaries)
            save()
        del codec
    print(markdown_table(list(rows[0]), ([r[k] if r[k] is not None else "-" for k in r] for r in rows)))
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
