"""The three synthesis endpoints. Each request (one item or a list) becomes engine items;
results are encoded, stored in the file registry and returned as download URLs, or, with
`"stream": true`, one item's audio is sent back in chunks as it is generated."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..audio.codec_io import FILE_EXTENSIONS, MEDIA_TYPES, encode_audio
from ..audio.encoders import STREAMABLE_FORMATS, check_output_format
from ..audio.sources import ReferenceAudio
from ..engine.registry import LoadedModel
from ..engine.types import Mode, SamplingParams, SynthesisItem, SynthesisResult
from ..errors import InvalidRequest, NotFound
from ..storage.voices import VoiceRecord
from .deps import file_url, owner, services
from .lifecycle import until_disconnect
from .openai.voices import VoiceLookup, check_model_fits, is_reserved, stored_name
from .schemas import (
    AudioItem,
    CustomVoiceRequest,
    SynthesisOptions,
    SynthesisResponse,
    Timing,
    VoiceCloneRequest,
    VoiceDesignRequest,
    batch_size,
    check_languages,
    check_texts,
    custom_ids,
    field_name,
    spread,
)
from .speech import Speech
from .streaming import audio_stream_response

router = APIRouter(prefix="/api/v1", tags=["synthesis"])


STREAM_RESPONSES = {200: {"content": {"application/json": {}, "audio/*": {}}, "description": "JSON, or audio"}}


@router.post(
    "/custom-voice", response_model=SynthesisResponse, response_model_exclude_none=True, responses=STREAM_RESPONSES
)
async def custom_voice(body: CustomVoiceRequest, request: Request, svc=Depends(services)) -> SynthesisResponse:
    """Speak text with a built-in speaker, optionally in a style (`instruct`, 1.7B models)."""
    s = svc.settings
    n = batch_size(_list_fields(body, "text", "speaker", "instruct"), s)
    texts = check_texts("text", body.text, n, s.max_text_chars)
    instructs = check_texts("instruct", body.instruct, n, s.max_instruct_chars, required=False)
    speakers = [str(v).strip().lower() for v in spread(body.speaker, n)]
    languages = check_languages(body.language, n)
    items = [
        SynthesisItem(text=t, language=lang, speaker=spk, instruct=ins)
        for t, lang, spk, ins in zip(texts, languages, speakers, instructs, strict=True)
    ]
    model = body.model or s.default_custom_voice_model
    return await _synthesize(request, body, Mode.CUSTOM_VOICE, model, n, _ready(items))


@router.post(
    "/voice-design", response_model=SynthesisResponse, response_model_exclude_none=True, responses=STREAM_RESPONSES
)
async def voice_design(body: VoiceDesignRequest, request: Request, svc=Depends(services)) -> SynthesisResponse:
    """Speak text in a voice described in words (`instruct`)."""
    s = svc.settings
    n = batch_size(_list_fields(body, "text", "instruct"), s)
    texts = check_texts("text", body.text, n, s.max_text_chars)
    instructs = check_texts("instruct", body.instruct, n, s.max_instruct_chars)
    languages = check_languages(body.language, n)
    items = [
        SynthesisItem(text=t, language=lang, instruct=ins)
        for t, lang, ins in zip(texts, languages, instructs, strict=True)
    ]
    model = body.model or s.default_voice_design_model
    return await _synthesize(request, body, Mode.VOICE_DESIGN, model, n, _ready(items))


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
    """The clone path of every route that clones (this module's and api/compat.py's).

    `references`: audio already received and checked (a multipart upload), by the `ref_audio` string
    that stands for it in `body`. `without_transcript`: what an item without ref_text means, `error`
    (422) or `xvector` (default: QTTS_CLONE_WITHOUT_TRANSCRIPT). `inline_default`: whether results
    carry audio_base64 when the request does not say (default: QTTS_INLINE_AUDIO_DEFAULT). `notes`:
    warnings for the response."""
    s = svc.settings
    given = dict(references or {})
    notes = list(notes or [])
    guessed: list[str] = []  # items cloned by x-vector because they came without a transcript
    n = batch_size(_list_fields(body, "text", "ref_audio", "ref_text", "x_vector_only", "voice"), s)
    texts = check_texts("text", body.text, n, s.max_text_chars)
    ref_texts = check_texts("ref_text", body.ref_text, n, s.max_text_chars, required=False)
    x_vector = [bool(v) for v in spread(body.x_vector_only, n)]
    refs: list[str | None] = [None if v is None else str(v).strip() for v in spread(body.ref_audio, n)]
    names: list[str | None] = [None if v is None else str(v).strip() for v in spread(body.voice, n)]
    name_fields = [field_name("voice", body.voice, i) for i in range(n)]
    for i, ref in enumerate(refs):
        named = stored_name(ref)
        if named is not None and names[i] is None:  # ref_audio "voice:NAME" is voice "NAME"
            refs[i], names[i], name_fields[i] = None, named, field_name("ref_audio", body.ref_audio, i)
    for i, (ref, name, ref_text, xvec) in enumerate(zip(refs, names, ref_texts, x_vector, strict=True)):
        if name is not None:
            if not name:
                raise InvalidRequest(
                    "voice is empty: name one of your voices (GET /api/v1/voices)", field=name_fields[i]
                )
            if ref is not None:
                raise InvalidRequest("send ref_audio or voice, not both", field=name_fields[i])
            if ref_text is not None:
                raise InvalidRequest(
                    f"voice '{name}' carries its own transcript: remove ref_text",
                    field=field_name("ref_text", body.ref_text, i),
                )
            continue
        if ref is None:
            raise InvalidRequest(
                "ref_audio is required: send reference audio (a file_id, an http(s) URL, base64 audio or an "
                "allowed path), or voice: one of your stored voices",
                field=field_name("ref_audio", body.ref_audio, i),
            )
        if not ref:
            raise InvalidRequest(
                "ref_audio is empty: send a file_id, an http(s) URL, base64 audio or an allowed path",
                field=field_name("ref_audio", body.ref_audio, i),
            )
        if ref_text is None and not xvec:
            if (without_transcript or s.clone_without_transcript) != "xvector":
                raise InvalidRequest(
                    "ref_text (the transcript of ref_audio) is required unless x_vector_only is true",
                    field=field_name("ref_text", body.ref_text, i),
                )
            x_vector[i] = True
            guessed.append(field_name("ref_text", body.ref_text, i))
    if guessed:
        missing = "ref_text is missing" if n == 1 else f"ref_text is missing for {len(guessed)} of {n} items"
        notes.append(
            f"{missing}: cloned from the speaker embedding alone (x_vector_only); send ref_text, the words of "
            "ref_audio, for a closer voice"
        )
    languages = check_languages(body.language, n)
    lookup = VoiceLookup(store=svc.voices, owner=owner(request))
    voices = await _stored_voices(lookup, names, name_fields, body.model)

    async def build_items(model: LoadedModel) -> list[SynthesisItem]:
        # Each distinct reference is fetched and hashed once, however many items use it; decoded and
        # encoded only when no prompt for its content is cached.
        unique = list(dict.fromkeys(ref for ref in refs if ref is not None))
        fields = {ref: field_name("ref_audio", body.ref_audio, refs.index(ref)) for ref in unique}
        fetch = [ref for ref in unique if ref not in given]
        resolved = await asyncio.gather(*(svc.resolver.resolve(ref, field=fields[ref], decode=False) for ref in fetch))
        audio = {**dict(zip(fetch, resolved, strict=True)), **{ref: given[ref] for ref in unique if ref in given}}
        prompts = {}
        for ref in unique:
            prompts[ref] = await svc.engine.voice_prompt(model, audio[ref])
        for voice in {v.id: v for v in voices if v is not None}.values():
            prompts[voice.id] = await lookup.prompt(svc.engine, model, voice)
        items = []
        for t, lang, ref, voice, rt, xv in zip(texts, languages, refs, voices, ref_texts, x_vector, strict=True):
            if voice is not None:
                rt, xv, ref = voice.ref_text, xv or voice.x_vector_only, voice.id
            items.append(SynthesisItem(text=t, language=lang, voice=prompts[ref], ref_text=rt, x_vector_only=xv))
        return items

    stored_model = next((v.model for v in voices if v is not None), None)
    model = body.model or stored_model or s.default_voice_clone_model
    return await _synthesize(
        request, body, Mode.VOICE_CLONE, model, n, build_items, inline_default=inline_default, notes=notes
    )


async def _stored_voices(
    lookup: VoiceLookup, names: list[str | None], fields: list[str], model: str | None
) -> list[VoiceRecord | None]:
    """The stored voice of each item (None for items with ref_audio); all must fit one model."""
    found: dict[str, VoiceRecord | None] = {}
    out: list[VoiceRecord | None] = []
    for name, field in zip(names, fields, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in found:
            found[name] = await lookup.stored(name)
        voice = found[name]
        if voice is None:
            hint = " (built-in speakers are spoken on /api/v1/custom-voice)" if is_reserved(name) else ""
            raise NotFound(f"voice '{name}' does not exist: GET /api/v1/voices lists your voices{hint}", field=field)
        first = next((v for v in out if v is not None), None)
        if model is None and first is not None and voice.model != first.model:
            raise InvalidRequest(
                f"voice '{voice.name}' is made for model '{voice.model}' and '{first.name}' for '{first.model}': "
                "one request uses one model; send them in separate requests",
                field=field,
            )
        check_model_fits(voice, model)
        out.append(voice)
    return out


ItemBuilder = Callable[[LoadedModel], Awaitable[list[SynthesisItem]]]


def _list_fields(body: SynthesisOptions, *names: str) -> dict[str, object]:
    return {name: getattr(body, name) for name in (*names, "language", "custom_id")}


def _ready(items: list[SynthesisItem]) -> ItemBuilder:
    async def build(_: LoadedModel) -> list[SynthesisItem]:
        return items

    return build


async def _synthesize(
    request: Request,
    body: SynthesisOptions,
    mode: Mode,
    model_name: str,
    n: int,
    build_items: ItemBuilder,
    *,
    inline_default: bool | None = None,
    notes: list[str] | None = None,
) -> SynthesisResponse | StreamingResponse:
    """Load the model, build the items (clone prompts need the model), then stream the one item, or
    run them all and store each result. A client that leaves cancels the work. Whole results carry
    audio_base64 when the request asks, else when `inline_default` (else QTTS_INLINE_AUDIO_DEFAULT)
    says so, and `warnings`: the request's unknown fields, then `notes`."""
    svc = services(request)
    sampling = body.sampling(svc.settings)
    inline = body.return_audio_inline
    if inline is None:
        inline = svc.settings.inline_audio_default if inline_default is None else inline_default
    warnings = [*body.ignored_fields(), *(notes or [])]
    check_output_format(body.response_format)
    if body.stream:
        _check_streamable(body, n)

    async def prepare() -> tuple[LoadedModel, list[SynthesisItem]]:
        model = await svc.engine.model_for(model_name, mode)
        return model, await build_items(model)

    if body.stream:
        model, items = await until_disconnect(request, prepare(), svc.metrics, body.timeout_s)
        speech = Speech(svc.engine, model, mode, sampling)
        return await audio_stream_response(
            request, speech.stream(items[0]), body.response_format, model.info.sample_rate, body.timeout_s
        )
    return await until_disconnect(
        request, _whole(request, body, mode, n, prepare, sampling, inline, warnings), svc.metrics, body.timeout_s
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
    mode: Mode,
    n: int,
    prepare: Prepare,
    sampling: SamplingParams,
    inline: bool,
    warnings: list[str],
) -> SynthesisResponse:
    """Every item whole, each stored and returned as a download URL (and inline when `inline`)."""
    svc = services(request)
    started = time.perf_counter()
    ids = custom_ids(body.custom_id, n)
    model, items = await prepare()
    loaded = time.perf_counter()
    results = await Speech(svc.engine, model, mode, sampling).whole(items)
    generated = time.perf_counter()
    out = await asyncio.gather(
        *(asyncio.to_thread(_store, request, svc, body, i, ids[i], result, inline) for i, result in enumerate(results))
    )
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


def _store(
    request: Request, svc, body: SynthesisOptions, index: int, custom_id, result: SynthesisResult, inline: bool
) -> AudioItem:
    fmt = body.response_format
    data = encode_audio(result.samples, result.sample_rate, fmt)
    record = svc.files.put(
        data,
        kind="output",
        filename=f"{custom_id or f'item-{index}'}{FILE_EXTENSIONS[fmt]}",
        media_type=MEDIA_TYPES[fmt],
        duration_s=result.duration_s,
        sample_rate=result.sample_rate,
    )
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
