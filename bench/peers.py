"""The peers beside ours in the same call: once `bench_http`'s server has stopped (its GPU memory freed),
`bench.bench_engines` runs upstream qwen-tts (`reference`) and faster-qwen3-tts on the same card, with
requests of the same length, and their rows join `bench_http`'s report and docs section.

Their rows are engine level (in process, no HTTP, a model built in memory with random weights): what the
peers offer has no server of ours in front of it, and the issue accepts that. The peer serves one request
at a time, so its concurrent row is its requests one after the other (where the budget allows); upstream's
is one padded batch (`bench_engines`). On the CPU (a tiny checkpoint) only the reference runs: the peer needs CUDA.

On a fresh machine the server's load (compile, graph capture) and the peers do not both fit one device call. Then
the peers run in a call of their own, on the same warm machine just before or after the server's:
    python3 -m bench.peers --size 1.7B --frames 100 --concurrency 64 --budget-s 330 --out "$OUT"
writes `<out>/<date>-<card>-peers.json` (`-peers-2.json` and on when that exists), and `bench_http --peers-from
THAT.json` puts its rows beside the server's, saying where they came from: the rows record their machine (host
name and boot id) and start, and when that is the server run's machine within the hour (one lease), the peers'
target counts as met in that run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.bench_engines import PEER, fmt_cell
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
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        result.update(size=size, frames=frames, machine=machine(), started_at=started)
        result["returncode"] = _run([*cmd, "--out", tmp], budget_s, log)
        reports = sorted(Path(tmp).glob("*.json"))
        try:
            data = json.loads(reports[-1].read_text())
        except (IndexError, OSError, ValueError) as exc:  # none written, or cut off mid-write
            result["error"] = f"no report from bench_engines ({type(exc).__name__})"
            return result
    result["card"], result["date"] = data.get("card"), data.get("date")
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


def machine() -> str:
    """Which machine this is: its host name and boot id. Calls on one warm device machine share it; a fresh
    machine, or a restart, has another."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()} {boot.read_text().strip() if boot.exists() else 'no-boot-id'}"


SAME_LEASE_S = 3600.0  # a device machine is held 30 minutes at most: rows an hour apart are not one lease's


def same_machine(peers: dict[str, Any] | None, report: dict[str, Any]) -> bool:
    """Whether the peers' rows were measured on the machine of `report` (a bench_http report: its `machine` and
    `started_at`) while it was held: same host name and boot id, started within `SAME_LEASE_S` of each other.
    Older files name neither."""
    peers = peers or {}
    if not peers.get("machine") or peers["machine"] != report.get("machine"):
        return False
    try:
        theirs, ours = (datetime.datetime.fromisoformat(x["started_at"]) for x in (peers, report))
    except (KeyError, TypeError, ValueError):
        return False
    return abs((theirs - ours).total_seconds()) <= SAME_LEASE_S


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


def load(path: Path, frames: int) -> dict[str, Any]:
    """The peers' result saved by `main` (or the `peers` of a `bench_http` report), marked with its file, so
    that a report it joins says the peers ran in another call. Refused unless its requests were `frames` long
    (the report's), and unless a peer ran."""
    data = json.loads(path.read_text())
    result = data if "engines" in data else data.get("peers")
    if not isinstance(result, dict) or not result.get("engines"):
        raise ValueError(f"{path}: no peer's rows in it")
    # A bench_http report's peers ran in its call: that call's card, date and request length are theirs.
    theirs = result.get("frames") or data.get("settings", {}).get("frames")
    if theirs != frames:
        raise ValueError(f"{path}: the peers' requests were {theirs} frames long, this report's {frames}")
    return {
        **result,
        "card": result.get("card") or data.get("card"),
        "date": result.get("date") or data.get("date"),
        "frames": theirs,
        "machine": result.get("machine") or data.get("machine"),
        "started_at": result.get("started_at") or data.get("started_at"),
        "source": result.get("source") or path.name,  # where they first came from
    }


def unused_path(folder: Path, stem: str) -> Path:
    """`folder/stem.json`, or `stem-2.json` and on: a second run on the same day and card keeps the first's rows."""
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the peers' rows alone (see the module's docstring)")
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"])
    p.add_argument("--frames", type=int, default=100, help="codec frames per request, as bench_http's --frames")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=330.0, help="all of it, stopping and saving included")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    result = run(
        args.size, frames=args.frames, concurrency=args.concurrency, budget_s=args.budget_s, device=args.device, log=log
    )
    date = result.get("date") or datetime.date.today().isoformat()
    card = str(result.get("card") or "unknown").replace(" ", "-")
    path = unused_path(Path(args.out), f"{date}-{card}-peers")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, fmt_cell) or "no peer ran", flush=True)
    print(f"wrote {path}", flush=True)
    return 0 if result.get("engines") else 1


if __name__ == "__main__":
    sys.exit(main())
