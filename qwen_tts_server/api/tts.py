"""The three synthesis endpoints. Each request (one item or a list) becomes engine items;
results are encoded, stored in the file registry and returned as download URLs, or, with
`"stream": true`, one item's audio is sent back in chunks as it is generated."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..audio.codec_io import MEDIA_TYPES
from ..audio.encoders import STREAMABLE_FORMATS, check_output_format
from ..audio.sources import ReferenceAudio
from ..engine.registry import LoadedModel
from ..engine.types import SamplingParams, SynthesisItem, SynthesisResult
from ..errors import InvalidRequest
from .deps import file_url, owner, services
from .json_body import OffLoopJSONRoute
from .lifecycle import until_disconnect
from .plans import Plan, plan_clone, plan_custom_voice, plan_voice_design, store_output
from .schemas import (
    AudioItem,
    CustomVoiceRequest,
    SynthesisOptions,
    SynthesisResponse,
    Timing,
    VoiceCloneRequest,
    VoiceDesignRequest,
    custom_ids,
)
from .speech import Speech
from .streaming import audio_stream_response

if TYPE_CHECKING:
    from ..storage.files import FileRegistry
    from .services import Services

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["synthesis"], route_class=OffLoopJSONRoute)


STREAM_RESPONSES = {200: {"content": {"application/json": {}, "audio/*": {}}, "description": "JSON, or audio"}}


@router.post(
    "/custom-voice", response_model=SynthesisResponse, response_model_exclude_none=True, responses=STREAM_RESPONSES
)
async def custom_voice(body: CustomVoiceRequest, request: Request, svc=Depends(services)) -> SynthesisResponse:
    """Speak text with a built-in speaker, optionally in a style (`instruct`, 1.7B models)."""
    return await _synthesize(request, body, plan_custom_voice(body, svc))


@router.post(
    "/voice-design", response_model=SynthesisResponse, response_model_exclude_none=True, responses=STREAM_RESPONSES
)
async def voice_design(body: VoiceDesignRequest, request: Request, svc=Depends(services)) -> SynthesisResponse:
    """Speak text in a voice described in words (`instruct`)."""
    return await _synthesize(request, body, plan_voice_design(body, svc))


@router.post(
    "/voice-clone", response_model=SynthesisResponse, response_model_exclude_none=True, responses=STREAM_RESPONSES
)
async def voice_clone(body: VoiceCloneRequest, request: Request, svc=Depends(services)) -> SynthesisResponse:
    """Speak text in the voice of a reference recording (with its transcript, or x-vector only), or in
    a stored voice (`voice`, or `ref_audio: "voice:NAME"`)."""
    return await clone(request, body, svc)


async def clone(
    request: Request,
    body: VoiceCloneRequest,
    svc,
    *,
    references: Mapping[str, ReferenceAudio] | None = None,
    without_transcript: str | None = None,
    inline_default: bool | None = None,
    notes: list[str] | None = None,
) -> SynthesisResponse | StreamingResponse:
    """The clone route of every route that clones (this module's and api/compat.py's): see
    `plans.plan_clone` for `references` and `without_transcript`. `inline_default`: whether results
    carry audio_base64 when the request does not say (default: QTTS_INLINE_AUDIO_DEFAULT). `notes`:
    warnings for the response."""
    plan = await plan_clone(body, svc, owner(request), references=references, without_transcript=without_transcript)
    plan.notes[:0] = notes or []
    return await _synthesize(request, body, plan, inline_default=inline_default)


async def _synthesize(
    request: Request, body: SynthesisOptions, plan: Plan, *, inline_default: bool | None = None
) -> SynthesisResponse | StreamingResponse:
    """Load the model, build the items (clone prompts need the model), then stream the one item, or
    run them all and store each result. A client that leaves cancels the work. Whole results carry
    audio_base64 when the request asks, else when `inline_default` (else QTTS_INLINE_AUDIO_DEFAULT)
    says so, and `warnings`: the request's unknown fields, then the plan's notes."""
    svc = services(request)
    sampling = body.sampling(svc.settings)
    inline = body.return_audio_inline
    if inline is None:
        inline = svc.settings.inline_audio_default if inline_default is None else inline_default
    warnings = [*body.ignored_fields(), *plan.notes]
    check_output_format(body.response_format)
    if body.stream:
        _check_streamable(body, plan.n)

    async def prepare() -> tuple[LoadedModel, list[SynthesisItem]]:
        model = await svc.synthesizer.model_for(plan.model, plan.mode)
        return model, await plan.build(model)

    if body.stream:
        model, items = await until_disconnect(request, prepare(), svc.metrics, body.timeout_s)
        speech = Speech(svc.synthesizer, model, plan.mode, sampling)
        return await audio_stream_response(
            request, speech.stream(items[0]), body.response_format, model.info.sample_rate, body.timeout_s
        )
    return await until_disconnect(
        request, _whole(request, body, plan, prepare, sampling, inline, warnings), svc.metrics, body.timeout_s
    )


def _check_streamable(body: SynthesisOptions, n: int) -> None:
    if n != 1:
        raise InvalidRequest(f"stream takes one item, this request has {n}: send one text", field="stream")
    if body.response_format not in STREAMABLE_FORMATS:
        raise InvalidRequest(
            f"response_format '{body.response_format}' cannot be streamed; stream one of "
            f"{', '.join(STREAMABLE_FORMATS)}, or send stream: false for {body.response_format}",
            field="response_format",
        )
    if body.return_audio_inline:
        raise InvalidRequest("a stream is the audio itself: drop return_audio_inline", field="return_audio_inline")


Prepare = Callable[[], Awaitable[tuple[LoadedModel, list[SynthesisItem]]]]


async def _whole(
    request: Request,
    body: SynthesisOptions,
    plan: Plan,
    prepare: Prepare,
    sampling: SamplingParams,
    inline: bool,
    warnings: list[str],
) -> SynthesisResponse:
    """Every item whole, each stored and returned as a download URL (and inline when `inline`)."""
    svc = services(request)
    started = time.perf_counter()
    ids = custom_ids(body.custom_id, plan.n)
    model, items = await prepare()
    loaded = time.perf_counter()
    results = await Speech(svc.synthesizer, model, plan.mode, sampling).whole(items)
    generated = time.perf_counter()
    out = await _store_all(request, svc, body, ids, results, inline)
    done = time.perf_counter()
    return SynthesisResponse(
        model=model.name,
        items=list(out),
        timing=Timing(
            total_ms=round((done - started) * 1000, 1),
            model_ms=round((loaded - started) * 1000, 1),
            generate_ms=round((generated - loaded) * 1000, 1),
            encode_ms=round((done - generated) * 1000, 1),
        ),
        performance=round(done - started, 4),
        warnings=warnings or None,
    )


async def _store_all(
    request: Request,
    svc: Services,
    body: SynthesisOptions,
    ids: list[str | None],
    results: list[SynthesisResult],
    inline: bool,
) -> list[AudioItem]:
    """Store every item's output, or none: if one cannot be stored (a full disk), the ones that were are
    deleted again, so the error the client gets leaves no files behind that it was never told of. The same
    when the request is cancelled (client gone, deadline) while storing: the stores finish in their threads,
    then what they stored goes."""
    stores = asyncio.gather(
        *(asyncio.to_thread(_store, request, svc, body, i, ids[i], result, inline) for i, result in enumerate(results)),
        return_exceptions=True,
    )
    try:
        outcomes = await asyncio.shield(stores)
    except asyncio.CancelledError:
        stores.add_done_callback(functools.partial(_delete_when_stored, svc.files))
        raise
    stored = [item for item in outcomes if isinstance(item, AudioItem)]
    if len(stored) == len(outcomes):
        return stored
    failures = [item for item in outcomes if isinstance(item, BaseException)]
    for other in failures[1:]:
        log.warning("storing another output of the request failed too", exc_info=other)
    await asyncio.to_thread(_delete_outputs, svc.files, stored)
    error = failures[0]
    try:
        raise error
    finally:
        del error, failures, outcomes  # the traceback holds this frame: no cycle through it


def _delete_when_stored(files: FileRegistry, stores: asyncio.Future[list[AudioItem | BaseException]]) -> None:
    """After a cancelled request's stores finished: delete what they stored, off the event loop."""
    if not stores.cancelled():
        stored = [item for item in stores.result() if isinstance(item, AudioItem)]
        asyncio.get_running_loop().run_in_executor(None, _delete_outputs, files, stored)


def _delete_outputs(files: FileRegistry, items: list[AudioItem]) -> None:
    """Delete outputs the client was never told of. A failure only logs: the file expires with its TTL, and
    the client gets the error that made the request fail, not this one."""
    for item in items:
        try:
            files.delete(item.file_id)
        except Exception:
            log.warning("could not delete output %s after a failed store", item.file_id, exc_info=True)


def _store(
    request: Request, svc, body: SynthesisOptions, index: int, custom_id, result: SynthesisResult, inline: bool
) -> AudioItem:
    fmt = body.response_format
    record, data = store_output(svc.files, result, fmt, custom_id or f"item-{index}")
    return AudioItem(
        index=index,
        custom_id=custom_id,
        file_id=record.id,
        url=file_url(request, record.id, expires_at=record.expires_at),
        format=fmt,
        media_type=MEDIA_TYPES[fmt],
        sample_rate=result.sample_rate,
        duration_s=round(result.duration_s, 6),
        frames=result.frames,
        finish_reason=result.finish_reason.value,
        audio_base64=base64.b64encode(data).decode("ascii") if inline else None,
    )
