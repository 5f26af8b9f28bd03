"""`qwen-tts-server worker`: one process per GPU that runs job items from the Celery queue.

The process runs an event loop in a background thread with the same services as the API server
(engine with continuous batching, files, voices, job store). Celery's thread pool has one thread per
engine row: each thread takes a task (an item id), hands the item to the loop and waits, so the
engine batches as many items as the worker has threads. A watcher on the loop stops items whose
job was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any

from ..api.services import Services, close_services, open_services
from ..config import Settings
from ..storage.database import OutageBackoff, is_unavailable
from .backends import job_concurrency
from .celery_app import QUEUE, TASK_NAME, make_celery
from .runner import POLL_S, JobRunner
from .store import Item

log = logging.getLogger(__name__)


class Worker:
    """The worker's loop thread, its services and its runner."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="qtts-worker-loop", daemon=True)
        self.svc: Services | None = None
        self.runner: JobRunner | None = None
        self._watcher: asyncio.Future[None] | None = None
        # A task delivered again takes over a run only if that run is old enough to be the one whose worker
        # died (redelivery comes a visibility timeout after the first delivery), not a copy that the API
        # sent again and that started just before.
        self.take_over_after_s = settings.job_visibility_timeout_s / 2
        self._lock = threading.Lock()
        self._in_flight: dict[str, threading.Event] = {}  # items this worker's threads are running

    def start(self) -> None:
        self._thread.start()
        self.svc = self.call(open_services(self.settings))
        self.runner = JobRunner(self.svc.jobs, self.svc, concurrency=job_concurrency(self.settings), worker=self.name)
        self._watcher = asyncio.run_coroutine_threadsafe(self._watch_cancelled(), self.loop)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.svc is not None:
            self.call(close_services(self.svc))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run_item(self, item_id: str, resent: bool = False) -> None:
        """A delivered task: take the item over and run it to its end (or its cancellation). A task the
        API sent again (`resent`: the broker had lost the first) runs only an item nobody has started.

        A second delivery of an item this worker is running waits for that run instead of running it
        again, and is acknowledged only then: on Redis both deliveries share one unacknowledged record,
        which must outlive the run in case this worker dies."""
        assert self.svc is not None
        with self._lock:
            running = self._in_flight.get(item_id)
            if running is None:
                self._in_flight[item_id] = done = threading.Event()
        if running is not None:
            running.wait()
            return
        try:
            item = self.svc.jobs.start(item_id, self.name, take_over_after_s=None if resent else self.take_over_after_s)
            if item is not None:  # else finished, cancelled or running elsewhere already
                self.call(self._run(item))
        finally:
            with self._lock:
                del self._in_flight[item_id]
            done.set()

    async def _run(self, item: Item) -> None:
        assert self.runner is not None
        task = asyncio.create_task(self.runner.run(item))
        self.runner.track(item, task)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _watch_cancelled(self) -> None:
        assert self.runner is not None
        outage = OutageBackoff()
        while True:
            try:
                await self.runner.stop_cancelled()
                outage = OutageBackoff()
            except Exception as exc:
                if is_unavailable(exc):
                    await outage.wait(exc)
                else:
                    log.exception("checking for cancelled items failed")
            await asyncio.sleep(POLL_S)


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Start the engine's services, then consume the queue until interrupted."""
    name = f"worker:{socket.gethostname()}:{os.getpid()}:{settings.device}"
    app = make_celery(settings)
    worker = Worker(settings, name)

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
    def run_item(item_id: str, resent: bool = False) -> None:
        worker.run_item(item_id, resent)

    worker.start()
    log.info(
        "worker ready",
        extra={"worker": name, "device": settings.device, "concurrency": job_concurrency(settings)},
    )
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={job_concurrency(settings)}",
                f"--queues={QUEUE}",
                f"--hostname={name.replace(':', '-')}@%h",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        worker.stop()
