"""Batch jobs through the real server: a job of many items against the synchronous closed loop of the
same run, and the memory a model unload gives back.

Starts the REAL server process and loads the model as `bench.bench_http` does (a full-size random
checkpoint is written first if the folder lacks it), warms it up (the first request compiles: minutes on a
GPU; then bursts at the concurrency), then measures, from this process over loopback:

1. sync: a closed loop of `--concurrency` clients (default 64) of whole-utterance requests
   (`--sync-mode whole`: `POST /api/v1/custom-voice`, pcm, `return_audio_inline`; the server also encodes
   and stores each file, as it does for a job item), measured in its steady window exactly as bench_http
   measures its loops: sync audio-s/s = audio of the responses that ended in the window / its length.
2. job: one `POST /api/v1/jobs` of `--items` items (default 1000) of the same text, each `max_new_tokens`
   = `--frames`, its own seed, `response_format` `--job-format`, then its event stream
   (`GET /api/v1/jobs/<id>/events`, server-sent events) read from the 202 to `end`, each event's arrival
   time taken at the client. The items run in the server (the in-process backend: one worker,
   QTTS_JOB_CONCURRENCY items at once, by default the engine's rows).
   - job wall = just before the POST is sent -> the `end` event's arrival (includes checking and storing the
     job, queueing, the ramp-up of the first items and the tail of the last ones);
   - job audio-s/s = audio seconds of all items (the end event's `progress.audio_s`) / job wall;
   - ratio = job audio-s/s / sync audio-s/s (target >= 0.9);
   - event gaps: between consecutive event arrivals, from the stream's response headers to `end`
     (max and p99; target: max <= 1 s, the server promises a `progress` at least every second).
   Not measured: downloading the outputs, the Celery backend, other traffic next to the job.
3. memory: the server's own accounting (`GET /api/v1/models`: `memory.used_bytes`, per device
   `memory.devices[].used_bytes`: weights and KV cache it counts against its budget), with CUDA
   `nvidia-smi` memory.used of every GPU (and of the server's processes, where nvidia-smi names them), and
   the resident host memory of the server's processes (/proc), at these stages: before the model is loaded;
   loaded and warmed (after the sync loop); after the job; after `POST /api/v1/models/<name>/unload` (it
   answers once the memory is released, so the snapshot is taken at once); after loading it again and one
   burst at the concurrency (graphs and KV cache rebuilt); after a second unload. Targets: after the
   unload, back within `--memory-tolerance-mib` of the before-load figure; the second unload within
   `--growth-tolerance-mib` of the first (a leak shows as growth). GPU figures when nvidia-smi answers,
   else the server's accounting (on the CPU it is all there is).

Budget: `--max-seconds` from start; the job gets what is left after a reserve for the memory stages and is
cancelled (`DELETE /api/v1/jobs/<id>`) if it runs out; the JSON is rewritten after every section.

Writes `<out>/<date>-<card>-jobs.json` and the section of `docs/benchmarks.md` between
`<!-- jobs-bench:start -->` and `<!-- jobs-bench:end -->` (`--docs`; re-render from a JSON with
`--update-docs RESULT.json`). `--targets` prints met/missed.

CPU smoke run (tiny checkpoint, about a minute, most of it starting the server):
    .venv/bin/python -m bench.bench_jobs --size tiny --models-dir /tmp/m --device cpu --concurrency 2 \\
        --items 20 --frames 6 --out /tmp/r --docs /tmp/r/benchmarks.md --targets
On the lent GPU: see bench/device_setup.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.bench_http import (
    FRAME_S,
    T_START,
    Api,
    Bench,
    Budget,
    Report,
    Server,
    add_common_args,
    add_loop_args,
    card_name,
    ensure_checkpoint,
    fmt,
    load_model,
    log,
    make_api,
    make_client,
    ms,
    now,
    pct,
    probe,
    report_footer,
    run_burst,
    run_loop,
    sections_table,
    start_server,
    targets_table,
    update_docs,
)
from bench.tables import markdown_table

DOCS_MARKERS = ("<!-- jobs-bench:start -->", "<!-- jobs-bench:end -->")
MIB = 1024**2
MEMORY_STAGES = {
    "before_load": "before load",
    "loaded_warm": "loaded, warmed",
    "after_job": "after the job",
    "unloaded": "after unload",
    "reloaded": "loaded again, one burst",
    "unloaded_again": "after a second unload",
}


# ---------------------------------------------------------------- the job, seen from the client


@dataclasses.dataclass
class Event:
    at: float  # arrival at the client (perf_counter)
    kind: str  # progress | item | end
    data: dict[str, Any]


class SseParser:
    """Server-sent events, line by line (`event:`, `data:`, a blank line ends an event)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        """The event a line completes, else None."""
        if not line:
            if self.kind is None and not self.data:
                return None
            kind, data = self.kind or "message", "\n".join(self.data)
            self.kind, self.data = None, []
            return kind, (json.loads(data) if data else {})
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self.kind = value
        elif field == "data":
            self.data.append(value)
        return None


