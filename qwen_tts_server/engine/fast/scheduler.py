"""Admission policy: FIFO into free rows, with a bound on prefill work per step.

Prefill of a long prompt costs many decode steps' worth of compute; admitting at most
`max_prefill_tokens` prompt positions per step (but always at least one request when a row is
free) keeps running streams from stalling behind a burst of new requests.

A prefill call costs about the same host time for one prompt as for many (it is launch-bound),
and under a steady stream of arrivals a prefill every step would double the step time. So while
requests are running, newcomers wait up to `admit_wait_s` to be admitted together, unless they
would fill every free row or the prefill budget anyway. With nothing running they go at once.

Running requests are kept in cache rows 0..n-1, so a batch is the first rows of every tensor
(views, not gathers). A request that leaves takes the last request's place in the list; the engine
then moves that request's cache row into the hole (`compact`).
"""

from __future__ import annotations

import time
from collections import deque

from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_slots: int, max_prefill_tokens: int, admit_wait_s: float = 0.0) -> None:
        self.max_slots = max_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.admit_wait_s = admit_wait_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, now: float | None = None) -> list[Sequence]:
        """Move waiting requests into the next free rows, oldest first, within the prefill budget.

        Call after `compact`: rows 0..n-1 are taken, so the next request gets row n. `now`
        (time.perf_counter()) is compared with the oldest request's `submitted_at`.
        """
        if not self._ready(time.perf_counter() if now is None else now):
            return []
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_slots:
            seq = self.waiting[0]
            if admitted and seq.prompt_len > budget:
                break
            self.waiting.popleft()
            seq.slot = len(self.running)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.prompt_len
        return admitted

    def _ready(self, now: float) -> bool:
        if not self.waiting or not self.free:
            return False
        if not self.running or self.admit_wait_s <= 0 or len(self.waiting) >= self.free:
            return True
        if sum(seq.prompt_len for seq in self.waiting) >= self.max_prefill_tokens:
            return True
        oldest = self.waiting[0].submitted_at
        return oldest is None or now - oldest >= self.admit_wait_s

    def release(self, seq: Sequence) -> None:
        """Free a finished or cancelled request's row at once (the last request moves into it)."""
        if seq.status is SequenceStatus.RUNNING:
            i = self.running.index(seq)
            last = self.running.pop()
            if last is not seq:
                self.running[i] = last
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def compact(self) -> list[tuple[Sequence, int, int]]:
        """Give every running request the row of its index; returns the moves (seq, from, to)."""
        moves = [(seq, seq.slot, i) for i, seq in enumerate(self.running) if seq.slot != i]
        for seq, _, row in moves:
            seq.slot = row
        return moves

    @property
    def free(self) -> int:
        return self.max_slots - len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
