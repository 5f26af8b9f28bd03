"""Short sine clips, generated on the fly, as test audio."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import soundfile as sf

SineFn = Callable[..., np.ndarray]
WavFn = Callable[..., bytes]


def sine(duration_s: float = 1.5, sample_rate: int = 16000, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(duration_s * sample_rate), dtype=np.float64) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(duration_s: float = 1.5, sample_rate: int = 16000, channels: int = 1) -> bytes:
    x = sine(duration_s, sample_rate)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="session")
def make_sine() -> SineFn:
    return sine


@pytest.fixture(scope="session")
def make_wav() -> WavFn:
    return wav_bytes
