"""End to end through the real server: concurrent HTTP and WebSocket clients against `qwen-tts-server serve`.

Starts the REAL server process (`python -m qwen_tts_server.cli serve`) on a checkpoint folder, loads the
model through the real loading code (`POST /api/v1/models/<name>/load`; a full-size random checkpoint is
written first by `bench.checkpoint` if the folder lacks it), warms it up, and drives it from this process
with asyncio clients (httpx with a large connection pool; `websockets`):

* streaming: `POST /v1/audio/speech` (OpenAI's speech API), `response_format: pcm`, `stream_format: audio`,
  read as a byte stream; each chunk's arrival time and size is recorded (pcm s16le 24 kHz mono: audio
  seconds = bytes / 48000). Without that route, `POST /api/v1/custom-voice` with `"stream": true`.
* whole (non-streaming): `POST /api/v1/custom-voice`, `response_format: pcm`, `return_audio_inline: true`:
  the native API as its clients use it (the server also encodes and stores the file); the audio comes back
  base64 in the JSON.
* WebSocket: `/v1/audio/speech/stream` (`session.config`, `input.text` pieces, `input.done`; binary audio
  messages until `session.done`).

Every request asks for exactly `--frames` codec frames (default 100 = 8 s; random weights never emit EOS)
of a fixed text of a few sentences (one segment), with its own seed.

Runs: one request at a time (`single`, the median of `--single-requests`); per concurrency C, a burst of C
requests at once and a closed loop of C clients (each sends its next request when the last one ends; their
first starts spread over one request's lifetime, as measured in the warm-up, so that the loop reaches a
steady mix instead of moving in lockstep bursts) for `--loop-rounds` rounds or `--loop-seconds`. The
headline keys (`..._c64`) come from the closed loop, measured in its steady window: from the first request's
end (ramp-up over) to the last request's start (all clients still busy). Aggregate audio-s/s = audio
bytes that arrived in that window / its length (whole responses: those that ended in it); first-audio and
latency percentiles over the requests started in it.

First audio (ttfa) is the first audio byte at the client, from just before the request is sent (WebSocket:
before the connection opens). Stutter: a player starts a stream at its first byte and plays in real time;
a stream starves when chunk i arrives after the audio received before it has played out; the gap is
max_i(t_i - (t_first + seconds_received_before_i)), clipped at 0, per stream; reported: the worst over all
streams, the p95 of per-stream worsts, and how many streams ever starved.

Warm-up (not measured, reported as `warmup_s`): the first request (compile and graph capture), then
`--warmup-rounds` bursts at every concurrency of every run. Budget: `--max-seconds` from start; a section
that would not fit is skipped, and the JSON is rewritten after every section, so a run cut short keeps
what it measured.

Writes `<out>/<date>-<card>-http.json` and replaces the section of `docs/benchmarks.md` between
`<!-- http-bench:start -->` and `<!-- http-bench:end -->` (`--docs`; re-render from a JSON with
`--update-docs RESULT.json`). `--targets` prints met/missed.

CPU smoke run (tiny checkpoint, a few seconds):
    .venv/bin/python -m bench.bench_http --size tiny --models-dir /tmp/m --concurrency 2 --frames 6 \
        --device cpu --out /tmp/r --docs /tmp/r/benchmarks.md
On the lent GPU: see bench/device_setup.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import peers
from bench.tables import markdown_table
from qwen_tts_server.engine.fast.timing import REQUEST_PHASES, STEP_PARTS

T_START = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
BYTES_PER_S = 48000  # pcm s16le, 24 kHz, mono
FRAME_S = 0.08
DOCS_START = "<!-- http-bench:start -->"
DOCS_END = "<!-- http-bench:end -->"
DEFAULT_TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. Please read this sentence "
    "aloud: the weather today is sunny, and tomorrow it may rain again. Thank you very much, see you soon."
)
MODES = ("stream", "whole", "ws")


def now() -> float:
    return time.perf_counter()


def log(msg: str) -> None:
    print(f"[{now() - T_START:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- one request, seen from the client


@dataclasses.dataclass
class Sample:
    mode: str
    started: float
    first: float | None = None  # first audio byte
    finished: float | None = None
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (arrival, bytes)
    bytes: int = 0
    streamed: bool = True  # False: the audio came whole (a JSON body), first == finished
    connect_s: float | None = None  # WebSocket handshake
    error: str | None = None
    finish_reason: str | None = None

    def add(self, t: float, n: int) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = t
        self.chunks.append((t, n))
        self.bytes += n

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None and self.bytes > 0

    @property
    def audio_s(self) -> float:
        return self.bytes / BYTES_PER_S

    @property
    def ttfa_s(self) -> float:
        return (self.first if self.first is not None else self.finished or self.started) - self.started

    @property
    def latency_s(self) -> float:
        return (self.finished or self.started) - self.started

    @property
    def worst_gap_s(self) -> float:
        """How long a real-time player started at the first byte starves, at worst (0: never)."""
        if not self.chunks:
            return 0.0
        t_first = self.chunks[0][0]
        received = 0
        worst = 0.0
        for t, n in self.chunks:
            worst = max(worst, t - (t_first + received / BYTES_PER_S))
            received += n
        return worst


@dataclasses.dataclass
class Api:
    base_url: str
    ws_url: str
    model: str
    frames: int
    text: str
    timeout_s: float
    stream_route: str = "/v1/audio/speech"  # or /api/v1/custom-voice (stream: true)
    whole_route: str = "/api/v1/custom-voice"
    ws_route: str = "/v1/audio/speech/stream"
    client: httpx.AsyncClient | None = None
    seed: int = 0

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def stream_body(self, seed: int, frames: int | None = None) -> dict[str, Any]:
        frames = frames or self.frames
        if self.stream_route == "/v1/audio/speech":
            return {
                "model": self.model,
                "input": self.text,
                "voice": "vivian",
                "language": "english",
                "response_format": "pcm",
                "stream_format": "audio",
                "max_new_tokens": frames,
                "seed": seed,
            }
        return self.whole_body(seed, frames) | {"stream": True, "return_audio_inline": False}

    def whole_body(self, seed: int, frames: int | None = None) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": self.text,
            "speaker": "vivian",
            "language": "english",
            "max_new_tokens": frames or self.frames,
            "response_format": "pcm",
            "return_audio_inline": True,
            "seed": seed,
        }


def _json_audio_bytes(data: dict[str, Any]) -> int:
    """Audio bytes of a native JSON response: inline base64 if there, else from the item durations."""
    total = 0
    for item in data.get("items") or []:
        if item.get("audio_base64"):
            total += len(base64.b64decode(item["audio_base64"]))
        else:
            total += round(float(item.get("duration_s") or 0.0) * BYTES_PER_S)
    return total


async def http_stream(api: Api, seed: int, frames: int | None = None) -> Sample:
    assert api.client is not None
    s = Sample("stream", now())
    try:
        async with api.client.stream("POST", api.stream_route, json=api.stream_body(seed, frames)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode("utf-8", "replace")
                s.error = f"HTTP {r.status_code}: {body[:300]}"
            elif "json" in r.headers.get("content-type", ""):  # a server that does not stream this route
                data = json.loads(await r.aread())
                s.streamed = False
                s.add(now(), _json_audio_bytes(data))
            else:
                async for chunk in r.aiter_raw():
                    s.add(now(), len(chunk))
    except Exception as exc:  # recorded, the run goes on
        s.error = f"{type(exc).__name__}: {exc}"[:300]
    s.finished = now()
    return s


async def http_whole(api: Api, seed: int, frames: int | None = None) -> Sample:
    assert api.client is not None
    s = Sample("whole", now(), streamed=False)
    try:
        r = await api.client.post(api.whole_route, json=api.whole_body(seed, frames))
        if r.status_code != 200:
            s.error = f"HTTP {r.status_code}: {r.text[:300]}"
        else:
            data = r.json()
            items = data.get("items") or [{}]
            s.finish_reason = items[0].get("finish_reason")
            s.add(now(), _json_audio_bytes(data))
    except Exception as exc:
        s.error = f"{type(exc).__name__}: {exc}"[:300]
    s.finished = now()
    return s


def _text_pieces(text: str) -> list[str]:
    """The text as a client would send it while typing: sentence by sentence."""
    pieces = [p for p in re.split(r"(?<=[.!?])\s+", text) if p]
    return [p + (" " if i < len(pieces) - 1 else "") for i, p in enumerate(pieces)]


async def ws_session(api: Api, seed: int, frames: int | None = None) -> Sample:
    import websockets

    s = Sample("ws", now())
    config = {
        "type": "session.config",
        "model": api.model,
        "voice": "vivian",
        "response_format": "pcm",
        "language": "english",
        "seed": seed,
        "max_new_tokens": frames or api.frames,
    }
    try:
        async with websockets.connect(
            api.ws_url + api.ws_route,
            max_size=None,
            compression=None,
            ping_interval=None,
            open_timeout=30,
            close_timeout=5,
        ) as ws:
            s.connect_s = now() - s.started
            await ws.send(json.dumps(config))
            for piece in _text_pieces(api.text):
                await ws.send(json.dumps({"type": "input.text", "text": piece}))
            await ws.send(json.dumps({"type": "input.done"}))
            async for message in ws:
                if isinstance(message, bytes):
                    s.add(now(), len(message))
                    continue
                event = json.loads(message)
                kind = event.get("type")
                if kind == "session.done":
                    s.finish_reason = event.get("finish_reason")
                    break
                if kind == "error":
                    err = event.get("error") or {}
                    s.error = f"ws error {err.get('code') or err.get('type')}: {err.get('message')}"[:300]
                    break
            else:
                s.error = s.error or "connection closed before session.done"
    except Exception as exc:
        s.error = f"{type(exc).__name__}: {exc}"[:300]
    s.finished = now()
    return s


Client = Callable[[Api, int], Awaitable[Sample]]
CLIENTS: dict[str, Client] = {"stream": http_stream, "whole": http_whole, "ws": ws_session}


# ---------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    samples: list[Sample]
    t0: float
    t1: float
    clients: int
    kind: str  # single | burst | loop
    cut_short: bool = False
    # A closed loop's server counters at its first end and once every client has started its last request: the
    # steady window, as its audio-s/s counts it (`step_profile` of the two); None where either was not taken.
    window_counters: tuple[dict[str, float], dict[str, float]] | None = None


async def _bounded(coro: Awaitable[None], limit_s: float) -> bool:
    """Run `coro` for at most `limit_s`; True if it was cut short."""
    try:
        await asyncio.wait_for(coro, timeout=max(1.0, limit_s))
        return False
    except asyncio.TimeoutError:
        return True


async def run_single(api: Api, mode: str, count: int, limit_s: float) -> Run:
    samples: list[Sample] = []

    async def go() -> None:
        for _ in range(count):
            samples.append(await CLIENTS[mode](api, api.next_seed()))

    t0 = now()
    cut = await _bounded(go(), limit_s)
    return Run(samples, t0, now(), 1, "single", cut)


async def run_burst(api: Api, mode: str, clients: int, limit_s: float, frames: int | None = None) -> Run:
    samples: list[Sample] = []

    async def one() -> None:
        samples.append(await CLIENTS[mode](api, api.next_seed(), frames))

    t0 = now()
    cut = await _bounded(asyncio.gather(*(one() for _ in range(clients))), limit_s)
    return Run(samples, t0, now(), clients, "burst", cut)


async def run_loop(
    api: Api,
    mode: str,
    clients: int,
    rounds: int,
    seconds: float,
    limit_s: float,
    stagger_s: float = 0.0,
    counters: Callable[[], Awaitable[dict[str, float]]] | None = None,
) -> Run:
    """Closed loop: `clients` workers, each sends its next request as soon as its last one ends, until it
    has sent `rounds` or `seconds` have passed since the start. Worker k starts k x `stagger_s` late, so
    that the requests are spread over their lifetime instead of moving in lockstep bursts. With `counters`
    (the server's), they are read at the first end and once every worker has started its last round: the
    run's `window_counters` (none if a worker stopped on `seconds`, or with one round)."""
    samples: list[Sample] = []
    t0 = now()
    first_end, last_start = asyncio.Event(), asyncio.Event()
    final_starts = 0

    async def worker(k: int) -> None:
        nonlocal final_starts
        await asyncio.sleep(k * stagger_s)
        for i in range(rounds):
            if now() - t0 > seconds:
                return
            if i == rounds - 1:
                final_starts += 1
                if final_starts == clients:
                    last_start.set()
            sample = await CLIENTS[mode](api, api.next_seed())
            samples.append(sample)
            if sample.ok:  # as `summarize`'s window starts
                first_end.set()

    async def window() -> tuple[dict[str, float], dict[str, float]]:
        assert counters is not None
        await first_end.wait()
        at_first_end = await counters()
        await last_start.wait()
        return at_first_end, await counters()

    watcher = asyncio.create_task(window()) if counters is not None and rounds > 1 else None
    try:
        cut = await _bounded(asyncio.gather(*(worker(k) for k in range(clients))), limit_s)
        run = Run(samples, t0, now(), clients, "loop", cut)
        if watcher is not None and not cut and last_start.is_set():
            # The last /metrics read may still be on its way when the last requests end early.
            with contextlib.suppress(Exception):
                run.window_counters = await asyncio.wait_for(asyncio.shield(watcher), timeout=5.0)
        return run
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


# ---------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


async def engine_counters(client: httpx.AsyncClient | None) -> dict[str, float]:
    """The server's fast-engine counters from /metrics (summed over models and devices): steps, seconds per
    part of the loop, the batch-size histogram's sum and count, and finished requests with their seconds per
    phase, and the streaming codec's batches, streams and rows. Empty if /metrics cannot be read."""
    if client is None:
        return {}
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qtts_engine_steps_total":
                key = "steps"
            elif sample.name == "qtts_engine_seconds_total":
                key = sample.labels["part"]
            elif sample.name in ("qtts_batch_size_sum", "qtts_batch_size_count"):
                key = sample.name.removeprefix("qtts_")
            elif sample.name == "qtts_engine_request_phase_seconds_sum":
                key = REQUEST_KEY + sample.labels["phase"]
            elif sample.name == "qtts_engine_request_phase_seconds_count" and sample.labels["phase"] == "queue":
                key = REQUESTS  # every phase counts the same requests
            elif sample.name in CODEC_METRICS:
                key = CODEC_METRICS[sample.name]
            elif sample.name == "qtts_gc_pause_seconds_total":
                key = "gc"
            elif sample.name == "qtts_gc_long_pauses_total":
                key = LONG_GC
            elif sample.name in ("qtts_event_loop_lag_seconds_sum", "qtts_event_loop_lag_seconds_count"):
                key = sample.name.removeprefix("qtts_event_")
            elif sample.name == "qtts_event_loop_lag_seconds_bucket" and sample.labels["le"] == LOOP_LAG_LONG:
                key = LOOP_ON_TIME
            else:
                continue
            counters[key] = counters.get(key, 0.0) + sample.value
    return counters


def step_profile(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """Where the server's step time went during a run: steps, mean batch, and milliseconds per step in each
    part of the engine loop (host time of the step thread, the frame's GPU time, the codec thread's host time);
    the streaming codec's batches and their mean streams and rows (a captured graph's padding included);
    then the requests the engine finished in the run and their mean milliseconds per phase (an engine request
    is one utterance: a WebSocket session or a text split into segments counts one per segment); and how late
    the server's event loop woke its probe (api/loop_lag.py): the mean, and how many times over 50 ms."""
    steps = after.get("steps", 0.0) - before.get("steps", 0.0)
    if steps <= 0:
        return None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    batches = delta.get("batch_size_count", 0.0)
    per_request = {k: delta.pop(k) for k in list(delta) if k.startswith(REQUEST_KEY)}
    requests = delta.pop(REQUESTS, 0.0)
    codec_batches, codec_streams, codec_rows = (delta.pop(k, 0.0) for k in CODEC_METRICS.values())
    probes, lag_s, on_time = (delta.pop(k, 0.0) for k in LOOP_KEYS)
    parts = {k: round(1000 * v / steps, 3) for k, v in delta.items() if k not in ("steps", LONG_GC, *BATCH_KEYS)}
    return {
        "steps": int(steps),
        "mean_batch": round(delta.get("batch_size_sum", 0.0) / batches, 1) if batches else None,
        "ms_per_step": parts,
        "long_gc_pauses": int(delta[LONG_GC]) if LONG_GC in delta else None,
        "codec_batches": int(codec_batches),
        "codec_streams_per_batch": round(codec_streams / codec_batches, 1) if codec_batches else None,
        "codec_rows_per_batch": round(codec_rows / codec_batches, 1) if codec_batches else None,
        "loop_probes": int(probes),
        "loop_lag_ms_mean": round(1000 * lag_s / probes, 3) if probes > 0 else None,
        "loop_lags_over_50ms": int(probes - on_time) if probes > 0 else None,
        "requests": int(requests),
        "ms_per_request": {k.removeprefix(REQUEST_KEY): round(1000 * v / requests, 1) for k, v in per_request.items()}
        if requests > 0
        else None,
    }


BATCH_KEYS = ("batch_size_sum", "batch_size_count")
# The streaming codec's batches, the streams' chunks in them, the rows they computed (padding included).
CODEC_METRICS = {f"qtts_engine_codec_{k}_total": f"codec_{k}" for k in ("batches", "streams", "rows")}
REQUEST_KEY, REQUESTS = "request_", "requests"  # finished requests' seconds per phase, and how many
LONG_GC = "gc_long_pauses"  # the server's garbage-collector pauses of 50 ms or more (a count, not seconds)
# The server's event-loop probe (api/loop_lag.py): wake-ups, seconds late in all, and those at most 50 ms late.
LOOP_KEYS = ("loop_lag_seconds_count", "loop_lag_seconds_sum", "loop_on_time")
LOOP_ON_TIME, LOOP_LAG_LONG = LOOP_KEYS[2], "0.05"


def summarize(run: Run, frames: int, starve_s: float) -> dict[str, Any]:
    ok = [s for s in run.samples if s.ok]
    errors = [s.error for s in run.samples if s.error]
    out: dict[str, Any] = {
        "kind": run.kind,
        "clients": run.clients,
        "requests": len(run.samples),
        "ok": len(ok),
        "errors": len(errors),
        "error_examples": list(dict.fromkeys(errors))[:3],
        "cut_short": run.cut_short,
        "wall_s": round(run.t1 - run.t0, 3),
    }
    if not ok:
        return out
    expected = frames * FRAME_S
    audio = [s.audio_s for s in ok]
    first_start = min(s.started for s in ok)
    last_end = max(s.finished for s in ok)  # type: ignore[type-var]
    out |= {
        "audio_s": round(sum(audio), 2),
        "audio_s_per_request_min": round(min(audio), 3),
        "audio_s_expected": round(expected, 3),
        "exact_lengths": all(abs(a - expected) < 1e-6 for a in audio),
        "short_requests": sum(s.audio_s < expected - 1e-6 and s.finish_reason != "eos" for s in ok),
        "streamed": all(s.streamed for s in ok),
        "audio_s_per_s_total": round(sum(audio) / max(last_end - first_start, 1e-9), 2),
        "ttfa_ms_p50": ms(pct([s.ttfa_s for s in ok], 50)),
        "ttfa_ms_p95": ms(pct([s.ttfa_s for s in ok], 95)),
        "ttfa_ms_max": ms(max(s.ttfa_s for s in ok)),
        "latency_ms_p50": ms(pct([s.latency_s for s in ok], 50)),
        "latency_ms_p95": ms(pct([s.latency_s for s in ok], 95)),
        "latency_ms_mean": ms(statistics.mean(s.latency_s for s in ok)),
        "xrt_p50": round(pct([s.audio_s / max(s.latency_s, 1e-9) for s in ok], 50) or 0.0, 2),
        "xrt_min": round(min(s.audio_s / max(s.latency_s, 1e-9) for s in ok), 2),
        "chunks_per_request": round(statistics.mean(len(s.chunks) for s in ok), 1),
    }
    finish = {s.finish_reason for s in ok if s.finish_reason}
    if finish:
        out["finish_reasons"] = sorted(finish)
    if any(s.connect_s is not None for s in ok):
        out["connect_ms_p95"] = ms(pct([s.connect_s for s in ok if s.connect_s is not None], 95))
    gaps = [s.worst_gap_s for s in ok if s.streamed]
    if gaps:
        out |= {
            "worst_gap_ms": ms(max(gaps)),
            "worst_gap_ms_p95": ms(pct(gaps, 95)),
            "starved_streams": sum(g > starve_s for g in gaps),
        }
    if run.kind == "single":
        out |= {
            "ttfa_ms_median": ms(statistics.median(s.ttfa_s for s in ok)),
            "latency_ms_median": ms(statistics.median(s.latency_s for s in ok)),
            "xrt_median": round(statistics.median(s.audio_s / max(s.latency_s, 1e-9) for s in ok), 2),
        }
    # Steady window of a closed loop: from the first end (ramp-up over) to the last start (all still busy).
    w0 = min(s.finished for s in ok)  # type: ignore[type-var]
    w1 = max(s.started for s in run.samples)
    if run.kind == "loop" and w1 - w0 > 0.2:
        if all(s.streamed for s in ok):
            in_window = sum(n for s in ok for t, n in s.chunks if w0 <= t <= w1)
        else:
            in_window = sum(s.bytes for s in ok if w0 <= s.finished <= w1)  # type: ignore[operator]
        steady = [s for s in ok if s.started >= w0]
        out |= {
            "window_s": round(w1 - w0, 2),
            "audio_s_per_s": round(in_window / BYTES_PER_S / (w1 - w0), 2),
            "steady_requests": len(steady),
        }
        if len(steady) >= max(2, run.clients // 2):
            out |= {
                "ttfa_ms_p50_steady": ms(pct([s.ttfa_s for s in steady], 50)),
                "ttfa_ms_p95_steady": ms(pct([s.ttfa_s for s in steady], 95)),
                "latency_ms_p50_steady": ms(pct([s.latency_s for s in steady], 50)),
                "latency_ms_p95_steady": ms(pct([s.latency_s for s in steady], 95)),
            }
    else:
        out["audio_s_per_s"] = out["audio_s_per_s_total"]
    return out


def metric_keys(concurrency: Sequence[int], ws_concurrency: Sequence[int]) -> list[str]:
    keys = ["http_ttfa_ms_single", "http_xrt_single", "http_latency_ms_single", "http_xrt_single_nonstream"]
    keys += ["ws_ttfa_ms_single", "warmup_s", "load_s"]
    for c in concurrency:
        keys += [
            f"http_ttfa_ms_p50_c{c}",
            f"http_ttfa_ms_p95_c{c}",
            f"http_audio_s_per_s_c{c}",
            f"http_worst_gap_ms_c{c}",
            f"http_worst_gap_ms_p95_c{c}",
            f"http_starved_streams_c{c}",
            f"http_ttfa_ms_p95_c{c}_burst",
            f"http_audio_s_per_s_c{c}_burst",
            f"http_latency_ms_p50_c{c}",
            f"http_latency_ms_p95_c{c}",
            f"http_audio_s_per_s_c{c}_nonstream",
        ]
    for c in ws_concurrency:
        keys += [
            f"ws_ttfa_ms_p50_c{c}",
            f"ws_ttfa_ms_p95_c{c}",
            f"ws_audio_s_per_s_c{c}",
            f"ws_worst_gap_ms_c{c}",
            f"ws_starved_streams_c{c}",
        ]
    return keys


def headline(mode: str, run_kind: str, c: int, summary: dict[str, Any]) -> dict[str, Any]:
    """The flat metric keys a section's summary fills."""
    if summary.get("ok", 0) == 0:
        return {}
    steady = "_steady" if "ttfa_ms_p95_steady" in summary else ""
    if run_kind == "single":
        return {
            "stream": {"http_ttfa_ms_single": summary["ttfa_ms_median"], "http_xrt_single": summary["xrt_median"]},
            "whole": {
                "http_latency_ms_single": summary["latency_ms_median"],
                "http_xrt_single_nonstream": summary["xrt_median"],
            },
            "ws": {"ws_ttfa_ms_single": summary["ttfa_ms_median"]},
        }[mode]
    if run_kind == "burst":
        if mode != "stream":
            return {}
        return {
            f"http_ttfa_ms_p95_c{c}_burst": summary["ttfa_ms_p95"],
            f"http_audio_s_per_s_c{c}_burst": summary["audio_s_per_s"],
        }
    if mode == "stream":
        return {
            f"http_ttfa_ms_p50_c{c}": summary[f"ttfa_ms_p50{steady}"],
            f"http_ttfa_ms_p95_c{c}": summary[f"ttfa_ms_p95{steady}"],
            f"http_audio_s_per_s_c{c}": summary["audio_s_per_s"],
            f"http_worst_gap_ms_c{c}": summary.get("worst_gap_ms"),
            f"http_worst_gap_ms_p95_c{c}": summary.get("worst_gap_ms_p95"),
            f"http_starved_streams_c{c}": summary.get("starved_streams"),
        }
    if mode == "whole":
        return {
            f"http_latency_ms_p50_c{c}": summary[f"latency_ms_p50{steady}"],
            f"http_latency_ms_p95_c{c}": summary[f"latency_ms_p95{steady}"],
            f"http_audio_s_per_s_c{c}_nonstream": summary["audio_s_per_s"],
        }
    return {
        f"ws_ttfa_ms_p50_c{c}": summary[f"ttfa_ms_p50{steady}"],
        f"ws_ttfa_ms_p95_c{c}": summary[f"ttfa_ms_p95{steady}"],
        f"ws_audio_s_per_s_c{c}": summary["audio_s_per_s"],
        f"ws_worst_gap_ms_c{c}": summary.get("worst_gap_ms"),
        f"ws_starved_streams_c{c}": summary.get("starved_streams"),
    }


# ---------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python -m qwen_tts_server.cli serve` in its own process group, its output in a log file."""

    def __init__(self, args: argparse.Namespace, models_dir: Path, data_dir: Path, log_path: Path) -> None:
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "qwen_tts_server.cli", "serve", "--host", "127.0.0.1"]
        self.command += ["--port", str(self.port), "--models-dir", str(models_dir), "--data-dir", str(data_dir)]
        self.env = dict(os.environ, QTTS_DOWNLOAD_SOURCE="none", PYTHONUNBUFFERED="1")
        if args.device:
            self.env["QTTS_DEVICE"] = args.device
        for item in args.server_env:
            key, _, value = item.partition("=")
            self.env[key] = value
        self.proc: subprocess.Popen[bytes] | None = None

    def settings(self) -> dict[str, str]:
        return {k: v for k, v in sorted(self.env.items()) if k.startswith("QTTS_")}

    def start(self) -> None:
        log(f"server: {shlex.join(self.command)} (log {self.log_path})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_healthy(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        deadline = now() + timeout_s
        failing_since: float | None = None  # a server that answers /health with 5xx is broken, not starting
        while now() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.proc.returncode if self.proc else None}")
            with contextlib.suppress(httpx.HTTPError):
                status = (await client.get("/health", timeout=2.0)).status_code
                if status == 200:
                    return
                failing_since = failing_since or now()
                if status >= 500 and now() - failing_since > 10:
                    raise RuntimeError(f"server answers /health with HTTP {status}")
            await asyncio.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s")

    def stop(self) -> int | None:
        """SIGINT (uvicorn's graceful stop), then SIGTERM, then SIGKILL, to this server's own process group
        (torch.compile's worker processes are in it)."""
        if self.proc is None:
            return None
        for sig, wait_s in ((signal.SIGINT, 20.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
        with contextlib.suppress(ProcessLookupError):  # leftovers of the group (compile workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------- report


def card_name(device: str | None) -> str:
    if device and device.startswith("cpu"):
        return f"cpu-{platform.machine()}"
    index = device.split(":", 1)[1] if device and ":" in device else "0"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
        if out:
            return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"cpu-{platform.machine()}"


def gpu_memory() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class Report:
    MODULE = "bench.bench_http"  # the command recorded
    SUFFIX = "http"  # <out>/<date>-<card>-<SUFFIX>.json

    def __init__(self, args: argparse.Namespace, card: str, model: str) -> None:
        started = datetime.datetime.now(datetime.timezone.utc)
        self.data: dict[str, Any] = {
            "card": card,
            "date": started.strftime("%Y-%m-%d"),
            "started_at": started.isoformat(timespec="seconds"),
            "machine": peers.machine(),
            "commit": args.commit or git_commit() or "unknown",
            "command": shlex.join(["python", "-m", self.MODULE, *(args.argv or [])]),
            "versions": {
                "python": platform.python_version(),
                **{
                    name: dist_version(name)
                    for name in ("torch", "transformers", "qwen-tts", "qwen-tts-server", "fastapi", "uvicorn")
                },
                "httpx": dist_version("httpx"),
                "websockets": dist_version("websockets"),
            },
            "settings": {
                "model": model,
                "size": args.size,
                "frames": args.frames,
                "audio_s_per_request": round(args.frames * FRAME_S, 2),
                "text": args.text,
                "text_chars": len(args.text),
                "concurrency": args.concurrency,
                "ws_concurrency": args.ws_concurrency,
                "headline_concurrency": args.headline,
                "modes": args.modes,
                "single_requests": args.single_requests,
                "loop_rounds": args.loop_rounds,
                "loop_stagger": args.stagger,
                "loop_seconds": args.loop_seconds,
                "warmup_rounds": args.warmup_rounds,
                "max_seconds": args.max_seconds,
                "starve_ms": args.starve_ms,
                "device": args.device,
                "voice": "vivian",
                "language": "english",
                "format": "pcm s16le 24 kHz mono (seconds = bytes / 48000)",
            },
            "metrics": dict.fromkeys(metric_keys(args.concurrency, args.ws_concurrency)),
            "server": {},
            "api": {},
            "sections": {},
            "warmup": {},
            "skipped": [],
            "errors": [],
            "notes": [
                "Clients in the benchmark process (asyncio, httpx, websockets), the server in its own process, "
                "over loopback on the same host.",
                "ttfa: request sent (WebSocket: before connecting) -> first audio byte at the client.",
                "cN keys: closed loop of N clients (starts spread over one request's lifetime), steady window "
                "(first end -> last start); *_burst: N at once.",
                "whole (non-streaming) = POST /api/v1/custom-voice, pcm, return_audio_inline: the server also "
                "encodes and stores the file; latency = request -> whole JSON body.",
                "Weights are random (full-size architecture), so every request runs to max_new_tokens.",
            ],
        }
        self.path: Path | None = None
        if args.out:
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.data['date']}-{card}").strip("-")
            self.path = Path(args.out) / f"{name}-{self.SUFFIX}.json"

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data["metrics"]

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            tmp.replace(self.path)


ROW_LABELS = {"stream": "HTTP stream", "whole": "HTTP whole", "ws": "WebSocket"}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def sections_table(data: dict[str, Any]) -> str:
    head = ["run", "clients", "requests", "audio-s/s", "first audio p50 / p95 ms", "latency p50 / p95 ms"]
    head += ["worst gap ms", "starved"]
    rows = []
    for key, s in data["sections"].items():
        mode, kind = key.split("_", 1)
        label = f"{ROW_LABELS.get(mode, mode)} {kind}"
        steady = "_steady" if "ttfa_ms_p95_steady" in s else ""
        streamed = s.get("streamed", False) and mode != "whole"
        first = f"{fmt(s.get('ttfa_ms_p50' + steady))} / {fmt(s.get('ttfa_ms_p95' + steady))}" if streamed else "-"
        latency = f"{fmt(s.get('latency_ms_p50' + steady))} / {fmt(s.get('latency_ms_p95' + steady))}"
        requests = f"{s.get('ok', 0)}/{s['requests']}"
        cells = [label, s["clients"], requests, fmt(s.get("audio_s_per_s")), first, latency]
        cells += [fmt(s.get("worst_gap_ms")) if streamed else "-", fmt(s.get("starved_streams")) if streamed else "-"]
        rows.append(cells)
    return markdown_table(head, rows)


PROFILE_PARTS = (*STEP_PARTS, "gpu_frame", "codec", "gc")  # the step thread's, the GPU's, codec's, collector's


def profile_table(data: dict[str, Any]) -> str:
    """Per run, the server's engine step in milliseconds per part (see `step_profile`), then how late the
    server's event loop ran what was due (mean per probe, and probes over 50 ms late); empty when no run has
    a profile."""
    rows = []
    for key, section in data["sections"].items():
        rows += [(key, section["step_profile"])] if section.get("step_profile") else []
        rows += [(f"{key} (steady)", section["step_profile_steady"])] if section.get("step_profile_steady") else []
    if not rows:
        return ""
    head = [
        "run",
        "steps",
        "mean batch",
        "step ms",
        *PROFILE_PARTS,
        "codec batch streams / rows",
        "gc pauses >= 50 ms",
        "loop lag ms",
        "loop lags > 50 ms",
    ]
    cells = []
    for key, p in rows:
        ms = p["ms_per_step"]
        step = sum(ms.get(part, 0.0) for part in STEP_PARTS)
        cells.append(
            [key, p["steps"], fmt(p["mean_batch"]), fmt(round(step, 2)), *(fmt(ms.get(x)) for x in PROFILE_PARTS)]
            + [f"{fmt(p.get('codec_streams_per_batch'))} / {fmt(p.get('codec_rows_per_batch'))}"]
            + [fmt(p.get(k)) for k in ("long_gc_pauses", "loop_lag_ms_mean", "loop_lags_over_50ms")]
        )
    return markdown_table(head, cells)


def request_table(data: dict[str, Any]) -> str:
    """Per run, where a finished request's time went on the server, mean milliseconds per phase (see
    `engine.fast.timing.RequestPhases`), then `outside`; empty when no run has them."""
    rows = [(key, s) for key, s in data["sections"].items() if (s.get("step_profile") or {}).get("ms_per_request")]
    if not rows:
        return ""

    def cells(key: str, section: dict[str, Any]) -> list[Any]:
        p = section["step_profile"]
        return [key, p["requests"], *(fmt(p["ms_per_request"].get(x)) for x in REQUEST_PHASES), fmt(outside(section))]

    return markdown_table(["run", "requests", *REQUEST_PHASES, "outside"], (cells(k, s) for k, s in rows))


def outside(section: dict[str, Any]) -> float | None:
    """A run's mean client latency less its requests' mean server phases: HTTP both ways, the request's checks
    before its prompt, and delivering its last bytes. Only where the engine finished exactly the run's requests
    (one engine request each: not WebSocket sessions of several segments)."""
    profile = section.get("step_profile") or {}
    phases = profile.get("ms_per_request") or {}
    if section.get("latency_ms_mean") is None or profile.get("requests") != section.get("ok") or not phases:
        return None
    return round(section["latency_ms_mean"] - sum(phases.values()), 1)


def targets(data: dict[str, Any], engine_c64: float | None) -> list[dict[str, Any]]:
    m = data["metrics"]
    c = data["settings"]["headline_concurrency"]

    def row(name: str, value: Any, ok: Callable[[Any], bool] | None) -> dict[str, Any]:
        status = "not measured" if value is None or ok is None else ("met" if ok(value) else "missed")
        return {"target": name, "value": value, "status": status}

    gap = m.get(f"http_worst_gap_ms_c{c}")
    starved = m.get(f"http_starved_streams_c{c}")
    agg = m.get(f"http_audio_s_per_s_c{c}")
    # Issue 12's targets (they tighten the streaming issue's 60 ms and 250 ms).
    rows = [
        row("one stream >= 16x real time", m.get("http_xrt_single"), lambda v: v >= 16),
        row("first audio byte, one stream <= 50 ms", m.get("http_ttfa_ms_single"), lambda v: v <= 50),
        row(f"first audio byte p95 at c{c} <= 200 ms", m.get(f"http_ttfa_ms_p95_c{c}"), lambda v: v <= 200),
        row(
            f"no stream slower than real time at c{c} (starved streams; worst gap {fmt(gap)} ms)",
            starved,
            lambda v: v == 0,
        ),
        row(f"streaming aggregate at c{c} >= 600 audio-s/s", agg, lambda v: v >= 600),
        peers_row(data.get("peers"), data),
    ]
    if engine_c64 is None:
        rows.append(row(f"streaming aggregate at c{c} >= 0.9 x engine-only (no engine figure given)", agg, None))
    else:
        rows.append(
            row(
                f"streaming aggregate at c{c} >= 0.9 x engine-only {engine_c64:g} = {0.9 * engine_c64:.1f} audio-s/s",
                agg,
                lambda v: v >= 0.9 * engine_c64,
            )
        )
    return rows


def peers_row(result: dict[str, Any] | None, report: dict[str, Any]) -> dict[str, Any]:
    """The peers' target. Rows from the same call meet it. So do rows from a call of their own on this report's
    machine in the same lease (`--peers-from`: the same warm device machine, the call before or after; the
    server's load and the peers do not fit one call), and the row says so; rows from any other machine or lease
    do not: it says where they came from."""
    source = (result or {}).get("source")
    ran = peers.present(result)
    both = "met" if ran == ", ".join(peers.ENGINES) else "missed"
    if source is not None and peers.same_machine(result, report):
        status = f"{both}: on this machine, in a call of their own (`{source}`)"
    elif source is not None:
        status = f"from another call (`{source}`)"
    elif ran is None:
        status = "not measured"
    else:
        status = both
    return {
        "target": "the reference and faster-qwen3-tts in the same run (engine level)",
        "value": ran,
        "status": status,
    }


def targets_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(["target", "measured", "status"], ([r["target"], fmt(r["value"]), r["status"]] for r in rows))


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    server = data.get("server", {})
    out = [
        "## End to end through the real server (`bench/bench_http.py`)",
        "",
        "| card | date | commit | command |",
        "|---|---|---|---|",
        f"| {data['card']} | {data['date']} | {data['commit']} | `{data['command']}` |",
        "",
        f"{s['model']} ("
        + ("tiny test checkpoint" if s.get("size") == "tiny" else "full-size architecture")
        + ", random weights, loaded from disk by the server), "
        f"{s['frames']} frames ({s['audio_s_per_request']} s of audio) per request, pcm, one segment of "
        f"{s['text_chars']} characters; torch {data['versions'].get('torch')}. Server start "
        f"{fmt(server.get('start_s'))} s, model load {fmt(data['metrics'].get('load_s'))} s, warm-up "
        f"{fmt(data['metrics'].get('warmup_s'))} s (first request {fmt(server.get('first_request_s'))} s). "
        f"Routes: stream `{data['api'].get('stream_route')}`, whole `{data['api'].get('whole_route')}`, "
        f"WebSocket `{data['api'].get('ws_route')}`"
        + ("" if data["api"].get("ws_available", True) else " (not available)")
        + ".",
        "",
        sections_table(data),
        "",
        "cN loop: a closed loop of N clients, measured in its steady window (first end to last start); "
        "cN burst: N requests at once. First audio: request sent to the first audio byte at the client. "
        "Worst gap: how long a real-time player started at the first byte starved, worst stream.",
        "",
    ]
    peer_data = data.get("peers") or {}
    peer_rows = peers.table(peer_data, fmt)
    if peer_rows:
        if not peer_data.get("source"):
            where = "in the same call, after the server stopped (`bench/peers.py`"
        elif peers.same_machine(peer_data, data):
            where = "on this machine, in a call of their own next to the server's "
            where += f"(`bench/peers.py`, `{peer_data['source']}`"
        else:
            where = (
                f"from another call ({peer_data.get('card') or 'card not recorded'}, "
                f"{peer_data.get('date') or 'date not recorded'}; `bench/peers.py`, `{peer_data['source']}`"
            )
        out += [
            f"The peers {where}: `bench.bench_engines` in process, no HTTP, same request length; upstream does not "
            "stream, so its first audio is the whole batch's audio; faster-qwen3-tts serves one request at a time):",
            "",
            peer_rows,
            "",
        ]
    profile = profile_table(data)
    if profile:
        out += [
            "Where the server's engine step goes (from its `/metrics` counters over each run; milliseconds per "
            "step): the step thread's host time in admit (inbox, compaction), prefill, launch (graph replay), "
            "gpu_wait (the one host read, waiting for the frame; since 2026-12-06 the frame the previous step "
            "queued, so the host's other parts overlap the GPU's work) and deliver (callbacks, chunks, hand-off "
            "to the codec thread), which sum to "
            "the step; gpu_frame is the frame's own time on the GPU, codec the codec thread's host time, codec "
            "batch the streams a streaming-codec batch decoded on average and the rows it computed (a captured "
            "graph's padding rows included), gc the "
            "server's garbage-collector pauses (every thread stopped), then how many of those were 50 ms or more. "
            "A loop's (steady) row counts its steady window alone (from its first end to its last start, as its "
            "audio-s/s does); its other row, the whole run with its ramps up and down.",
            "",
            profile,
            "",
        ]
    requests = request_table(data)
    if requests:
        out += [
            "Where a finished request's time went on the server (the same counters; mean milliseconds a request): "
            "prompt (building it on a worker thread, waiting for one included), queue (submit to admission: a free "
            "row and the admission wait), first_frame (admission to its first frame read), frames (first to last "
            "frame), tail (last frame to its last audio handed out). Under a closed loop every phase but frames is "
            "time a row could serve someone. Outside: the client's mean latency less the phases (HTTP both ways, "
            "the request's checks before its prompt, delivering its last bytes).",
            "",
            requests,
            "",
        ]
    return "\n".join(out + report_footer(data))


def report_footer(data: dict[str, Any]) -> list[str]:
    """The lines that end every benchmark's docs section: its targets, then what was skipped or failed."""
    out: list[str] = []
    if data.get("targets"):
        out += [targets_table(data["targets"]), ""]
    if data.get("skipped") or data.get("errors"):
        out += [f"- skipped: {x}" for x in data.get("skipped", [])]
        out += [f"- error: {x}" for x in data.get("errors", [])]
        out.append("")
    return out


def update_docs(
    docs: Path,
    data: dict[str, Any],
    render: Callable[[dict[str, Any]], str] | None = None,
    markers: tuple[str, str] = (DOCS_START, DOCS_END),
) -> None:
    """Replace the section of `docs` between `markers` with `render(data)` (default: this benchmark's
    markdown); the markers are added under the title if absent."""
    start, end = markers
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    block = f"{start}\n{(render or markdown)(data).rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        lines = text.splitlines(keepends=True)
        at = 1 if lines and lines[0].startswith("# ") else 0
        text = "".join(lines[:at]) + ("\n" if at else "") + block + "\n\n" + "".join(lines[at:]).lstrip("\n")
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def engine_figure(value: str | None, model: str) -> float | None:
    """--engine-c64: a number, or a bench_engines JSON (its fast engine's audio_s_per_s_c64 for the model)."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return float(value)
    data = json.loads(Path(value).read_text())
    fast = data.get("results", {}).get("fast", {})
    for label in (model, *fast):
        figure = (fast.get(label) or {}).get("audio_s_per_s_c64")
        if figure is not None:
            return float(figure)
    raise SystemExit(f"{value}: no fast engine audio_s_per_s_c64 in it")


# ---------------------------------------------------------------- the benchmark


class Budget:
    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s

    @property
    def left_s(self) -> float:
        return self.limit_s - (now() - T_START)


class Bench:
    def __init__(self, args: argparse.Namespace, api: Api, report: Report, budget: Budget) -> None:
        self.args, self.api, self.report, self.budget = args, api, report, budget
        self.rate: dict[tuple[str, int], float] = {}  # audio-s/s seen in warm-up, per (mode, clients)
        self.wall: dict[tuple[str, int], float] = {}  # a warm-up burst's wall time, per (mode, clients)
        self.request_s = args.frames * FRAME_S / 2  # a request's wall time, refined by warm-up

    def estimate_s(self, mode: str, clients: int, requests: int) -> float:
        rate = self.rate.get((mode, clients)) or max(self.rate.values(), default=0.0)
        audio = requests * self.args.frames * FRAME_S
        if rate <= 0:
            return requests * self.request_s * 1.5 + 5
        return max(audio / rate, self.request_s) * 1.3 + 3

    def warm_up_estimate_s(self, mode: str, clients: int) -> float:
        """The time a warm-up burst needs to start. A burst is cut off at the time left anyway, so where no rate
        at its concurrency is known yet a few requests' time is enough: the one-client rate, the only one known
        before the first burst of 64, puts that burst at 64 requests' time, some twenty times what it takes a
        batching server (on 2026-12-06 that skipped every c64 run of a call with 48 s left for ~40 s of them)."""
        estimate = self.estimate_s(mode, clients, clients)
        if (mode, clients) in self.rate:
            return estimate
        return min(estimate, 3 * self.request_s + 5)

    def fits(self, name: str, estimate: float) -> bool:
        left = self.budget.left_s - self.args.reserve_s
        if estimate <= left:
            return True
        self.report.data["skipped"].append(f"{name}: needs ~{estimate:.0f} s, {left:.0f} s left")
        log(f"{name}: skipped (needs ~{estimate:.0f} s, {left:.0f} s left)")
        self.report.save()
        return False

    def record(self, name: str, mode: str, run: Run) -> dict[str, Any]:
        summary = summarize(run, self.args.frames, self.args.starve_ms / 1000)
        self.report.data["sections"][name] = summary
        self.report.metrics.update(headline(mode, run.kind, run.clients, summary))
        if summary.get("errors"):
            self.report.data["errors"].append(f"{name}: {summary['errors']} failed, e.g. {summary['error_examples']}")
        if summary.get("short_requests"):
            self.report.data["errors"].append(
                f"{name}: {summary['short_requests']} requests got less audio than their frames and did not end "
                f"at EOS (shortest {summary['audio_s_per_request_min']} s of {summary['audio_s_expected']} s): "
                "audio was lost"
            )
        log(
            f"{name}: {summary['ok']}/{summary['requests']} ok, {fmt(summary.get('audio_s_per_s'))} audio-s/s, "
            f"ttfa p50/p95 {fmt(summary.get('ttfa_ms_p50'))}/{fmt(summary.get('ttfa_ms_p95'))} ms, latency p95 "
            f"{fmt(summary.get('latency_ms_p95'))} ms, worst gap {fmt(summary.get('worst_gap_ms'))} ms, starved "
            f"{fmt(summary.get('starved_streams'))}" + (" (CUT SHORT)" if run.cut_short else "")
        )
        self.report.save()
        return summary

    async def warm_up(self, modes: list[str]) -> None:
        args = self.args
        t0 = now()
        warm = self.report.data["warmup"]
        for mode in modes:
            plan = [1, 1] + [c for c in self.concurrencies(mode) for _ in range(args.warmup_rounds)]
            for clients in plan:
                if not self.fits(f"warm-up {mode} c{clients}", self.warm_up_estimate_s(mode, clients)):
                    break
                run = await run_burst(self.api, mode, clients, self.budget.left_s - args.reserve_s)
                ok = [s for s in run.samples if s.ok]
                wall = run.t1 - run.t0
                if ok:
                    self.rate[(mode, clients)] = sum(s.audio_s for s in ok) / max(wall, 1e-9)
                    self.wall[(mode, clients)] = wall
                    if clients == 1:
                        self.request_s = wall
                warm.setdefault(f"{mode}_c{clients}", []).append(
                    {"wall_s": round(wall, 2), "ok": len(ok), "requests": clients}
                )
                log(f"warm-up {mode} c{clients}: {len(ok)}/{clients} ok in {wall:.2f} s")
                if not ok:
                    errors = {s.error for s in run.samples if s.error}
                    self.report.data["errors"].append(f"warm-up {mode} c{clients}: {sorted(errors)[:2]}")
                    break
        self.report.metrics["warmup_s"] = round(now() - t0 + self.report.data["server"].get("first_request_s", 0), 1)
        self.report.save()

    def concurrencies(self, mode: str) -> list[int]:
        return self.args.ws_concurrency if mode == "ws" else self.args.concurrency

    async def measure(self, modes: list[str]) -> None:
        args = self.args
        # Headline first (single, then the headline concurrency), then the others, while time lasts.
        order: list[tuple[str, str, int]] = [(m, "single", 1) for m in modes]
        for c in sorted({*args.concurrency, *args.ws_concurrency}, key=lambda c: (c != args.headline, c)):
            for m in modes:
                if c in self.concurrencies(m):
                    order += [(m, "loop", c)] + ([(m, "burst", c)] if m != "ws" or args.ws_burst else [])
        for mode, kind, c in order:
            name = f"{mode}_single" if kind == "single" else f"{mode}_{kind}_c{c}"
            if kind == "single":
                estimate = args.single_requests * self.request_s * 1.5 + 3
            elif kind == "burst":
                estimate = self.estimate_s(mode, c, c)
            else:
                one_round = self.estimate_s(mode, c, c)
                estimate = min(one_round * (args.loop_rounds + 1), args.loop_seconds + 2 * one_round)
            if not self.fits(name, estimate):
                continue
            limit = self.budget.left_s - args.reserve_s
            counters = await engine_counters(self.api.client)
            if kind == "single":
                run = await run_single(self.api, mode, args.single_requests, limit)
            elif kind == "burst":
                run = await run_burst(self.api, mode, c, limit)
            else:
                # Spread the clients' starts over one request's lifetime at this concurrency.
                stagger = self.wall.get((mode, c), 0.0) / c if args.stagger else 0.0
                read = functools.partial(engine_counters, self.api.client)
                run = await run_loop(self.api, mode, c, args.loop_rounds, args.loop_seconds, limit, stagger, read)
            summary = self.record(name, mode, run)
            profile = step_profile(counters, await engine_counters(self.api.client))
            if profile is not None:
                summary["step_profile"] = profile
                log(f"{name}: step profile {profile}")
            windowed = run.window_counters and "window_s" in summary  # as its audio-s/s
            steady = step_profile(*run.window_counters) if windowed else None
            if steady is not None:
                summary["step_profile_steady"] = steady
                log(f"{name}: steady-window step profile {steady}")
            self.report.save()


async def probe(api: Api, report: Report, modes: list[str], first_timeout_s: float) -> list[str]:
    """Find the routes this server has; the first request (compile, graph capture) is timed here."""
    info = report.data["api"]
    assert api.client is not None
    for route in (api.stream_route, "/api/v1/custom-voice"):
        api.stream_route = route
        t0 = now()
        s = await asyncio.wait_for(http_stream(api, api.next_seed(), 2), timeout=first_timeout_s)
        report.data["server"]["first_request_s"] = round(now() - t0, 1)
        if not (s.error and ("HTTP 404" in s.error or "HTTP 405" in s.error)):
            break
        info["stream_route_missing"] = route
    if s.error:
        raise RuntimeError(f"first request failed: {s.error}")
    info["stream_route"] = api.stream_route
    info["streamed"] = s.streamed
    info["whole_route"] = api.whole_route
    info["ws_route"] = api.ws_route
    if not s.streamed:
        report.data["notes"].append(
            f"{api.stream_route} answered with a whole JSON body: 'stream' first audio = whole latency."
        )
    usable = [m for m in modes if m != "ws"]
    if "ws" in modes:
        w = await ws_session(api, api.next_seed(), 2)
        info["ws_available"] = w.ok
        if w.ok:
            usable.append("ws")
        else:
            info["ws_error"] = w.error
            report.data["skipped"].append(f"ws: {w.error}")
            log(f"ws: not available ({w.error})")
    return usable


def make_api(args: argparse.Namespace, server: Server, model: str) -> Api:
    return Api(
        base_url=server.url,
        ws_url=server.url.replace("http://", "ws://"),
        model=model,
        frames=args.frames,
        text=args.text,
        timeout_s=args.timeout_s,
    )


def make_client(args: argparse.Namespace, server: Server) -> httpx.AsyncClient:
    """One client for all requests, with room for `args.max_clients` at once."""
    limits = httpx.Limits(max_connections=4 * args.max_clients + 16, max_keepalive_connections=4 * args.max_clients)
    timeout = httpx.Timeout(args.timeout_s, connect=30.0)
    return httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout)


async def start_server(
    args: argparse.Namespace, report: Report, server: Server, client: httpx.AsyncClient, budget: Budget
) -> None:
    """Start the server process and wait for /health; `start_s` and its QTTS_ settings go to the report."""
    t0 = now()
    server.start()
    await server.wait_healthy(client, min(args.start_timeout_s, budget.left_s))
    report.data["server"]["start_s"] = round(now() - t0, 1)
    report.data["server"]["settings"] = server.settings()
    log(f"server healthy after {now() - t0:.1f} s")


async def load_model(
    client: httpx.AsyncClient, model: str, report: Report, budget: Budget, key: str = "load_s"
) -> dict[str, Any]:
    """`POST /api/v1/models/<model>/load`; its time (metric `key`) and the model list go to the report.
    Returns the answer."""
    t0 = now()
    r = await client.post(f"/api/v1/models/{model}/load", timeout=max(30.0, budget.left_s))
    if r.status_code != 200:
        raise RuntimeError(f"load: HTTP {r.status_code}: {r.text[:500]}")
    report.metrics[key] = round(now() - t0, 1)
    log(f"model loaded in {now() - t0:.1f} s: {r.json()}")
    with contextlib.suppress(httpx.HTTPError, ValueError):
        report.data["server"]["models"] = (await client.get("/api/v1/models")).json()
    report.save()
    return r.json()


async def bench_main(args: argparse.Namespace, report: Report, server: Server, budget: Budget) -> None:
    api = make_api(args, server, report.data["settings"]["model"])
    async with make_client(args, server) as client:
        api.client = client
        await start_server(args, report, server, client, budget)
        await load_model(client, api.model, report, budget)
        modes = await probe(api, report, args.modes, max(30.0, budget.left_s - args.reserve_s))
        log(f"first request {report.data['server']['first_request_s']} s; routes {report.data['api']}")
        bench = Bench(args, api, report, budget)
        await bench.warm_up(modes)
        await bench.measure(modes)
        with contextlib.suppress(httpx.HTTPError, ValueError):
            report.data["server"]["ready"] = (await client.get("/ready")).json()
        report.data["server"]["gpu_memory"] = gpu_memory()


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags of every benchmark through the real server: checkpoint, server, requests, budget, output."""
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"], help="checkpoint size (CustomVoice)")
    p.add_argument("--model", default=None, help="model name (default: the published name of --size)")
    p.add_argument("--models-dir", default=None, help="checkpoints folder (default: a temporary one)")
    p.add_argument("--tokenizer-dir", default=None, help="full text tokenizer for a checkpoint this writes")
    p.add_argument("--device", default=None, help="QTTS_DEVICE for the server (default: the server's own)")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--frames", type=int, default=100, help="codec frames per request (0.08 s each)")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--max-seconds", type=float, default=540.0, help="overall budget from start")
    p.add_argument("--reserve-s", type=float, default=15.0, help="budget kept for stopping and saving")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--start-timeout-s", type=float, default=180.0, help="server start to /health")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder ('' to write none)")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--server-log", default=None, help="server output (default: in the temporary data folder)")
    p.add_argument("--targets", action="store_true", help="print met/missed against the targets")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse here)")
    p.add_argument("--update-docs", default=None, metavar="RESULT_JSON", help="only re-render --docs from a JSON")


