"""From a validated native request body to engine items, without an HTTP request: the synthesis
routes (api/tts.py) and job items (jobs/) share these, so an item runs by the same rules whether it
came in a request or in a job.

A `Plan` is checked up front (texts, languages, which voice or reference each item uses) and builds
its items once the model is loaded (clone prompts need the model)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from ..audio.codec_io import FILE_EXTENSIONS, MEDIA_TYPES, encode_audio
from ..audio.sources import ReferenceAudio
from ..engine.registry import LoadedModel
from ..engine.types import Mode, SynthesisItem, SynthesisResult
from ..errors import InvalidRequest, NotFound
from ..storage.files import FileRecord, FileRegistry
from ..storage.voices import VoiceRecord
from .openai.voices import VoiceLookup, check_model_fits, is_reserved, stored_name
from .schemas import (
    CustomVoiceRequest,
    SynthesisOptions,
    VoiceCloneRequest,
    VoiceDesignRequest,
    batch_size,
    check_languages,
    check_texts,
    field_name,
    spread,
)

ItemBuilder = Callable[[LoadedModel], Awaitable[list[SynthesisItem]]]


@dataclass
class Plan:
    """What a request asks for: `n` items of `mode` on model `model`, built by `build`."""

    mode: Mode
    model: str
    n: int
    build: ItemBuilder
    notes: list[str] = field(default_factory=list)  # warnings for the response


def plan_custom_voice(body: CustomVoiceRequest, svc) -> Plan:
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
    return Plan(Mode.CUSTOM_VOICE, body.model or s.default_custom_voice_model, n, _ready(items))


def plan_voice_design(body: VoiceDesignRequest, svc) -> Plan:
    s = svc.settings
    n = batch_size(_list_fields(body, "text", "instruct"), s)
    texts = check_texts("text", body.text, n, s.max_text_chars)
    instructs = check_texts("instruct", body.instruct, n, s.max_instruct_chars)
    languages = check_languages(body.language, n)
    items = [
        SynthesisItem(text=t, language=lang, instruct=ins)
        for t, lang, ins in zip(texts, languages, instructs, strict=True)
    ]
    return Plan(Mode.VOICE_DESIGN, body.model or s.default_voice_design_model, n, _ready(items))


async def plan_clone(
    body: VoiceCloneRequest,
    svc,
    owner: str | None,
    *,
    references: Mapping[str, ReferenceAudio] | None = None,
    without_transcript: str | None = None,
) -> Plan:
    """The clone plan of every path that clones (routes, compatibility routes, job items).

    `references`: audio already received and checked (a multipart upload), by the `ref_audio` string
    that stands for it in `body`. `without_transcript`: what an item without ref_text means, `error`
    (422) or `xvector` (default: QTTS_CLONE_WITHOUT_TRANSCRIPT). Stored voices are looked up as
    `owner`'s."""
    s = svc.settings
    given = dict(references or {})
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
            _check_voice_item(body, i, name, ref, ref_text, name_fields[i])
            continue
        _check_reference_item(body, i, ref)
        if ref_text is None and not xvec:
            if (without_transcript or s.clone_without_transcript) != "xvector":
                raise InvalidRequest(
                    "ref_text (the transcript of ref_audio) is required unless x_vector_only is true",
                    field=field_name("ref_text", body.ref_text, i),
                )
            x_vector[i] = True
            guessed.append(field_name("ref_text", body.ref_text, i))
    notes = []
    if guessed:
        missing = "ref_text is missing" if n == 1 else f"ref_text is missing for {len(guessed)} of {n} items"
        notes.append(
            f"{missing}: cloned from the speaker embedding alone (x_vector_only); send ref_text, the words of "
            "ref_audio, for a closer voice"
        )
    languages = check_languages(body.language, n)
    lookup = VoiceLookup(store=svc.voices, owner=owner)
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
            prompts[ref] = await svc.synthesizer.voice_prompt(model, audio[ref])
        for voice in {v.id: v for v in voices if v is not None}.values():
            prompts[voice.id] = await lookup.prompt(svc.synthesizer, model, voice)
        items = []
        for t, lang, ref, voice, rt, xv in zip(texts, languages, refs, voices, ref_texts, x_vector, strict=True):
            if voice is not None:
                rt, xv, ref = voice.ref_text, xv or voice.x_vector_only, voice.id
            items.append(SynthesisItem(text=t, language=lang, voice=prompts[ref], ref_text=rt, x_vector_only=xv))
        return items

    stored_model = next((v.model for v in voices if v is not None), None)
    model = body.model or stored_model or s.default_voice_clone_model
    return Plan(Mode.VOICE_CLONE, model, n, build_items, notes)


def store_output(
    files: FileRegistry, result: SynthesisResult, fmt: str, name: str, *, ttl_s: float | None = None
) -> tuple[FileRecord, bytes]:
    """Encode one result and store it as an output file named `name` + the format's extension."""
    data = encode_audio(result.samples, result.sample_rate, fmt)
    record = files.put(
        data,
        kind="output",
        filename=f"{name}{FILE_EXTENSIONS[fmt]}",
        media_type=MEDIA_TYPES[fmt],
        duration_s=result.duration_s,
        sample_rate=result.sample_rate,
        ttl_s=ttl_s,
    )
    return record, data


def _check_voice_item(body: VoiceCloneRequest, i: int, name: str, ref: str | None, ref_text, where: str) -> None:
    if not name:
        raise InvalidRequest("voice is empty: name one of your voices (GET /api/v1/voices)", field=where)
    if ref is not None:
        raise InvalidRequest("send ref_audio or voice, not both", field=where)
    if ref_text is not None:
        raise InvalidRequest(
            f"voice '{name}' carries its own transcript: remove ref_text",
            field=field_name("ref_text", body.ref_text, i),
        )


def _check_reference_item(body: VoiceCloneRequest, i: int, ref: str | None) -> None:
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


async def _stored_voices(
    lookup: VoiceLookup, names: list[str | None], fields: list[str], model: str | None
) -> list[VoiceRecord | None]:
    """The stored voice of each item (None for items with ref_audio); all must fit one model."""
    found: dict[str, VoiceRecord | None] = {}
    out: list[VoiceRecord | None] = []
    for name, where in zip(names, fields, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in found:
            found[name] = await lookup.stored(name)
        voice = found[name]
        if voice is None:
            hint = " (built-in speakers are spoken on /api/v1/custom-voice)" if is_reserved(name) else ""
            raise NotFound(f"voice '{name}' does not exist: GET /api/v1/voices lists your voices{hint}", field=where)
        first = next((v for v in out if v is not None), None)
        if model is None and first is not None and voice.model != first.model:
            raise InvalidRequest(
                f"voice '{voice.name}' is made for model '{voice.model}' and '{first.name}' for '{first.model}': "
                "one request uses one model; send them in separate requests",
                field=where,
            )
        check_model_fits(voice, model)
        out.append(voice)
    return out


def _list_fields(body: SynthesisOptions, *names: str) -> dict[str, object]:
    return {name: getattr(body, name) for name in (*names, "language", "custom_id")}


def _ready(items: list[SynthesisItem]) -> ItemBuilder:
    async def build(_: LoadedModel) -> list[SynthesisItem]:
        return items

    return build
