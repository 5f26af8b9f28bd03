"""CUDA graphs of the fast engine's frame: one per (batch bucket, KV bucket, sampling plan pair), all
captured at warm-up, replayed by the step loop."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .capture import GraphPool
from .sampler import PLANS, SamplingPlan

if TYPE_CHECKING:
    from .engine import FastEngine

log = logging.getLogger(__name__)


class FrameGraphs:
    """CUDA graphs of `FastEngine.frame`, one per (batch bucket, KV bucket, sampling plans).

    A replay launches the whole frame (thousands of small kernels when eager) at once, with no
    inputs to copy: the batch is rows 0..size-1 of the engine's state. Outputs live in the graph's
    memory and are read before the next replay. Every graph is captured at warm-up (`capture_all`);
    one missing then (warm-up skipped) is captured on first use, with the running requests' rows
    preserved around its warm-up frame.
    """

    def __init__(self, engine: FastEngine) -> None:
        self.engine = weakref.proxy(engine)  # the engine owns its graphs: no cycle back to it
        self._graphs: dict[tuple[int, int, SamplingPlan, SamplingPlan], tuple[Any, Tensor]] = {}
        self.pool = GraphPool(engine.device, "FrameGraphs")

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[tuple[int, int, SamplingPlan, SamplingPlan]]:
        """Every graph a step can ask for."""
        e = self.engine
        return [(b, k, *p) for p in itertools.product(PLANS, PLANS) for b in e.buckets for k in e.kv_buckets]

    def capture_all(self) -> None:
        """Capture every graph now, not on a request's step; logs progress (hundreds of graphs)."""
        keys = [key for key in self.keys() if key not in self._graphs]
        t0 = time.perf_counter()
        for i, key in enumerate(keys, 1):
            size, kv_len, talker, sub = key
            self._graphs[key] = self._capture(size, kv_len, (talker, sub))
            if i % 50 == 0 or i == len(keys):
                seconds = time.perf_counter() - t0
                log.info(f"fast engine warm-up: {i}/{len(keys)} frame graphs captured in {seconds:.1f} s")

    def run(self, size: int, kv_len: int, plans: tuple[SamplingPlan, SamplingPlan]) -> Tensor:
        """Replay the frame graph for this batch (its output, see `FastEngine.frame`)."""
        key = (size, kv_len, *plans)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(size, kv_len, plans)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, size: int, kv_len: int, plans: tuple[SamplingPlan, SamplingPlan]) -> tuple[Any, Tensor]:
        engine = self.engine

        def warm_up() -> None:
            # Capture only records kernels, so only the warm-up frame's writes need undoing.
            with engine.preserved_rows(size):
                engine.frame(size, kv_len, plans)

        graph, out = self.pool.capture(lambda: engine.frame(size, kv_len, plans), warm_up)
        log.debug("captured a frame graph", extra={"batch": size, "kv_len": kv_len})
        return graph, out