def add_loop_args(p: argparse.ArgumentParser) -> None:
    """Flags of the warm-up and of the closed loops (`Bench`)."""
    p.add_argument("--single-requests", type=int, default=5, help="sequential requests of the single runs")
    p.add_argument("--loop-rounds", type=int, default=4, help="requests per client in a closed loop")
    p.add_argument(
        "--no-stagger",
        dest="stagger",
        action="store_false",
        help="closed-loop clients all start at once (default: spread over one request's lifetime)",
    )
    p.add_argument("--loop-seconds", type=float, default=60.0, help="a closed loop sends nothing new after this")
    p.add_argument("--warmup-rounds", type=int, default=2, help="warm-up bursts per concurrency and mode")
    p.add_argument("--starve-ms", type=float, default=0.0, help="a stream starved if its worst gap exceeds this")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--concurrency", default="1,64", help="comma list; 1 = one request at a time (always run)")
    p.add_argument("--ws-concurrency", default=None, help="comma list for the WebSocket runs (default: headline)")
    p.add_argument("--ws-burst", action="store_true", help="also a WebSocket burst per concurrency")
    p.add_argument("--headline", type=int, default=None, help="concurrency of the targets (default 64 if run)")
    p.add_argument("--modes", default="stream,whole,ws", help="comma list of stream,whole,ws")
    add_loop_args(p)
    p.add_argument("--engine-c64", default=None, help="engine-only c64 audio-s/s, or a bench_engines JSON")
    p.add_argument(
        "--peers-s",
        type=float,
        default=0.0,
        help="seconds of --max-seconds kept for the peers (upstream, faster-qwen3-tts) after the server stops; "
        "0: none (bench/peers.py)",
    )
    p.add_argument(
        "--peers-from",
        default=None,
        metavar="PEERS_JSON",
        help="the peers' rows from another call (`python -m bench.peers`, or a bench_http report), instead of "
        "--peers-s; "
        "with --update-docs, added to RESULT_JSON (its targets redone: give --engine-c64 again if it had one)",
    )
    args = p.parse_args(argv)
    if args.peers_from and args.peers_s > 0:
        p.error("--peers-from and --peers-s both give the peers' rows: pick one")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()} - {1})
    if args.headline is None:
        args.headline = 64 if 64 in args.concurrency or not args.concurrency else max(args.concurrency)
    if args.ws_concurrency is None:
        args.ws_concurrency = [args.headline] if args.headline in args.concurrency else args.concurrency[-1:]
    else:
        args.ws_concurrency = sorted({int(c) for c in args.ws_concurrency.split(",") if c.strip()} - {1})
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}")
    args.max_clients = max([1, *args.concurrency, *args.ws_concurrency])
    return args


