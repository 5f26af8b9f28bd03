"""Loaded tiny models and a voice prompt, shared by the fast-engine tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_tts_server.engine.types import VoicePrompt

from .helpers import synthetic_voice


@pytest.fixture(scope="session")
def load_tts(tiny_models_dir: Path) -> Callable[[str], Any]:
    """Upstream `Qwen3TTSModel` for a published name (fp32, CPU, sdpa), loaded once per session."""
    from qwen_tts import Qwen3TTSModel

    cache: dict[str, Any] = {}

    def load(name: str) -> Any:
        if name not in cache:
            cache[name] = Qwen3TTSModel.from_pretrained(
                str(tiny_models_dir / name), device_map="cpu", dtype=torch.float32, attn_implementation="sdpa"
            )
        return cache[name]

    return load


@pytest.fixture(scope="session")
def voice(load_tts: Callable[[str], Any]) -> VoicePrompt:
    """A voice prompt from 1.5 s of synthetic audio, computed the way upstream's wrapper does."""
    model = load_tts("Qwen3-TTS-12Hz-0.6B-Base").model
    wav, sr = synthetic_voice()
    with torch.inference_mode():
        ref_code = model.speech_tokenizer.encode(wav, sr=sr).audio_codes[0]
        embedding = model.extract_speaker_embedding(audio=wav, sr=sr)
    return VoicePrompt(speaker_embedding=embedding, ref_code=ref_code)
