"""Every output format, whole and streamed, decoded back by independent readers (libsndfile, FFmpeg).

Duration tolerances are in samples at the rate the bytes were written at, and come from what each
container can say about codec padding:

- wav, pcm, flac: lossless, exact.
- opus: exact. Ogg granule positions carry the encoder's pre-skip and the end trim.
- mp3 whole file: exact. The muxer seeks back to write the LAME tag, which carries encoder delay and
  padding, so decoders trim them (gapless).
- mp3 stream: no LAME tag (a stream cannot seek back), so decoders play the encoder delay (LAME's 576
  plus the 529-sample decoder delay) and padding up to one MP3 frame: 0 < extra <= 1105 + one frame.
- aac (ADTS): ADTS cannot mark the 1024-sample encoder priming, so decoders play it, plus padding up
  to one 1024-sample frame: 1024 <= extra <= 2048, streamed or whole.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import av
import numpy as np
import pytest
import soundfile as sf

from qwen_tts_server.audio import codec_io, encoders
from qwen_tts_server.audio.encoders import (
    AUDIO_FORMATS,
    FILE_EXTENSIONS,
    MEDIA_TYPES,
    STREAMABLE_FORMATS,
    AudioEncoder,
    available_output_formats,
    encode_audio,
    open_encoder,
)
from qwen_tts_server.errors import InvalidRequest

SineFn = Callable[..., np.ndarray]

SR = 24000  # the Qwen3-TTS output rate
LOSSY = ("mp3", "opus", "aac")
PIECES_S = (0.08, 0.5, 1.3)  # uneven chunk lengths, cycled, as a model stream would deliver them
LAME_DELAY = 576 + 529  # LAME's encoder delay plus the MP3 decoder delay
AAC_FRAME = 1024


def _mp3_frame(rate: int) -> int:
    return 1152 if rate >= 32000 else 576  # MPEG-1 vs MPEG-2/2.5 Layer III


def _extra_bounds(fmt: str, rate: int, *, streamed: bool) -> tuple[int, int]:
    """The samples a decoder may return beyond the input, as (min, max); see the module docstring."""
    if fmt == "aac":
        return AAC_FRAME, 2 * AAC_FRAME
    if fmt == "mp3" and streamed:
        return 1, LAME_DELAY + _mp3_frame(rate)
    return 0, 0


def _pieces(x: np.ndarray, rate: int) -> list[np.ndarray]:
    out, start, k = [], 0, 0
    while start < len(x):
        n = int(PIECES_S[k % len(PIECES_S)] * rate)
        out.append(x[start : start + n])
        start, k = start + n, k + 1
    return out


def _stream(fmt: str, x: np.ndarray, rate: int) -> tuple[list[bytes], AudioEncoder]:
    """The bytes of each write and of close (last), for `x` written in uneven pieces."""
    encoder = open_encoder(fmt, rate)
    outputs = [encoder.write(piece) for piece in _pieces(x, rate)]
    outputs.append(encoder.close())
    return outputs, encoder


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    """FFmpeg's reading of the bytes, as float32 mono at the stream's rate."""
    resampler = av.AudioResampler(format="flt", layout="mono")
    parts: list[np.ndarray] = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        for frame in container.decode(stream):
            parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), rate


def _decode_sf(data: bytes, fmt: str, rate: int) -> tuple[np.ndarray, int]:
    """libsndfile's reading of the bytes; pcm has no header, so it is read as RAW s16 at `rate`."""
    if fmt == "pcm":
        samples, got = sf.read(
            io.BytesIO(data), samplerate=rate, channels=1, format="RAW", subtype="PCM_16", dtype="float32"
        )
        return samples, got
    samples, got = sf.read(io.BytesIO(data), dtype="float32")
    return samples, got


def _decoders(fmt: str) -> list[str]:
    if fmt == "aac":
        return ["av"]  # libsndfile cannot read raw ADTS
    if fmt == "pcm":
        return ["soundfile"]  # no header for FFmpeg to recognise
    return ["soundfile", "av"]


def _decode(data: bytes, fmt: str, rate: int, decoder: str) -> tuple[np.ndarray, int]:
    return _decode_sf(data, fmt, rate) if decoder == "soundfile" else _decode_av(data)


def _decoded_rate(fmt: str, written_rate: int, decoder: str) -> int:
    # FFmpeg's Opus decoder always outputs 48 kHz; libsndfile reports the OpusHead input rate.
    return 48000 if fmt == "opus" and decoder == "av" else written_rate


