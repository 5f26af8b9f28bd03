"""The voice library, native routes (`/api/v1/voices`), and the creation steps the OpenAI-style
routes (`/v1/audio/voices`, openai/voices_router.py) share.

A voice is a named cloning prompt, computed once at creation with a Base model and stored (see
storage/voices.py); its name then works as `voice` in `/v1/audio/speech` and the WebSocket, and as
`voice` (or `ref_audio: "voice:NAME"`) on `/api/v1/voice-clone`. It is made

- from reference audio (a file_id, URL, base64, an allowed path, or an upload on /v1): with
  `ref_text` an ICL voice (reference codes + transcript), without it an x-vector voice;
- from a description ("design, then clone"): the VoiceDesign model speaks `sample_text` in the
  described voice, and the Base model takes that audio, with `sample_text` as its transcript, as
  the reference (ICL). One call, one stored voice; the sample is also kept as an output file.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..audio.codec_io import MEDIA_TYPES, encode_audio
from ..audio.sources import ReferenceAudio
from ..engine.types import FRAME_RATE_HZ, FinishReason, Mode, SamplingParams, SynthesisItem
from ..errors import Conflict, InvalidRequest
from ..storage.voices import VoiceRecord, check_name
from .deps import file_url, owner, services
from .json_body import OffLoopJSONRoute
from .lifecycle import until_disconnect
from .openai.voices import is_reserved
from .schemas import check_languages, check_texts
from .speech import Speech
from .validation import ReferenceText, Seed, SpeechText

if TYPE_CHECKING:
    from .services import Services

router = APIRouter(prefix="/api/v1/voices", tags=["voices"], route_class=OffLoopJSONRoute)

# What a designed voice says when the request gives no sample_text: a few calm sentences in the
# voice's language (a reference of a few seconds; the Base model clones best from natural speech).
SAMPLE_TEXTS = {
    "english": "Hello! This is my voice. I am glad to read your words aloud, clearly and naturally, at a calm pace.",
    "chinese": "你好！这是我的声音。我很乐意用清晰自然的语气，为你朗读任何文字。",
    "japanese": "こんにちは。これは私の声です。どんな文章でも、はっきりと自然に読み上げます。",
    "korean": "안녕하세요. 이것은 제 목소리입니다. 어떤 글이든 또렷하고 자연스럽게 읽어 드릴게요.",
    "german": "Hallo! Das ist meine Stimme. Ich lese Ihnen gern jeden Text klar und natürlich vor.",
    "french": "Bonjour ! Voici ma voix. Je lis volontiers n'importe quel texte, clairement et naturellement.",
    "russian": "Здравствуйте! Это мой голос. Я с удовольствием прочитаю любой текст чётко и естественно.",
    "portuguese": "Olá! Esta é a minha voz. Leio qualquer texto com prazer, de forma clara e natural.",
    "spanish": "¡Hola! Esta es mi voz. Leo con gusto cualquier texto, de forma clara y natural.",
    "italian": "Ciao! Questa è la mia voce. Leggo volentieri qualsiasi testo, in modo chiaro e naturale.",
}


class CreateVoiceRequest(BaseModel):
    """Either `ref_audio` (+ optional `ref_text`, `x_vector_only`) or `description` (+ optional
    `sample_text`, `language`, `design_model`, `seed`)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {"name": "narrator", "ref_audio": "file-0123abcd...", "ref_text": "What the clip says."},
                {"name": "captain", "description": "A gruff, low male voice, speaking slowly", "language": "en"},
            ]
        },
    )

    name: str = Field(description="1-64 letters, digits, spaces, '-', '_' or '.'; unique among your voices.")
    model: SpeechText | None = Field(
        None, description="The Base model the voice is made for (it only works with that one); default: the server's."
    )
    ref_audio: ReferenceText | None = Field(
        None, description="A file_id from /api/v1/files/upload, an http(s) URL, base64 audio, or an allowed path."
    )
    ref_text: SpeechText | None = Field(
        None, description="Transcript of ref_audio: an ICL voice. Without it: an x-vector voice."
    )
    x_vector_only: bool = Field(
        False,
        validation_alias=AliasChoices("x_vector_only", "x_vector_only_mode"),
        description="Keep only the speaker embedding even with a transcript.",
    )
    description: SpeechText | None = Field(
        None, description="Design the voice from this description instead of reference audio."
    )
    sample_text: SpeechText | None = Field(
        None, description="What the designed voice says as its reference (default: a short greeting)."
    )
    language: SpeechText = Field("auto", description="Language of sample_text (auto, a name or a code).")
    design_model: SpeechText | None = Field(None, description="The VoiceDesign model; default: the server's.")
    seed: Seed | None = Field(None, description="Seed of the designed sample (the same seed, the same voice).")
    timeout_s: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False)


