"""Runs job items: the loop of the in-process backend (inside the API server) and of each Celery
worker's engine process alike. It keeps up to `concurrency` items in the engine at once (the
engine's rows), so a job of 1,000 items runs at the engine's batched speed; stops an item as soon
as its job is cancelled; records each result once (store.finish) and sends the job's webhook when
its last item ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..errors import EngineFailed, Overloaded, ServiceError
from ..storage.database import OUTAGE_ERRORS, OutageBackoff, is_unavailable, through_outages
from .items import Generated, Outcome, generate_item, save_item
from .store import Item, ItemState, JobStore
from .webhook import send_webhook

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the runner looks for new items and cancelled ones
IN_PROCESS = "api:"  # the start of every in-process runner's name (backends.runner_name)
ENGINE_FAULT_RETRIES = 3  # an item waits for this many engine rebuilds after device faults, then fails


class JobRunner:
    def __init__(self, store: JobStore, svc, *, concurrency: int, worker: str) -> None:
        self.store = store
        self.svc = svc
        self.concurrency = concurrency
        self.worker = worker
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._beats: asyncio.Task[None] | None = None

    # --- the in-process backend: claim queued items from the store ---

    async def start(self) -> None:
        """Take back what this runner left running when it last stopped, then start claiming."""
        await asyncio.to_thread(self.store.beat, self.worker)
        taken_back = await asyncio.to_thread(self.store.requeue_worker, self.worker)
        if taken_back:
            log.info("job items taken back after a restart", extra={"count": taken_back})
        self._loop_task = asyncio.create_task(self._claim_loop())
        self._beats = asyncio.create_task(self._beat_loop())

    def wake(self) -> None:
        """New items were queued (or a job cancelled): look now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming and stop running items; they go back to the queue for the next start."""
        for loop in (self._loop_task, self._beats):
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        running = list(self._running)
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        try:
            await asyncio.to_thread(self.store.requeue, running, self.worker)
        except Exception as exc:  # the database is away: the next start takes them back (requeue_worker)
            log.warning("job items left running at shutdown (%s): taken back at the next start", exc)

    async def _claim_loop(self) -> None:
        outage, pause_s = OutageBackoff(), POLL_S
        while True:
            try:
                free = self.concurrency - len(self._running)
                if free > 0:
                    for item in await asyncio.to_thread(self.store.claim, free, self.worker):
                        self._spawn(item)
                await self.stop_cancelled()
                outage, pause_s = OutageBackoff(), POLL_S
            except Exception as exc:
                if is_unavailable(exc):  # one line a try, slower and slower, not a traceback twice a second
                    pause_s = outage.next_wait(exc)
                else:
                    log.exception("job runner step failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause_s)

    async def _beat_loop(self) -> None:
        """Say this runner is alive, and take up what dead in-process runners left running: a server
        killed without its shutdown, perhaps back under another host name (a new container), would
        otherwise leave its items running for ever."""
        lease_s = self.svc.settings.job_runner_lease_s
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(lease_s / 4)
            try:
                await asyncio.to_thread(self.store.beat, self.worker)
                # This runner's own beats were held up (the database was away, or this process stalled):
                # the others' were too, likely. Take nothing this time; they beat again meanwhile.
                held_up = time.monotonic() - last_beat > lease_s / 2
                last_beat = time.monotonic()
                taken = 0 if held_up else await asyncio.to_thread(self.store.requeue_dead, IN_PROCESS, lease_s)
            except Exception as exc:
                if is_unavailable(exc):  # as in the claim loop: one line for an outage, a traceback for a bug
                    log.warning("job runner heartbeat failed: %s", type(exc).__name__)
                else:
                    log.exception("job runner heartbeat failed")
                continue
            if taken:
                log.warning("job items of a runner that died taken up", extra={"count": taken})
                self.wake()

    def _spawn(self, item: Item) -> None:
        task = asyncio.create_task(self.run(item))
        self._running[item.id] = task
        task.add_done_callback(lambda _: (self._running.pop(item.id, None), self._wake.set()))

    # --- shared with the Celery worker ---

    async def stop_cancelled(self) -> None:
        """Cancel the engine work of running items whose job was cancelled."""
        if not self._running:
            return
        states = await asyncio.to_thread(self.store.open_states, list(self._running))
        for item_id, state in states.items():
            task = self._running.get(item_id)
            if task is not None and state is ItemState.CANCELLED:
                task.cancel()

    async def run(self, item: Item) -> None:
        """Run one item and record its outcome; a cancelled item records nothing (its state says)."""
        try:
            outcome = await self._run_when_admitted(item)
        except asyncio.CancelledError:
            raise
        except ServiceError as exc:
            await self._finish(item, error=exc.message)
            return
        except Exception as exc:
            log.exception("job item failed", extra={"job_id": item.job_id, "item": item.idx})
            await self._finish(item, error=f"internal error ({type(exc).__name__}); see the server log")
            return
        recorded = await self._finish(
            item, file_id=outcome.file_id, duration_s=outcome.duration_s, finish_reason=outcome.finish_reason
        )
        if not recorded:  # cancelled meanwhile, or another run of the item got there first
            with contextlib.suppress(ServiceError):
                await asyncio.to_thread(self.svc.files.delete, outcome.file_id)

    async def _run_when_admitted(self, item: Item) -> Outcome:
        """Generate the item, then store its audio; a database outage delays the storing, and the audio
        waits for it (it is not generated again)."""
        generated = await self._generate(item)
        return await through_outages(save_item, self.svc, generated)

    async def _generate(self, item: Item) -> Generated:
        """Generate the item; while the engine's queue is full (synchronous traffic has it), wait as it says
        and try again: a busy server delays a job, it does not fail its items. An engine rebuilt after a
        device fault is waited for too, a few times: one CUDA error must not fail a whole job; and an outage
        (the database away when the item's voice is looked up, or its disk full), as `through_outages` does."""
        faults = 0
        outage = OutageBackoff()
        while True:
            try:
                return await generate_item(self.svc, item, item.owner)
            except OUTAGE_ERRORS as exc:
                await outage.wait_out(exc)
            except Overloaded as exc:
                await asyncio.sleep(exc.retry_after_s)
            except EngineFailed as exc:
                faults += 1
                if faults > ENGINE_FAULT_RETRIES:
                    raise
                await asyncio.sleep(exc.retry_after_s)

    def track(self, item: Item, task: asyncio.Task[None]) -> None:
        """Watch a task started by someone else (a Celery delivery) for cancellation."""
        self._running[item.id] = task
        task.add_done_callback(lambda _: self._running.pop(item.id, None))

    async def _finish(self, item: Item, **result: object) -> bool:
        """Record the item's outcome, through a database outage: an item whose result could not be
        written would stay running for ever (its runner lives on), and its job never end."""
        finished = await through_outages(self.store.finish, item.id, **result)
        if finished.job_over:
            await send_webhook(self.store, self.svc.settings, item.job_id)
        return finished.recorded
