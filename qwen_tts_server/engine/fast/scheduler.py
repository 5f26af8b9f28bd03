"""Admission policy: FIFO into free slots, with a bound on prefill work per step.

Prefill of a long prompt costs many decode steps' worth of compute; admitting at most
`max_prefill_tokens` prompt positions per step (but always at least one request when a slot is
free) keeps running streams from stalling behind a burst of new requests.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_slots: int, max_prefill_tokens: int) -> None:
        self.max_slots = max_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(max_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free slots, oldest first, within the prefill budget."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            if admitted and seq.prompt_len > budget:
                break
            self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.prompt_len
        return admitted

    def release(self, seq: Sequence) -> None:
        """Free a finished or cancelled request's slot at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