def _check_length(
    out: np.ndarray, n_in: int, fmt: str, written_rate: int, decoded_rate: int, *, streamed: bool
) -> None:
    low, high = _extra_bounds(fmt, written_rate, streamed=streamed)
    scale = decoded_rate / written_rate
    extra = len(out) - n_in * scale
    assert low * scale - 1 <= extra <= high * scale + 1, f"{fmt}: {extra:+.0f} samples, allowed {low}..{high}"


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def _aligned_corr(reference: np.ndarray, out: np.ndarray, max_lag: int) -> float:
    """Best correlation over the delays a lossy codec may add; the edges are left out."""
    edge = 1000
    n = min(len(reference), len(out) - max_lag) - 2 * edge
    ref = reference[edge : edge + n]
    return max(float(np.corrcoef(ref, out[edge + lag : edge + lag + n])[0, 1]) for lag in range(0, max_lag + 1, 2))


def test_tables_cover_every_format() -> None:
    assert set(AUDIO_FORMATS) == {"wav", "pcm", "mp3", "opus", "aac", "flac"}
    assert set(MEDIA_TYPES) == set(FILE_EXTENSIONS) == set(AUDIO_FORMATS)
    assert MEDIA_TYPES["aac"] == "audio/aac" and FILE_EXTENSIONS["aac"] == ".aac"
    assert MEDIA_TYPES["opus"] == "audio/ogg" and MEDIA_TYPES["wav"] == "audio/wav"
    assert set(STREAMABLE_FORMATS) == set(AUDIO_FORMATS) - {"flac"}


def test_codec_io_reexports_the_same_objects() -> None:
    assert codec_io.AudioFormat is encoders.AudioFormat and codec_io.AUDIO_FORMATS is AUDIO_FORMATS
    assert codec_io.MEDIA_TYPES is MEDIA_TYPES and codec_io.FILE_EXTENSIONS is FILE_EXTENSIONS
    assert codec_io.encode_audio is encode_audio
    assert codec_io.available_output_formats is available_output_formats


def test_every_format_is_writable_here() -> None:
    # PyAV's bundled FFmpeg brings libmp3lame, libopus and aac; if this fails, the build lost one.
    assert set(available_output_formats()) == set(AUDIO_FORMATS)


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_whole_file_decodes_to_input_length(fmt: str, make_sine: SineFn) -> None:
    x = make_sine(1.0, SR)
    data = encode_audio(x, SR, fmt)
    for decoder in _decoders(fmt):
        out, rate = _decode(data, fmt, SR, decoder)
        assert rate == _decoded_rate(fmt, SR, decoder), decoder
        _check_length(out, len(x), fmt, SR, rate, streamed=False)


@pytest.mark.parametrize("fmt", STREAMABLE_FORMATS)
def test_stream_in_uneven_chunks_is_one_valid_file(fmt: str, make_sine: SineFn) -> None:
    x = make_sine(2.3, SR)
    outputs, encoder = _stream(fmt, x, SR)
    assert encoder.output_rate == SR
    data = b"".join(outputs)
    for decoder in _decoders(fmt):
        out, rate = _decode(data, fmt, SR, decoder)
        assert rate == _decoded_rate(fmt, SR, decoder), decoder
        _check_length(out, len(x), fmt, SR, rate, streamed=True)
    # Bytes come while audio goes in, not all at close.
    assert sum(len(b) for b in outputs[:-1]) > len(data) // 2


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_lossless_stream_is_bit_exact(fmt: str, make_sine: SineFn) -> None:
    x = make_sine(1.0, SR)
    outputs, _ = _stream(fmt, x, SR)
    out, _ = _decode_sf(b"".join(outputs), fmt, SR)
    np.testing.assert_allclose(out, x, atol=1 / 32767 + 1e-6)
    assert len(outputs[0]) > 0  # the first write already returns bytes


def test_streaming_wav_header_is_open_ended(make_sine: SineFn) -> None:
    x = make_sine(0.1, SR)
    encoder = open_encoder("wav", SR)
    first = encoder.write(x)
    assert first[:4] == b"RIFF" and first[8:16] == b"WAVEfmt " and first[36:40] == b"data"
    assert first[4:8] == b"\xff\xff\xff\xff" and first[40:44] == b"\xff\xff\xff\xff"
    assert len(first) == 44 + 2 * len(x)
    assert struct.unpack("<HHIIHH", first[20:36]) == (1, 1, SR, 2 * SR, 2, 16)  # PCM, mono, s16
    assert encoder.write(x)[:4] != b"RIFF"  # the header comes once
    assert encoder.close() == b""


