"""Audio output formats, written chunk by chunk so a stream can send bytes while the model still speaks.

A streamed response forwards whatever `AudioEncoder.write` returns at once, so every format has to
hand back bytes as early as its codec allows instead of encoding at the end. Whole-file responses go
through the same encoders (write everything, close), so each format has exactly one implementation.
The codecs and containers are FFmpeg's (through PyAV) and libsndfile's; this module only feeds them,
re-chunks audio to their frame sizes and passes their bytes on.

First bytes of a stream (measured with PyAV 18 / FFmpeg 8.1; "frame" is the codec's frame):

- wav: the 44-byte header and the samples on the first write; the header's sizes say "open-ended".
- pcm: the samples on every write.
- mp3 (LAME): the ID3v2 tag (45 bytes) on the first write; LAME holds about three MP3 frames of
  lookahead, so the first audio arrives once 3 frames are written (1728 samples: 72 ms at 24 kHz).
  A stream has no LAME/Xing tag (it is written by seeking back), so decoders play LAME's encoder
  delay and end padding: about 60 ms of extra silence at 24 kHz.
- opus (Ogg): the Ogg header pages (about 130 bytes) on the first write; every 20 ms packet gets its
  own page, but the muxer holds the newest page until the next packet arrives, so the audio returned
  trails the input by one packet (the first audio page comes after 40 ms of input).
- aac (ADTS): nothing until the encoder has seen 2 frames (2048 samples: 85 ms at 24 kHz); ADTS has
  no header of its own and cannot mark the 1024-sample encoder priming, so decoders play it.
- flac: nothing until `close` (whole-file only; see `STREAMABLE_FORMATS`).

At the model's 24 kHz a first write of 0.1 s therefore returns audio in every streamable format
(at 16 kHz, mp3 and aac need 108 and 128 ms). A rate the codec refuses is resampled to 48 kHz on the
way in; the resampler's filter holds back a few more milliseconds of the newest input.
"""

from __future__ import annotations

import functools
import io
import struct
import wave
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, get_args

import av
import numpy as np
import soundfile as sf
import soxr

from qwen_tts_server.errors import InvalidRequest

AudioFormat = Literal["wav", "pcm", "mp3", "opus", "aac", "flac"]
AUDIO_FORMATS: tuple[AudioFormat, ...] = get_args(AudioFormat)
# FLAC stays whole-file: libsndfile writes it in one go, and its STREAMINFO (length, MD5) is only
# right once all audio is known.
STREAMABLE_FORMATS: tuple[AudioFormat, ...] = ("wav", "pcm", "mp3", "opus", "aac")

MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",  # raw s16le mono at the model's rate; no header
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Opus in an Ogg container
    "aac": "audio/aac",  # AAC-LC in ADTS frames
    "flac": "audio/flac",
}
FILE_EXTENSIONS: dict[str, str] = {
    "wav": ".wav",
    "pcm": ".pcm",
    "mp3": ".mp3",
    "opus": ".opus",
    "aac": ".aac",
    "flac": ".flac",
}

# A codec that refuses the input rate gets this one; every codec here takes it.
_FALLBACK_RATE = 48000
_OPEN_ENDED_SIZE = struct.pack("<I", 0xFFFFFFFF)
# libsndfile's writers have crashed on very large single writes; chunking costs nothing.
_SF_WRITE_BLOCK = 16384


@dataclass(frozen=True)
class _CodecSpec:
    """How one lossy format maps onto FFmpeg: which muxer, encoder and settings."""

    container: str  # FFmpeg muxer
    codec: str  # FFmpeg encoder
    sample_format: str  # a float format the encoder takes as is, so no conversion step
    bit_rate: int  # mono speech; constant, so players can estimate length from size
    stream_options: dict[str, str] = field(default_factory=dict)  # muxer options for streaming only


_CODECS: dict[str, _CodecSpec] = {
    "mp3": _CodecSpec("mp3", "libmp3lame", "fltp", 64_000),
    # Ogg's default 1 s pages would hold a second of audio back; one 20 ms packet per page costs
    # about 28 bytes of page header per packet (~11 kbit/s) and keeps a stream's latency at one packet.
    "opus": _CodecSpec("ogg", "libopus", "flt", 32_000, {"page_duration": "20000"}),
    "aac": _CodecSpec("adts", "aac", "fltp", 64_000),
}


def _as_mono_float(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)


def _to_s16le(x: np.ndarray) -> bytes:
    return np.round(x * 32767.0).astype("<i2").tobytes()


