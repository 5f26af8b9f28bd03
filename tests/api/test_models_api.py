"""Model registry over HTTP: listing, lazy single load, unload, budget, failures."""

from __future__ import annotations

import gc
import json
import shutil
import socket
import threading
import time
import weakref

from qwen_tts_server.engine import synthesizer as synthesizer_module
from qwen_tts_server.engine.registry import memory_of

from .support import BASE_06, CUSTOM_06, CUSTOM_17, error_of, metric


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
    assert client.app.state.services.synthesizer.registry.load_count == 1


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


def test_a_known_model_missing_with_downloads_disabled_is_503(make_client, tmp_path):
    client = make_client(models_dir=tmp_path / "empty")
    response = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
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

    client.post(f"/api/v1/models/{CUSTOM_06}/load")  # the engine starts with the load
    engine = client.app.state.services.synthesizer
    runtime = engine._fast[CUSTOM_06]
    weights = memory_of(engine.registry.loaded_model(CUSTOM_06).tts)
    assert memory() == weights + runtime.engine.cache_bytes
    assert runtime.engine.scheduler.max_slots == 8  # unset QTTS_MAX_SLOTS on CPU


# ----- only known names are models -----
EVIL = f"evil-user/{CUSTOM_17}"


def _no_network(monkeypatch) -> list[object]:
    """Record (and refuse) every outbound connection: an unknown name must not reach any hub."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError("network use in a test that must not touch the network")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
    return attempts


def test_unknown_names_are_404_with_no_hub_call_no_entry_and_no_metric_series(make_client, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    attempts = _no_network(monkeypatch)
    # Downloads on, from the default org: still nothing may be fetched for a name that is not ours.
    client = make_client(models_dir=models, download_source="huggingface")
    registry = client.app.state.services.synthesizer.registry
    requests = [
        ("post", "/api/v1/custom-voice", {"text": "hi", "speaker": "ryan", "model": EVIL}),
        ("post", "/api/v1/custom-voice", {"text": "hi", "speaker": "ryan", "model": "Made-Up-Model"}),
        ("post", f"/api/v1/models/{EVIL}/load", None),
        ("post", "/api/v1/models/Made-Up-Model/load", None),
        ("post", f"/api/v1/models/{EVIL}/unload", None),
        ("get", f"/api/v1/models/{EVIL}", None),
        ("get", "/api/v1/models/doesnotexist", None),
    ]
    for method, path, body in requests:
        response = client.request(method, path, json=body)
        assert response.status_code == 404, (path, response.text)
        error = error_of(response)
        assert error["type"] == "not_found" and error["field"] == "model"
        assert CUSTOM_17 in error["message"] and BASE_06 in error["message"]  # the known names are listed
    assert "configured organisation 'Qwen'" in error_of(client.post(f"/api/v1/models/{EVIL}/load"))["message"]
    assert attempts == []
    assert not registry._errors and not registry._loading and not registry._downloads and not registry.loaded()
    assert list(models.iterdir()) == []  # nothing written where the official model would go
    listed = states(client)
    assert "doesnotexist" not in listed and "Made-Up-Model" not in listed and listed[CUSTOM_17] == "available"
    assert "qtts_model_loads_total{" not in client.get("/metrics").text  # no label series was created


def test_the_configured_org_prefix_is_the_same_model(client):
    assert client.get(f"/api/v1/models/Qwen/{CUSTOM_06}").json()["name"] == CUSTOM_06
    assert client.get(f"/api/v1/models/qwen/{CUSTOM_06}").status_code == 200  # hub org names ignore case


def test_extra_models_are_known_and_others_are_not(make_client, tmp_path):
    client = make_client(models_dir=tmp_path / "empty", extra_models="Qwen/My-Finetune,other-org/Not-Ours")
    listed = states(client)
    assert listed["My-Finetune"] == "available" and "Not-Ours" not in listed
    response = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": "My-Finetune"})
    assert response.status_code == 503 and "downloads are disabled" in error_of(response)["message"]
    assert client.post("/api/v1/models/other-org/Not-Ours/load").status_code == 404
    assert client.post("/api/v1/models/Not-Ours/load").status_code == 404


def test_get_on_the_load_and_unload_paths_is_405_not_a_model_named_load(client):
    for action in ("load", "unload"):
        for name in (CUSTOM_06, f"Qwen/{CUSTOM_06}", "X"):
            response = client.get(f"/api/v1/models/{name}/{action}")
            assert response.status_code == 405, response.text
            assert response.headers["allow"] == "POST"
            assert error_of(response)["type"] == "method_not_allowed" and "POST" in error_of(response)["message"]
    assert states(client)[CUSTOM_06] == "available"  # nothing was loaded by a GET


# ----- downloads run in the background -----
class SlowCopy:
    """A downloader that copies a tiny checkpoint into the destination in two halves, waiting for the
    test between them: the registry's own machinery (background task, progress, staging folder, 503)
    runs for real; only the bytes come from a local folder instead of a hub."""

    def __init__(self, source_dir, fail: bool = False) -> None:
        self.source_dir = source_dir
        self.fail = fail
        self.half_written = threading.Event()
        self.go_on = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def __call__(self, source, repo_id, dest, progress) -> None:
        self.calls.append((source, repo_id))
        src = self.source_dir / repo_id.split("/", 1)[1]
        files = sorted(p for p in src.rglob("*") if p.is_file())
        if progress is not None:
            progress.bytes_total = sum(p.stat().st_size for p in files)
        later = [p for p in files if p.name == "config.json" and p.parent == src]  # config.json last
        first = [p for p in files if p not in later]
        half = len(first) // 2
        for group in (first[:half], first[half:] + later):
            for path in group:
                target = dest / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            if group is not later and not self.half_written.is_set():
                self.half_written.set()
                assert self.go_on.wait(30)
                if self.fail:
                    raise ConnectionError("the hub hung up")


def client_with_downloader(tmp_path, downloader, **overrides):
    from fastapi.testclient import TestClient

    from qwen_tts_server.api.app import create_app
    from qwen_tts_server.engine.registry import ModelRegistry
    from qwen_tts_server.engine.synthesizer import Synthesizer

    from .support import settings_for

    settings = settings_for(
        models_dir=tmp_path / "models", data_dir=tmp_path / "data", download_source="huggingface", **overrides
    )
    engine = Synthesizer(settings, registry=ModelRegistry(settings, downloader=downloader))
    return TestClient(create_app(settings, synthesizer=engine))


def wait_for(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_missing_model_downloads_in_the_background_with_progress(tiny_models_dir, tmp_path, monkeypatch):
    import logging

    from qwen_tts_server.engine import registry as registry_module

    monkeypatch.setattr(registry_module, "PROGRESS_POLL_S", 0.05)
    monkeypatch.setattr(registry_module, "PROGRESS_LOG_S", 0.05)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(registry_module.__name__)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    copy = SlowCopy(tiny_models_dir)
    body = {"text": "hi", "speaker": "ryan", "model": CUSTOM_06}
    try:
        with client_with_downloader(tmp_path, copy) as client:
            first = client.post("/api/v1/custom-voice", json=body)  # answered at once, not after the download
            assert first.status_code == 503 and int(first.headers["retry-after"]) > 0
            assert "downloading from huggingface (Qwen/" in error_of(first)["message"]
            assert copy.half_written.wait(30)

            def progress():
                (model,) = [m for m in client.get("/api/v1/models").json()["models"] if m["name"] == CUSTOM_06]
                download = model["download"]
                return model["state"] == "downloading" and download["bytes_done"] > 0 and download

            download = wait_for(progress)
            assert download["repo_id"] == f"Qwen/{CUSTOM_06}" and 0 < download["percent"] < 100
            assert 0 < download["bytes_done"] < download["bytes_total"]
            again = client.post("/api/v1/custom-voice", json=body)
            assert again.status_code == 503 and "%" in error_of(again)["message"]
            assert not (tmp_path / "models" / CUSTOM_06).exists()  # a half download is never taken for a model
            wait_for(lambda: any("%" in r and CUSTOM_06 in r for r in records))  # progress shows in the log
            copy.go_on.set()
            wait_for(lambda: states(client)[CUSTOM_06] == "available")
            assert (tmp_path / "models" / CUSTOM_06 / "config.json").is_file()
            assert client.post("/api/v1/custom-voice", json=body).status_code == 200
            assert copy.calls == [("huggingface", f"Qwen/{CUSTOM_06}")]  # one download for all those requests
            assert any("downloaded" in r for r in records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_explicit_load_of_a_missing_model_answers_202_with_the_download(tiny_models_dir, tmp_path):
    copy = SlowCopy(tiny_models_dir)
    with client_with_downloader(tmp_path, copy) as client:
        response = client.post(f"/api/v1/models/{CUSTOM_06}/load")
        assert response.status_code == 202 and response.headers["retry-after"]
        assert response.json()["state"] == "downloading" and response.json()["download"]["source"] == "huggingface"
        copy.go_on.set()
        wait_for(lambda: states(client)[CUSTOM_06] == "available")
        assert client.post(f"/api/v1/models/{CUSTOM_06}/load").json()["state"] == "loaded"


def test_a_failed_download_is_reported_and_not_retried_at_once(tiny_models_dir, tmp_path):
    copy = SlowCopy(tiny_models_dir, fail=True)
    copy.go_on.set()
    with client_with_downloader(tmp_path, copy) as client:
        body = {"text": "hi", "speaker": "ryan", "model": CUSTOM_06}
        assert client.post("/api/v1/custom-voice", json=body).status_code == 503
        wait_for(lambda: states(client)[CUSTOM_06] == "failed")
        (model,) = [m for m in client.get("/api/v1/models").json()["models"] if m["name"] == CUSTOM_06]
        assert "ConnectionError: the hub hung up" in model["error"]
        response = client.post("/api/v1/custom-voice", json=body)
        assert response.status_code == 503 and "the hub hung up" in error_of(response)["message"]
        assert int(response.headers["retry-after"]) > 1 and len(copy.calls) == 1
        assert not (tmp_path / "models" / CUSTOM_06).exists()
        labels = metric(client.get("/metrics").text, "qtts_model_loads_total", model=CUSTOM_06, result="error")
        assert labels == 1


# ----- unloading frees the memory at once -----
def test_unload_frees_the_fast_engine_without_the_cycle_collector(client):
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
    assert ok.status_code == 200
    engine = client.app.state.services.synthesizer
    runtime = engine._fast[CUSTOM_06]
    dead_runtime, dead_engine = weakref.ref(runtime), weakref.ref(runtime.engine)
    dead_codec = weakref.ref(runtime.engine.codec)
    dead_upstream = weakref.ref(runtime.tts)  # the model's weights too
    del runtime
    gc.collect()
    gc.disable()  # what dies below dies by reference counting, at unload, not at a later collection
    try:
        assert client.post(f"/api/v1/models/{CUSTOM_06}/unload").json() == {"name": CUSTOM_06, "unloaded": True}
        assert dead_engine() is None and dead_runtime() is None and dead_codec() is None
        assert dead_upstream() is None
    finally:
        gc.enable()
    assert CUSTOM_06 not in engine._fast and client.get("/api/v1/models").json()["memory"]["used_bytes"] == 0
    # It loads again on the next request.
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
    assert ok.status_code == 200


def test_start_up_says_what_it_found_and_what_it_will_do(make_client, tiny_models_dir, tmp_path):
    import logging

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / CUSTOM_06, models / CUSTOM_06)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("qwen_tts_server.api.app")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        make_client(models_dir=models, download_source="huggingface")
        make_client(models_dir=models, data_dir=tmp_path / "d2")  # downloads off (the tests' default)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = "\n".join(records)
    assert f"models found there: {CUSTOM_06}" in text
    assert "each is downloaded from huggingface (Qwen/<name>) on first use" in text and CUSTOM_17 in text
    assert "downloads are off (QTTS_DOWNLOAD_SOURCE=none)" in text


def engine_rows(client, name: str) -> int:
    """The rows of the model's started engine as /ready reports them (0: loaded, engine not started)."""
    body = client.get("/ready").json()
    return sum(d["models"].get(name, {}).get("rows", 0) for d in body.get("devices", []))