def ensure_checkpoint(args: argparse.Namespace, models_dir: Path, model: str, report: Report, budget: Budget) -> None:
    """Write a random checkpoint of `args.size` with `bench.checkpoint` unless `models_dir` has the model."""
    if (models_dir / model / "config.json").exists():
        return
    command = [sys.executable, "-m", "bench.checkpoint", "--size", args.size, "--out", str(models_dir)]
    if args.tokenizer_dir:
        command += ["--tokenizer-dir", args.tokenizer_dir]
    if args.device:
        command += ["--device", args.device]
    t0 = now()
    log(f"writing the checkpoint: {shlex.join(command)}")
    subprocess.run(command, cwd=REPO, check=True, timeout=max(60.0, budget.left_s))
    report.data["server"]["checkpoint_write_s"] = round(now() - t0, 1)


def run_peers(args: argparse.Namespace, report: Report) -> None:
    """The peers' rows in the time left (the server has stopped: the card is theirs)."""
    left = args.max_seconds - (now() - T_START) - args.reserve_s
    if left < 30:
        report.data["skipped"].append(f"peers: {left:.0f} s left")
        return
    concurrency = args.headline if args.headline in args.concurrency else max([1, *args.concurrency])
    try:
        report.data["peers"] = peers.run(
            args.size, frames=args.frames, concurrency=concurrency, budget_s=left, device=args.device, log=log
        )
    except Exception as exc:  # the server's results are saved whatever the peers do
        report.data["errors"].append(f"peers: {type(exc).__name__}: {exc}"[:1000])
    report.save()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.update_docs:
        data = json.loads(Path(args.update_docs).read_text())
        if args.peers_from:
            data["peers"] = peers.load(Path(args.peers_from), frames=data["settings"]["frames"])
            data["targets"] = targets(data, engine_figure(args.engine_c64, data["settings"]["model"]))
            Path(args.update_docs).write_text(json.dumps(data, indent=2) + "\n")
        update_docs(Path(args.docs), data)
        print(markdown(data))
        return 0
    from bench.bench_engines import published_name

    model = args.model or published_name(args.size)
    report = Report(args, card_name(args.device), model)
    budget = Budget(args.max_seconds - args.peers_s)
    tmp = Path(tempfile.mkdtemp(prefix="qtts-http-bench-"))
    models_dir = Path(args.models_dir) if args.models_dir else tmp / "models"
    server_log = Path(args.server_log) if args.server_log else tmp / "server.log"
    server = Server(args, models_dir, tmp / "data", server_log)
    if args.peers_from:
        report.data["peers"] = peers.load(Path(args.peers_from), frames=args.frames)
    log(f"{report.data['card']}, model {model}, commit {report.data['commit']}, budget {args.max_seconds:.0f} s")
    status = 0
    try:
        ensure_checkpoint(args, models_dir, model, report, budget)
        asyncio.run(bench_main(args, report, server, budget))
    except Exception as exc:
        status = 1
        report.data["errors"].append(f"{type(exc).__name__}: {exc}"[:1000])
        log(f"FAILED: {type(exc).__name__}: {exc}")
        tail = server.log_tail()
        if tail:
            print("---- server log tail ----\n" + tail + "\n----", flush=True)
    finally:
        returncode = server.stop()
        report.data["server"]["exit_code"] = returncode
        if args.peers_s > 0:
            run_peers(args, report)
        engine = engine_figure(args.engine_c64, model)
        report.data["targets"] = targets(report.data, engine)
        report.data["wall_s"] = round(now() - T_START, 1)
        report.save()
        shutil.rmtree(tmp / "data", ignore_errors=True)
        if not args.models_dir:
            shutil.rmtree(tmp / "models", ignore_errors=True)
    print("\n" + sections_table(report.data), flush=True)
    if args.targets:
        print("\n" + targets_table(report.data["targets"]), flush=True)
    if not args.no_docs and args.docs and report.data["sections"]:
        update_docs(Path(args.docs), report.data)
        print(f"updated {args.docs}", flush=True)
    if report.path is not None:
        print(f"wrote {report.path}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
