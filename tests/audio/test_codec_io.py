from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import soundfile as sf

from qwen_tts_server.audio.codec_io import (
    AUDIO_FORMATS,
    FILE_EXTENSIONS,
    MEDIA_TYPES,
    DecodedAudio,
    available_output_formats,
    check_duration,
    decode_audio,
    encode_audio,
    resample,
)
from qwen_tts_server.errors import InvalidRequest

SineFn = Callable[..., np.ndarray]
WavFn = Callable[..., bytes]

SR = 24000  # the Qwen3-TTS output rate


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Lag-tolerant similarity: lossy codecs add delay/padding, so search a small shift."""
    n = min(len(a), len(b)) - 2000
    best = 0.0
    for lag in range(0, 1200, 4):
        x, y = a[1000 : 1000 + n - 1200], b[1000 + lag : 1000 + lag + n - 1200]
        best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def test_tables_cover_every_format() -> None:
    assert set(MEDIA_TYPES) == set(FILE_EXTENSIONS) == set(AUDIO_FORMATS)
    assert MEDIA_TYPES["mp3"] == "audio/mpeg" and MEDIA_TYPES["pcm"] == "audio/pcm"


def test_all_formats_writable_here() -> None:
    # The bundled libsndfile (>= 1.1) writes MP3 and Opus; if this fails, the server build lost them.
    assert set(available_output_formats()) == set(AUDIO_FORMATS)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_roundtrip(fmt: str, make_sine: SineFn) -> None:
    x = make_sine(1.0, SR)
    out = decode_audio(encode_audio(x, SR, fmt), field="f")  # type: ignore[arg-type]
    assert out.sample_rate == SR
    assert out.samples.dtype == np.float32 and out.samples.ndim == 1
    assert len(out.samples) == len(x)
    np.testing.assert_allclose(out.samples, x, atol=1 / 32767 + 1e-6)


@pytest.mark.parametrize(("fmt", "rate", "expected_rate"), [("mp3", SR, SR), ("opus", SR, SR), ("opus", 22050, 48000)])
def test_lossy_roundtrip(fmt: str, rate: int, expected_rate: int, make_sine: SineFn) -> None:
    x = make_sine(1.0, rate)
    data = encode_audio(x, rate, fmt)  # type: ignore[arg-type]
    out = decode_audio(data, field="f")
    assert out.sample_rate == expected_rate
    # Length within codec padding (encoder delay / frame rounding), duration preserved.
    assert abs(out.duration_s - 1.0) < 0.08
    reference = resample(x, rate, expected_rate)
    assert _corr(reference, out.samples) > 0.95


def test_mp3_unsupported_rate_is_resampled(make_sine: SineFn) -> None:
    out = decode_audio(encode_audio(make_sine(0.5, 96000), 96000, "mp3"), field="f")
    assert out.sample_rate == 48000


def test_pcm_is_raw_s16le_and_clipped() -> None:
    x = np.array([0.0, 0.5, -0.5, 2.0, -3.0], dtype=np.float32)
    data = encode_audio(x, SR, "pcm")
    assert len(data) == 2 * len(x)
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), [0, 16384, -16384, 32767, -32767])
    decoded = sf.read(io.BytesIO(data), samplerate=SR, channels=1, format="RAW", subtype="PCM_16", dtype="int16")[0]
    assert decoded[3] == 32767


def test_wav_encode_clips_instead_of_wrapping() -> None:
    out = decode_audio(encode_audio(np.array([1.7, -1.7] * 100, dtype=np.float32), SR, "wav"), field="f")
    assert out.samples.max() > 0.99 and out.samples.min() < -0.99


def test_stereo_is_mixed_to_mono(make_sine: SineFn) -> None:
    left = make_sine(0.5, 16000)
    buf = io.BytesIO()
    sf.write(buf, np.stack([left, np.zeros_like(left)], axis=1), 16000, format="FLAC")
    out = decode_audio(buf.getvalue(), field="f")
    assert out.samples.ndim == 1 and len(out.samples) == len(left)
    np.testing.assert_allclose(out.samples, left / 2, atol=1e-4)


@pytest.mark.parametrize("data", [b"", b"definitely not audio" * 20, b"RIFF\x00\x00\x00\x00WAVEjunk"])
def test_not_audio_names_the_field_and_formats(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as err:
        decode_audio(data, field="ref_audio")
    assert err.value.field == "ref_audio"
    assert err.value.status_code == 422
    assert "WAV" in err.value.message and "MP3" in err.value.message
    assert err.value.message.startswith("ref_audio ")


def test_zero_frames_rejected() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, dtype=np.float32), 16000, format="WAV")
    with pytest.raises(InvalidRequest, match="no audio samples"):
        decode_audio(buf.getvalue(), field="x")


def test_nan_rejected(make_sine: SineFn) -> None:
    x = make_sine(0.2, 16000)
    x[10] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InvalidRequest, match="NaN"):
        decode_audio(buf.getvalue(), field="x")


def test_decode_stops_at_max_duration(make_wav: WavFn) -> None:
    data = make_wav(3.0, 8000)
    assert decode_audio(data, field="x", max_duration_s=3.0).duration_s == pytest.approx(3.0)
    with pytest.raises(InvalidRequest, match="too long") as err:
        decode_audio(data, field="x", max_duration_s=2.0)
    assert err.value.field == "x"


def test_check_duration_messages() -> None:
    audio = DecodedAudio(samples=np.zeros(4800, dtype=np.float32), sample_rate=16000)
    assert audio.duration_s == pytest.approx(0.3)
    with pytest.raises(InvalidRequest) as err:
        check_duration(audio, min_s=1.0, max_s=10.0, field="ref_audio")
    assert err.value.message == "ref_audio is too short (0.30 s); send at least 1.0 s"
    assert err.value.field == "ref_audio"
    with pytest.raises(InvalidRequest, match=r"too long \(0.30 s\); send at most 0.2 s"):
        check_duration(audio, min_s=0.0, max_s=0.2, field="ref_audio")
    check_duration(audio, min_s=0.3, max_s=0.3, field="ref_audio")


def test_resample(make_sine: SineFn) -> None:
    x = make_sine(1.0, 16000)
    y = resample(x, 16000, 24000)
    assert y.dtype == np.float32 and len(y) == 24000
    assert resample(x, 16000, 16000) is x
