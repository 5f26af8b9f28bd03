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
    registry = client.app.state.services.synthesizer.registry
    return {m.name: m for m in registry.loaded()}[name].tts


def error_of(response) -> dict:
    body = response.json()
    assert "error" in body, body
    return body["error"]


def largest_batch(client: TestClient) -> int:
    """The most items decoded together so far, on whichever engine the app runs."""
    return max(client.app.state.services.synthesizer.batch_sizes(), default=0)


# ----- live-server helpers (streaming, lifecycle, OpenAI and WebSocket tests) -----
_WORDS = (  # noqa: SIM905
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet hills and "
    "rivers run toward the distant sea"
).split()


def words(n: int) -> str:
    """A sentence of `n` words: about 0.8 codec frames a word on the tiny checkpoints, so 60 words
    run for about 80 frames (about a second of work on a CPU)."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(n)).capitalize() + "."


def engine_work(app) -> dict[str, object]:
    """What the app's engine still holds: sequences running or waiting in each fast engine, items
    admitted by the gate, and the in-flight count. All empty or zero when it is idle."""
    engine = app.state.services.synthesizer
    running = {name: len(rt.engine.scheduler.running) for name, rt in list(engine._fast.items())}
    waiting = {name: len(rt.engine.scheduler.waiting) for name, rt in list(engine._fast.items())}
    return {
        "running": {k: v for k, v in running.items() if v},
        "waiting": {k: v for k, v in waiting.items() if v},
        "admitted": dict(engine.gate._in_flight),
        "in_flight": engine.queue_depth,
    }


def wait_until_idle(app, timeout_s: float = 10.0) -> dict[str, object]:
    """Poll until the engine holds no work; returns the last state seen (empty when idle)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        work = engine_work(app)
        if not any(work.values()):
            return {}
        if time.monotonic() > deadline:
            return work
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
