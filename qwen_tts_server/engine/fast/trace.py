"""A torch.profiler trace of a window of the step loop under real load (`QTTS_TRACE_DIR`).

The step profile (`timing.PhaseTimer`) says how long each part of a step takes on the host; it cannot say
what the GPU did meanwhile: whose kernels (the frame's, a prefill's, the codec thread's) ran when, and
where the GPU sat idle. A trace of a few dozen steps in steady load does: CUDA activity is recorded for
the whole device, so the codec thread's kernels appear beside the step thread's, each on its stream.
`bench.trace_summary` reads the trace back into per-stream busy time and idle gaps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACE_STEPS = 30  # enough for a few admissions and codec batches, small enough to read (~tens of MB)
# The profiler is process-wide: one engine traces at a time (several models or devices each have one).
_ACTIVE = threading.Lock()


class StepTrace:
    """Records steps `after_steps`+1 .. `after_steps`+`steps` of one engine to `folder`: a Chrome trace
    (`steps-<pid>-<time>.json`, open in Perfetto) and the profiler's table of kernels by device time."""

    def __init__(self, folder: Path, after_steps: int, steps: int = TRACE_STEPS) -> None:
        self.folder, self.after_steps, self.steps = folder, after_steps, steps
        self.count = 0
        self._profiler: Any = None
        self.written = threading.Event()  # set once the files are out

    def after_step(self) -> None:
        """Called by the step thread after every step."""
        self.count += 1
        if self.count == self.after_steps:
            self._start()
        elif self.count == self.after_steps + self.steps and self._profiler is not None:
            self._finish()

    def close(self) -> None:
        """The step loop ended: stop a trace still recording (its files are written as usual)."""
        if self._profiler is not None:
            self._finish()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        if not _ACTIVE.acquire(blocking=False):
            log.warning("another engine is tracing: this one's trace is skipped")
            return
        try:
            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.__enter__()
        except BaseException:
            self._profiler = None
            _ACTIVE.release()
            raise
        log.info("tracing the next %d steps", self.steps)

    def _finish(self) -> None:
        """Stop recording here; write the files from a thread of their own (tens of MB: writing them on
        the step thread stalled every stream for seconds)."""
        profiler, self._profiler = self._profiler, None
        try:
            profiler.__exit__(None, None, None)
        finally:
            _ACTIVE.release()
        threading.Thread(target=self._write, args=(profiler,), name="qtts-trace-writer", daemon=True).start()

    def _write(self, profiler: Any) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            stem = self.folder / f"steps-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}"
            profiler.export_chrome_trace(f"{stem}.json")
            table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=60)
            Path(f"{stem}.txt").write_text(table)
            log.info("wrote a trace of %d steps to %s.json", self.steps, stem)
        except Exception:
            log.exception("writing the step trace failed")
        finally:
            self.written.set()
