"""Native `"stream": true`: chunked audio in every streamable format, the same audio as the whole
(non-streamed) result of the same seeded request, long text in segments, and finish reasons."""

from __future__ import annotations

import base64
import io
import json

import av
import numpy as np
import pytest
import soundfile as sf

from qwen_tts_server.audio.encoders import STREAMABLE_FORMATS

from .support import error_of

SR = 24000
FRAME = 1920  # samples per codec frame (12.5 frames a second)
TEXT = "Hello there, this is a streaming test of the server."
# Four sentences: with segment_chars=40 each one is a segment of its own.
LONG = "The first sentence is here. The second one follows it. A third sentence comes next. And the fourth ends it all."
# Extra samples a streamed mp3 decodes to: a stream has no LAME/Xing tag (it is written by seeking
# back), so decoders play LAME's encoder delay and end padding (about 60 ms at 24 kHz, see
# audio/encoders.py). Whole files carry the tag and decode to the exact length.
MP3_STREAM_PADDING = int(0.1 * SR)
# Raw s16 samples of the streamed and the whole pcm may differ by this much. The streaming codec
# carries the decoder's causal state from chunk to chunk (engine/fast/stream_codec.py), so it computes
# the same function as one whole decode, but in chunks of other shapes: float32 sums in another order
# differ by ~1e-7 relative, and a sample that lands on a rounding boundary then flips by one s16 step.
# Observed: at most 1. Anything bigger (a missing or repeated chunk, a wrong context) is thousands.
PCM_TOLERANCE = 2


def body(fmt: str, text: str = TEXT, **extra: object) -> dict[str, object]:
    return {"text": text, "speaker": "vivian", "seed": 7, "response_format": fmt, **extra}


def whole(client, fmt: str, text: str = TEXT, **extra: object) -> tuple[dict, bytes]:
    response = client.post("/api/v1/custom-voice", json={**body(fmt, text, **extra), "return_audio_inline": True})
    assert response.status_code == 200, response.text
    (item,) = response.json()["items"]
    return item, base64.b64decode(item["audio_base64"])