def _wav_file(sample_rate: int, pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def _open_ended_wav_header(sample_rate: int) -> bytes:
    """A WAV header whose RIFF and data sizes are 0xFFFFFFFF: "read to the end", as streaming servers send."""
    header = bytearray(_wav_file(sample_rate, b""))
    assert len(header) == 44 and header[36:40] == b"data", "unexpected WAV header layout"
    header[4:8] = _OPEN_ENDED_SIZE
    header[40:44] = _OPEN_ENDED_SIZE
    return bytes(header)


class AudioEncoder(ABC):
    """One output stream in one format: float32 mono chunks in, that format's bytes out.

    `write` returns what is ready now (possibly b""), `close` flushes and returns the rest; the
    concatenation of everything returned is one valid file. Not thread-safe: one stream, one caller.
    `output_rate` is the rate written into the bytes, which differs from the input rate when the
    codec refuses the input rate (the audio is then resampled).
    """

    def __init__(self, input_rate: int, output_rate: int) -> None:
        self.input_rate = input_rate
        self.output_rate = output_rate
        self._closed = False

    def write(self, samples: np.ndarray) -> bytes:
        """Encode float samples at `input_rate` (clipped to [-1, 1]); return the bytes ready now."""
        if self._closed:
            raise RuntimeError("write() after close()")
        return self._write(_as_mono_float(samples))

    def close(self) -> bytes:
        """Flush the codec and container; return the remaining bytes. A second call returns b""."""
        if self._closed:
            return b""
        self._closed = True
        return self._close()

    @abstractmethod
    def _write(self, x: np.ndarray) -> bytes: ...

    @abstractmethod
    def _close(self) -> bytes: ...


class _PcmEncoder(AudioEncoder):
    """Raw s16le: no header, so every write is final bytes."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__(sample_rate, sample_rate)

    def _write(self, x: np.ndarray) -> bytes:
        return _to_s16le(x)

    def _close(self) -> bytes:
        return b""


class _WavEncoder(AudioEncoder):
    """PCM s16 WAV. A stream cannot know its length up front, so its header says open-ended sizes
    (readers then read to the end); a whole file holds everything until close and gets exact sizes."""

    def __init__(self, sample_rate: int, *, streaming: bool) -> None:
        super().__init__(sample_rate, sample_rate)
        self._streaming = streaming
        self._header_sent = False
        self._pending: list[bytes] = []

    def _write(self, x: np.ndarray) -> bytes:
        pcm = _to_s16le(x)
        if not self._streaming:
            self._pending.append(pcm)
            return b""
        return self._header() + pcm

    def _close(self) -> bytes:
        if not self._streaming:
            return _wav_file(self.output_rate, b"".join(self._pending))
        return self._header()  # an empty stream is still a (header-only) file

    def _header(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return _open_ended_wav_header(self.output_rate)


class _FlacEncoder(AudioEncoder):
    """FLAC through libsndfile, whole-file: collects the audio and encodes it on close."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__(sample_rate, sample_rate)
        self._chunks: list[np.ndarray] = []

    def _write(self, x: np.ndarray) -> bytes:
        self._chunks.append(x)
        return b""

    def _close(self) -> bytes:
        x = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)
        self._chunks = []
        buf = io.BytesIO()
        with sf.SoundFile(buf, "w", samplerate=self.output_rate, channels=1, format="FLAC", subtype="PCM_16") as f:
            for start in range(0, x.shape[0], _SF_WRITE_BLOCK):
                f.write(x[start : start + _SF_WRITE_BLOCK])
        return buf.getvalue()