@dataclasses.dataclass
class JobRun:
    items: int
    submitted: float  # just before the POST was sent
    accepted: float | None = None  # the 202 arrived
    opened: float | None = None  # the event stream's headers arrived
    job_id: str | None = None
    events: list[Event] = dataclasses.field(default_factory=list)
    error: str | None = None
    cut_short: bool = False

    @property
    def end(self) -> Event | None:
        return next((e for e in reversed(self.events) if e.kind == "end"), None)


def job_body(api: Api, items: int, response_format: str, first_seed: int) -> dict[str, Any]:
    """`items` custom-voice items of the same text and length, each with its own seed."""
    return {
        "label": "bench_jobs",
        "options": {
            "mode": "custom_voice",
            "model": api.model,
            "speaker": "vivian",
            "language": "english",
            "max_new_tokens": api.frames,
            "response_format": response_format,
        },
        "items": [{"text": api.text, "seed": first_seed + i, "custom_id": f"bench-{i:05d}"} for i in range(items)],
    }


async def read_events(client: httpx.AsyncClient, run: JobRun) -> None:
    """Every event of the job's stream, with its arrival time, until `end` (or the stream closes)."""
    parser = SseParser()
    async with client.stream("GET", f"/api/v1/jobs/{run.job_id}/events") as r:
        if r.status_code != 200:
            run.error = f"events: HTTP {r.status_code}: {(await r.aread()).decode('utf-8', 'replace')[:300]}"
            return
        run.opened = now()
        async for line in r.aiter_lines():
            event = parser.feed(line)
            if event is None:
                continue
            run.events.append(Event(now(), *event))
            if event[0] == "end":
                return
    run.error = run.error or "the event stream closed before its end event"


async def run_job(api: Api, items: int, response_format: str, limit_s: float) -> JobRun:
    """Submit the job and follow its events for at most `limit_s`; a job cut short is cancelled."""
    assert api.client is not None
    body = job_body(api, items, response_format, api.seed + 1)
    api.seed += items
    run = JobRun(items, now())
    try:
        r = await api.client.post("/api/v1/jobs", json=body)
        run.accepted = now()
        if r.status_code != 202:
            run.error = f"submit: HTTP {r.status_code}: {r.text[:300]}"
            return run
        run.job_id = r.json()["id"]
        await asyncio.wait_for(read_events(api.client, run), timeout=max(1.0, limit_s - (now() - run.submitted)))
    except asyncio.TimeoutError:
        run.cut_short = True
        run.error = f"cut short after {now() - run.submitted:.0f} s (budget)"
    except Exception as exc:  # recorded, the run goes on
        run.error = f"{type(exc).__name__}: {exc}"[:300]
    if run.job_id and run.end is None:
        with contextlib.suppress(httpx.HTTPError):
            await api.client.delete(f"/api/v1/jobs/{run.job_id}")
    return run


