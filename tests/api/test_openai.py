"""The OpenAI-compatible API through the official `openai` client, against a real uvicorn server."""

from __future__ import annotations

import base64
import io
import json

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from openai import OpenAI

from .support import CUSTOM_06, CUSTOM_17, engine_work, wait_until_idle, words

pytestmark = pytest.mark.slow

SR = 24000
FRAME = 1920
FRAME_S = FRAME / SR  # 80 ms: 12.5 codec frames a second
TEXT = "Hello there, this is the OpenAI route speaking."
PUBLISHED = [
    "Qwen3-TTS-12Hz-0.6B-CustomVoice",
    "Qwen3-TTS-12Hz-1.7B-CustomVoice",
    "Qwen3-TTS-12Hz-1.7B-VoiceDesign",
    "Qwen3-TTS-12Hz-0.6B-Base",
    "Qwen3-TTS-12Hz-1.7B-Base",
]
# What each format decodes to beyond the generated frames (see audio/encoders.py): a streamed mp3
# has no LAME tag, so decoders play LAME's delay and padding (~60 ms); ADTS AAC cannot mark the
# 1024-sample priming and pads the last frame. The others decode exactly.
PADDING_S = {"mp3": 0.1, "aac": (1024 + 1024 + 256) / SR}


def client_for(base: str) -> OpenAI:
    # No retries: a 503 must show up as one error, not three slow attempts.
    return OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)


def decode(data: bytes, fmt: str) -> tuple[int, float]:
    """(sample rate the file declares, seconds it decodes to)."""
    if fmt == "pcm":  # raw s16le mono at the model's rate
        assert len(data) % 2 == 0
        return SR, len(data) / 2 / SR
    if fmt == "aac":  # libsndfile has no AAC; PyAV (FFmpeg) decodes ADTS
        with av.open(io.BytesIO(data)) as container:
            frames = list(container.decode(audio=0))
        (rate,) = {f.sample_rate for f in frames}
        return rate, sum(f.samples for f in frames) / rate
    info = sf.info(io.BytesIO(data))
    # Ogg Opus decodes at 48 kHz inside libopus; the header keeps the input rate, which is what
    # libsndfile reports (and what the samples are resampled back to).
    samples, rate = sf.read(io.BytesIO(data))
    assert rate == info.samplerate
    return rate, len(samples) / rate


def sse(base: str, **body: object) -> list[dict]:
    """POST /v1/audio/speech with stream_format sse; the events, parsed as OpenAI documents them:
    `data: <json>` lines, each event ended by a blank line."""
    client = client_for(base)
    params = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "pcm", **body}
    extra = {k: params.pop(k) for k in list(params) if k in ("seed", "max_new_tokens")}
    events, lines = [], []
    with client.audio.speech.with_streaming_response.create(stream_format="sse", extra_body=extra, **params) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "":
                if lines:
                    events.append(json.loads("".join(lines)))
                lines = []
                continue
            assert line.startswith("data: "), line
            lines.append(line[len("data: ") :])
    assert not lines, "the last event was not ended by a blank line"
    return events


def test_every_format_decodes_to_the_generated_length(live_server):
    base, _ = live_server
    done = sse(base, seed=1)[-1]
    frames = done["usage"]["output_tokens"]
    assert frames >= 1 and done["finish_reason"] == "eos"
    client = client_for(base)
    for fmt in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        response = client.audio.speech.create(
            model="tts-1", voice="alloy", input=TEXT, response_format=fmt, extra_body={"seed": 1}
        )
        rate, seconds = decode(response.content, fmt)
        assert rate == SR, fmt
        expected = frames * FRAME_S
        assert expected - 1e-6 <= seconds <= expected + PADDING_S.get(fmt, 1e-6), (fmt, seconds, expected)


def test_content_types_and_sizes(live_server):
    base, _ = live_server
    client = client_for(base)
    types = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav"}
    for fmt, media in types.items():
        response = client.audio.speech.create(model="tts-1-hd", voice="nova", input="Short.", response_format=fmt)
        assert response.response.headers["content-type"].startswith(media)
    flac = client.audio.speech.create(model="gpt-4o-mini-tts", voice="echo", input="Short.", response_format="flac")
    assert flac.response.headers["x-finish-reason"] == "eos"  # whole-file formats say how the speech ended
    assert flac.content[:4] == b"fLaC"