def test_whole_wav_has_exact_sizes(make_sine: SineFn) -> None:
    x = make_sine(0.5, SR)
    data = encode_audio(x, SR, "wav")
    riff_size, data_size = struct.unpack("<I", data[4:8])[0], struct.unpack("<I", data[40:44])[0]
    assert data_size == 2 * len(x) and riff_size == len(data) - 8


def test_empty_wav_stream_is_a_header() -> None:
    encoder = open_encoder("wav", SR)
    data = encoder.close()
    assert len(data) == 44
    assert len(sf.read(io.BytesIO(data))[0]) == 0


@pytest.mark.parametrize("fmt", LOSSY)
def test_first_bytes_come_early(fmt: str, make_sine: SineFn) -> None:
    """At the model's rate, 0.1 s in returns bytes and 0.2 s in returns at least 0.1 s of playable audio
    (mp3: 3 frames of LAME lookahead = 72 ms; aac: 2 frames = 85 ms; opus: one 20 ms packet held)."""
    x = make_sine(0.3, SR)
    encoder = open_encoder(fmt, SR)
    first = encoder.write(x[: int(0.1 * SR)])
    assert first
    so_far = first + encoder.write(x[int(0.1 * SR) : int(0.2 * SR)])
    out, rate = _decode_av(so_far)
    assert len(out) / rate >= 0.1
    encoder.close()


@pytest.mark.parametrize("fmt", LOSSY)
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_sine_survives_lossy_codec(fmt: str, streamed: bool, make_sine: SineFn) -> None:
    x = make_sine(1.5, SR, freq=440.0)
    data = b"".join(_stream(fmt, x, SR)[0]) if streamed else encode_audio(x, SR, fmt)
    out, rate = _decode_av(data) if fmt == "aac" else _decode_sf(data, fmt, SR)
    assert rate == SR
    assert abs(_peak_hz(out, rate) - 440.0) < 2.0
    assert _aligned_corr(x, out, max_lag=2 * AAC_FRAME + LAME_DELAY) > 0.95


@pytest.mark.parametrize(
    ("fmt", "rate", "written_rate"),
    [
        ("opus", 22050, 48000),
        ("opus", 16000, 16000),
        ("mp3", 96000, 48000),
        ("mp3", 16000, 16000),
        ("aac", 22050, 22050),
    ],
)
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_refused_rates_are_resampled(fmt: str, rate: int, written_rate: int, streamed: bool, make_sine: SineFn) -> None:
    x = make_sine(1.5, rate, freq=440.0)
    if streamed:
        outputs, encoder = _stream(fmt, x, rate)
        data = b"".join(outputs)
    else:
        encoder = open_encoder(fmt, rate, streaming=False)
        data = encoder.write(x) + encoder.close()
    assert encoder.input_rate == rate and encoder.output_rate == written_rate
    out, got = _decode_av(data)
    assert got == _decoded_rate(fmt, written_rate, "av")
    # The resampler's edges may round the count by a sample or two.
    low, high = _extra_bounds(fmt, written_rate, streamed=streamed)
    extra = len(out) - 1.5 * got
    scale = got / written_rate
    assert low * scale - 4 <= extra <= high * scale + 4
    assert abs(_peak_hz(out, got) - 440.0) < 2.0


def test_samples_are_clipped_not_wrapped() -> None:
    x = np.array([0.0, 0.5, -0.5, 2.0, -3.0], dtype=np.float32)
    encoder = open_encoder("pcm", SR)
    data = encoder.write(x) + encoder.close()
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), [0, 16384, -16384, 32767, -32767])


def test_flac_is_written_at_close(make_sine: SineFn) -> None:
    x = make_sine(0.5, SR)
    encoder = open_encoder("flac", SR)
    assert encoder.write(x[:6000]) == b"" and encoder.write(x[6000:]) == b""
    out, rate = _decode_sf(encoder.close(), "flac", SR)
    assert rate == SR and len(out) == len(x)


@pytest.mark.parametrize("call", [lambda: open_encoder("ogg", SR), lambda: encode_audio(np.zeros(10), SR, "m4a")])
def test_unknown_format_is_invalid_request(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidRequest) as err:
        call()
    assert err.value.field == "response_format" and err.value.status_code == 422
    assert "use one of: wav, pcm, mp3, opus, aac, flac" in err.value.message


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_close_ends_the_stream(fmt: str) -> None:
    encoder = open_encoder(fmt, SR)
    encoder.write(np.zeros(2400, dtype=np.float32))
    encoder.close()
    assert encoder.close() == b""
    with pytest.raises(RuntimeError):
        encoder.write(np.zeros(10, dtype=np.float32))
