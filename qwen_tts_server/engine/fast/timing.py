"""Where the step loop's time goes: host seconds per part, accumulated, read by metrics and benchmarks.

A step is admit (the inbox and row compaction) -> prefill (admitting newcomers and their prefill) ->
launch (the frame's graph replay or eager kernels, not waited for) -> gpu_wait (the one host read, of the
frame the previous step queued: it waits for that frame to finish) -> deliver (callbacks, stream chunks,
hand-off to the codec thread). On CUDA the GPU runs the previous frame meanwhile, so the host's parts cost
the streams nothing while they take less than a frame. If `gpu_wait` dominates, the step is GPU-bound; if the
others do, the host (Python, the GIL) is. `gpu_frame` is the frame's own duration on the GPU (CUDA events
around it), which grows when other work (codec decode, another model) shares the GPU.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence

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


# Where a request's time goes, its prompt to its finish (seconds summed over requests; see RequestPhases).
REQUEST_PHASES = ("prompt", "queue", "first_frame", "frames", "tail")


class RequestPhases:
    """Where requests' time goes between their prompt and finish, summed over those that ended with their
    frames (EOS or their limit; not cancelled, not failed): prompt (building the prompt on a worker thread, its
    wait for one included, to submit), queue (submit to admission: a free row and the admission
    wait), first_frame (admission to its first frame read: prefill and the first frame), frames (first frame
    read to last), tail (last frame read to finished: its last audio decoded and handed out). Under a closed
    loop of clients every phase but `frames` is time a row could be serving someone. Written by the step and
    codec threads, read by metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.seconds = dict.fromkeys(REQUEST_PHASES, 0.0)

    def record(self, seq: Sequence, now: float) -> None:
        """Add a request that finishes at `now`. One that never reached a mark (e.g. no frame read) has no
        phases to split: it is left out."""
        marks = [seq.arrived_at, seq.submitted_at, seq.admitted_at, seq.first_frame_at, seq.last_frame_at, now]
        times = [mark for mark in marks if mark is not None]
        if len(times) < len(marks):
            return
        with self._lock:
            self.count += 1
            for phase, (start, end) in zip(REQUEST_PHASES, itertools.pairwise(times), strict=True):
                self.seconds[phase] += end - start

    def snapshot(self) -> tuple[int, dict[str, float]]:
        """How many requests were recorded, and their seconds per phase, read together."""
        with self._lock:
            return self.count, dict(self.seconds)
