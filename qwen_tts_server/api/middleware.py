"""The request context: an id for every request, the API-key check, metrics and the access log."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request

from .. import web
from ..config import Settings
from ..errors import Forbidden, ServiceError, Unauthorized
from ..logs import request_id_var
from ..metrics import Metrics
from . import docs
from .auth import is_valid, owner_of, presented_key
from .error_handlers import SafeJSON
from .error_shapes import error_body
from .signing import UrlSigner

log = logging.getLogger("qwen_tts_server.api.app")

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes work without a key


def install_request_context(app: FastAPI, settings: Settings) -> None:
    """Per request: an id (header and logs), the API-key check (a signed download needs none), the
    owner the key stands for, metrics and the access log line."""
    keys = settings.api_keys
    # Download URLs are signed while keys are on (deps.file_url); one signer per app, so a random key
    # (no keys, no QTTS_URL_SIGNING_KEY) is the same for the URLs it makes and the checks here.
    signer = app.state.url_signer = UrlSigner.for_settings(settings)

    @app.middleware("http")
    async def request_context(request: Request, call_next):  # type: ignore[no-untyped-def]
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            open_path = request.url.path in OPEN_PATHS or docs.is_open_path(request.url.path)
            if keys and not open_path and not web.is_open_path(request.url.path):
                presented = presented_key(request) or ""
                error: ServiceError | None = None
                valid_key = is_valid(presented, keys)
                if not valid_key:
                    error = Unauthorized(
                        "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                    )
                    try:  # a download by a signed URL needs no key (a browser's <audio src> sends none)
                        if signer.allows(request.method, request.url.path, request.query_params):
                            error = None
                    except Forbidden as refused:
                        error = refused
                if error is not None:
                    body = error_body(request.url.path, error.status_code, error.error_type, error.message, error.field)
                    response = SafeJSON(body, status_code=error.status_code)
                elif valid_key:
                    request.state.owner = owner_of(presented)  # what this key creates is its own
                    response = await call_next(request)
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
