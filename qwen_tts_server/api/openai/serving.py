"""OpenAI speech requests to engine work: which model and mode, which voice, and the item.

The mode follows from the request: `ref_audio` clones a voice (a Base model), and so does a `voice`
that names one of the caller's stored voices (with that voice's model; see voices.py for the order
names are looked up in); otherwise the model's kind decides: a CustomVoice model speaks as `voice`
(a built-in speaker or an OpenAI voice name), a VoiceDesign model speaks in the voice `instructions`
describe. OpenAI's model names (tts-1,
tts-1-hd, gpt-4o-mini-tts) mean the configured default for that mode.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ...config import Settings
from ...engine.registry import LoadedModel
from ...engine.synthesizer import Synthesizer
from ...engine.types import Mode, SynthesisItem
from ...errors import InvalidRequest, NotFound
from ...storage.voices import VoiceRecord
from ..schemas import check_languages, check_texts
from .protocol import SpeechRequest
from .voices import VoiceLookup, check_model_fits, stored_name

if TYPE_CHECKING:
    from ..services import Services

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
_MODES = {"custom_voice": Mode.CUSTOM_VOICE, "voice_design": Mode.VOICE_DESIGN, "base": Mode.VOICE_CLONE}
# Our field names as OpenAI clients know them.
PARAMS = {"text": "input", "speaker": "voice", "instruct": "instructions"}


def default_model(settings: Settings, mode: Mode) -> str:
    return {
        Mode.CUSTOM_VOICE: settings.default_custom_voice_model,
        Mode.VOICE_DESIGN: settings.default_voice_design_model,
        Mode.VOICE_CLONE: settings.default_voice_clone_model,
    }[mode]


def model_name(settings: Settings, requested: str, mode: Mode) -> str:
    if requested in OPENAI_MODELS:
        configured = settings.openai_default_model
        return configured if configured and mode is not Mode.VOICE_CLONE else default_model(settings, mode)
    return requested


async def stored_voice(svc: Services, body: SpeechRequest, owner: str | None) -> VoiceRecord | None:
    """The caller's stored voice the request names (`voice`, or `ref_audio: "voice:NAME"`), else None."""
    lookup = VoiceLookup(store=svc.voices, owner=owner)
    name = stored_name(body.ref_audio)
    if name is not None:
        record = await lookup.stored(name)
        if record is None:
            raise NotFound(f"voice '{name}' does not exist: GET /v1/audio/voices lists your voices", field="ref_audio")
        return record
    if body.ref_audio is not None or not body.voice_name:
        return None
    return await lookup.stored(body.voice_name)


async def resolve_mode(
    synthesizer: Synthesizer, body: SpeechRequest, voice: VoiceRecord | None = None
) -> tuple[LoadedModel, Mode]:
    """The model and mode; `voice`, a stored voice the request names, means cloning with its model."""
    settings = synthesizer.settings
    if voice is not None:
        if body.model not in OPENAI_MODELS:
            check_model_fits(voice, body.model)
        return await synthesizer.model_for(voice.model, Mode.VOICE_CLONE), Mode.VOICE_CLONE
    if body.ref_audio is not None:
        mode = Mode.VOICE_CLONE
    else:
        name = model_name(settings, body.model, Mode.CUSTOM_VOICE)
        kind = (await synthesizer.registry.get(name)).info.model_type
        mode = _MODES[kind]
        if mode is Mode.VOICE_CLONE:
            raise InvalidRequest(
                f"model '{body.model}' clones voices: send ref_audio (and ref_text), or use a CustomVoice model",
                field="ref_audio",
            )
    return await synthesizer.model_for(model_name(settings, body.model, mode), mode), mode


