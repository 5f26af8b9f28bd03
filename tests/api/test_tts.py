"""The three synthesis endpoints over HTTP, on tiny random checkpoints."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import soundfile as sf

from qwen_tts_server.testing.force_eos import force_eos

from .support import BASE_06, BASE_17, CUSTOM_17, DESIGN_17, error_of, largest_batch, loaded_model, sine_wav, upload

SR = 24000
FRAME = 1920


@pytest.fixture(params=["fast", "reference"])
def engine(request) -> str:
    """Every test here runs on both engines: the fast one (default) and the reference oracle."""
    return request.param


@pytest.fixture
def client(make_client, engine):
    return make_client(engine=engine)


def download(client, item) -> bytes:
    response = client.get(item["url"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(item["media_type"])
    return response.content


def test_custom_voice_single_item(client):
    response = client.post("/api/v1/custom-voice", json={"text": "Hello there.", "speaker": "Vivian"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == CUSTOM_17
    (item,) = body["items"]
    assert item["index"] == 0 and item["format"] == "wav" and item["sample_rate"] == SR
    assert item["frames"] >= 1 and item["duration_s"] == pytest.approx(item["frames"] * FRAME / SR)
    samples, rate = sf.read(io.BytesIO(download(client, item)))
    assert rate == SR and len(samples) == item["frames"] * FRAME
    assert set(body["timing"]) == {"total_ms", "model_ms", "generate_ms", "encode_ms"}


def test_custom_voice_batch_keeps_order_and_custom_ids(client):
    response = client.post(
        "/api/v1/custom-voice",
        json={
            "text": ["One.", "Two, a bit longer.", "Three."],
            "speaker": ["ryan", "serena", "eric"],
            "language": ["en", "ZH", "auto"],
            "instruct": ["calm", None, "excited"],
            "custom_id": ["a", "b", "c"],
        },
    )
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["index"] for i in items] == [0, 1, 2]
    assert [i["custom_id"] for i in items] == ["a", "b", "c"]
    assert len({i["file_id"] for i in items}) == 3
    assert largest_batch(client) == 3


@pytest.mark.parametrize("mode", ["custom-voice", "voice-design", "voice-clone-icl", "voice-clone-xvec"])
def test_each_item_ends_at_its_own_frame(make_client, mode):
    """Rows forced to stop at frames 3, 6 and 9 in one batch give exactly those lengths.

    The hook counts upstream's talker calls per batch row, so this runs on the reference engine;
    the fast engine's per-item lengths are checked against it in the next test.
    """
    client = make_client(engine="reference")
    if mode == "custom-voice":
        model, path = CUSTOM_17, "custom-voice"
        body = {"text": ["a b c", "d e f", "g h i"], "speaker": "ryan"}
    elif mode == "voice-design":
        model, path = DESIGN_17, "voice-design"
        body = {"text": ["a b c", "d e f", "g h i"], "instruct": "a deep voice"}
    else:
        model, path = BASE_17, "voice-clone"
        file_id = upload(client)
        body = {"text": ["a b c", "d e f", "g h i"], "ref_audio": file_id}
        body |= {"x_vector_only": True} if mode.endswith("xvec") else {"ref_text": "the reference words"}
    tts = loaded_model(client, model)
    with force_eos(tts, [3, 6, 9]):
        response = client.post(f"/api/v1/{path}", json=body | {"model": model})
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["frames"] for i in items] == [3, 6, 9]
    for item, frames in zip(items, [3, 6, 9], strict=True):
        samples, rate = sf.read(io.BytesIO(download(client, item)))
        assert rate == SR and len(samples) == frames * FRAME
        assert item["duration_s"] == pytest.approx(frames * FRAME / SR, abs=1e-9)


@pytest.mark.parametrize("path", ["custom-voice", "voice-design", "voice-clone"])
def test_fast_engine_lengths_match_the_reference(make_client, path):
    """Greedy: both engines end every item at the same frame, with exactly that many samples."""
    texts = ["Hi.", "A somewhat longer sentence here.", "Middle length one."]
    body = {"text": texts, "do_sample": False, "language": "en"}
    body |= {"custom-voice": {"speaker": "ryan"}, "voice-design": {"instruct": "a deep voice"}}.get(path, {})
    frames = {}
    for engine in ("reference", "fast"):
        client = make_client(engine=engine, data_dir=make_client.tmp / engine)
        if path == "voice-clone":
            body |= {"ref_audio": upload(client), "ref_text": "the reference words"}
        response = client.post(f"/api/v1/{path}", json=body)
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        for item in items:
            samples, rate = sf.read(io.BytesIO(download(client, item)))
            assert rate == SR and len(samples) == item["frames"] * FRAME
        frames[engine] = [i["frames"] for i in items]
    assert frames["fast"] == frames["reference"]
    assert len(set(frames["fast"])) > 1, frames


def test_voice_design_batch(client):
    response = client.post(
        "/api/v1/voice-design",
        json={
            "text": ["Good morning.", "Good night."],
            "instruct": ["a cheerful child", "an old man"],
            "language": "en",
        },
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 2


def test_voice_clone_encodes_a_shared_reference_once(client):
    """N items on one file_id run the speaker encoder once; a second request reuses it."""
    file_id = upload(client)
    tts = loaded_model(client, BASE_17)
    calls = []
    hook = tts.model.speaker_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        body = {"text": ["one", "two", "three", "four"], "ref_audio": file_id, "ref_text": "reference words"}
        assert client.post("/api/v1/voice-clone", json=body).status_code == 200
        assert len(calls) == 1
        again = {"text": "five", "ref_audio": file_id, "x_vector_only": True}
        assert client.post("/api/v1/voice-clone", json=again).status_code == 200
        assert len(calls) == 1
    finally:
        hook.remove()
    cache = client.app.state.services.synthesizer.voice_cache
    assert cache.misses == 1 and cache.hits >= 1


def test_voice_clone_from_base64_and_data_uri(client):
    encoded = base64.b64encode(sine_wav(1.0)).decode()
    for ref in (encoded, f"data:audio/wav;base64,{encoded}"):
        response = client.post(
            "/api/v1/voice-clone",
            json={"text": "hi", "ref_audio": ref, "x_vector_only_mode": True, "model": BASE_06},
        )
        assert response.status_code == 200, response.text


def test_voice_clone_from_an_allowed_path(make_client, engine, tmp_path):
    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "me.wav").write_bytes(sine_wav())
    client = make_client(allowed_audio_dirs=[voices], engine=engine)
    response = client.post(
        "/api/v1/voice-clone", json={"text": "hi", "ref_audio": str(voices / "me.wav"), "ref_text": "words"}
    )
    assert response.status_code == 200, response.text


def test_seed_system_client_works_with_inline_audio(client):
    """A client of the seed API (same paths and fields) needs only return_audio_inline."""
    file_id = upload(client)
    response = client.post(
        "/api/v1/voice-clone",
        json={
            "text": ["First sentence.", "Second sentence."],
            "ref_audio": [file_id, file_id],
            "ref_text": ["Reference text 1", "Reference text 2"],
            "language": "en",
            "custom_id": ["id_123", "id_456"],
            "return_audio_inline": True,
        },
    )
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["custom_id"] for i in items] == ["id_123", "id_456"]
    for item in items:
        audio = base64.b64decode(item["audio_base64"])
        assert audio == download(client, item)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "pcm"])
def test_response_formats(client, fmt):
    response = client.post(
        "/api/v1/custom-voice", json={"text": "Format test.", "speaker": "aiden", "response_format": fmt, "seed": 1}
    )
    assert response.status_code == 200, response.text
    item = response.json()["items"][0]
    data = download(client, item)
    if fmt == "pcm":
        assert len(data) == 2 * item["frames"] * FRAME
    else:
        samples, rate = sf.read(io.BytesIO(data))
        assert rate == SR
        assert abs(len(samples) - item["frames"] * FRAME) <= 2 * FRAME  # lossy codecs pad a little


def test_seed_makes_a_request_reproducible(client):
    body = {"text": "Same again, and a little longer this time.", "speaker": "dylan", "seed": 1234}
    first = client.post("/api/v1/custom-voice", json=body).json()["items"][0]
    second = client.post("/api/v1/custom-voice", json=body).json()["items"][0]
    assert download(client, first) == download(client, second)
    other = client.post("/api/v1/custom-voice", json=body | {"seed": 99}).json()["items"][0]
    assert download(client, other) != download(client, first)


def test_max_duration_bounds_the_frames(client):
    text = "This sentence is long enough to run well past a limit of five frames."
    body = {"text": text, "speaker": "ryan", "do_sample": False}
    free = client.post("/api/v1/custom-voice", json=body).json()["items"][0]["frames"]
    assert free > 5
    bounded = client.post("/api/v1/custom-voice", json=body | {"max_duration_s": 0.4})
    assert bounded.status_code == 200, bounded.text
    assert bounded.json()["items"][0]["frames"] == 5
    assert client.post("/api/v1/custom-voice", json=body | {"max_new_tokens": 7}).json()["items"][0]["frames"] == 7


def test_concurrent_requests_merge_into_one_batch(make_client, engine):
    client = make_client(batch_window_ms=300.0, engine=engine)
    loaded_model(client, CUSTOM_17)
    results = []

    def send(text):
        results.append(client.post("/api/v1/custom-voice", json={"text": text, "speaker": "ryan"}).status_code)

    # Long enough to overlap: the fast engine admits a first request at once (nothing else running)
    # and gathers later arrivals for up to QTTS_ADMIT_WAIT_MS while it runs.
    text = "A rather long sentence that keeps going for a good number of frames before it stops, request {}."
    threads = [threading.Thread(target=send, args=(text.format(i),)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    assert largest_batch(client) == 3


def test_sampled_audio_is_not_silent(client):
    item = client.post("/api/v1/custom-voice", json={"text": "Noise?", "speaker": "sohee"}).json()["items"][0]
    samples, _ = sf.read(io.BytesIO(download(client, item)))
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0


def test_wrong_model_kind_for_the_endpoint(client):
    response = client.post("/api/v1/voice-design", json={"text": "x", "instruct": "y", "model": CUSTOM_17})
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "model" and "voice_design" in error["message"]
