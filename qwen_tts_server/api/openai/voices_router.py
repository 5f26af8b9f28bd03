"""OpenAI's custom-voice routes over the voice library: `POST /v1/audio/voices` (multipart, as the
`openai` SDK's `client.audio.voices.create` sends it), `GET /v1/audio/voices` (a list, in OpenAI's
list shape), `GET` and `DELETE /v1/audio/voices/{voice}` (by id, as OpenAI names voices, or name).

`type: "audio_sample"` (the default) clones `audio_sample`; `consent` (OpenAI's consent recording
id) is accepted and not checked. Our extras: `ref_text` (an ICL voice; without it an x-vector
voice), `x_vector_only`, `model` (the Base model; OpenAI's `auto` or a dated version mean the
server's default). `type: "prompt"` designs the voice from `prompt` (a description), speaking
`script_hint` (or a short greeting) as its sample, then clones it (api/voices.py).
Voices are shown as OpenAI's `audio.voice` objects, with our fields added.
"""

from __future__ import annotations

import asyncio
import re
from typing import Literal

from fastapi import APIRouter, File, Form, Request, UploadFile

from ...errors import InvalidRequest
from ...storage.voices import VoiceRecord
from ...text.checks import checked_text
from ..deps import owner, services
from ..files import read_limited
from ..lifecycle import until_disconnect
from ..voices import checked_name, create_designed, create_from_reference

router = APIRouter(prefix="/v1/audio/voices", tags=["openai"])

_DATED = re.compile(r"\d{4}-\d{2}-\d{2}")


def voice_object(record: VoiceRecord) -> dict[str, object]:
    body: dict[str, object] = {
        "id": record.id,
        "object": "audio.voice",
        "name": record.name,
        "created_at": int(record.created_at),
        "type": "prompt" if record.source == "design" else "audio_sample",
    }
    if record.description is not None:
        body["prompt"] = record.description
    return body | {k: v for k, v in record.to_public_dict().items() if k not in body and k != "created_at"}


def _base_model(model: str | None) -> str | None:
    """OpenAI's voice-creation model names (`auto`, a dated version) mean our default Base model."""
    if model is None or not model.strip() or model.strip() == "auto" or _DATED.fullmatch(model.strip()):
        return None
    return model.strip()


@router.post("")
async def create_voice(
    request: Request,
    name: str = Form(description="1-64 letters, digits, spaces, '-', '_' or '.'; unique among your voices."),
    audio_sample: UploadFile | None = File(None, description="The reference recording (type audio_sample)."),
    consent: str | None = Form(None, description="OpenAI's consent recording id: accepted, not checked."),
    type: Literal["audio_sample", "prompt"] = Form("audio_sample"),
    prompt: str | None = Form(None, description="type prompt: a description of the voice to design."),
    script_hint: str | None = Form(None, description="type prompt: what the designed voice says as its sample."),
    ref_text: str | None = Form(None, description="Transcript of audio_sample: an ICL voice (else x-vector)."),
    x_vector_only: bool = Form(False),
    model: str | None = Form(None, description="The Base model the voice is made for; default: the server's."),
    language: str = Form("auto", description="Language of the sample (auto, a name or a code)."),
) -> dict[str, object]:
    """Create a voice from an audio sample, or from a text prompt (design, then clone)."""
    texts = {"name": name, "prompt": prompt, "script_hint": script_hint, "ref_text": ref_text, "model": model}
    for field, value in {**texts, "language": language, "consent": consent}.items():
        if value is not None:
            checked_text(field, value)  # form fields get the same text rules as JSON fields
    svc = services(request)
    who = owner(request)
    if type == "prompt":
        if prompt is None or not prompt.strip():
            raise InvalidRequest("type prompt needs prompt: a description of the voice", field="prompt")
        if audio_sample is not None:
            raise InvalidRequest("type prompt takes no audio_sample (send type audio_sample)", field="audio_sample")
        work = create_designed(
            svc,
            request,
            name=name,
            owner=who,
            description=prompt,
            sample_text=script_hint,
            language=language,
            model_name=_base_model(model),
            design_model=None,
            seed=None,
        )
        record, sample = await until_disconnect(request, work, svc.metrics)
        return voice_object(record) | sample
    if audio_sample is None:
        raise InvalidRequest(
            "audio_sample is required: the recording to clone (or send type prompt)", field="audio_sample"
        )
    voice_name = await checked_name(svc, name, who)
    data = await read_limited(audio_sample, svc.settings.max_upload_bytes, field="audio_sample")
    reference = svc.resolver.from_bytes(data, field="audio_sample", source="upload")
    await reference.decoded()  # bad audio is a 422 before any model work
    work = create_from_reference(
        svc,
        name=voice_name,
        owner=who,
        reference=reference,
        ref_text=ref_text,
        x_vector_only=x_vector_only,
        model_name=_base_model(model),
    )
    return voice_object(await until_disconnect(request, work, svc.metrics))


@router.get("")
async def list_voices(request: Request) -> dict[str, object]:
    svc = services(request)
    records = await asyncio.to_thread(svc.voices.list, owner(request))
    return {"object": "list", "data": [voice_object(record) for record in records]}


@router.get("/{voice}")
async def get_voice(voice: str, request: Request) -> dict[str, object]:
    svc = services(request)
    return voice_object(await asyncio.to_thread(svc.voices.get, voice, owner(request)))


@router.delete("/{voice}")
async def delete_voice(voice: str, request: Request) -> dict[str, object]:
    svc = services(request)
    record = await asyncio.to_thread(svc.voices.delete, voice, owner(request))
    return {"id": record.id, "object": "audio.voice.deleted", "deleted": True, "name": record.name}
