"""Where the step loop's time goes: host seconds per part, accumulated, read by metrics and benchmarks.

A step is admit (the inbox and row compaction) -> prefill (admitting newcomers and their prefill) ->
launch (the frame's graph replay or eager kernels, not waited for) -> gpu_wait (the one host read, of the
frame the previous step queued: it waits for that frame to finish) -> deliver (callbacks, stream chunks,
hand-off to the codec thread). The GPU runs the previous frame meanwhile, so the host's parts cost the
streams nothing while they take less than a frame. If `gpu_wait` dominates, the step is GPU-bound; if the
others do, the host (Python, the GIL) is. `gpu_frame` is the frame's own duration on the GPU (CUDA events
around it), which grows when other work (codec decode, another model) shares the GPU.
"""

from __future__ import annotations

import time

STEP_PARTS = ("admit", "prefill", "launch", "gpu_wait", "deliver")


class PhaseTimer:
    """Accumulates wall seconds into named parts: `lap(part)` charges the time since the previous lap."""

    def __init__(self, parts: tuple[str, ...]) -> None:
        self.seconds = dict.fromkeys(parts, 0.0)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now
