"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from .deps import services

router = APIRouter(tags=["system"])


@router.get("/health")
async def health():
    """The process is up and answering."""
    return {"status": "ok", "version": __version__}


@router.get("/ready")
async def ready(request: Request):
    """Ready to take requests: storage is open, the engine started, and the models of
    QTTS_PRELOAD_MODELS loaded and warmed up (others load on first use).

    503 `starting`, then `loading` while preloading (with the models left), `failed` if a preload
    failed (with why), `engine_failed` while a model's engine is being rebuilt after a device fault
    (or could not be: then the process needs a restart), and `saturated` while a model's queue is
    full (new requests for it get 429): a load balancer sends traffic to another replica meanwhile."""
    svc = getattr(request.app.state, "services", None)
    if svc is None or not svc.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    synthesizer = svc.synthesizer
    loaded = list(dict.fromkeys(m.name for m in synthesizer.registry.loaded()))  # once, if on several devices
    failed = {name: why for name, why in svc.preload_errors.items() if name not in loaded}  # up since: fine
    if svc.preloading:  # with the errors of those being retried (a failed download)
        body = {"status": "loading", "loading_models": svc.preloading, "preload_errors": failed}
        return JSONResponse(body, status_code=503)
    if failed:
        return JSONResponse({"status": "failed", "preload_errors": failed}, status_code=503)
    if synthesizer.engine_failures:
        return JSONResponse(
            {"status": "engine_failed", "engine_failures": synthesizer.engine_failures}, status_code=503
        )
    saturated = synthesizer.gate.saturated()
    body = {
        "status": "saturated" if saturated else "ready",
        "loaded_models": loaded,
        "queue_depth": synthesizer.queue_depth,
        "saturated_models": saturated,
        "devices": synthesizer.device_loads(),  # per device: its models' items in flight against their rows
    }
    return JSONResponse(body, status_code=503 if saturated else 200)


@router.get("/metrics")
async def metrics(svc=Depends(services)) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