def test_first_bytes_arrive_while_the_engine_still_generates(make_live_server):
    """The audio is sent as it is generated: when the client reads the first chunk, the request is
    still running in the engine with fewer frames than it ends with."""
    base, app = make_live_server(segment_chars=2000)  # one segment: one sequence to watch
    client = client_for(base)
    client.audio.speech.create(model="tts-1", voice="alloy", input="Warm up.", response_format="pcm")
    runtime = app.state.services.synthesizer._fast[CUSTOM_17]
    at_first_chunk = None
    received = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=words(150), response_format="pcm", extra_body={"seed": 2}
    ) as response:
        for chunk in response.iter_bytes():
            if at_first_chunk is None:
                at_first_chunk = [seq.num_frames for seq in runtime.engine.scheduler.running]
            received.append(chunk)
    final_frames = len(b"".join(received)) // 2 // FRAME
    assert at_first_chunk, "the request had already left the engine when its first bytes were read"
    (frames_then,) = at_first_chunk
    assert frames_then < final_frames, (frames_then, final_frames)
    assert len(received) > 1
    assert wait_until_idle(app) == {}


def test_sse_events(live_server):
    base, _ = live_server
    events = sse(base, seed=3)
    *deltas, done = events
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas)
    assert done["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    usage = done["usage"]
    assert set(usage) >= {"input_tokens", "output_tokens", "total_tokens"}
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert done["finish_reason"] == "eos"
    assert len(audio) == usage["output_tokens"] * FRAME * 2  # pcm: s16 samples of every frame
    assert done["audio_seconds"] == pytest.approx(usage["output_tokens"] * FRAME_S, abs=1e-3)
    # Same seed, same audio: the SSE deltas carry what the plain stream carries.
    plain = client_for(base).audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="pcm", extra_body={"seed": 3}
    )
    a = np.frombuffer(plain.content, "<i2").astype(int)
    b = np.frombuffer(audio, "<i2").astype(int)
    assert len(a) == len(b) and np.abs(a - b).max() <= 2


def test_sse_in_a_container_format_decodes(live_server):
    base, _ = live_server
    *deltas, done = sse(base, response_format="wav", seed=4)
    data = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    rate, seconds = decode(data, "wav")
    assert rate == SR and seconds == pytest.approx(done["usage"]["output_tokens"] * FRAME_S)


def test_sse_finish_reason_length(live_server):
    base, _ = live_server
    done = sse(base, input=words(40), max_new_tokens=3, seed=5)[-1]
    assert done["finish_reason"] == "length" and done["usage"]["output_tokens"] == 3


def test_voice_names_are_case_insensitive_and_openai_names_map(live_server):
    base, _ = live_server
    client = client_for(base)
    same = [
        client.audio.speech.create(
            model="tts-1", voice=voice, input="Same voice.", response_format="pcm", extra_body={"seed": 9}
        ).content
        for voice in ("vivian", "Vivian", "ALLOY")  # alloy maps to vivian
    ]
    assert same[0] == same[1] == same[2]
    other = client.audio.speech.create(
        model="tts-1", voice="ryan", input="Same voice.", response_format="pcm", extra_body={"seed": 9}
    )
    assert other.content != same[0]


def test_speed_changes_the_duration(live_server):
    base, _ = live_server
    client = client_for(base)
    normal = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="pcm", extra_body={"seed": 6}
    )
    fast = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="pcm", speed=2.0, extra_body={"seed": 6}
    )
    assert len(fast.content) / len(normal.content) == pytest.approx(0.5, abs=0.05)


