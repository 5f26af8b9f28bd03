"""Model routes: what is available, downloading and loaded, and explicit load / unload.

Only known names are models (see `engine.registry`): any other name is a 404 listing the known ones.
Model names may contain a '/' (`Qwen/<name>`), so the routes take `{name:path}`; a GET on a
`.../load` or `.../unload` path is answered 405 (those are POST actions), never read as a model named
`<name>/load`. `GET /api/v1/speakers` (`speakers_router`) tells what every model speaks (its type,
speakers and languages) without loading any, and the model of each mode by default: the web page's pickers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..engine.registry import ModelDownloading
from ..errors import ServiceError
from .deps import services

router = APIRouter(prefix="/api/v1/models", tags=["models"])
speakers_router = APIRouter(prefix="/api/v1", tags=["models"])

_ACTIONS = ("load", "unload")


@router.get("")
async def list_models(svc=Depends(services)):
    """Every known model (published, configured in QTTS_EXTRA_MODELS, or found in the models folder)
    with its state: available, downloading (with bytes so far and total), loading, loaded or failed."""
    registry = svc.synthesizer.registry
    budget = svc.settings.memory_budget_gb
    return {
        "models": [dataclasses.asdict(status) for status in registry.statuses()],
        "memory": {
            "used_bytes": registry.used_bytes(),
            "budget_bytes": int(budget * 1024**3) if budget else None,
            "device": registry.options.device,
            "dtype": registry.options.dtype,
            "devices": svc.synthesizer.device_loads(),  # per device (the budget applies to each): memory and work
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
    registry = svc.synthesizer.registry
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
    """Load a model now, with its engine's whole warm-up: when this answers, requests for it wait for
    nothing. One that is not on disk starts downloading: 202 with the download's progress (poll this or
    GET /api/v1/models), and POST again once it is `available`."""
    registry = svc.synthesizer.registry
    try:
        model = await svc.synthesizer.load(name)
    except ModelDownloading as exc:
        body = dataclasses.asdict(registry.status(exc.progress.name))
        body["message"] = exc.message
        return JSONResponse(body, status_code=202, headers={"retry-after": str(exc.retry_after_s)})
    return dataclasses.asdict(registry.status(model.name))


@router.post("/{name:path}/unload")
async def unload_model(name: str, svc=Depends(services)):
    """Unload a model: it takes no new work (503 with Retry-After meanwhile), running work gets
    QTTS_UNLOAD_TIMEOUT_S to finish, and the answer comes once its memory is released."""
    unloaded = await svc.synthesizer.unload(name)
    return {"name": svc.synthesizer.registry.key(name), "unloaded": unloaded}


@speakers_router.get("/speakers")
async def list_speakers(svc=Depends(services)):
    """What every known model speaks, without loading any: its type, speakers (CustomVoice models),
    languages and whether it takes `instruct`, from the loaded model or its `config.json` on disk
    (`null` for a model not on disk yet), and the model each endpoint uses by default."""
    registry = svc.synthesizer.registry
    s = svc.settings
    defaults = {
        "custom_voice": s.default_custom_voice_model,
        "voice_design": s.default_voice_design_model,
        "voice_clone": s.default_voice_clone_model,
    }

    def describe_all() -> list[dict[str, Any]]:  # reads the models folder and config files: in a thread
        loaded = {m.name: m for m in registry.loaded()}
        out = []
        for status in registry.statuses():
            model = loaded.get(status.name)
            if model is not None:
                info = model.info
                entry = _speaks(info.model_type, info.size, list(info.speakers), list(info.languages))
            elif status.path:
                entry = _speaks_from_config(Path(status.path) / "config.json")
            else:
                entry = _speaks(None, None, None, None)
            out.append({"name": status.name, "state": status.state.value, **entry})
        return out

    return {
        "defaults": {mode: _key_or_name(registry, name) for mode, name in defaults.items()},
        "models": await asyncio.to_thread(describe_all),
    }


def _key_or_name(registry: Any, name: str) -> str:
    try:
        return registry.canonical_name(name)
    except ServiceError:
        return name


def _speaks(
    model_type: str | None, size: str | None, speakers: list[str] | None, languages: list[str] | None
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "size": size,
        "speakers": speakers,
        "languages": languages,
        # 0.6B CustomVoice checkpoints ignore instruct (see engine.registry.describe)
        "accepts_instruct": None if model_type is None else not (model_type == "custom_voice" and size == "0b6"),
    }


def _speaks_from_config(path: Path) -> dict[str, Any]:
    """Type, size, speakers and languages from a checkpoint's config.json, as upstream reads them
    (speakers: `talker_config.spk_id`; languages: `auto` and `talker_config.codec_language_id` but dialects)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        talker = config.get("talker_config") or {}
        speakers = sorted(str(name).lower() for name in (talker.get("spk_id") or {}))
        languages = ["auto"] + [str(x).lower() for x in (talker.get("codec_language_id") or {}) if "dialect" not in x]
        return _speaks(config.get("tts_model_type"), config.get("tts_model_size"), speakers, languages)
    except (OSError, ValueError, AttributeError, TypeError):
        return _speaks(None, None, None, None)
