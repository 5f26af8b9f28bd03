"""What every route needs, built once per process: by the API server at start-up (api/app.py) and by
each `qwen-tts-server worker` (jobs/worker.py), so both run items with the same parts."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..audio.sources import ReferenceAudioResolver
from ..config import Settings
from ..engine.pool import DevicePool, build_synthesizer
from ..engine.registry import ModelDownloading
from ..engine.synthesizer import Synthesizer
from ..errors import ServiceError
from ..jobs.store import JobStore
from ..metrics import Metrics
from ..storage.database import close_databases
from ..storage.files import FileRegistry
from ..storage.voices import VoiceStore

if TYPE_CHECKING:
    from ..jobs.backends import JobBackend

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    files: FileRegistry
    resolver: ReferenceAudioResolver
    synthesizer: Synthesizer | DevicePool  # what runs synthesis: one device's, or a pool of them
    voices: VoiceStore
    jobs: JobStore
    job_backend: JobBackend | None = None  # the API server's (set at start-up)
    ready: bool = False
    preloading: list[str] = field(default_factory=list)  # QTTS_PRELOAD_MODELS not up yet
    preload_errors: dict[str, str] = field(default_factory=dict)  # those that failed, and why


async def open_services(settings: Settings, synthesizer: Synthesizer | DevicePool | None = None) -> Services:
    """Open the stores (creating their tables) and build the synthesizer (models load on first use)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    metrics = synthesizer.metrics if synthesizer is not None else Metrics()
    url = settings.metadata_url
    files = await asyncio.to_thread(FileRegistry, settings.files_dir, url, settings.file_ttl_s)
    voices = await asyncio.to_thread(VoiceStore, settings.voices_dir, url)
    jobs = await asyncio.to_thread(JobStore, url)
    return Services(
        settings=settings,
        metrics=metrics,
        files=files,
        resolver=ReferenceAudioResolver(files, settings),
        synthesizer=synthesizer or build_synthesizer(settings, metrics),  # a pool when QTTS_DEVICES lists several
        voices=voices,
        jobs=jobs,
    )


async def preload_models(svc: Services) -> None:
    """Load QTTS_PRELOAD_MODELS one after another, each with its engine's warm-up (a model still
    downloading is waited for). Until this ends `preloading` names what is left. A failure goes to
    `preload_errors` (the server keeps serving; /ready says which model failed and why); one that says
    when to retry (a failed download) is retried then, and its error goes when the model is up."""
    svc.preloading = list(svc.settings.preload_models)
    while svc.preloading:
        name, t0 = svc.preloading[0], time.perf_counter()
        log.info(f"preloading model {name}", extra={"model": name})
        if await _preload(svc, name):
            seconds = time.perf_counter() - t0
            log.info(f"model {name} loaded and warmed up in {seconds:.1f} s", extra={"model": name})
        svc.preloading.pop(0)


async def _preload(svc: Services, name: str) -> bool:
    while True:
        try:
            await svc.synthesizer.load(name)
        except ModelDownloading as exc:
            await asyncio.sleep(exc.retry_after_s)
            continue
        except Exception as exc:
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            svc.preload_errors[name] = message
            retry_after = getattr(exc, "retry_after_s", None)
            again = f"; retrying in {retry_after} s" if retry_after else ""
            log.error(f"preloading model {name} failed: {message}{again}", extra={"model": name})
            if retry_after is None:
                return False
            await asyncio.sleep(retry_after)
            continue
        svc.preload_errors.pop(name, None)
        return True


async def close_services(svc: Services) -> None:
    await asyncio.to_thread(svc.synthesizer.close)  # joins the engines' threads: off the loop
    await asyncio.to_thread(close_databases)