def expect_error(call, status: int | tuple[int, ...], exception: type[openai.APIStatusError]) -> dict:
    with pytest.raises(exception) as info:
        call()
    error = info.value
    statuses = status if isinstance(status, tuple) else (status,)
    assert error.status_code in statuses, (error.status_code, error.response.text)
    body = error.response.json()
    # OpenAI's error shape, exactly: {"error": {"message", "type", "param", "code"}}.
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    # The client reads the same fields.
    assert error.param == body["error"]["param"] and error.code == body["error"]["code"]
    return body["error"]


def test_errors_use_openai_exceptions_and_shape(live_server):
    base, _ = live_server
    client = client_for(base)

    def speak(**overrides):
        params = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **overrides}
        return lambda: client.audio.speech.create(**params)

    err = expect_error(speak(voice="nobody"), 404, openai.NotFoundError)
    assert err["param"] == "voice" and "nobody" in err["message"] and "vivian" in err["message"]
    err = expect_error(speak(input=""), (400, 422), openai.APIStatusError)
    assert err["param"] == "input"
    err = expect_error(speak(input="   "), (400, 422), openai.APIStatusError)
    assert err["param"] == "input"
    err = expect_error(speak(speed=9), (400, 422), openai.APIStatusError)
    assert err["param"] == "speed"
    err = expect_error(speak(response_format="flac", stream_format="sse"), (400, 422), openai.APIStatusError)
    assert err["param"] in ("stream_format", "response_format")
    err = expect_error(speak(model=CUSTOM_06, instructions="Very happy."), (400, 422), openai.APIStatusError)
    assert err["param"] == "instructions"
    err = expect_error(speak(response_format="ogg"), (400, 422), openai.APIStatusError)
    assert err["param"] == "response_format"
    # A model this server does not have: the client's fault or "unavailable", never a crash.
    err = expect_error(speak(model="no-such-model"), (400, 404, 422, 503), openai.APIStatusError)
    assert err["param"] == "model"
    err = expect_error(speak(model="../etc/passwd"), (400, 404, 422), openai.APIStatusError)
    assert err["param"] == "model"
    # A VoiceDesign model needs instructions; a Base model needs ref_audio.
    err = expect_error(speak(model="Qwen3-TTS-12Hz-1.7B-VoiceDesign"), (400, 422), openai.APIStatusError)
    assert err["param"] == "instructions"
    err = expect_error(speak(model="Qwen3-TTS-12Hz-0.6B-Base"), (400, 422), openai.APIStatusError)
    assert err["param"] == "ref_audio"


def test_error_types(live_server):
    """OpenAI's `type` is invalid_request_error for a client's mistake; our own kind is in `code`."""
    base, _ = live_server
    response = httpx.post(f"{base}/v1/audio/speech", json={"model": "tts-1", "voice": "nobody", "input": "Hi."})
    error = response.json()["error"]
    assert response.status_code == 404
    assert error["type"] == "invalid_request_error" and error["code"] == "not_found"
    response = httpx.post(f"{base}/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "bogus": 1})
    assert response.status_code in (400, 422) and response.json()["error"]["param"] == "bogus"
    response = httpx.post(f"{base}/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code in (400, 422) and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_no_work_left_after_errors(live_server):
    base, app = live_server
    client = client_for(base)
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hello.", response_format="wav")
    with pytest.raises(openai.APIStatusError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="pcm", speed=0.1)
    assert client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="wav").content
    assert wait_until_idle(app) == {}, engine_work(app)


def test_models_list(live_server):
    base, _ = live_server
    client = client_for(base)
    ids = [m.id for m in client.models.list().data]
    assert ids[:3] == ["tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    assert set(PUBLISHED) <= set(ids)
    assert len(ids) == len(set(ids))
    models = httpx.get(f"{base}/v1/models").json()
    assert models["object"] == "list" and all(m["object"] == "model" for m in models["data"])


def test_models_list_leaves_out_names_that_never_loaded(live_server):
    """Asking for a model that does not exist must not add it to /v1/models."""
    base, _ = live_server
    client = client_for(base)
    with pytest.raises(openai.APIStatusError):
        client.audio.speech.create(model="made-up-model", voice="alloy", input="Hello.")
    assert "made-up-model" not in [m.id for m in client.models.list().data]