# ----- routes -----
@router.post("", status_code=201)
async def create_voice(body: CreateVoiceRequest, request: Request, svc=Depends(services)) -> dict[str, object]:
    """Create a voice from reference audio, or from a description (design, then clone)."""
    if (body.ref_audio is None) == (body.description is None):
        raise InvalidRequest(
            "send either ref_audio (reference audio) or description (a voice to design), not both or neither",
            field="ref_audio" if body.ref_audio is None else "description",
        )
    who = owner(request)
    if body.description is not None:
        for name in ("ref_text", "x_vector_only"):
            if getattr(body, name):
                raise InvalidRequest(
                    f"{name} goes with ref_audio: a designed voice's transcript is its sample_text", field=name
                )
        work = create_designed(
            svc,
            request,
            name=body.name,
            owner=who,
            description=body.description,
            sample_text=body.sample_text,
            language=body.language,
            model_name=body.model,
            design_model=body.design_model,
            seed=body.seed,
        )
        record, sample = await until_disconnect(request, work, svc.metrics, body.timeout_s)
        return {**record.to_public_dict(), **sample}
    for name in ("sample_text", "design_model", "seed"):
        if getattr(body, name) is not None:
            raise InvalidRequest(f"{name} goes with description (a designed voice), not with ref_audio", field=name)
    name = await checked_name(svc, body.name, who)
    assert body.ref_audio is not None
    reference = await svc.resolver.resolve(body.ref_audio, field="ref_audio")
    work = create_from_reference(
        svc,
        name=name,
        owner=who,
        reference=reference,
        ref_text=body.ref_text,
        x_vector_only=body.x_vector_only,
        model_name=body.model,
    )
    record = await until_disconnect(request, work, svc.metrics, body.timeout_s)
    return record.to_public_dict()


@router.get("")
async def list_voices(request: Request, svc=Depends(services)) -> dict[str, object]:
    """Your voices (with API keys on: the ones created with your key), oldest first."""
    records = await asyncio.to_thread(svc.voices.list, owner(request))
    return {"voices": [record.to_public_dict() for record in records]}


@router.get("/{name}")
async def get_voice(name: str, request: Request, svc=Depends(services)) -> dict[str, object]:
    """One of your voices, by name or id."""
    record = await asyncio.to_thread(svc.voices.get, name, owner(request))
    return record.to_public_dict()


@router.delete("/{name}")
async def delete_voice(name: str, request: Request, svc=Depends(services)) -> dict[str, object]:
    record = await asyncio.to_thread(svc.voices.delete, name, owner(request))
    return {"id": record.id, "name": record.name, "deleted": True}


# ----- creation, shared with /v1/audio/voices -----
async def checked_name(svc: Services, name: str, who: str | None) -> str:
    """The name, valid (422), not a built-in voice's and not one of this owner's voices (409)."""
    name = check_name(name)
    if is_reserved(name):
        raise Conflict(
            f"'{name}' is a built-in voice (an OpenAI voice name or a built-in speaker) and keeps that meaning: "
            "choose another name",
            field="name",
        )
    await asyncio.to_thread(svc.voices.ensure_free, name, who)
    return name