def event_gaps(run: JobRun) -> list[float]:
    """Seconds between consecutive events, from the stream's headers to the last event."""
    times = ([run.opened] if run.opened is not None else []) + [e.at for e in run.events]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def summarize_job(run: JobRun, frames: int, sync_rate: float | None) -> dict[str, Any]:
    """What the job did, as the client saw it: wall time, audio, rate against `sync_rate`, event gaps."""
    items = [e for e in run.events if e.kind == "item"]
    progress = [e for e in run.events if e.kind == "progress"]
    end = run.end
    last = end or (progress[-1] if progress else None)
    p = (last.data.get("progress", last.data) if last else {}) or {}
    out: dict[str, Any] = {
        "items": run.items,
        "job_id": run.job_id,
        "status": last.data.get("status") if last else None,
        "ended": end is not None,
        "cut_short": run.cut_short,
        "error": run.error,
        "submit_ms": ms(run.accepted - run.submitted) if run.accepted else None,
        "done": p.get("done"),
        "failed": p.get("failed"),
        "cancelled": p.get("cancelled"),
        "events": len(run.events),
        "progress_events": len(progress),
        "item_events": len(items),
        "running_max": max((e.data.get("running") or 0 for e in progress), default=None),
    }
    if end is None:
        return out
    wall = end.at - run.submitted
    audio = float(p.get("audio_s") or 0.0)
    durations = [float(e.data.get("duration_s") or 0.0) for e in items]
    gaps = event_gaps(run)
    out |= {
        "wall_s": round(wall, 3),
        "audio_s": round(audio, 2),
        "audio_s_items": round(sum(durations), 2),
        "audio_s_expected_per_item": round(frames * FRAME_S, 3),
        "exact_lengths": bool(durations) and all(abs(d - frames * FRAME_S) < 1e-3 for d in durations),
        "audio_s_per_s": round(audio / max(wall, 1e-9), 2),
        "vs_sync": round(audio / max(wall, 1e-9) / sync_rate, 3) if sync_rate else None,
        "first_item_s": round(items[0].at - run.submitted, 3) if items else None,
        "event_gap_ms_max": ms(max(gaps, default=0.0)),
        "event_gap_ms_p99": ms(pct(gaps, 99)),
        "event_gaps_over_1s": sum(g > 1.0 for g in gaps),
    }
    if len(items) > 1 and items[-1].at > items[0].at:  # from the first item's end to the last's (no ramp-up)
        out["audio_s_per_s_items_window"] = round(sum(durations[1:]) / (items[-1].at - items[0].at), 2)
    started, finished = end.data.get("started_at"), end.data.get("finished_at")
    if started and finished and finished > started:
        out["server_run_s"] = round(finished - started, 3)
        out["server_audio_s_per_s"] = round(audio / (finished - started), 2)
    return out


# ---------------------------------------------------------------- memory


def nvidia_smi(*query: str) -> str | None:
    """nvidia-smi's CSV answer (no header, no units) to `query`; None without nvidia-smi or on failure."""
    try:
        return subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_used_mib() -> list[dict[str, int]] | None:
    """memory.used and memory.total of every GPU (nvidia-smi), MiB; None without nvidia-smi."""
    out = nvidia_smi("--query-gpu=index,memory.used,memory.total")
    if out is None:
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    with contextlib.suppress(ValueError):
        return [{"index": int(i), "used_mib": int(u), "total_mib": int(t)} for i, u, t in rows]
    return None


