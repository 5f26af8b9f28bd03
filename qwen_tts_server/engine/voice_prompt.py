"""Turn a reference recording into the voice-clone prompt (speaker embedding + reference codes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..audio.codec_io import resample
from .types import VoicePrompt


def compute_voice_prompt(tts: Any, samples: np.ndarray, sample_rate: int) -> VoicePrompt:
    """Speaker embedding and reference codes of one recording, through upstream's encoders.

    Both come from the same 24 kHz audio (resampled with soxr, not librosa, so no numba warm-up on
    a user's first request) whatever mode later uses them: one cached prompt serves ICL and
    x-vector requests alike, on either engine.
    """
    import torch

    upstream = tts.model
    target_sr = int(upstream.speaker_encoder_sample_rate)
    wav = samples if sample_rate == target_sr else resample(samples, sample_rate, target_sr)
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    with torch.inference_mode():
        codes = upstream.speech_tokenizer.encode(wav, sr=target_sr).audio_codes[0]
        embedding = upstream.extract_speaker_embedding(audio=wav, sr=target_sr)
    return VoicePrompt(speaker_embedding=embedding, ref_code=codes)
