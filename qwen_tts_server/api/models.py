"""Model routes: what is available and loaded, and explicit load / unload."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends

from .deps import services

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("")
async def list_models(svc=Depends(services)):
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
    }


@router.get("/{name:path}")
async def describe_model(name: str, svc=Depends(services)):
    """State of one model; when loaded, also its speakers and languages."""
    registry = svc.engine.registry
    body = dataclasses.asdict(registry.status(name))
    loaded = {m.name: m for m in registry.loaded()}.get(registry.canonical_name(name))
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
    model = await svc.engine.registry.load(name)
    return dataclasses.asdict(svc.engine.registry.status(model.name))


@router.post("/{name:path}/unload")
async def unload_model(name: str, svc=Depends(services)):
    unloaded = await svc.engine.unload(name)
    return {"name": svc.engine.registry.canonical_name(name), "unloaded": unloaded}
