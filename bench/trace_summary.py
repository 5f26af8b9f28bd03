"""What the GPU did during a traced window of the step loop (a `QTTS_TRACE_DIR` trace): per CUDA stream,
busy time and kernel count, how much of the window the device sat idle, how much the streams overlapped,
and which kernels took the time, split into work launched by CUDA-graph replay (the frames, the graphed
codec) and work launched kernel by kernel (prefill, compaction, eager codec decode).

    python -m bench.trace_summary TRACE.json [--json OUT.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def load_events(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total / 1000


def summarize(events: list[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    launches = {
        e["args"]["correlation"]: e["name"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and e.get("dur") is not None]
    if not gpu:
        raise SystemExit("no GPU activity in this trace")
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    window_ms = (end - start) / 1000
    streams: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in gpu:
        streams[e["args"].get("stream")].append(e)
    per_stream = {}
    for stream, items in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        by_launch: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in items:
            source = launches.get(e["args"].get("correlation"), "?")
            by_launch["graph" if "Graph" in source else "eager"].append(e)
        per_stream[str(stream)] = {
            "kernels": len(items),
            "busy_ms": round(union_ms([(e["ts"], e["ts"] + e["dur"]) for e in items]), 2),
            "by_launch": {
                kind: {"kernels": len(k), "busy_ms": round(union_ms([(e["ts"], e["ts"] + e["dur"]) for e in k]), 2)}
                for kind, k in by_launch.items()
            },
            "top": top_kernels(items, top),
        }
    busy = union_ms([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    summed = sum(s["busy_ms"] for s in per_stream.values())
    return {
        "window_ms": round(window_ms, 2),
        "device_busy_ms": round(busy, 2),
        "device_idle_ms": round(window_ms - busy, 2),
        "streams_overlap_ms": round(summed - busy, 2),
        "streams": per_stream,
    }


def top_kernels(items: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in items:
        totals[e["name"]][0] += 1
        totals[e["name"]][1] += e["dur"]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"name": name[:90], "count": c, "ms": round(us / 1000, 2)} for name, (c, us) in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    summary = summarize(load_events(args.trace), args.top)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
