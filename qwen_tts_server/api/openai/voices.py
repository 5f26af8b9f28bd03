"""The `voice` of a speech request: what it names, and how it is found. The one place a voice name
is looked up, for `/v1/audio/speech`, the WebSocket and the native clone endpoint.

Order (first match wins):
1. `ref_audio` (unless it is `voice:NAME`) clones from that audio; `voice` is not looked up.
2. OpenAI's voice names (alloy, ash, ...) and the speakers of the published CustomVoice checkpoints
   (vivian, ryan, ...), any case: the built-in speaker. These names mean the same for every client
   and never change meaning, so a stored voice cannot take one (creating it is a 409).
3. The caller's stored voices (voice library), by name (any case) or id (`voice-<hex>`, as OpenAI's
   `{"id": ...}` form sends it): voice cloning with that voice's Base model and stored prompt. With
   API keys on, only voices created with the same key are seen; another key's voice is not found.
4. Any other speaker of the requested CustomVoice model (an operator's own checkpoint).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import InvalidRequest
from ...storage.voices import VoiceRecord, VoiceStore

if TYPE_CHECKING:
    from ...engine.registry import LoadedModel
    from ...engine.synthesizer import Synthesizer
    from ...engine.types import VoicePrompt

# OpenAI voice -> built-in speaker, by the voice's character (English-capable speakers first).
OPENAI_VOICES: dict[str, str] = {
    "alloy": "vivian",
    "ash": "ryan",
    "ballad": "aiden",
    "coral": "serena",
    "echo": "aiden",
    "fable": "ryan",
    "onyx": "uncle_fu",
    "nova": "vivian",
    "sage": "serena",
    "shimmer": "serena",
    "verse": "ryan",
    "marin": "vivian",
    "cedar": "aiden",
}
# The speakers of the published CustomVoice checkpoints.
BUILTIN_SPEAKERS = ("vivian", "serena", "uncle_fu", "dylan", "eric", "ryan", "aiden", "ono_anna", "sohee")
VOICE_PREFIX = "voice:"  # `ref_audio: "voice:NAME"` names a stored voice


def is_reserved(name: str) -> bool:
    """A built-in name (step 2 above): no stored voice may have it."""
    key = name.strip().lower()
    return key in OPENAI_VOICES or key in BUILTIN_SPEAKERS


def stored_name(ref_audio: str | None) -> str | None:
    """NAME of a `ref_audio: "voice:NAME"`, else None."""
    if ref_audio is None or ref_audio.strip()[: len(VOICE_PREFIX)].lower() != VOICE_PREFIX:
        return None
    return ref_audio.strip()[len(VOICE_PREFIX) :].strip()


@dataclass(frozen=True)
class Voice:
    """A resolved voice: a built-in speaker of a CustomVoice model."""

    name: str  # as the client sent it
    speaker: str


class VoiceLookup:
    def __init__(
        self, speakers: tuple[str, ...] = (), *, store: VoiceStore | None = None, owner: str | None = None
    ) -> None:
        self.speakers = tuple(s.lower() for s in speakers)
        self.store = store
        self.owner = owner

    def resolve(self, name: str) -> Voice | None:
        """A built-in speaker of this model (steps 2 and 4)."""
        key = name.strip().lower()
        if key in self.speakers:
            return Voice(name, key)
        speaker = OPENAI_VOICES.get(key)
        if speaker is not None and speaker in self.speakers:
            return Voice(name, speaker)
        return None

    async def stored(self, name: str) -> VoiceRecord | None:
        """The caller's stored voice by this name or id (step 3); None for a built-in name (step 2)."""
        if self.store is None or not name or not name.strip() or is_reserved(name):
            return None
        return await asyncio.to_thread(self.store.find, name, self.owner)

    def names(self) -> list[str]:
        """Every built-in name `resolve` accepts, speakers first."""
        return [*self.speakers, *(v for v, s in OPENAI_VOICES.items() if s in self.speakers)]

    async def prompt(self, synthesizer: Synthesizer, model: LoadedModel, voice: VoiceRecord) -> VoicePrompt:
        """A stored voice's prompt on `model`'s device, through the voice-prompt cache (keyed by its
        audio's content, like any reference)."""
        assert self.store is not None
        store = self.store
        return await synthesizer.stored_voice_prompt(
            model, f"sha256:{voice.audio_sha256}", lambda device: store.load_prompt(voice.id, device)
        )


def check_model_fits(voice: VoiceRecord, requested: str | None, field: str = "model") -> None:
    """A stored prompt fits only the model it was computed with."""
    if requested is None:
        return
    if requested.strip().rsplit("/", 1)[-1] != voice.model:
        raise InvalidRequest(
            f"voice '{voice.name}' was made with model '{voice.model}' and only works with it: send "
            f"model '{voice.model}' (or leave model out / use tts-1 on /v1)",
            field=field,
        )
