"""Audio bytes <-> float32 mono arrays, through libsndfile (soundfile) and soxr.

Everything the server reads or writes as audio goes through here, so format support and the
error messages a client sees for bad audio live in one place.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import soundfile as sf
import soxr

from qwen_tts_server.errors import InvalidRequest

ACCEPTED_INPUT_FORMATS = "WAV, FLAC, OGG (Vorbis or Opus) or MP3"

AudioFormat = Literal["wav", "flac", "mp3", "opus", "pcm"]
AUDIO_FORMATS: tuple[AudioFormat, ...] = get_args(AudioFormat)

MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "pcm": "audio/pcm",  # raw s16le mono at the model's rate; no header
}
FILE_EXTENSIONS: dict[str, str] = {
    "wav": ".wav",
    "flac": ".flac",
    "mp3": ".mp3",
    "opus": ".opus",
    "pcm": ".pcm",
}

# libsndfile refuses other rates for these codecs; anything else is resampled to the fallback.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_FALLBACK_RATE = 48000
# libsndfile's OGG writer has crashed on very large single writes; chunking costs nothing.
_WRITE_BLOCK = 16384

# fmt -> (libsndfile major format, subtype, allowed sample rates or None for any)
_SF_FORMATS: dict[str, tuple[str, str, tuple[int, ...] | None]] = {
    "wav": ("WAV", "PCM_16", None),
    "flac": ("FLAC", "PCM_16", None),
    "mp3": ("MP3", "MPEG_LAYER_III", _MP3_RATES),
    "opus": ("OGG", "OPUS", _OPUS_RATES),
}


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, 1-D, nominally in [-1, 1]
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def decode_audio(data: bytes, *, field: str, max_duration_s: float | None = None) -> DecodedAudio:
    """Decode any libsndfile-readable audio to float32 mono.

    `max_duration_s` stops decoding past that length, so a tiny FLAC of hours of silence
    cannot blow up memory; it raises the same "too long" error as `check_duration`.
    """
    if not data:
        raise InvalidRequest(f"{field} is empty; send {ACCEPTED_INPUT_FORMATS} audio", field=field)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sample_rate = int(f.samplerate)
            if max_duration_s is None:
                samples = f.read(dtype="float32", always_2d=True)
            else:
                limit = int(max_duration_s * sample_rate)
                samples = f.read(limit + 1, dtype="float32", always_2d=True)
                if samples.shape[0] > limit:
                    raise InvalidRequest(
                        f"{field} is too long (more than {max_duration_s:.1f} s); send at most {max_duration_s:.1f} s",
                        field=field,
                    )
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else str(exc)
        raise InvalidRequest(
            f"{field} is not decodable audio ({reason.strip().rstrip('.')}); send {ACCEPTED_INPUT_FORMATS}",
            field=field,
        ) from None
    if sample_rate <= 0 or samples.shape[0] == 0:
        raise InvalidRequest(f"{field} contains no audio samples", field=field)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise InvalidRequest(f"{field} contains NaN or infinite samples", field=field)
    return DecodedAudio(samples=np.ascontiguousarray(mono, dtype=np.float32), sample_rate=sample_rate)


def check_duration(audio: DecodedAudio, *, min_s: float, max_s: float, field: str) -> None:
    duration = audio.duration_s
    if duration < min_s:
        raise InvalidRequest(f"{field} is too short ({duration:.2f} s); send at least {min_s:.1f} s", field=field)
    if duration > max_s:
        raise InvalidRequest(f"{field} is too long ({duration:.2f} s); send at most {max_s:.1f} s", field=field)


def resample(samples: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """High-quality resampling of a 1-D float32 signal (soxr HQ)."""
    samples = np.asarray(samples, dtype=np.float32)
    if from_sr == to_sr:
        return samples
    return np.asarray(soxr.resample(samples, from_sr, to_sr), dtype=np.float32)


@functools.cache
def available_output_formats() -> tuple[AudioFormat, ...]:
    """Output formats this libsndfile build can write (MP3 needs libsndfile >= 1.1)."""
    formats = sf.available_formats()
    out: list[AudioFormat] = []
    for fmt in AUDIO_FORMATS:
        spec = _SF_FORMATS.get(fmt)
        if spec is None or (spec[0] in formats and spec[1] in sf.available_subtypes(spec[0])):
            out.append(fmt)
    return tuple(out)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: AudioFormat) -> bytes:
    """Encode mono float samples; opus/mp3 are resampled when the codec refuses the rate.

    Raises InvalidRequest (field `response_format`) for a format this build cannot write.
    """
    x = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if fmt == "pcm":
        return np.round(x * 32767.0).astype("<i2").tobytes()
    if fmt not in _SF_FORMATS or fmt not in available_output_formats():
        raise InvalidRequest(
            f"response_format '{fmt}' is not available on this server; "
            f"use one of: {', '.join(available_output_formats())}",
            field="response_format",
        )
    major, subtype, rates = _SF_FORMATS[fmt]
    if rates is not None and sample_rate not in rates:
        x = np.clip(resample(x, sample_rate, _FALLBACK_RATE), -1.0, 1.0)
        sample_rate = _FALLBACK_RATE
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sample_rate, channels=1, format=major, subtype=subtype) as f:
        for start in range(0, x.shape[0], _WRITE_BLOCK):
            f.write(x[start : start + _WRITE_BLOCK])
    return buf.getvalue()