async def create_from_reference(
    svc: Services,
    *,
    name: str,
    owner: str | None,
    reference: ReferenceAudio,
    ref_text: str | None,
    x_vector_only: bool,
    model_name: str | None,
    **details: str,
) -> VoiceRecord:
    """Compute the prompt of `reference` (decoded already) with the Base model and store it, with
    `details` (a designed voice's description, sample text and language)."""
    (transcript,) = check_texts("ref_text", ref_text, 1, svc.settings.max_text_chars, required=False)
    model = await svc.synthesizer.model_for(model_name or svc.settings.default_voice_clone_model, Mode.VOICE_CLONE)
    prompt = await svc.synthesizer.voice_prompt(model, reference)
    return await asyncio.to_thread(
        svc.voices.create,
        name=name,
        owner=owner,
        model=model.name,
        prompt=prompt,
        audio_sha256=reference.cache_key.removeprefix("sha256:"),
        source=reference.source,
        ref_text=transcript,
        x_vector_only=x_vector_only or transcript is None,
        duration_s=reference.audio.duration_s,
        **details,
    )


async def create_designed(
    svc: Services,
    request: Request,
    *,
    name: str,
    owner: str | None,
    description: str,
    sample_text: str | None,
    language: str,
    model_name: str | None,
    design_model: str | None,
    seed: int | None,
) -> tuple[VoiceRecord, dict[str, object]]:
    """Design, then clone: the VoiceDesign model speaks the sample in the described voice; the Base
    model computes the prompt from that audio with the sample as its transcript. Returns the voice
    and where its sample can be heard (an output file, with the usual lifetime)."""
    s = svc.settings
    name = await checked_name(svc, name, owner)
    (description,) = check_texts("description", description, 1, s.max_instruct_chars)
    (lang,) = check_languages(language, 1)
    if sample_text is None:
        sample_text = SAMPLE_TEXTS.get(lang, SAMPLE_TEXTS["english"])
    (text,) = check_texts("sample_text", sample_text, 1, s.max_text_chars)
    assert description is not None and text is not None
    designer = await svc.synthesizer.model_for(design_model or s.default_voice_design_model, Mode.VOICE_DESIGN)
    # The sample must fit the reference length the Base model takes: it may run to max_ref_audio_s.
    sampling = SamplingParams(seed=seed, max_new_tokens=max(1, int(s.max_ref_audio_s * FRAME_RATE_HZ)))
    item = SynthesisItem(text=text, language=lang, instruct=description)
    (result,) = await Speech(svc.synthesizer, designer, Mode.VOICE_DESIGN, sampling).whole([item])
    if result.finish_reason is not FinishReason.EOS or result.duration_s > s.max_ref_audio_s:
        raise InvalidRequest(
            f"the designed sample did not end within {s.max_ref_audio_s:g} s (the longest reference this server "
            "takes): send a shorter sample_text",
            field="sample_text",
        )
    if result.duration_s < s.min_ref_audio_s:
        raise InvalidRequest(
            f"the designed sample is {result.duration_s:.2f} s of audio, under the {s.min_ref_audio_s:g} s a "
            "reference needs: send a longer sample_text",
            field="sample_text",
        )
    # The reference is the WAV file of the sample, exactly as a client would send it back: the prompt
    # is computed from its decoded samples, so its content key (the file's hash) is the right one.
    wav = await asyncio.to_thread(encode_audio, result.samples, result.sample_rate, "wav")
    reference = svc.resolver.from_bytes(wav, field="sample_text", source="design")
    await reference.decoded()
    record = await create_from_reference(
        svc,
        name=name,
        owner=owner,
        reference=reference,
        ref_text=text,
        x_vector_only=False,
        model_name=model_name,
        description=description,
        sample_text=text,
        language=lang,
    )
    try:
        sample = await asyncio.to_thread(
            svc.files.put,
            wav,
            kind="output",
            filename=f"voice-sample-{record.id}.wav",
            media_type=MEDIA_TYPES["wav"],
            duration_s=result.duration_s,
            sample_rate=result.sample_rate,
        )
    except BaseException:  # e.g. a full disk: no voice without its sample, and the client's retry finds the name free
        with contextlib.suppress(Exception):  # the sample's error is the one to report
            await asyncio.to_thread(svc.voices.delete, record.id, owner)
        raise
    return record, {"sample_file_id": sample.id, "sample_url": file_url(request, sample.id)}
