"""What every route needs, built once per process: by the API server at start-up (api/app.py) and by
each `qwen-tts-server worker` (jobs/worker.py), so both run items with the same parts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..audio.sources import ReferenceAudioResolver
from ..config import Settings
from ..engine.engine import TTSEngine
from ..engine.pool import DevicePool, build_engine
from ..jobs.store import JobStore
from ..metrics import Metrics
from ..storage.database import close_databases
from ..storage.files import FileRegistry
from ..storage.voices import VoiceStore

if TYPE_CHECKING:
    from ..jobs.backends import JobBackend


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    files: FileRegistry
    resolver: ReferenceAudioResolver
    engine: TTSEngine | DevicePool
    voices: VoiceStore
    jobs: JobStore
    job_backend: JobBackend | None = None  # the API server's (set at start-up)
    ready: bool = False


async def open_services(settings: Settings, engine: TTSEngine | DevicePool | None = None) -> Services:
    """Open the stores (creating their tables) and build the engine (models load on first use)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    metrics = engine.metrics if engine is not None else Metrics()
    url = settings.metadata_url
    files = await asyncio.to_thread(FileRegistry, settings.files_dir, url, settings.file_ttl_s)
    voices = await asyncio.to_thread(VoiceStore, settings.voices_dir, url)
    jobs = await asyncio.to_thread(JobStore, url)
    return Services(
        settings=settings,
        metrics=metrics,
        files=files,
        resolver=ReferenceAudioResolver(files, settings),
        engine=engine or build_engine(settings, metrics),  # a pool of engines when QTTS_DEVICES lists several
        voices=voices,
        jobs=jobs,
    )


async def close_services(svc: Services) -> None:
    await asyncio.to_thread(svc.engine.close)  # joins the engines' threads: off the loop
    await asyncio.to_thread(close_databases)
