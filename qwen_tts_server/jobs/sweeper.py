"""Sends again the job items whose Celery task the broker lost (the worker pool only).

A broker can lose a task. Redis hands a task over with BRPOP and records it as unacknowledged only
afterwards, so a worker killed in between takes the task with it (celery/kombu#305); a Redis restart
without persistence loses the tasks waiting in the queue; an API killed between storing a job and
publishing its tasks never publishes them. The job store is the record of what must run, so the API
compares the two. While the broker's queue is empty, an item the store has as queued (nobody started
it) is in a worker's hands, about to start (or to be delivered again after the visibility timeout, if
that worker died), or lost. An item still queued `grace_s` later, at a look that finds the queue
empty again, is sent again, as a task that runs only an item nobody has started (`store.start` with
no take-over): copies from several API replicas run it once, and a late first task takes over only a
run as old as a dead worker's would be (jobs/worker.py).

Lost tasks are found once the queue drains: while tasks wait in it, an item missing from it cannot be
told from one waiting its turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .store import ItemState, JobStore

log = logging.getLogger(__name__)

MAX_SUSPECTS = 10_000  # items watched at once; more are looked at once these have been settled


class LostTaskSweeper:
    """One look per `sweep()`; the caller sets the pace (CeleryBackend, every restore interval)."""

    def __init__(
        self,
        store: JobStore,
        *,
        waiting: Callable[[], int],
        send: Callable[[Sequence[str]], None],
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.waiting = waiting  # tasks in the broker's queue, not yet handed to a worker
        self.send = send
        self.grace_s = grace_s
        self.clock = clock
        self._suspects: dict[str, float] = {}  # item id -> when it was queued in the store, not in the broker

    def sweep(self) -> list[str]:
        """If the broker's queue is empty: send again the suspects still queued after the grace, then
        note the items the store has as queued. Returns the ids sent again."""
        if self.waiting() > 0:
            return []  # tasks wait their turn: nothing can be told lost now (suspects keep their time)
        now = self.clock()
        due = [item_id for item_id, seen in self._suspects.items() if now - seen >= self.grace_s]
        states = self.store.open_states(due)
        lost = [item_id for item_id in due if states.get(item_id) is ItemState.QUEUED]
        if lost:
            log.warning("job items lost by the broker: sent again", extra={"count": len(lost)})
            self.send(lost)
        for item_id in due:  # after the send: a failed one is tried again at the next look
            del self._suspects[item_id]
        for item_id in self.store.queued_ids(MAX_SUSPECTS - len(self._suspects)):
            self._suspects.setdefault(item_id, now)
        return lost