class _ForwardOnlySink:
    """A write-only file for FFmpeg's muxer. Without seek/tell FFmpeg treats the output as a stream:
    it never goes back to patch a header, so bytes handed out are final."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


@functools.cache
def _codec_rates(codec: str) -> tuple[int, ...] | None:
    rates = av.Codec(codec, "w").audio_rates
    return tuple(rates) if rates else None


class _PyAVEncoder(AudioEncoder):
    """A lossy codec through PyAV: samples go into an AudioFifo, every full codec frame is encoded
    and muxed into memory, and `write` returns the bytes the muxer produced since the last call.

    A whole file is muxed into a seekable buffer instead, so FFmpeg can go back and write what
    only the end knows (the MP3 LAME tag, which lets decoders drop the encoder delay and padding).
    """

    def __init__(self, spec: _CodecSpec, sample_rate: int, *, streaming: bool) -> None:
        rates = _codec_rates(spec.codec)
        output_rate = sample_rate if rates is None or sample_rate in rates else _FALLBACK_RATE
        super().__init__(sample_rate, output_rate)
        self._spec = spec
        self._resampler = (
            None
            if output_rate == sample_rate
            else soxr.ResampleStream(sample_rate, output_rate, 1, dtype="float32", quality="HQ")
        )
        self._sink: _ForwardOnlySink | io.BytesIO = _ForwardOnlySink() if streaming else io.BytesIO()
        options = {"flush_packets": "1", **spec.stream_options} if streaming else {}
        self._container = av.open(self._sink, "w", format=spec.container, container_options=options)
        self._stream = self._container.add_stream(spec.codec, rate=output_rate, layout="mono")
        self._stream.format = spec.sample_format
        self._stream.bit_rate = spec.bit_rate
        self._container.start_encoding()  # opens the codec, so its frame size is known; writes the header
        self._frame_size = self._stream.codec_context.frame_size or 1024
        self._time_base = Fraction(1, output_rate)
        self._fifo = av.AudioFifo()
        self._pts = 0

    def _write(self, x: np.ndarray) -> bytes:
        if self._resampler is not None:
            x = self._resampled(x, last=False)
        self._queue(x)
        while self._fifo.samples >= self._frame_size:
            self._encode(self._fifo.read(self._frame_size))
        return self._take()

    def _close(self) -> bytes:
        if self._resampler is not None:
            self._queue(self._resampled(np.zeros(0, dtype=np.float32), last=True))
        while self._fifo.samples >= self._frame_size:
            self._encode(self._fifo.read(self._frame_size))
        rest = self._fifo.read()  # a short last frame; these encoders accept one
        if rest is not None:
            self._encode(rest)
        self._encode(None)  # drain the encoder's lookahead
        self._container.close()
        if isinstance(self._sink, io.BytesIO):
            return self._sink.getvalue()
        return self._sink.take()

    def _resampled(self, x: np.ndarray, *, last: bool) -> np.ndarray:
        assert self._resampler is not None
        return np.clip(self._resampler.resample_chunk(x, last=last), -1.0, 1.0)

    def _queue(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format=self._spec.sample_format, layout="mono")
        frame.sample_rate = self.output_rate
        self._fifo.write(frame)

    def _encode(self, frame: av.AudioFrame | None) -> None:
        if frame is not None:
            frame.pts = self._pts
            frame.time_base = self._time_base
            self._pts += frame.samples
        self._container.mux(self._stream.encode(frame))

    def _take(self) -> bytes:
        return self._sink.take() if isinstance(self._sink, _ForwardOnlySink) else b""


def _can_write(fmt: str) -> bool:
    if fmt in ("wav", "pcm"):
        return True
    if fmt == "flac":
        return "FLAC" in sf.available_formats()
    spec = _CODECS[fmt]
    try:
        av.Codec(spec.codec, "w")
        av.format.ContainerFormat(spec.container, "w")
    except (ValueError, av.FFmpegError):
        return False
    return True


@functools.cache
def available_output_formats() -> tuple[AudioFormat, ...]:
    """Formats this build can write: wav and pcm always, flac with libsndfile, the rest with PyAV's FFmpeg."""
    return tuple(fmt for fmt in AUDIO_FORMATS if _can_write(fmt))


def check_output_format(fmt: str) -> None:
    """InvalidRequest (field `response_format`) for a format this build cannot write: routes call it
    before any work, so the error comes before the audio is generated."""
    if fmt not in available_output_formats():
        raise InvalidRequest(
            f"response_format '{fmt}' is not available on this server; "
            f"use one of: {', '.join(available_output_formats())}",
            field="response_format",
        )


def open_encoder(fmt: str, sample_rate: int, *, streaming: bool = True) -> AudioEncoder:
    """An encoder for `fmt` taking float32 mono at `sample_rate`.

    `streaming=False` is for whole files: bytes come at close, and formats whose header holds the
    length get it exact (WAV sizes, the MP3 LAME tag). Raises InvalidRequest (field `response_format`)
    for a format this build cannot write.
    """
    check_output_format(fmt)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if fmt == "pcm":
        return _PcmEncoder(sample_rate)
    if fmt == "wav":
        return _WavEncoder(sample_rate, streaming=streaming)
    if fmt == "flac":
        return _FlacEncoder(sample_rate)
    return _PyAVEncoder(_CODECS[fmt], sample_rate, streaming=streaming)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole file: mono float samples, clipped to [-1, 1]; mp3/opus/aac are resampled to 48 kHz
    when the codec refuses the rate. Raises InvalidRequest (field `response_format`) for a format
    this build cannot write."""
    encoder = open_encoder(fmt, sample_rate, streaming=False)
    return encoder.write(samples) + encoder.close()
