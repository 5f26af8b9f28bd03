"""Model registry over HTTP: listing, lazy single load, unload, budget, failures."""

from __future__ import annotations

import json
import shutil
import threading

from .support import BASE_06, CUSTOM_06, CUSTOM_17, error_of


def states(client) -> dict[str, str]:
    return {m["name"]: m["state"] for m in client.get("/api/v1/models").json()["models"]}


def test_nothing_loads_at_start_and_first_request_loads(client):
    assert set(states(client).values()) == {"available"}
    assert client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan"}).status_code == 200
    listed = client.get("/api/v1/models").json()
    loaded = [m for m in listed["models"] if m["state"] == "loaded"]
    assert [m["name"] for m in loaded] == [CUSTOM_17]
    assert loaded[0]["memory_bytes"] > 0 and listed["memory"]["used_bytes"] == loaded[0]["memory_bytes"]


def test_concurrent_first_requests_load_once(client):
    codes = []

    def send():
        codes.append(client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan"}).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4
    assert client.app.state.services.engine.registry.load_count == 1


def test_explicit_load_describe_unload(client):
    loaded = client.post(f"/api/v1/models/{CUSTOM_06}/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
    described = client.get(f"/api/v1/models/{CUSTOM_06}").json()
    assert "vivian" in described["speakers"] and "english" in described["languages"]
    assert described["accepts_instruct"] is False
    assert client.post(f"/api/v1/models/{CUSTOM_06}/unload").json() == {"name": CUSTOM_06, "unloaded": True}
    assert states(client)[CUSTOM_06] == "available"
    assert client.post(f"/api/v1/models/{CUSTOM_06}/unload").json()["unloaded"] is False


def test_hub_style_names_resolve_to_the_local_folder(client):
    response = client.post(f"/api/v1/models/Qwen/{CUSTOM_06}/load")
    assert response.status_code == 200 and response.json()["name"] == CUSTOM_06
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": f"Qwen/{CUSTOM_06}"})
    assert ok.status_code == 200 and ok.json()["model"] == CUSTOM_06


def test_memory_budget_unloads_least_recently_used(make_client, tiny_models_dir):
    probe = make_client()
    probe.post(f"/api/v1/models/{CUSTOM_06}/load")
    one_model = probe.get("/api/v1/models").json()["memory"]["used_bytes"]
    client = make_client(memory_budget_gb=1.5 * one_model / 1024**3)
    client.post(f"/api/v1/models/{CUSTOM_06}/load")
    client.post(f"/api/v1/models/{BASE_06}/load")
    current = states(client)
    assert current[BASE_06] == "loaded" and current[CUSTOM_06] == "available"


def test_a_broken_model_is_503_and_others_keep_serving(make_client, tiny_models_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    broken = models / "Broken-Model"
    shutil.copytree(models / CUSTOM_06, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    client = make_client(models_dir=models)
    response = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": "Broken-Model"})
    assert response.status_code == 503
    error = error_of(response)
    assert error["type"] == "model_unavailable" and "Broken-Model" in error["message"]
    assert states(client)["Broken-Model"] == "failed"
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
    assert ok.status_code == 200


def test_missing_model_with_downloads_disabled_is_503(client):
    response = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": "No-Such-Model"})
    assert response.status_code == 503
    assert "downloads are disabled" in error_of(response)["message"]


def test_local_folder_with_bad_config_is_503(make_client, tmp_path):
    models = tmp_path / "models"
    (models / "Odd").mkdir(parents=True)
    (models / "Odd" / "config.json").write_text(json.dumps({"model_type": "nope"}))
    client = make_client(models_dir=models)
    response = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": "Odd"})
    assert response.status_code == 503


def test_the_fast_engine_cache_counts_against_the_memory_budget(client):
    def memory() -> int:
        (model,) = [m for m in client.get("/api/v1/models").json()["models"] if m["name"] == CUSTOM_06]
        return model["memory_bytes"]

    client.post(f"/api/v1/models/{CUSTOM_06}/load")
    weights = memory()
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
    assert ok.status_code == 200
    runtime = client.app.state.services.engine._fast[CUSTOM_06]
    assert memory() == weights + runtime.engine.cache_bytes
    assert runtime.engine.scheduler.max_slots == 8  # unset QTTS_MAX_SLOTS on CPU
