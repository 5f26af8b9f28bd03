"""Request and result types shared by the engine's parts and its callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

FRAME_RATE_HZ = 12.5  # codec frames per second of audio (24 kHz / 1920 samples)
SAMPLES_PER_FRAME = 1920  # 24 kHz samples the codec decodes from one frame


def last_frames(samples: np.ndarray, frames: int) -> np.ndarray:
    """The audio of the last `frames` frames.

    ICL clone audio is decoded with the reference codes in front; upstream cuts them off
    proportionally, which can keep a sample of the reference. The generated audio is exactly
    its own frames.
    """
    return samples[max(0, len(samples) - frames * SAMPLES_PER_FRAME) :]


class FinishReason(str, Enum):
    """How a request ended. Audio cut at its frame limit is `length`, never reported as complete."""

    EOS = "eos"  # the model ended the speech
    LENGTH = "length"  # cut at the frame limit
    CANCELLED = "cancelled"  # client gone, deadline passed, or the model unloaded


class Mode(str, Enum):
    """What a request asks the model to do; each needs its own checkpoint kind."""

    CUSTOM_VOICE = "custom_voice"
    VOICE_DESIGN = "voice_design"
    VOICE_CLONE = "voice_clone"

    @property
    def model_type(self) -> str:
        """The checkpoint's `tts_model_type` that serves this mode."""
        return {"custom_voice": "custom_voice", "voice_design": "voice_design", "voice_clone": "base"}[self.value]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options. None means "the checkpoint's generation_config default".

    Frozen and hashable: requests merge into one batch only when these are equal, because the
    reference runner applies one set of options (and one seed) to a whole batch.
    """

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    # The code predictor's own options (codebooks 1-15); upstream calls them subtalker_*.
    subtalker_do_sample: bool | None = None
    subtalker_temperature: float | None = None
    subtalker_top_k: int | None = None
    subtalker_top_p: float | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Upstream `generate_*` keyword arguments for the options that are set."""
        names = {
            "do_sample": "do_sample",
            "temperature": "temperature",
            "top_k": "top_k",
            "top_p": "top_p",
            "repetition_penalty": "repetition_penalty",
            "max_new_tokens": "max_new_tokens",
            "subtalker_do_sample": "subtalker_dosample",
            "subtalker_temperature": "subtalker_temperature",
            "subtalker_top_k": "subtalker_top_k",
            "subtalker_top_p": "subtalker_top_p",
        }
        return {upstream: getattr(self, ours) for ours, upstream in names.items() if getattr(self, ours) is not None}


@dataclass(frozen=True)
class VoicePrompt:
    """What voice cloning conditions on, computed once per reference audio and cached.

    `ref_code` (codec codes of the reference, frames x 16) is only used in ICL mode;
    `speaker_embedding` (the x-vector) in both.
    """

    speaker_embedding: Any  # torch.Tensor (hidden,)
    ref_code: Any  # torch.Tensor (frames, 16)


@dataclass(frozen=True)
class SynthesisItem:
    """One utterance to generate. Strings are already validated and normalised."""

    text: str
    language: str = "auto"
    speaker: str | None = None
    instruct: str | None = None
    voice: VoicePrompt | None = None
    ref_text: str | None = None
    x_vector_only: bool = False


@dataclass(frozen=True)
class SynthesisResult:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    frames: int
    finish_reason: FinishReason = FinishReason.EOS

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class AudioChunk:
    """A piece of one request's audio while it is generated. The last chunk of a stream carries its
    `finish_reason` (and may be empty); the others carry None."""

    samples: np.ndarray  # float32 mono
    frames: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded checkpoint can do, read from its config."""

    name: str
    model_type: str  # custom_voice | voice_design | base
    size: str  # 0b6 | 1b7
    speakers: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    accepts_instruct: bool = True
    sample_rate: int = 24000
    max_new_tokens_default: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
