"""Health, readiness, metrics, API keys and request ids."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from .support import error_of, sine_wav


def test_health_and_ready(client):
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_count_requests_audio_and_loads(client):
    client.post("/api/v1/custom-voice", json={"text": "Count me.", "speaker": "ryan"})
    text = client.get("/metrics").text
    for name in (
        "qtts_requests_total",
        "qtts_request_seconds",
        "qtts_audio_seconds_total",
        "qtts_queue_depth",
        "qtts_model_loads_total",
        "qtts_batch_size",
    ):
        assert name in text
    assert 'qtts_model_loads_total{model="Qwen3-TTS-12Hz-1.7B-CustomVoice",result="ok"} 1.0' in text
    assert 'route="/api/v1/custom-voice",status="200"' in text


def test_metrics_say_where_a_finished_requests_time_went(client):
    """Per model, the fast engine's finished requests: how many, and their seconds from their prompt to finish
    in five phases (prompt, queue, first frame, frames, tail), which together fit inside the request's own time."""
    t0 = time.perf_counter()
    assert client.post("/api/v1/custom-voice", json={"text": "Time me.", "speaker": "ryan"}).status_code == 200
    wall = time.perf_counter() - t0
    phases = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "qtts_engine_request_phase_seconds":
            for sample in family.samples:
                phases.setdefault(sample.labels["phase"], {})[sample.name.rsplit("_", 1)[1]] = sample.value
    assert set(phases) == {"prompt", "queue", "first_frame", "frames", "tail"}
    assert all(p["count"] == 1 for p in phases.values())
    assert all(p["sum"] >= 0 for p in phases.values()) and phases["frames"]["sum"] > 0 and phases["prompt"]["sum"] > 0
    assert sum(p["sum"] for p in phases.values()) <= wall


def test_metrics_count_the_streaming_codecs_batches(client):
    """One request at a time on the CPU (no graphs): each of its chunks is a batch of one stream, one row."""
    assert client.post("/api/v1/custom-voice", json={"text": "Count my chunks.", "speaker": "ryan"}).status_code == 200
    counts = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name.startswith("qtts_engine_codec_"):
            (sample,) = family.samples
            counts[family.name.removeprefix("qtts_engine_codec_")] = sample.value
    assert counts["batches"] >= 1, counts  # a whole utterance decodes through the streaming decoder in chunks
    assert counts["streams"] == counts["rows"] == counts["batches"], counts


def test_a_load_freezes_its_objects_out_of_the_collector_and_metrics_count_its_pauses(make_client):
    import gc

    gc.unfreeze()
    client = make_client()
    assert client.post("/api/v1/models/Qwen3-TTS-12Hz-0.6B-CustomVoice/load").status_code == 200
    assert gc.get_freeze_count() > 10_000, "the warm-up's objects were not frozen"
    text = client.get("/metrics").text
    assert 'qtts_gc_pause_seconds_total{generation="2"}' in text and "qtts_gc_long_pauses_total" in text
    gc.unfreeze()
    off = make_client(gc_freeze=False)
    assert off.post("/api/v1/models/Qwen3-TTS-12Hz-0.6B-CustomVoice/load").status_code == 200
    assert gc.get_freeze_count() == 0


def test_request_id_is_echoed(client):
    response = client.get("/health", headers={"x-request-id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert client.get("/health").headers["x-request-id"]


def test_api_keys_guard_every_route_but_probes(make_client):
    client = make_client(api_keys=["k1", "k2"])
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    for method, path in [
        ("get", "/api/v1/models"),
        ("get", "/metrics"),
        ("post", "/api/v1/custom-voice"),
        ("get", "/api/v1/files/file-" + "0" * 32 + "/content"),
        # (/docs is open: a browser cannot send a key to open a page; test_docs_offline.py.)
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, path
        assert "API key" in error_of(response)["message"]
    assert client.get("/api/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    good = {"authorization": "Bearer k2"}
    upload = client.post("/api/v1/files/upload", files={"file": ("a.wav", sine_wav(), "audio/wav")}, headers=good)
    assert upload.status_code == 201
    url = upload.json()["url"]
    # The url handed out is signed (it works without a key, for <audio src> and links: tests/compat);
    # without its signature it needs a key like every route.
    plain = url.split("?")[0]
    assert client.get(plain).status_code == 401
    assert client.get(plain, headers={"x-api-key": "k1"}).status_code == 200
    assert client.get(url).status_code == 200


def test_openapi_docs_are_served(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/v1/custom-voice", "/api/v1/voice-design", "/api/v1/voice-clone", "/api/v1/files/upload"):
        assert path in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_json_404(client):
    response = client.get("/api/v1/nothing")
    assert response.status_code == 404 and error_of(response)["type"] == "not_found"
