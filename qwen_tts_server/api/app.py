"""App factory: wires settings, storage, engine and routes; turns every error into clear JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..audio.sources import ReferenceAudioResolver
from ..config import Settings
from ..engine.engine import TTSEngine
from ..errors import ServiceError, Unauthorized
from ..logs import request_id_var
from ..metrics import Metrics
from ..storage.files import FileRegistry
from . import files, models, system, tts

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes work without a key


@dataclass
class Services:
    """Everything a route needs, built once per app."""

    settings: Settings
    metrics: Metrics
    files: FileRegistry
    resolver: ReferenceAudioResolver
    engine: TTSEngine
    ready: bool = False


def create_app(settings: Settings | None = None, *, engine: TTSEngine | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        metrics = engine.metrics if engine is not None else Metrics()
        registry = FileRegistry(settings.files_dir, settings.db_path, settings.file_ttl_s)
        services = Services(
            settings=settings,
            metrics=metrics,
            files=registry,
            resolver=ReferenceAudioResolver(registry, settings),
            engine=engine or TTSEngine(settings, metrics=metrics),
        )
        app.state.services = services
        cleanup = asyncio.create_task(_cleanup_loop(registry, settings.cleanup_interval_s))
        services.ready = True
        try:
            yield
        finally:
            services.ready = False
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            services.engine.close()
            registry.close()

    app = FastAPI(
        title="Qwen3-TTS server",
        version=__version__,
        description="Custom voice, voice design and voice cloning with Qwen3-TTS-12Hz models.",
        lifespan=lifespan,
    )
    app.include_router(tts.router)
    app.include_router(files.router)
    app.include_router(models.router)
    app.include_router(system.router)
    _install_middleware(app, settings)
    _install_error_handlers(app)
    return app


async def _cleanup_loop(registry: FileRegistry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await asyncio.to_thread(registry.cleanup_expired)
            if removed:
                log.info("expired files removed", extra={"count": removed})
        except Exception:
            log.exception("file cleanup failed")


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    keys = [k.encode() for k in settings.api_keys]

    @app.middleware("http")
    async def request_context(request: Request, call_next):  # type: ignore[no-untyped-def]
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            if keys and request.url.path not in OPEN_PATHS:
                presented = (_presented_key(request) or "").encode()
                if not any(hmac.compare_digest(presented, k) for k in keys):
                    error = Unauthorized(
                        "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                    )
                    response = JSONResponse({"error": error.to_dict()}, status_code=error.status_code)
                else:
                    response = await call_next(request)
            else:
                response = await call_next(request)
            response.headers["x-request-id"] = request_id
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics: Metrics | None = getattr(getattr(request.app.state, "services", None), "metrics", None)
            if metrics is not None:
                metrics.requests.labels(route=path, status=str(response.status_code)).inc()
                metrics.latency.labels(route=path).observe(time.perf_counter() - started)
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.url.path,
                    "status": response.status_code,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            return response
        finally:
            request_id_var.reset(token)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
            # Union types add the member type name to the location; drop it for readability.
            loc = [p for p in loc if not p.startswith(("list[", "str", "int", "float", "bool", "function-"))]
            field = ".".join(loc) or None
            problems.append({"field": field, "message": err.get("msg", "invalid value")})
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else str(first["message"])
        body = {"type": "invalid_request", "message": message, "field": first["field"], "errors": problems}
        return JSONResponse({"error": body}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        message = f"internal error ({type(exc).__name__}); quote request id {request_id_var.get()} when reporting it"
        return JSONResponse({"error": {"type": "internal_error", "message": message}}, status_code=500)
