"""Merge items that arrive close together into GPU batches.

Items with the same key (model, mode, sampling options) that arrive within `window_s` of the
first one go into one batch; a key's queue flushes at once when it reaches `max_batch`. Batches
are handed to `run_batch`, which serialises them on the GPU; results go back to each caller
in order, and an error in a batch fails exactly the callers whose items were in it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Item]], Awaitable[list[Result]]],
        *,
        max_batch: int,
        window_s: float,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self._queues: dict[Hashable, list[_Pending[Item, Result]]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # recent batch sizes; tests read it
        self.on_batch: Callable[[int], None] | None = None

    async def submit(self, key: Hashable, items: list[Item]) -> list[Result]:
        """Queue items (one request's list stays together in order) and wait for their results."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        queue = self._queues.setdefault(key, [])
        queue.extend(pending)
        if len(queue) >= self.max_batch:
            self._flush(key)
        elif key not in self._timers:
            self._timers[key] = loop.call_later(self.window_s, self._flush, key)
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _flush(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        queue = self._queues.pop(key, [])
        for start in range(0, len(queue), self.max_batch):
            chunk = queue[start : start + self.max_batch]
            task = asyncio.ensure_future(self._run(key, chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Hashable, chunk: list[_Pending[Item, Result]]) -> None:
        live = [p for p in chunk if not p.future.done()]  # callers that went away are skipped
        if not live:
            return
        self.batch_sizes.append(len(live))
        if self.on_batch is not None:
            self.on_batch(len(live))
        try:
            results = await self._run_batch(key, [p.item for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch of {len(live)} items returned {len(results)} results")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for p, result in zip(live, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
