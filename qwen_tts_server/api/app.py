"""App factory: wires settings, storage, engine and routes; turns every error into clear JSON."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI

from .. import __version__
from ..audio.sources import ReferenceAudioResolver
from ..config import Settings
from ..engine.engine import TTSEngine
from ..metrics import Metrics
from ..storage.files import FileRegistry
from ..storage.voices import VoiceStore
from . import compat, docs, files, models, system, tts, voices
from .error_handlers import install_error_handlers
from .limits import BodyLimit
from .middleware import OPEN_PATHS, install_request_context
from .openai import router as openai_router
from .openai import voices_router as openai_voices_router
from .openai import websocket as openai_websocket

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a route needs, built once per app."""

    settings: Settings
    metrics: Metrics
    files: FileRegistry
    resolver: ReferenceAudioResolver
    engine: TTSEngine
    voices: VoiceStore | None = None  # the voice library (set at start-up)
    ready: bool = False


def create_app(settings: Settings | None = None, *, engine: TTSEngine | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        metrics = engine.metrics if engine is not None else Metrics()
        registry = await asyncio.to_thread(FileRegistry, settings.files_dir, settings.db_path, settings.file_ttl_s)
        services = Services(
            settings=settings,
            metrics=metrics,
            files=registry,
            resolver=ReferenceAudioResolver(registry, settings),
            engine=engine or TTSEngine(settings, metrics=metrics),
            voices=VoiceStore(settings.voices_dir, settings.db_path),
        )
        app.state.services = services
        cleanup = asyncio.create_task(_cleanup_loop(registry, settings.cleanup_interval_s))
        for line in await asyncio.to_thread(_startup_report, services):
            log.info(line)
        services.ready = True
        try:
            yield
        finally:
            services.ready = False
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            await asyncio.to_thread(services.engine.close)  # joins the engines' threads: off the loop
            await asyncio.to_thread(registry.close)
            services.voices.close()

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
    app.include_router(files.router)
    app.include_router(models.router)
    app.include_router(system.router)
    app.add_middleware(BodyLimit, **BodyLimit.limits(settings))  # inside the request context: 413s get its id
    install_request_context(app, settings)
    install_error_handlers(app)
    compat.install_cors(app, settings)  # last: outermost, so preflights never meet the key check
    return app


def _startup_report(services: Services) -> list[str]:
    """What a newcomer needs to see at start: the engine, the models on disk and what happens to the
    others (downloaded on first use, or not at all). Reads the models folder: run it in a thread."""
    registry = services.engine.registry
    options = registry.options
    lines = [f"engine: {services.settings.engine} on {options.device} ({options.dtype}); models load on first use"]
    lines += registry.startup_report()
    if services.settings.api_keys:
        lines.append("API keys are on: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (/docs: Authorize)")
    return lines


async def _cleanup_loop(registry: FileRegistry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await asyncio.to_thread(registry.cleanup_expired)
            if removed:
                log.info("expired files removed", extra={"count": removed})
        except Exception:
            log.exception("file cleanup failed")