def streamed(client, fmt: str, text: str = TEXT, **extra: object) -> bytes:
    with client.stream("POST", "/api/v1/custom-voice", json={**body(fmt, text, **extra), "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith(
            {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac"}[fmt]
        )
        assert "content-length" not in response.headers  # chunked: the length is not known up front
        return b"".join(response.iter_bytes())


def decoded_samples(data: bytes, fmt: str) -> tuple[int, int]:
    """(samples, rate) of encoded audio: soundfile where it reads the format, PyAV for aac."""
    if fmt == "pcm":
        samples, rate = sf.read(io.BytesIO(data), samplerate=SR, channels=1, format="RAW", subtype="PCM_16")
        return len(samples), rate
    if fmt == "aac":  # libsndfile has no AAC
        with av.open(io.BytesIO(data)) as container:
            frames = list(container.decode(audio=0))
        assert {f.sample_rate for f in frames} == {SR}
        return sum(f.samples for f in frames), SR
    samples, rate = sf.read(io.BytesIO(data))
    return len(samples), rate


@pytest.mark.parametrize("fmt", STREAMABLE_FORMATS)
def test_stream_decodes_to_the_whole_results_duration(client, fmt):
    item, whole_bytes = whole(client, fmt)
    stream_bytes = streamed(client, fmt)
    assert item["finish_reason"] == "eos"
    expected = item["frames"] * FRAME
    n_whole, rate_whole = decoded_samples(whole_bytes, fmt)
    n_stream, rate_stream = decoded_samples(stream_bytes, fmt)
    assert rate_whole == rate_stream == SR
    if fmt == "mp3":
        assert n_whole == expected
        assert expected <= n_stream <= expected + MP3_STREAM_PADDING, (n_stream, expected)
    elif fmt == "aac":
        # ADTS cannot mark AAC's 1024-sample priming, and the last frame is padded to 1024 samples:
        # whole and stream go through the same encoder and decode to the same length.
        assert n_stream == n_whole
        assert expected <= n_stream <= expected + 2048 + 1024, (n_stream, expected)
    else:
        assert n_whole == n_stream == expected


def test_stream_pcm_samples_equal_the_whole_result(client):
    _, whole_bytes = whole(client, "pcm")
    stream_bytes = streamed(client, "pcm")
    a = np.frombuffer(whole_bytes, dtype="<i2").astype(np.int32)
    b = np.frombuffer(stream_bytes, dtype="<i2").astype(np.int32)
    assert len(a) == len(b) and len(a) % FRAME == 0 and len(a) > 0
    assert np.abs(a - b).max() <= PCM_TOLERANCE
    assert np.abs(a).max() > 1000  # real audio, not silence on both sides


def test_stream_wav_is_an_open_ended_wav(client):
    data = streamed(client, "wav")
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert data[40:44] == b"\xff\xff\xff\xff"  # data size unknown while streaming: read to the end
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == SR and len(samples) == (len(data) - 44) // 2


def test_long_text_streams_in_segments_like_the_whole(make_client):
    client = make_client(segment_chars=40)
    item, whole_bytes = whole(client, "pcm", LONG)
    stream_bytes = streamed(client, "pcm", LONG)
    a = np.frombuffer(whole_bytes, dtype="<i2").astype(np.int32)
    b = np.frombuffer(stream_bytes, dtype="<i2").astype(np.int32)
    assert item["finish_reason"] == "eos"
    # Four segments, joined: the same total length as the sum of the segments' frames.
    assert len(a) == len(b) == item["frames"] * FRAME
    assert np.abs(a - b).max() <= PCM_TOLERANCE  # joins are faded the same way in both
    # The stream's finish reason: OpenAI's SSE form of the same request says it in its last event.
    events = sse_events(
        client.post(
            "/v1/audio/speech",
            json={
                "model": "tts-1",
                "voice": "vivian",
                "input": LONG,
                "seed": 7,
                "response_format": "pcm",
                "stream_format": "sse",
            },
        )
    )
    done = events[-1]
    assert done["type"] == "speech.audio.done" and done["finish_reason"] == "eos"
    assert done["usage"]["output_tokens"] == item["frames"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(audio) == len(whole_bytes)


def test_long_text_gives_several_segments(make_client):
    """The segment split really happens: a one-segment server gives other audio for the same text."""
    split = make_client(segment_chars=40)
    single = make_client(segment_chars=1000)
    item_split, _ = whole(split, "pcm", LONG)
    item_single, _ = whole(single, "pcm", LONG)
    assert item_split["frames"] != item_single["frames"]


def sse_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    events = []
    for block in blocks:
        (line,) = block.splitlines()
        assert line.startswith("data: ")
        events.append(json.loads(line[len("data: ") :]))
    return events


def test_max_new_tokens_cuts_with_length(client):
    long_text = " ".join(["A long sentence that would take many frames to speak."] * 4)
    item, data = whole(client, "pcm", long_text, max_new_tokens=3)
    assert item["finish_reason"] == "length" and item["frames"] == 3
    assert len(data) == 3 * FRAME * 2
    assert len(streamed(client, "pcm", long_text, max_new_tokens=3)) == 3 * FRAME * 2


def test_short_text_without_bound_ends_with_eos(client):
    item, _ = whole(client, "wav", "Short.")
    assert item["finish_reason"] == "eos" and item["frames"] >= 1


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"response_format": "flac"}, "response_format", "cannot be streamed"),
        ({"text": ["One.", "Two."]}, "stream", "one item"),
        ({"return_audio_inline": True}, "return_audio_inline", "return_audio_inline"),
    ],
)
def test_stream_errors(client, extra, field, words):
    response = client.post("/api/v1/custom-voice", json={**body("wav"), "stream": True, **extra})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request" and error["field"] == field
    assert words in error["message"]
