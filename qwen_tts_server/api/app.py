"""App factory: wires settings, storage, engine and routes; turns every error into clear JSON."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from .. import __version__, web
from ..config import Settings
from ..engine.synthesizer import Synthesizer
from ..jobs.backends import CeleryBackend, InProcessBackend, JobBackend, job_concurrency
from . import compat, docs, files, models, system, tts, voices
from .error_handlers import install_error_handlers
from .jobs import queue as jobs_queue
from .jobs import router as jobs_router
from .limits import BodyLimit
from .loop_lag import watch_event_loop
from .middleware import OPEN_PATHS, install_request_context
from .openai import router as openai_router
from .openai import voices_router as openai_voices_router
from .openai import websocket as openai_websocket
from .services import Services, close_services, open_services, preload_models

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, synthesizer: Synthesizer | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await open_services(settings, synthesizer)
        services.job_backend = job_backend(services)
        app.state.services = services
        cleanup = asyncio.create_task(_cleanup_loop(services, settings.cleanup_interval_s))
        loop_lag = asyncio.create_task(watch_event_loop(services.metrics.loop_lag))
        await services.job_backend.start()
        for line in await asyncio.to_thread(_startup_report, services):
            log.info(line)
        services.ready = True
        preload = asyncio.create_task(preload_models(services))  # /ready stays 503 until it is done
        try:
            yield
        finally:
            services.ready = False
            for task in (cleanup, loop_lag, preload):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                await services.job_backend.stop()
            finally:
                await close_services(services)

    app = FastAPI(
        title="Qwen3-TTS server",
        version=__version__,
        description="Custom voice, voice design and voice cloning with Qwen3-TTS-12Hz models.",
        lifespan=lifespan,
        docs_url=None,  # served by `docs`, from the package: works offline and with API keys
        redoc_url=None,
    )
    docs.install(app, settings, OPEN_PATHS)
    app.include_router(tts.router)
    app.include_router(compat.router)  # the earlier service's routes (its queue: the jobs module's)
    app.include_router(openai_router.router)
    app.include_router(openai_websocket.router)
    app.include_router(openai_voices_router.router)
    app.include_router(voices.router)
    app.include_router(jobs_router.router)
    app.include_router(jobs_queue.router)  # the earlier service's queue, on the jobs store
    app.include_router(files.router)
    app.include_router(models.router)
    app.include_router(models.speakers_router)  # GET /api/v1/speakers: what each model speaks
    app.include_router(system.router)
    web.install(app)  # the web page at / (qwen_tts_server/web)
    app.add_middleware(BodyLimit, **BodyLimit.limits(settings))  # inside the request context: 413s get its id
    install_request_context(app, settings)
    install_error_handlers(app)
    compat.install_cors(app, settings)  # last: outermost, so preflights never meet the key check
    return app


def job_backend(services: Services) -> JobBackend:
    """Celery workers when a broker is configured, else this server's own runner."""
    if services.settings.broker_url:
        return CeleryBackend(services.jobs, services.settings, services.metrics.jobs_resent)
    return InProcessBackend(services.jobs, services, job_concurrency(services.settings))


def _startup_report(services: Services) -> list[str]:
    """What a newcomer needs to see at start: the engine, the models on disk and what happens to the
    others (downloaded on first use, or not at all). Reads the models folder: run it in a thread."""
    registry = services.synthesizer.registry
    options = registry.options
    lines = [f"engine: {services.settings.engine} on {options.device} ({options.dtype}); models load on first use"]
    lines += registry.startup_report()
    if services.settings.api_keys:
        lines.append("API keys are on: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (/docs: Authorize)")
    return lines


async def _cleanup_loop(services: Services, interval_s: float) -> None:
    """Expired files go, and finished jobs once their outputs have expired (QTTS_FILE_TTL_S after)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await asyncio.to_thread(services.files.cleanup_expired)
            if removed:
                log.info("expired files removed", extra={"count": removed})
            cutoff = time.time() - services.settings.file_ttl_s
            jobs = await asyncio.to_thread(services.jobs.delete_before, cutoff)
            if jobs:
                log.info("expired jobs removed", extra={"count": jobs})
        except Exception:
            log.exception("cleanup failed")
