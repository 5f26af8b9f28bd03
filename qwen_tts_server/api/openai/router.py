"""Routes of the OpenAI-compatible API: `POST /v1/audio/speech`, `GET /v1/models`.

Streamable formats are sent as they are generated (as OpenAI does); flac is sent whole. With
`stream_format: "sse"` the audio comes as `speech.audio.delta` events, then `speech.audio.done`.
Errors use OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`, see error_shapes).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from ...audio.codec_io import MEDIA_TYPES
from ...audio.encoders import STREAMABLE_FORMATS, check_output_format, encode_audio
from ...engine.registry import PUBLISHED_MODELS, ModelState
from ...engine.synthesizer import check_items
from ...errors import InvalidRequest, ServiceError
from ..deps import owner, services
from ..json_body import OffLoopJSONRoute
from ..lifecycle import until_disconnect
from ..speech import Speech
from ..streaming import audio_stream_response, sse_stream_response
from .protocol import ModelCard, ModelList, SpeechRequest
from .serving import OPENAI_MODELS, PARAMS, input_tokens, resolve_mode, speech_item, stored_voice

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OffLoopJSONRoute)

AUDIO_RESPONSES = {
    200: {
        "description": "The audio (chunked as it is generated), or server-sent events with stream_format sse",
        "content": {**{media: {} for media in sorted(set(MEDIA_TYPES.values()))}, "text/event-stream": {}},
    }
}


@router.post("/audio/speech", response_class=Response, responses=AUDIO_RESPONSES)
async def create_speech(body: SpeechRequest, request: Request) -> Response:
    """OpenAI's speech API: text to audio in one of the three modes (see the fields)."""
    svc = services(request)
    fmt = body.response_format
    check_output_format(fmt)
    if body.stream_format == "sse" and fmt not in STREAMABLE_FORMATS:
        raise InvalidRequest(
            f"response_format '{fmt}' cannot be streamed as events; use one of {', '.join(STREAMABLE_FORMATS)}, "
            "or stream_format 'audio' to get it whole",
            field="stream_format",
        )
    sampling = body.sampling(svc.settings)
    try:
        voice = await stored_voice(svc, body, owner(request))
        model, mode = await until_disconnect(
            request, resolve_mode(svc.synthesizer, body, voice), svc.metrics, body.timeout_s
        )
        item = await until_disconnect(request, speech_item(svc, body, model, mode, voice), svc.metrics, body.timeout_s)
        check_items(model.info, mode, [item])
    except ServiceError as exc:
        exc.field = PARAMS.get(exc.field or "", exc.field)
        raise
    speech = Speech(svc.synthesizer, model, mode, sampling)
    rate = model.info.sample_rate
    if body.stream_format == "sse":
        tokens = input_tokens(model, item.text)
        return await sse_stream_response(request, speech.stream(item), fmt, rate, tokens, body.timeout_s, body.speed)
    if fmt in STREAMABLE_FORMATS:
        return await audio_stream_response(request, speech.stream(item), fmt, rate, body.timeout_s, body.speed)
    (result,) = await until_disconnect(request, speech.whole([item], body.speed), svc.metrics, body.timeout_s)
    data = await asyncio.to_thread(encode_audio, result.samples, result.sample_rate, fmt)
    return Response(data, media_type=MEDIA_TYPES[fmt], headers={"x-finish-reason": result.finish_reason.value})


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """OpenAI's model names (served by the configured defaults) and every model this server knows."""
    registry = services(request).synthesizer.registry
    # A name some request asked for that failed to load, with no checkpoint, is no model of this server.
    statuses = registry.statuses()
    known = [s.name for s in statuses if s.state is not ModelState.FAILED or s.path or s.name in PUBLISHED_MODELS]
    names = [*OPENAI_MODELS, *known]
    return ModelList(data=[ModelCard(id=name) for name in dict.fromkeys(names)])
