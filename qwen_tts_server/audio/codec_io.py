"""Audio bytes <-> float32 mono arrays: decoding through libsndfile (soundfile), resampling through soxr.

Everything the server reads as audio goes through here, so input format support and the error
messages a client sees for bad audio live in one place. Writing audio lives in `encoders` (one
streaming-capable encoder per output format); its names are re-exported here for older imports.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from qwen_tts_server.audio.encoders import (
    AUDIO_FORMATS,
    FILE_EXTENSIONS,
    MEDIA_TYPES,
    AudioFormat,
    available_output_formats,
    encode_audio,
)
from qwen_tts_server.errors import InvalidRequest

__all__ = [
    "ACCEPTED_INPUT_FORMATS",
    "AUDIO_FORMATS",
    "FILE_EXTENSIONS",
    "MEDIA_TYPES",
    "AudioFormat",
    "DecodedAudio",
    "available_output_formats",
    "check_duration",
    "decode_audio",
    "encode_audio",
    "resample",
]

ACCEPTED_INPUT_FORMATS = "WAV, FLAC, OGG (Vorbis or Opus) or MP3"


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
