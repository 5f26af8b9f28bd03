"""Python's cyclic garbage collector while serving: what a model load left behind frozen out of its scans,
and every pause it makes counted.

A full collection walks every tracked object with the GIL held, so the step thread, the codec thread and
the event loop all stop for it at once. A loaded, warmed-up model leaves hundreds of thousands of objects
behind (torch.compile's graphs and guards, upstream's modules): on an H200 host after the full-size 1.7B
model's warm-up, 1,003,402 tracked objects and 569 ms for one full collection (on this project's CPU machine,
the tiny checkpoint: 743k and 378 ms).
CPython runs one whenever the objects that survived younger collections grow by a quarter of the old ones,
so under load a stream that has less than that much audio in hand starves, and every stream's next chunk is
late by as much.

`freeze_after_load` collects once and moves every object into the permanent generation (`gc.freeze`): later
collections walk only what serving allocated since. The collection is a full one only while no other engine
serves (a first load: the pause costs nothing); otherwise only the young generations, and whatever garbage
the old one holds is frozen with the rest. Nothing the server frees relies on the collector (an unload frees
by reference counting: `registry.release_memory`), so a frozen object still goes the moment its last
reference does; only reference cycles among frozen objects stay, for the life of the process. `PAUSES`
counts the collector's pauses for /metrics (`qtts_gc_pause_seconds`), the freeze's own collection apart.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LONG_PAUSE_S = 0.05  # a pause as long as this delays every stream's next chunk noticeably


class Pauses(Collector):
    """Every collection's duration by generation (process-wide, like the collector), from `gc.callbacks`;
    a prometheus collector read at scrape time."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.long = [0, 0, 0]  # pauses of LONG_PAUSE_S or more
        self.longest_s = 0.0
        self._started: float | None = None  # the collection under way (one at a time: it holds the GIL)
        self.ignoring = False  # the freeze's own collection, asked for at load time: not a serving pause
        self._installed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        """Start counting (idempotent)."""
        with self._lock:
            if not self._installed:
                gc.callbacks.append(self._callback)
                self._installed = True

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        started, self._started = self._started, None
        if started is None or self.ignoring:
            return
        seconds, generation = now - started, min(info.get("generation", 2), 2)
        self.count[generation] += 1
        self.seconds[generation] += seconds
        if seconds >= LONG_PAUSE_S:
            self.long[generation] += 1
        self.longest_s = max(self.longest_s, seconds)

    def collect(self) -> Iterator[Metric]:
        pauses = CounterMetricFamily(
            "qtts_gc_pause_seconds",
            "Seconds Python's cyclic garbage collector held every thread, by generation",
            labels=["generation"],
        )
        count = CounterMetricFamily("qtts_gc_pauses", "Collections, by generation", labels=["generation"])
        long = CounterMetricFamily(
            "qtts_gc_long_pauses", f"Collections of {LONG_PAUSE_S * 1000:.0f} ms or more", labels=["generation"]
        )
        for generation in range(3):
            pauses.add_metric([str(generation)], self.seconds[generation])
            count.add_metric([str(generation)], self.count[generation])
            long.add_metric([str(generation)], self.long[generation])
        yield pauses
        yield count
        yield long
        yield GaugeMetricFamily("qtts_gc_longest_pause_seconds", "The longest collection so far", self.longest_s)


PAUSES = Pauses()


def freeze_after_load(full: bool) -> None:
    """Collect, then keep every object that exists now out of later collections (see above). `full`: a full
    collection (blocking every thread for up to a second: only when no other engine serves), else only the
    young generations. Call it where the load itself already waits, before the new engine serves."""
    t0 = time.perf_counter()
    PAUSES.ignoring = True
    try:
        gc.collect() if full else gc.collect(1)
    finally:
        PAUSES.ignoring = False
    gc.freeze()
    log.info(
        f"garbage collector: {gc.get_freeze_count()} objects frozen out of its scans (collected first, "
        f"{'in full' if full else 'the young generations'}, in {1000 * (time.perf_counter() - t0):.0f} ms)"
    )