async def speech_item(
    svc: Services, body: SpeechRequest, model: LoadedModel, mode: Mode, voice: VoiceRecord | None = None
) -> SynthesisItem:
    """The request as one engine item (validated; errors name OpenAI's fields)."""
    s = svc.settings
    (text,) = check_texts("input", body.input, 1, s.max_text_chars)
    (instructions,) = check_texts("instructions", body.instructions, 1, s.max_instruct_chars, required=False)
    (language,) = check_languages(body.language, 1)
    assert text is not None
    if mode is Mode.VOICE_DESIGN:
        if instructions is None:
            raise InvalidRequest(
                "instructions are required for a VoiceDesign model: describe the voice, e.g. "
                "'a warm, low female voice, speaking slowly'",
                field="instructions",
            )
        return SynthesisItem(text=text, language=language, instruct=instructions)
    if mode is Mode.VOICE_CLONE and voice is not None:
        return await _stored_item(svc, body, model, text, language, voice)
    if mode is Mode.VOICE_CLONE:
        return await _clone_item(svc, body, model, text, language)
    lookup = VoiceLookup(model.info.speakers)
    if not body.voice_name or not body.voice_name.strip():
        raise InvalidRequest(f"voice is required; choose one of: {', '.join(lookup.names())}", field="voice")
    voice = lookup.resolve(body.voice_name)
    if voice is None:
        raise NotFound(
            f"voice '{body.voice_name}' is not available in model '{model.name}' and is none of your stored "
            f"voices (GET /v1/audio/voices); choose one of: {', '.join(lookup.names())}",
            field="voice",
        )
    return SynthesisItem(text=text, language=language, speaker=voice.speaker, instruct=instructions)


async def _clone_item(
    svc: Services, body: SpeechRequest, model: LoadedModel, text: str, language: str
) -> SynthesisItem:
    (ref_text,) = check_texts("ref_text", body.ref_text, 1, svc.settings.max_text_chars, required=False)
    if ref_text is None and not body.x_vector_only:
        raise InvalidRequest(
            "ref_text (the transcript of ref_audio) is required unless x_vector_only is true", field="ref_text"
        )
    if body.instructions:
        raise InvalidRequest("voice cloning takes no instructions: remove them", field="instructions")
    ref = (body.ref_audio or "").strip()
    if not ref:
        raise InvalidRequest(
            "ref_audio is empty: send a file_id, an http(s) URL, base64 audio or an allowed path", field="ref_audio"
        )
    audio = await svc.resolver.resolve(ref, field="ref_audio", decode=False)  # decoded on a cache miss
    prompt = await svc.synthesizer.voice_prompt(model, audio)
    return SynthesisItem(
        text=text, language=language, voice=prompt, ref_text=ref_text, x_vector_only=body.x_vector_only
    )


async def _stored_item(
    svc: Services, body: SpeechRequest, model: LoadedModel, text: str, language: str, voice: VoiceRecord
) -> SynthesisItem:
    if body.instructions:
        raise InvalidRequest("a stored voice takes no instructions: remove them", field="instructions")
    if body.ref_text is not None:
        raise InvalidRequest(f"voice '{voice.name}' carries its own transcript: remove ref_text", field="ref_text")
    prompt = await VoiceLookup(store=svc.voices).prompt(svc.synthesizer, model, voice)
    return SynthesisItem(
        text=text,
        language=language,
        voice=prompt,
        ref_text=voice.ref_text,
        x_vector_only=voice.x_vector_only or body.x_vector_only,
    )


def input_tokens(model: LoadedModel, text: str) -> int:
    """Text tokens of the input, as the model's tokenizer counts them (for `usage`).

    Counted with a copy of the tokenizer: a Rust fast tokenizer may not be used by two threads at
    once ("Already borrowed"), and the engine builds prompts with the original on worker threads.
    Only the event loop uses the copy."""
    counter = _token_counters.get(id(model.tts))
    if counter is None:
        tokenizer = getattr(getattr(model.tts, "processor", None), "tokenizer", None)
        counter = _token_counters[id(model.tts)] = copy.deepcopy(tokenizer) if tokenizer is not None else False
    return len(counter.encode(text)) if counter else len(text)


_token_counters: dict[int, Any] = {}
