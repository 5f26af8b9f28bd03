"""Helpers for the API tests: settings on the tiny checkpoints, audio, uploads, errors."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from fastapi.testclient import TestClient

from qwen_tts_server.config import Settings

CUSTOM_06 = "Qwen3-TTS-12Hz-0.6B-CustomVoice"
CUSTOM_17 = "Qwen3-TTS-12Hz-1.7B-CustomVoice"
DESIGN_17 = "Qwen3-TTS-12Hz-1.7B-VoiceDesign"
BASE_06 = "Qwen3-TTS-12Hz-0.6B-Base"
BASE_17 = "Qwen3-TTS-12Hz-1.7B-Base"


def settings_for(**overrides: object) -> Settings:
    """Settings for tests: CPU, fp32, no downloads; `models_dir` and `data_dir` are required."""
    values: dict[str, object] = {
        "download_source": "none",
        "device": "cpu",
        "dtype": "float32",
        "batch_window_ms": 10.0,
        "min_ref_audio_s": 0.5,
        "max_ref_audio_s": 10.0,
        "log_json": False,
    }
    values.update(overrides)
    return Settings(**values)


def sine_wav(seconds: float = 1.5, sample_rate: int = 24000, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(0)
    samples = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def upload(client: TestClient, data: bytes | None = None, filename: str = "ref.wav") -> str:
    response = client.post("/api/v1/files/upload", files={"file": (filename, data or sine_wav(), "audio/wav")})
    assert response.status_code == 201, response.text
    return response.json()["file_id"]


def loaded_model(client: TestClient, name: str):
    """The upstream model object the server loaded (to hook it in tests)."""
    response = client.post(f"/api/v1/models/{name}/load")
    assert response.status_code == 200, response.text
    registry = client.app.state.services.engine.registry
    return {m.name: m for m in registry.loaded()}[name].tts


def error_of(response) -> dict:
    body = response.json()
    assert "error" in body, body
    return body["error"]


def largest_batch(client: TestClient) -> int:
    """The most items decoded together so far, on whichever engine the app runs."""
    return max(client.app.state.services.engine.batch_sizes(), default=0)
