"""Where a submitted job's items run.

- In-process (default): the API server's own runner claims queued items from the store and feeds
  them to its engine; no other service. A restart takes back the items it left running.
- Celery (QTTS_BROKER_URL): the API enqueues one task per item; `qwen-tts-server worker` processes
  (one per GPU) run them (jobs/worker.py). Cancellation reaches them through the store; an item
  whose task the broker lost is sent again (jobs/sweeper.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import Counter

from ..config import Settings
from ..errors import QueueUnavailable
from .runner import IN_PROCESS, JobRunner
from .store import JobStore
from .sweeper import LostTaskSweeper

log = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # how long a stopping API waits for a sweep under way
NOT_FOUND = "404"  # AMQP's reply code for a queue that does not exist (kombu's Redis gives it as text)


class JobBackend(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submitted(self, job_id: str) -> None: ...
    async def cancelled(self, job_id: str) -> None: ...


def runner_name(settings) -> str:
    """The in-process runner's name in the store: what it takes back after a restart."""
    return f"{IN_PROCESS}{socket.gethostname()}:{settings.port}"


def job_concurrency(settings: Settings) -> int:
    """Job items run at once: QTTS_JOB_CONCURRENCY, else the engines' rows (max_slots, or a default
    per device) times the devices (QTTS_DEVICES: one engine each)."""
    if settings.job_concurrency:
        return settings.job_concurrency
    devices = settings.devices or [settings.device]
    rows = settings.max_slots or (64 if _on_cuda(devices[0]) else 8)
    return rows * len(devices)


def _on_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


class InProcessBackend:
    def __init__(self, store: JobStore, svc, concurrency: int) -> None:
        self.runner = JobRunner(store, svc, concurrency=concurrency, worker=runner_name(svc.settings))

    async def start(self) -> None:
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()

    async def submitted(self, job_id: str) -> None:
        self.runner.wake()

    async def cancelled(self, job_id: str) -> None:
        self.runner.wake()


class CeleryBackend:
    """Publishes one task per item; sends again, from the store, what the broker lost (sweeper.py)."""

    def __init__(self, store: JobStore, settings: Settings, resent: Counter | None = None) -> None:
        from .celery_app import make_celery, redelivery_grace_s, restore_interval_s  # only with a broker

        self.store = store
        self.app = make_celery(settings)
        self.resent = resent
        self.sweep_interval_s = restore_interval_s(settings)
        self.sweeper = LostTaskSweeper(
            store, waiting=self.waiting, send=self.resend, grace_s=redelivery_grace_s(settings)
        )
        self._sweeps: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._sweeps = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        self._stopping.set()
        if self._sweeps is not None:  # it ends after the sweep under way, so none publishes after close
            await asyncio.wait({self._sweeps}, timeout=STOP_WAIT_S)  # unless the broker hangs it
        await asyncio.to_thread(self.app.close)

    async def submitted(self, job_id: str) -> None:
        """Publish the job's tasks; QueueUnavailable if the broker cannot be reached (after Celery's
        own retries): the caller forgets the job, and a task already out finds no item to run."""
        from kombu.exceptions import OperationalError

        items = await asyncio.to_thread(self.store.items, job_id)
        try:
            await asyncio.to_thread(self.publish, [item.id for item in items])
        except OperationalError as exc:
            log.warning("the job queue's broker is unreachable: %s", exc)
            raise QueueUnavailable(
                "the job queue is unreachable (its broker is down); the job was not accepted: retry"
            ) from exc

    async def cancelled(self, job_id: str) -> None:
        return None  # workers see the cancelled state in the store and stop those items

    def publish(self, item_ids: Sequence[str], *, resent: bool = False) -> None:
        """One task per item; `resent`: tasks that run only an item nobody has started (sweeper.py)."""
        from .celery_app import TASK_NAME

        with self.app.producer_or_acquire() as producer:
            for item_id in item_ids:
                args = [item_id, True] if resent else [item_id]
                self.app.send_task(TASK_NAME, args=args, producer=producer)

    def resend(self, item_ids: Sequence[str]) -> None:
        self.publish(item_ids, resent=True)
        if self.resent is not None:
            self.resent.inc(len(item_ids))

    def waiting(self) -> int:
        """Tasks in the broker's queue that no worker has taken yet."""
        from .celery_app import QUEUE

        with self.app.connection_for_read() as conn, conn.channel() as channel:
            try:
                return channel.queue_declare(QUEUE, passive=True).message_count
            except conn.channel_errors as exc:
                if str(getattr(exc, "reply_code", "")) == NOT_FOUND:  # Redis drops an empty queue's key
                    return 0
                raise

    async def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.sweep_interval_s)
                return
            try:
                await asyncio.to_thread(self.sweeper.sweep)
            except Exception as exc:  # the broker or the database is away: look again at the next interval
                log.warning("looking for job items the broker lost failed: %s", exc)
