"""The peers beside ours in the same call: once `bench_http`'s server has stopped (its GPU memory freed),
`bench.bench_engines` runs upstream qwen-tts (`reference`) and faster-qwen3-tts on the same card, with
requests of the same length, and their rows join `bench_http`'s report and docs section.

Their rows are engine level (in process, no HTTP, a model built in memory with random weights): what the
peers offer has no server of ours in front of it, and the issue accepts that. The peer serves one request
at a time, so its concurrent row is its requests one after the other (where the budget allows); upstream's
is one padded batch (`bench_engines`). On the CPU (a tiny checkpoint) only the reference runs: the peer needs CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_engines import PEER
from bench.tables import markdown_table

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("reference", PEER)
# Of the peers' seconds, what upstream needs on an H200 for one 1.7B model (build, warm-up, one stream,
# one batch of 64: ~16 + 16 + 36 s, measured 2026-11-25 on an H100) with a margin; the peer gets the rest.
REFERENCE_S = 110.0
STOP_S = 20.0  # of the peers' seconds, what bench_engines leaves itself to stop and save


def command(size: str, *, frames: int, concurrency: int, budget_s: float, device: str | None) -> list[str]:
    """The `bench_engines` command for the peers' rows: every request `frames` long, no parity check, no
    memory sweep (those are the fast engine's business), done `STOP_S` before `budget_s`."""
    tiny = size == "tiny"
    device = None if device == "auto" else device  # bench_engines' own default: CUDA when there is one
    engines = ["reference"] if tiny or (device or "").startswith("cpu") else list(ENGINES)
    budget_s -= STOP_S
    out = [sys.executable, "-m", "bench.bench_engines", *(["--tiny"] if tiny else ["--sizes", size])]
    out += ["--engines", ",".join(engines), "--concurrency", str(concurrency), "--check-rows", "0", "--vram", ""]
    out += ["--frames-single", str(frames), "--frames-min", str(frames), "--frames-max", str(frames)]
    out += ["--budget-s", f"{budget_s:.0f}", "--peer-budget-s", f"{max(0.0, budget_s - REFERENCE_S):.0f}"]
    out += ["--peer-reserve-s", f"{min(REFERENCE_S, budget_s):.0f}"]
    return out + (["--device", device] if device else [])


def run(
    size: str, *, frames: int, concurrency: int, budget_s: float, device: str | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run the peers within `budget_s`; returns what the report keeps: the command, the versions, and per
    engine its single-stream and concurrent figures (or why there are none)."""
    with tempfile.TemporaryDirectory(prefix="qtts-peers-") as tmp:
        cmd = command(size, frames=frames, concurrency=concurrency, budget_s=budget_s, device=device)
        log(f"peers: {shlex.join(cmd)}")
        result: dict[str, Any] = {"command": shlex.join(["python", *cmd[1:]]), "engines": {}}
        result["returncode"] = _run([*cmd, "--out", tmp], budget_s, log)
        reports = sorted(Path(tmp).glob("*.json"))
        try:
            data = json.loads(reports[-1].read_text())
        except (IndexError, OSError, ValueError) as exc:  # none written, or cut off mid-write
            result["error"] = f"no report from bench_engines ({type(exc).__name__})"
            return result
    result["versions"] = data.get("versions", {})
    result["peer"] = data.get("peer", {})
    for engine in ENGINES:
        for label, row in data.get("results", {}).get(engine, {}).items():
            result["engines"][engine] = {
                "model": label,
                "xrt_single": row.get("xrt_single"),
                "ttff_ms_single": row.get("ttff_ms_single"),
                "audio_s_per_s": row.get(f"audio_s_per_s_c{concurrency}"),
                "ttff_ms_p95": row.get(f"ttff_ms_p95_c{concurrency}"),
                "concurrency": concurrency,
                "skipped": row.get("skipped", []) + [f"{k}: {e}" for k, e in row.get("errors", {}).items()],
            }
    return result


def _run(cmd: list[str], timeout_s: float, log: Callable[[str], None]) -> int | None:
    """`cmd` in a session of its own, all of it (the peer runs in a grandchild) killed at `timeout_s`."""
    process = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # bench_engines saves after every section: keep what it finished
        log(f"peers: stopped after {timeout_s:.0f} s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def table(peers: dict[str, Any], fmt: Callable[[Any], str]) -> str:
    """One row per peer engine that ran, in the units of `bench_http`'s own rows."""
    engines = peers.get("engines", {})
    if not engines:
        return ""
    c = next(iter(engines.values()))["concurrency"]
    head = ["engine (in process, no HTTP)", "model", "x real time, one stream", "first audio ms, one stream"]
    head += [f"audio-s/s c{c}", f"first audio p95 ms c{c}"]
    rows = [
        [
            engine,
            r["model"],
            fmt(r["xrt_single"]),
            fmt(r["ttff_ms_single"]),
            fmt(r["audio_s_per_s"]),
            fmt(r["ttff_ms_p95"]),
        ]
        for engine, r in engines.items()
    ]
    return markdown_table(head, rows)


def present(peers: dict[str, Any] | None) -> str | None:
    """For the targets table: which peers have a one-stream figure from this run, or None if none ran."""
    engines = (peers or {}).get("engines", {})
    ran = [engine for engine in ENGINES if (engines.get(engine) or {}).get("xrt_single") is not None]
    return ", ".join(ran) if peers else None