def process_group(pgid: int) -> set[int]:
    """The processes of a process group (the server and its compile workers), from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.add(int(entry.name))
    return pids


def server_rss_mib(server: Server) -> float | None:
    """Resident host memory of the server's processes (VmRSS from /proc), MiB."""
    if server.proc is None:
        return None
    total_kib = 0
    for pid in process_group(server.proc.pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return round(total_kib / 1024, 1) if total_kib else None


def server_gpu_mib(server: Server) -> int | None:
    """GPU memory nvidia-smi gives the server's processes, MiB; None when it names none of them (no GPU, or
    another PID namespace)."""
    if server.proc is None:
        return None
    out = nvidia_smi("--query-compute-apps=pid,used_memory")
    if out is None:
        return None
    mine = process_group(server.proc.pid)
    used = [int(m) for pid, m in (line.split(",") for line in out.splitlines() if line.strip()) if int(pid) in mine]
    return sum(used) if used else None


async def memory_snapshot(client: httpx.AsyncClient, server: Server, stage: str) -> dict[str, Any]:
    """What the server counts (GET /api/v1/models) and what nvidia-smi sees, now."""
    snap: dict[str, Any] = {"stage": stage, "at_s": round(now() - T_START, 1)}
    try:
        body = (await client.get("/api/v1/models")).json()
        memory = body.get("memory") or {}
        snap["server_used_bytes"] = memory.get("used_bytes")
        snap["server_devices"] = [
            {"device": d.get("device"), "used_bytes": d.get("used_bytes")} for d in memory.get("devices") or []
        ]
        snap["loaded"] = [m["name"] for m in body.get("models", []) if m.get("state") == "loaded"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        snap["server_error"] = f"{type(exc).__name__}: {exc}"[:200]
    snap["server_rss_mib"] = await asyncio.to_thread(server_rss_mib, server)
    gpus = await asyncio.to_thread(gpu_used_mib)
    if gpus:
        snap["gpus"] = gpus
        snap["gpu_used_mib"] = sum(g["used_mib"] for g in gpus)
        snap["server_process_mib"] = await asyncio.to_thread(server_gpu_mib, server)
    log(
        f"memory {stage}: server counts {fmt(mib(snap.get('server_used_bytes')))} MiB, GPU used "
        f"{fmt(snap.get('gpu_used_mib'))} MiB, server processes {fmt(snap.get('server_process_mib'))} MiB GPU, "
        f"{fmt(snap.get('server_rss_mib'))} MiB resident"
    )
    return snap


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / MIB, 1)


def memory_figure(snap: dict[str, Any] | None, source: str) -> float | None:
    """A snapshot's figure in MiB from `source`: gpu (nvidia-smi memory.used) or server (its accounting)."""
    if snap is None:
        return None
    return snap.get("gpu_used_mib") if source == "gpu" else mib(snap.get("server_used_bytes"))


def memory_source(snaps: Iterable[dict[str, Any]]) -> str:
    """gpu when every snapshot has nvidia-smi's figure, else server."""
    snaps = list(snaps)
    return "gpu" if snaps and all(s.get("gpu_used_mib") is not None for s in snaps) else "server"


# ---------------------------------------------------------------- report


class JobsReport(Report):
    MODULE = "bench.bench_jobs"
    SUFFIX = "jobs"

    def __init__(self, args: argparse.Namespace, card: str, model: str) -> None:
        super().__init__(args, card, model)
        c = args.headline
        self.data["settings"] |= {
            "items": args.items,
            "job_format": args.job_format,
            "sync_mode": args.sync_mode,
            "memory_tolerance_mib": args.memory_tolerance_mib,
            "growth_tolerance_mib": args.growth_tolerance_mib,
        }
        self.data["metrics"] = dict.fromkeys(
            [
                "load_s",
                "warmup_s",
                f"sync_audio_s_per_s_c{c}",
                "job_wall_s",
                "job_audio_s",
                "job_audio_s_per_s",
                "job_vs_sync",
                "job_items_failed",
                "job_event_gap_ms_max",
                "job_event_gap_ms_p99",
                "unload_s",
                "reload_s",
                "reload_burst_s",
                "memory_unloaded_minus_before_mib",
                "memory_growth_mib",
            ]
        )
        self.data |= {"job": {}, "memory": []}
        self.data["notes"] = [
            "Clients in the benchmark process (asyncio httpx), the server in its own process, over loopback.",
            f"sync: closed loop of {c} clients ({args.sync_mode}), steady window (first end -> last start).",
            "job: one POST /api/v1/jobs; wall = POST sent -> end event at the client; audio-s/s = audio of all "
            "items / wall; event gaps between consecutive SSE arrivals from the stream's headers to end.",
            "memory: server = its accounting (GET /api/v1/models memory.used_bytes); GPU = nvidia-smi memory.used.",
            "Weights are random (full-size architecture), so every item runs to max_new_tokens.",
        ]


def job_row(job: dict[str, Any]) -> list[str]:
    ok = f"{fmt(job.get('done'))} / {fmt(job.get('failed'))}"
    gaps = f"{fmt(job.get('event_gap_ms_max'))} / {fmt(job.get('event_gap_ms_p99'))}"
    vs = job.get("vs_sync")
    return [
        f"job of {job.get('items')} items",
        fmt(job.get("running_max")),
        ok,
        fmt(job.get("wall_s")),
        fmt(job.get("audio_s_per_s")),
        "-" if vs is None else f"{100 * vs:.0f}%",
        fmt(job.get("first_item_s")),
        gaps,
    ]


def job_table(data: dict[str, Any]) -> str:
    head = ["run", "items at once (max seen)", "done / failed", "wall s", "audio-s/s", "vs sync"]
    head += ["first item s", "event gap max / p99 ms"]
    return markdown_table(head, [job_row(data["job"])] if data.get("job") else [])


def memory_table(data: dict[str, Any]) -> str:
    head = ["stage", "models loaded", "server counts MiB", "GPU memory.used MiB", "server processes' GPU MiB"]
    head.append("server resident (host) MiB")
    rows = []
    for snap in data.get("memory", []):
        label = MEMORY_STAGES.get(snap["stage"], snap["stage"])
        loaded = len(snap["loaded"]) if "loaded" in snap else "-"
        cells = [label, loaded, fmt(mib(snap.get("server_used_bytes")))]
        cells += [fmt(snap.get("gpu_used_mib")), fmt(snap.get("server_process_mib")), fmt(snap.get("server_rss_mib"))]
        rows.append(cells)
    return markdown_table(head, rows)


def tables(data: dict[str, Any]) -> str:
    """The sync loop, the job and the memory stages."""
    return "\n\n".join([sections_table(data), job_table(data), memory_table(data)])


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    m, s = data["metrics"], data["settings"]
    c = s["headline_concurrency"]

    def row(name: str, value: Any, ok: bool | None) -> dict[str, Any]:
        status = "not measured" if value is None or ok is None else ("met" if ok else "missed")
        return {"target": name, "value": value, "status": status}

    sync, ratio = m.get(f"sync_audio_s_per_s_c{c}"), m.get("job_vs_sync")
    gap = m.get("job_event_gap_ms_max")
    back, growth = m.get("memory_unloaded_minus_before_mib"), m.get("memory_growth_mib")
    source = "GPU memory.used" if data.get("memory_source") == "gpu" else "server-counted memory (no GPU figure)"
    tol, grow_tol = s["memory_tolerance_mib"], s["growth_tolerance_mib"]
    return [
        row(
            f"job of {s['items']} items >= 90% of sync c{c} ({fmt(sync)} audio-s/s; measured: ratio)",
            ratio,
            None if ratio is None else ratio >= 0.9,
        ),
        row("no gap over 1 s between job events (max ms)", gap, None if gap is None else gap <= 1000),
        row(
            f"{source} after unload within {tol:g} MiB of before load (MiB over)",
            back,
            None if back is None else back <= tol,
        ),
        row(
            f"{source} after a second unload within {grow_tol:g} MiB of the first (MiB grown)",
            growth,
            None if growth is None else growth <= grow_tol,
        ),
    ]


def markdown(data: dict[str, Any]) -> str:
    s, m = data["settings"], data["metrics"]
    server = data.get("server", {})
    job_settings = {k: v for k, v in server.get("settings", {}).items() if "JOB" in k or "SLOTS" in k}
    out = [
        "## Batch jobs through the real server (`bench/bench_jobs.py`)",
        "",
        "| card | date | commit | command |",
        "|---|---|---|---|",
        f"| {data['card']} | {data['date']} | {data['commit']} | `{data['command']}` |",
        "",
        f"{s['model']} ("
        + ("tiny test checkpoint" if s.get("size") == "tiny" else "full-size architecture")
        + f", random weights), {s['frames']} frames ({s['audio_s_per_request']} s of audio) per request and per "
        f"item, {s['text_chars']} characters; job items `{s['job_format']}`, in the server's own runner"
        + (f" ({', '.join(f'{k}={v}' for k, v in job_settings.items())})" if job_settings else "")
        + f"; torch {data['versions'].get('torch')}. Model load {fmt(m.get('load_s'))} s, warm-up "
        f"{fmt(m.get('warmup_s'))} s (first request {fmt(server.get('first_request_s'))} s).",
        "",
        tables(data),
        "",
        "Sync: a closed loop of whole-utterance requests, steady window. Job: one `POST /api/v1/jobs`; wall from "
        "the POST to the `end` event at the client (ramp-up and tail included); event gap: between consecutive "
        "server-sent events.",
        "",
        f"Unload took {fmt(m.get('unload_s'))} s, the second load {fmt(m.get('reload_s'))} s and the burst after "
        f"it {fmt(m.get('reload_burst_s'))} s."
        + (
            ""
            if data.get("memory_source") == "gpu"
            else " GPU figures need CUDA (nvidia-smi); these are the server's own accounting."
        ),
        "",
    ]
    return "\n".join(out + report_footer(data))


# ---------------------------------------------------------------- the benchmark


class JobsBench:
    def __init__(self, args: argparse.Namespace, api: Api, report: JobsReport, server: Server, budget: Budget):
        self.args, self.api, self.report, self.server, self.budget = args, api, report, server, budget
        self.bench = Bench(args, api, report, budget)
        self.c = args.headline

    @property
    def client(self) -> httpx.AsyncClient:
        assert self.api.client is not None
        return self.api.client

    async def snapshot(self, stage: str) -> None:
        self.report.data["memory"].append(await memory_snapshot(self.client, self.server, stage))
        self.report.save()

    def memory_reserve_s(self) -> float:
        """Time the memory stages need after the job: two unloads, a load and one burst (which may compile
        again, as the first request did)."""
        load = self.report.metrics.get("load_s") or 5.0
        first = self.report.data["server"].get("first_request_s") or 0.0
        return 2 * load + first + self.bench.estimate_s(self.args.sync_mode, self.c, self.c) + 10

    async def sync_loop(self) -> float | None:
        """The closed loop at the concurrency; its steady audio-s/s."""
        args, mode, c = self.args, self.args.sync_mode, self.c
        one_round = self.bench.estimate_s(mode, c, c)
        estimate = min(one_round * (args.loop_rounds + 1), args.loop_seconds + 2 * one_round)
        if not self.bench.fits(f"{mode}_loop_c{c}", estimate + self.memory_reserve_s()):
            return None
        stagger = self.bench.wall.get((mode, c), 0.0) / c if args.stagger else 0.0
        limit = self.budget.left_s - args.reserve_s
        run = await run_loop(self.api, mode, c, args.loop_rounds, args.loop_seconds, limit, stagger)
        summary = self.bench.record(f"{mode}_loop_c{c}", mode, run)
        rate = summary.get("audio_s_per_s")
        self.report.metrics[f"sync_audio_s_per_s_c{c}"] = rate
        return rate

    async def job(self, sync_rate: float | None) -> None:
        args = self.args
        estimate = self.bench.estimate_s(args.sync_mode, self.c, args.items)
        if not self.bench.fits(f"job of {args.items} items", estimate + self.memory_reserve_s()):
            return
        limit = self.budget.left_s - args.reserve_s - self.memory_reserve_s()
        log(f"job of {args.items} items: submitting (expect ~{estimate:.0f} s, limit {limit:.0f} s)")
        run = await run_job(self.api, args.items, args.job_format, limit)
        job = summarize_job(run, args.frames, sync_rate)
        self.report.data["job"] = job
        self.report.data["job_events"] = [[round(e.at - run.submitted, 3), e.kind] for e in run.events]
        m = self.report.metrics
        m |= {
            "job_wall_s": job.get("wall_s"),
            "job_audio_s": job.get("audio_s"),
            "job_audio_s_per_s": job.get("audio_s_per_s"),
            "job_vs_sync": job.get("vs_sync"),
            "job_items_failed": job.get("failed"),
            "job_event_gap_ms_max": job.get("event_gap_ms_max"),
            "job_event_gap_ms_p99": job.get("event_gap_ms_p99"),
        }
        if run.error:
            self.report.data["errors"].append(f"job: {run.error}")
        if job.get("failed"):
            self.report.data["errors"].append(f"job: {job['failed']} items failed")
        log(
            f"job: {job.get('status')}, {fmt(job.get('done'))}/{args.items} done, {fmt(job.get('failed'))} failed, "
            f"wall {fmt(job.get('wall_s'))} s, {fmt(job.get('audio_s_per_s'))} audio-s/s "
            f"({fmt(job.get('vs_sync'))} x sync), event gap max/p99 {fmt(job.get('event_gap_ms_max'))}/"
            f"{fmt(job.get('event_gap_ms_p99'))} ms"
        )
        self.report.save()

    async def unload(self, key: str | None = None) -> bool:
        t0 = now()
        r = await self.client.post(f"/api/v1/models/{self.api.model}/unload", timeout=max(30.0, self.budget.left_s))
        if r.status_code != 200:
            self.report.data["errors"].append(f"unload: HTTP {r.status_code}: {r.text[:300]}")
            return False
        if key:
            self.report.metrics[key] = round(now() - t0, 2)
        log(f"unloaded in {now() - t0:.2f} s: {r.json()}")
        return True

    async def memory_cycle(self) -> None:
        """Unload, snapshot; load again, one burst, snapshot; unload again, snapshot."""
        if not await self.unload("unload_s"):
            return
        await self.snapshot("unloaded")
        if self.budget.left_s - self.args.reserve_s < 2 * (self.report.metrics.get("load_s") or 5.0) + 5:
            self.report.data["skipped"].append("reload: no time left")
            return
        await load_model(self.client, self.api.model, self.report, self.budget, key="reload_s")
        limit = self.budget.left_s - self.args.reserve_s - (self.report.metrics.get("unload_s") or 1.0) - 5
        burst = await run_burst(self.api, self.args.sync_mode, self.c, limit)
        ok = sum(s.ok for s in burst.samples)
        self.report.metrics["reload_burst_s"] = round(burst.t1 - burst.t0, 2)
        log(f"reloaded; burst c{self.c}: {ok}/{self.c} ok in {burst.t1 - burst.t0:.2f} s")
        if burst.cut_short or ok < self.c:
            self.report.data["notes"].append(f"after the reload, the burst had {ok}/{self.c} ok (budget or errors)")
        await self.snapshot("reloaded")
        if await self.unload():
            await self.snapshot("unloaded_again")

    def memory_metrics(self) -> None:
        snaps = {s["stage"]: s for s in self.report.data["memory"]}
        source = memory_source(snaps.values())
        self.report.data["memory_source"] = source
        before, unloaded = memory_figure(snaps.get("before_load"), source), memory_figure(snaps.get("unloaded"), source)
        again = memory_figure(snaps.get("unloaded_again"), source)
        m = self.report.metrics
        if before is not None and unloaded is not None:
            m["memory_unloaded_minus_before_mib"] = round(unloaded - before, 1)
        if unloaded is not None and again is not None:
            m["memory_growth_mib"] = round(again - unloaded, 1)
        if source != "gpu":
            self.report.data["notes"].append("No nvidia-smi: memory is the server's accounting; GPU figures need CUDA.")


async def jobs_main(args: argparse.Namespace, report: JobsReport, server: Server, budget: Budget) -> None:
    api = make_api(args, server, report.data["settings"]["model"])
    async with make_client(args, server) as client:
        api.client = client
        await start_server(args, report, server, client, budget)
        bench = JobsBench(args, api, report, server, budget)
        await bench.snapshot("before_load")
        await load_model(client, api.model, report, budget)
        await probe(api, report, [args.sync_mode], max(30.0, budget.left_s - args.reserve_s))
        log(f"first request {report.data['server']['first_request_s']} s")
        await bench.bench.warm_up([args.sync_mode])
        try:
            sync_rate = await bench.sync_loop()
            await bench.snapshot("loaded_warm")
            await bench.job(sync_rate)
            await bench.snapshot("after_job")
            await bench.memory_cycle()
        finally:
            bench.memory_metrics()
            report.save()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--concurrency", type=int, default=64, help="clients of the synchronous closed loop")
    p.add_argument("--items", type=int, default=1000, help="items of the job")
    p.add_argument("--job-format", default="pcm", choices=["pcm", "wav"], help="response_format of each item")
    p.add_argument("--sync-mode", default="whole", choices=["whole", "stream"], help="requests of the sync loop")
    p.add_argument("--memory-tolerance-mib", type=float, default=1024.0, help="after unload vs before load")
    p.add_argument("--growth-tolerance-mib", type=float, default=256.0, help="second unload vs first")
    add_loop_args(p)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # What bench_http's Bench and Report read.
    args.headline = args.concurrency
    args.concurrency = [args.concurrency]
    args.ws_concurrency = []
    args.modes = [args.sync_mode]
    args.max_clients = args.headline
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.update_docs:
        data = json.loads(Path(args.update_docs).read_text())
        update_docs(Path(args.docs), data, markdown, DOCS_MARKERS)
        print(markdown(data))
        return 0
    from bench.bench_engines import published_name

    model = args.model or published_name(args.size)
    report = JobsReport(args, card_name(args.device), model)
    budget = Budget(args.max_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="qtts-jobs-bench-"))
    models_dir = Path(args.models_dir) if args.models_dir else tmp / "models"
    server = Server(args, models_dir, tmp / "data", Path(args.server_log) if args.server_log else tmp / "server.log")
    log(f"{report.data['card']}, model {model}, commit {report.data['commit']}, budget {args.max_seconds:.0f} s")
    status = 0
    try:
        ensure_checkpoint(args, models_dir, model, report, budget)
        asyncio.run(jobs_main(args, report, server, budget))
    except Exception as exc:
        status = 1
        report.data["errors"].append(f"{type(exc).__name__}: {exc}"[:1000])
        log(f"FAILED: {type(exc).__name__}: {exc}")
        if tail := server.log_tail():
            print("---- server log tail ----\n" + tail + "\n----", flush=True)
    finally:
        report.data["server"]["exit_code"] = server.stop()
        report.data["targets"] = targets(report.data)
        report.data["wall_s"] = round(now() - T_START, 1)
        report.save()
        shutil.rmtree(tmp / "data", ignore_errors=True)
        if not args.models_dir:
            shutil.rmtree(tmp / "models", ignore_errors=True)
    print("\n" + tables(report.data), flush=True)
    if args.targets:
        print("\n" + targets_table(report.data["targets"]), flush=True)
    if not args.no_docs and args.docs and (report.data["sections"] or report.data["job"]):
        update_docs(Path(args.docs), report.data, markdown, DOCS_MARKERS)
        print(f"updated {args.docs}", flush=True)
    if report.path is not None:
        print(f"wrote {report.path}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
