"""Schemas of the OpenAI-compatible routes: OpenAI's fields as OpenAI names them, plus optional Qwen
extras (language, seed, sampling, voice cloning) so every mode is reachable from one route."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..schemas import SamplingFields
from ..validation import ReferenceText, SpeechText

SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class VoiceId(BaseModel):
    """OpenAI also accepts a voice as an object: `{"id": "..."}`."""

    id: str


class SpeechRequest(SamplingFields):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"example": {"model": "tts-1", "input": "Hello there.", "voice": "alloy"}},
    )

    model: str = Field(description="tts-1, tts-1-hd, gpt-4o-mini-tts (the configured defaults) or a Qwen3-TTS model.")
    input: SpeechText = Field(description="The text to speak. Long text is spoken as consecutive segments.")
    voice: str | VoiceId | None = Field(
        None,
        description="A built-in speaker (vivian, ryan, ...), an OpenAI voice name (alloy, ash, ...), or one of your "
        "stored voices (name or id; see /v1/audio/voices).",
    )
    instructions: SpeechText | None = Field(
        None, description="Style (CustomVoice 1.7B) or, for a VoiceDesign model, the description of the voice."
    )
    response_format: SpeechFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Tempo, pitch kept (0.25-4.0).")
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="audio: the bytes, chunked as generated; sse: speech.audio.delta/done events."
    )
    # Qwen extras
    language: SpeechText = Field("auto", description="auto, a name (english) or a code (en, zh, ja, ...).")
    ref_audio: ReferenceText | None = Field(
        None,
        description="Voice cloning: a file_id, an http(s) URL, base64 audio, an allowed path, or voice:NAME (a "
        "stored voice).",
    )
    ref_text: SpeechText | None = Field(None, description="Voice cloning: the transcript of ref_audio (ICL mode).")
    x_vector_only: bool = Field(
        False,
        validation_alias=AliasChoices("x_vector_only", "x_vector_only_mode"),
        description="Voice cloning from the speaker embedding alone; ref_text then optional.",
    )

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "qwen-tts-server"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
