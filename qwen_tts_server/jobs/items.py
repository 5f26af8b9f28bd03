"""A job item: checked when the job is submitted, run by whichever runner takes it.

An item is the body of one native synthesis request for one text (`mode` says which endpoint:
custom_voice, voice_design or voice_clone), merged over the job's `options`. It is checked by the
same schema and plan as the route's (api/plans.py) at submission, so a bad item is a 422 naming
`items[i].field` before anything runs, and run again by the same plan in the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..api.plans import Plan, plan_clone, plan_custom_voice, plan_voice_design, store_output
from ..api.schemas import CustomVoiceRequest, SynthesisOptions, VoiceCloneRequest, VoiceDesignRequest
from ..api.speech import Speech
from ..engine.types import SynthesisResult
from ..errors import InvalidRequest, ServiceError
from .store import Item, NewItem

SCHEMAS: dict[str, type[SynthesisOptions]] = {
    "custom_voice": CustomVoiceRequest,
    "voice_design": VoiceDesignRequest,
    "voice_clone": VoiceCloneRequest,
}
# The earlier service's queue names its operations; these are ours.
OPERATIONS = {"voice_clone_enhanced": "voice_clone"}
# Fields that make no sense for an item that is stored, not returned.
NOT_FOR_ITEMS = ("stream", "return_audio_inline", "timeout_s")


@dataclass(frozen=True)
class Outcome:
    file_id: str
    duration_s: float
    finish_reason: str


def parse_item(raw: dict[str, Any], options: dict[str, Any], index: int) -> tuple[str, SynthesisOptions]:
    """The item's mode and request body; InvalidRequest naming `items[index].<field>` otherwise."""
    where = f"items[{index}]"
    merged = {**options, **raw}
    mode = merged.pop("mode", None)
    if mode is None:
        raise InvalidRequest(
            f"{where} has no mode: send mode custom_voice, voice_design or voice_clone (per item or in options)",
            field=f"{where}.mode",
        )
    mode = OPERATIONS.get(str(mode), mode)
    if mode not in SCHEMAS:
        raise InvalidRequest(
            f"{where}.mode '{mode}' is not one of custom_voice, voice_design, voice_clone", field=f"{where}.mode"
        )
    for name in NOT_FOR_ITEMS:
        if merged.get(name):
            raise InvalidRequest(f"{where}.{name} does not apply to job items: drop it", field=f"{where}.{name}")
    if isinstance(merged.get("text"), list):
        raise InvalidRequest(f"{where}.text must be one text: make one item per text", field=f"{where}.text")
    try:
        body = SCHEMAS[mode].model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(part) for part in error["loc"])
        raise InvalidRequest(f"{where}.{loc}: {error['msg']}", field=f"{where}.{loc}") from None
    return mode, body


async def plan_item(svc, mode: str, body: SynthesisOptions, owner: str | None) -> Plan:
    """The item's plan: the route's own checks (texts, languages, stored voices of `owner`)."""
    if mode == "custom_voice":
        return plan_custom_voice(body, svc)  # type: ignore[arg-type]
    if mode == "voice_design":
        return plan_voice_design(body, svc)  # type: ignore[arg-type]
    # Jobs have no one to warn: an item without a transcript clones from the speaker embedding.
    return await plan_clone(body, svc, owner, without_transcript="xvector")  # type: ignore[arg-type]


async def check_items(
    svc, raw_items: list[dict[str, Any]], options: dict[str, Any], owner: str | None
) -> list[NewItem]:
    """Every item checked as its route would check it; the items to store."""
    out = []
    for i, raw in enumerate(raw_items):
        mode, body = parse_item(raw, options, i)
        try:
            await plan_item(svc, mode, body, owner)
            body.sampling(svc.settings)
        except ServiceError as exc:  # the route's error, pointed at the item
            exc.field = f"items[{i}].{exc.field}" if exc.field else f"items[{i}]"
            exc.message = f"items[{i}]: {exc.message}"
            raise
        spec = body.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        custom_id = body.custom_id if isinstance(body.custom_id, str) else None
        out.append(NewItem(mode=mode, spec=spec, custom_id=custom_id))
    return out


@dataclass(frozen=True)
class Generated:
    """An item's audio, not stored yet."""

    result: SynthesisResult
    response_format: str
    name: str


async def generate_item(svc, item: Item, owner: str | None) -> Generated:
    """Generate one item whole."""
    body = SCHEMAS[item.mode].model_validate(item.spec)
    plan = await plan_item(svc, item.mode, body, owner)
    model = await svc.synthesizer.model_for(plan.model, plan.mode)
    items = await plan.build(model)
    [result] = await Speech(svc.synthesizer, model, plan.mode, body.sampling(svc.settings)).whole(items)
    return Generated(result, body.response_format, item.custom_id or f"{item.job_id}-{item.idx:05d}")


def save_item(svc, generated: Generated) -> Outcome:
    """Store an item's audio as an output file (blocking: run it in a thread)."""
    result = generated.result
    record, _ = store_output(svc.files, result, generated.response_format, generated.name)
    return Outcome(record.id, round(result.duration_s, 6), result.finish_reason.value)
