"""Several devices in one server (QTTS_DEVICES=cpu,cpu here): synchronous and streaming requests are
served by both engines, and the model routes show and act on every device."""

from __future__ import annotations

import logging
import threading

import pytest

from qwen_tts_server.api.app import _startup_report
from qwen_tts_server.cli import main
from qwen_tts_server.engine.pool import DevicePool

from .support import CUSTOM_17


def native(text: str = "Hello there, how are you today?", **extra: object) -> dict[str, object]:
    return {"text": text, "speaker": "vivian", "seed": 1, **extra}


def test_two_devices_serve_requests_and_streams(make_client):
    client = make_client(devices="cpu,cpu", max_slots=2)
    pool = client.app.state.services.synthesizer
    assert isinstance(pool, DevicePool)

    loaded = client.post(f"/api/v1/models/{CUSTOM_17}/load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "loaded" and loaded.json()["device"] == "cpu,cpu"
    report = _startup_report(client.app.state.services)
    assert report[0].startswith("engine: fast on cpu,cpu") and report[1].startswith(
        "devices: cpu, cpu, one engine each"
    )

    codes: list[int] = []

    def send() -> None:
        codes.append(client.post("/api/v1/custom-voice", json=native()).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200] * 4
    assert all(sum(engine.batch_sizes()) > 0 for engine in pool.synthesizers), "one device took every request"

    streamed = client.post("/api/v1/custom-voice", json=native(stream=True, response_format="pcm"))
    assert streamed.status_code == 200 and len(streamed.content) > 0

    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["loaded_models"] == [CUSTOM_17] and ready["queue_depth"] == 0
    assert [d["device"] for d in ready["devices"]] == ["cpu", "cpu"]
    assert all(d["models"][CUSTOM_17]["rows"] == 2 for d in ready["devices"])
    memory = client.get("/api/v1/models").json()["memory"]
    assert memory["device"] == "cpu,cpu" and memory["used_bytes"] == sum(d["used_bytes"] for d in memory["devices"])

    unloaded = client.post(f"/api/v1/models/{CUSTOM_17}/unload")
    assert unloaded.json() == {"name": CUSTOM_17, "unloaded": True}
    assert all(not engine.registry.loaded() and not engine._fast for engine in pool.synthesizers)
    listed = client.get("/api/v1/models").json()
    assert {m["state"] for m in listed["models"]} == {"available"} and listed["memory"]["used_bytes"] == 0


def test_one_device_answers_as_before(client):
    """A single device keeps its plain engine; the model list and /ready only gain the per-device report."""
    assert not isinstance(client.app.state.services.synthesizer, DevicePool)
    assert client.post("/api/v1/custom-voice", json=native()).status_code == 200
    ready = client.get("/ready").json()
    assert ready["loaded_models"] == [CUSTOM_17] and [d["device"] for d in ready["devices"]] == ["cpu"]
    assert client.get("/api/v1/models").json()["memory"]["device"] == "cpu"


@pytest.fixture
def quiet_logging():
    """`serve` configures the package's logger; put it back afterwards."""
    logger = logging.getLogger("qwen_tts_server")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_serve_takes_devices(tmp_path, monkeypatch, quiet_logging):
    import uvicorn

    import qwen_tts_server.api.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "create_app", lambda settings: seen.setdefault("devices", settings.devices))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setenv("QTTS_LOG_JSON", "false")
    assert main(["serve", "--devices", "cpu, cpu", "--data-dir", str(tmp_path)]) == 0
    assert seen["devices"] == ["cpu", "cpu"]


def test_serve_refuses_a_gpu_the_host_lacks(tmp_path, monkeypatch, capsys, quiet_logging):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("started anyway"))
    monkeypatch.setenv("QTTS_LOG_JSON", "false")
    monkeypatch.setenv("QTTS_DEVICES", "cpu,cuda:63")
    assert main(["serve", "--data-dir", str(tmp_path)]) == 1
    assert "error: QTTS_DEVICES: 'cuda:63' is not on this host" in capsys.readouterr().err
