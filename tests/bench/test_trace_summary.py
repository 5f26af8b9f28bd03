"""bench.trace_summary on a hand-written trace: busy time is the union of a stream's kernels, idle is the
rest of the window, overlap is where two streams ran at once, and graph-launched kernels are told apart."""

from __future__ import annotations

from bench.trace_summary import summarize


def kernel(name: str, ts: float, dur: float, stream: int, correlation: int) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, "correlation": correlation}}


def launch(name: str, correlation: int) -> dict:
    return {"cat": "cuda_runtime", "name": name, "ts": 0, "dur": 1, "args": {"correlation": correlation}}


def test_busy_idle_overlap_and_launch_kinds() -> None:
    events = [
        launch("cudaGraphLaunch", 1),
        launch("cudaLaunchKernel", 2),
        launch("cudaLaunchKernel", 3),
        kernel("frame", 0, 1000, 7, 1),  # step stream: 0-1 ms (graph), then 1.5-2 ms (eager)
        kernel("frame", 500, 200, 7, 1),  # inside the first: no extra busy time
        kernel("prefill", 1500, 500, 7, 2),
        kernel("codec", 800, 1000, 9, 3),  # codec stream: 0.8-1.8 ms, overlapping both
    ]
    summary = summarize(events)
    assert summary["window_ms"] == 2.0
    assert summary["streams"]["7"]["busy_ms"] == 1.5
    assert summary["streams"]["7"]["by_launch"] == {
        "graph": {"kernels": 2, "busy_ms": 1.0},
        "eager": {"kernels": 1, "busy_ms": 0.5},
    }
    assert summary["streams"]["9"]["busy_ms"] == 1.0
    assert summary["device_busy_ms"] == 2.0  # 0-2 ms covered by one stream or the other
    assert summary["device_idle_ms"] == 0.0
    assert summary["streams_overlap_ms"] == 0.5  # 0.8-1.0 and 1.5-1.8
