"""Model routes: what is available, downloading and loaded, and explicit load / unload.

Only known names are models (see `engine.registry`): any other name is a 404 listing the known ones.
Model names may contain a '/' (`Qwen/<name>`), so the routes take `{name:path}`; a GET on a
`.../load` or `.../unload` path is answered 405 (those are POST actions), never read as a model named
`<name>/load`.
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..engine.registry import ModelDownloading
from .deps import services

router = APIRouter(prefix="/api/v1/models", tags=["models"])

_ACTIONS = ("load", "unload")


@router.get("")
async def list_models(svc=Depends(services)):
    """Every known model (published, configured in QTTS_EXTRA_MODELS, or found in the models folder)
    with its state: available, downloading (with bytes so far and total), loading, loaded or failed."""
    registry = svc.engine.registry
    budget = svc.settings.memory_budget_gb
    return {
        "models": [dataclasses.asdict(status) for status in registry.statuses()],
        "memory": {
            "used_bytes": registry.used_bytes(),
            "budget_bytes": int(budget * 1024**3) if budget else None,
            "device": registry.options.device,
            "dtype": registry.options.dtype,
        },
        "downloads": {
            "source": svc.settings.download_source,
            "hub_org": svc.settings.hub_org,
            "models_dir": str(svc.settings.models_dir),
        },
    }


@router.get("/{name:path}/load", include_in_schema=False)
@router.get("/{name:path}/unload", include_in_schema=False)
async def action_needs_post(name: str):
    raise HTTPException(
        405,
        detail=f"load and unload are actions: send POST /api/v1/models/{name}/load (or /unload); "
        f"GET /api/v1/models/{name} describes the model",
        headers={"allow": "POST"},
    )


@router.get("/{name:path}")
async def describe_model(name: str, svc=Depends(services)):
    """State of one known model (404 for any other name); when loaded, also its speakers and languages."""
    registry = svc.engine.registry
    status = registry.status(name)
    body = dataclasses.asdict(status)
    loaded = {m.name: m for m in registry.loaded()}.get(status.name)
    if loaded is not None:
        info = loaded.info
        body.update(
            speakers=list(info.speakers),
            languages=list(info.languages),
            size=info.size,
            accepts_instruct=info.accepts_instruct,
        )
    return body


@router.post("/{name:path}/load")
async def load_model(name: str, svc=Depends(services)):
    """Load a model now. One that is not on disk starts downloading: 202 with the download's
    progress (poll this or GET /api/v1/models), and POST again once it is `available`."""
    registry = svc.engine.registry
    try:
        model = await registry.load(name)
    except ModelDownloading as exc:
        body = dataclasses.asdict(registry.status(exc.progress.name))
        body["message"] = exc.message
        return JSONResponse(body, status_code=202, headers={"retry-after": str(exc.retry_after_s)})
    return dataclasses.asdict(registry.status(model.name))


@router.post("/{name:path}/unload")
async def unload_model(name: str, svc=Depends(services)):
    """Unload a model: it takes no new work (503 with Retry-After meanwhile), running work gets
    QTTS_UNLOAD_TIMEOUT_S to finish, and the answer comes once its memory is released."""
    unloaded = await svc.engine.unload(name)
    return {"name": svc.engine.registry.key(name), "unloaded": unloaded}
