"""Where a submitted job's items run.

- In-process (default): the API server's own runner claims queued items from the store and feeds
  them to its engine; no other service. A restart takes back the items it left running.
- Celery (QTTS_BROKER_URL): the API enqueues one task per item; `qwen-tts-server worker` processes
  (one per GPU) run them (jobs/worker.py). Cancellation reaches them through the store.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from ..config import Settings
from .runner import JobRunner
from .store import JobStore


class JobBackend(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submitted(self, job_id: str) -> None: ...
    async def cancelled(self, job_id: str) -> None: ...


def runner_name(settings) -> str:
    """The in-process runner's name in the store: what it takes back after a restart."""
    return f"api:{socket.gethostname()}:{settings.port}"


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
    def __init__(self, store: JobStore, settings) -> None:
        from .celery_app import make_celery  # Celery is imported only where a broker is configured

        self.store = store
        self.app = make_celery(settings)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await asyncio.to_thread(self.app.close)

    async def submitted(self, job_id: str) -> None:
        await asyncio.to_thread(self._send, job_id)

    async def cancelled(self, job_id: str) -> None:
        return None  # workers see the cancelled state in the store and stop those items

    def _send(self, job_id: str) -> None:
        from .celery_app import TASK_NAME

        items = self.store.items(job_id)
        with self.app.producer_or_acquire() as producer:
            for item in items:
                self.app.send_task(TASK_NAME, args=[item.id], producer=producer)
