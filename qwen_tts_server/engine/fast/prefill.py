"""Packed prefill padded to a few token buckets on CUDA, each bucket one CUDA graph captured at warm-up, so
admitting requests costs the step thread one launch instead of ~28 layers of Python, compiled-function
guards and eager kernels.

Measured before this existed (H200, 1.7B, `bench_http`): the step thread spent ~17 ms on one
prompt's prefill, 4-7 ms a step on average at 64 clients, while the frame it overlaps takes 6.5-15 ms.
Prompts are packed as `ModelRunner.pack` does and padded to the bucket: the padding tokens sit in the last
prompt's row after it (written there, never read). Without graphs the same padded shapes run eagerly, so
an engine with graphs and one without compute the same numbers (what the GPU tests compare). A batch of
prompts that no bucket holds (longer than the largest, or whose padding would run past the cache) runs
unpadded and eagerly. On the CPU nothing is padded: prefill stays op for op upstream's.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .capture import GraphPool

if TYPE_CHECKING:
    from .model_runner import ModelRunner

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)


class _Graph:
    """One bucket's graph with its static inputs (packed tokens, positions, rows) and outputs."""

    def __init__(self, runner: ModelRunner, tokens: int, single: bool, pool: GraphPool) -> None:
        width = runner.norm.weight.shape[0]
        self.x = torch.zeros(tokens, width, device=runner.device, dtype=runner.dtype)
        # Warm-up writes K/V into row 0 at positions 0..tokens-1: only before any request holds a row.
        self.positions = torch.arange(tokens, device=runner.device).clamp(max=runner.max_len - 1)
        self.owner = torch.zeros(tokens, dtype=torch.long, device=runner.device)
        self.graph, (self.hidden, self.logits) = pool.capture(
            lambda: runner.prefill_packed(self.x, self.positions, self.owner, single=single)
        )

    def run(self, x: Tensor, positions: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        self.x.copy_(x)
        self.positions.copy_(positions)
        self.owner.copy_(owner)
        self.graph.replay()
        return self.hidden, self.logits


class BucketedPrefill:
    """`prefill_many` padded to a token bucket, through its captured graph when there is one.

    Two graphs per bucket: one prompt (causal attention, as the eager path uses for one prompt) and
    several (attention within each prompt's own tokens)."""

    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        self.runner = weakref.proxy(runner)  # the engine owns both: no cycle through the graphs
        self.buckets = sorted({b for b in TOKEN_BUCKETS if b < max_tokens} | {min(max_tokens, TOKEN_BUCKETS[-1])})
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool: GraphPool | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def capture_all(self, frames: GraphPool) -> None:
        """Capture every bucket now, on the stream of the frame graphs' pool `frames` (warm-up, before any
        request holds a row: captures write into row 0). Both are replayed one after the other on the step
        stream, so they may share that stream's cuBLAS workspace. A bucket that fails leaves the smaller ones
        captured; the caller decides what to keep."""
        runner = self.runner
        self._pool = GraphPool(runner.device, "BucketedPrefill", share_stream_of=frames)
        t0 = time.perf_counter()
        for tokens in self.buckets:
            for single in (True, False):
                self._graphs[tokens, single] = _Graph(runner, tokens, single, self._pool)
        log.info(
            f"fast engine warm-up: {len(self._graphs)} prefill graphs captured in {time.perf_counter() - t0:.1f} s"
        )

    @torch.inference_mode()
    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """As `ModelRunner.prefill_many`: each prompt's last hidden state [n, H] and logits [n, V]."""
        runner = self.runner
        lengths = [int(p.shape[0]) for p in prompts]
        bucket = next((b for b in self.buckets if b >= sum(lengths)), None)
        if bucket is None or not runner.padding_fits(lengths, bucket - sum(lengths)):
            return runner.prefill_many(slots, prompts)
        single = len(prompts) == 1
        packed = runner.pack(slots, prompts, pad_to=bucket)
        graph = self._graphs.get((bucket, single))
        if graph is None:
            hidden, logits = runner.prefill_packed(packed.x, packed.positions, packed.owner, single=single)
        else:
            hidden, logits = graph.run(packed.x, packed.positions, packed.owner)
        return hidden[packed.last], logits[packed.last]

    def release_graphs(self) -> None:
        """Drop every graph and its memory pool (the engine stopped, or capture failed); later calls run
        eagerly, padded as before."""
        self._graphs.clear()
        self._pool = None