def wait_ready(client, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        ready = client.get("/ready")
        seen.append(ready.json()["status"])
        if ready.json()["status"] not in ("starting", "loading"):
            return ready, seen
        time.sleep(0.05)
    raise AssertionError(f"/ready never settled: {seen[-5:]}")


def test_an_explicit_load_starts_the_engine_before_it_answers(client):
    assert client.post(f"/api/v1/models/{CUSTOM_06}/load").status_code == 200
    assert engine_rows(client, CUSTOM_06) > 0  # warm-up done: the first request waits for nothing


def test_preloaded_models_are_up_before_ready(make_client):
    client = make_client(preload_models=[CUSTOM_06])
    ready, seen = wait_ready(client)
    assert ready.status_code == 200 and ready.json()["loaded_models"] == [CUSTOM_06], seen
    assert engine_rows(client, CUSTOM_06) > 0
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
    assert ok.status_code == 200 and client.app.state.services.synthesizer.registry.load_count == 1


def test_a_failed_preload_keeps_ready_red_and_says_why(make_client):
    client = make_client(preload_models=[CUSTOM_06, "Qwen3-TTS-nope"])
    ready, _ = wait_ready(client)
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert "Qwen3-TTS-nope" in ready.json()["preload_errors"]["Qwen3-TTS-nope"]
    assert states(client)[CUSTOM_06] == "loaded"  # the others are served


def test_a_request_that_gives_up_during_the_first_load_leaves_one_engine(client, monkeypatch):
    """The engine's build (minutes on a GPU) outlives a caller that leaves: it is finished, kept and counted
    once, and the next request uses it instead of building a second one beside it."""
    body = {"text": "hi", "speaker": "ryan", "model": CUSTOM_06}
    engine = client.app.state.services.synthesizer
    real = synthesizer_module.FastRuntime

    built = threading.Event()

    def slow_build(*args, **kwargs):  # as long as a GPU's warm-up, relative to the request's time-out
        built.wait(timeout=60)  # until the test has seen the caller give up
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesizer_module, "FastRuntime", slow_build)
    client.portal.call(engine.registry.get, CUSTOM_06)  # the weights, not the engine: it is built on first use
    assert client.post("/api/v1/custom-voice", json=body | {"timeout_s": 0.2}).status_code == 504
    assert engine._builds, "the request should have given up while the engine was being built"
    built.set()
    deadline = time.monotonic() + 60
    while (CUSTOM_06 not in engine._fast or engine._builds) and time.monotonic() < deadline:
        time.sleep(0.02)
    runtime = engine._fast[CUSTOM_06]
    (listed,) = [m for m in client.get("/api/v1/models").json()["models"] if m["name"] == CUSTOM_06]
    assert listed["memory_bytes"] == memory_of(runtime.tts) + runtime.engine.cache_bytes
    assert client.post("/api/v1/custom-voice", json=body).status_code == 200
    assert engine._fast[CUSTOM_06] is runtime
