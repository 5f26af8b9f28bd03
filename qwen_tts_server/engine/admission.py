"""Admission: how much work each model may hold, and a fast "no" beyond it.

A model takes as many items as its engine has rows, plus `max_queue` waiting for a row. Past that,
a request is refused at once with 429 and a Retry-After, instead of queueing without bound until
every client times out. A request holds its items from admission until it ends (finished,
failed or cancelled), so the count is exactly the work the engine owes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import Overloaded


@dataclass(frozen=True)
class Load:
    """One model's admission state."""

    in_flight: int
    rows: int
    capacity: int

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.rows)

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.capacity


class AdmissionGate:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._in_flight: dict[str, int] = {}
        self._rows: dict[str, int] = {}

    def set_rows(self, model: str, rows: int) -> None:
        """The model's engine is up with this many rows (0 until it is: only the queue counts)."""
        self._rows[model] = rows

    def forget(self, model: str) -> None:
        self._rows.pop(model, None)

    def load(self, model: str) -> Load:
        rows = self._rows.get(model, 0)
        return Load(self._in_flight.get(model, 0), rows, rows + self.max_queue)

    @contextlib.contextmanager
    def admit(self, model: str, items: int = 1) -> Iterator[None]:
        """Hold `items` of the model's capacity for the duration, or raise Overloaded at once."""
        load = self.load(model)
        if load.in_flight + items > load.capacity:
            raise Overloaded(
                f"model '{model}' is at capacity ({load.in_flight} items in progress or waiting, limit "
                f"{load.capacity}); retry shortly",
                retry_after_s=self._retry_after(load),
            )
        self._in_flight[model] = load.in_flight + items
        try:
            yield
        finally:
            left = self._in_flight[model] - items
            if left:
                self._in_flight[model] = left
            else:
                del self._in_flight[model]

    def saturated(self) -> list[str]:
        names = set(self._in_flight) | set(self._rows)
        return sorted(name for name in names if self.load(name).saturated)

    @staticmethod
    def _retry_after(load: Load) -> int:
        """A rough wait: about a second per full set of rows queued ahead (utterances take seconds)."""
        return max(1, math.ceil(load.waiting / max(load.rows, 1)))
