"""A device fault (a CUDA error) in a step: its requests fail with a 503 to retry, none hang, /ready is red
while the model's engine is rebuilt, and then the model serves again.

The fault is injected into the real engine (tiny checkpoint, CPU): its talker step raises the error CUDA
raises on an illegal memory access; nothing else is replaced."""

from __future__ import annotations

import threading
import time

from qwen_tts_server.engine import synthesizer as synthesizer_module

from .support import CUSTOM_06, error_of

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def body(text: str = "A fault.") -> dict:
    return {"text": text, "speaker": "ryan", "model": CUSTOM_06, "max_new_tokens": 40}


def inject_fault(client) -> object:
    """Make the model's current engine fail its next talker step with a device fault; returns that engine."""
    runtime = client.app.state.services.synthesizer._fast[CUSTOM_06]

    def fault(*_args, **_kwargs):
        raise RuntimeError(ILLEGAL_ACCESS)

    runtime.engine.runner.decode = fault
    return runtime.engine


def wait_for_ready(client, timeout_s: float = 60.0) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get("/ready").json()["status"]
        seen.append(status)
        if status == "ready":
            return seen
        time.sleep(0.02)
    raise AssertionError(f"/ready did not come back: {seen[-5:]}")


def test_a_device_fault_fails_its_requests_with_503_and_the_engine_comes_back(client):
    assert client.post(f"/api/v1/models/{CUSTOM_06}/load").status_code == 200
    failed_engine = inject_fault(client)
    answers: list = []

    def send(i: int) -> None:
        answers.append(client.post("/api/v1/custom-voice", json=body(f"Request {i}.")))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == 3, "a request was left hanging"
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert error_of(answer)["type"] == "engine_failed" and "retry" in error_of(answer)["message"]
        assert answer.headers["retry-after"] == "30"
    seen = wait_for_ready(client)
    runtime = client.app.state.services.synthesizer._fast[CUSTOM_06]
    assert runtime.engine is not failed_engine and failed_engine.failure is not None
    assert client.post("/api/v1/custom-voice", json=body()).status_code == 200
    assert seen[-1] == "ready"
    # What the failed engine keeps of the fault holds no traceback, so no frame of its loop (which would
    # keep the engine, its KV cache and graphs, alive beside the new one until the cycle collector ran).
    assert failed_engine.failure.__traceback__ is None


def test_ready_is_red_while_an_engine_cannot_be_rebuilt(client, monkeypatch):
    assert client.post(f"/api/v1/models/{CUSTOM_06}/load").status_code == 200
    engine = client.app.state.services.synthesizer

    def dead_gpu(*_args, **_kwargs):
        raise RuntimeError(ILLEGAL_ACCESS)

    inject_fault(client)
    monkeypatch.setattr(synthesizer_module, "FastRuntime", dead_gpu)  # every rebuild meets the same dead GPU
    assert client.post("/api/v1/custom-voice", json=body()).status_code == 503
    deadline = time.monotonic() + 30
    while "could not be restarted" not in str(engine.engine_failures) and time.monotonic() < deadline:
        time.sleep(0.02)
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "engine_failed"
    assert ILLEGAL_ACCESS in ready.json()["engine_failures"][CUSTOM_06]


def test_a_device_fault_in_the_codec_thread_also_rebuilds_the_engine(client):
    assert client.post(f"/api/v1/models/{CUSTOM_06}/load").status_code == 200
    failed_engine = client.app.state.services.synthesizer._fast[CUSTOM_06].engine

    def fault(*_args, **_kwargs):
        raise RuntimeError(ILLEGAL_ACCESS)

    failed_engine.streaming_decoder.decode = fault  # decoding whole utterances to audio, on the codec thread
    answer = client.post("/api/v1/custom-voice", json=body())
    assert answer.status_code == 503 and error_of(answer)["type"] == "engine_failed"
    deadline = time.monotonic() + 30
    while failed_engine.failure is None and time.monotonic() < deadline:  # its step loop stops it next
        time.sleep(0.01)
    assert failed_engine.failure is not None
    engines = client.app.state.services.synthesizer
    while CUSTOM_06 in engines._fast and engines._fast[CUSTOM_06].engine is failed_engine:
        assert time.monotonic() < deadline, "the engine was not rebuilt"
        time.sleep(0.01)
    wait_for_ready(client)
    assert client.post("/api/v1/custom-voice", json=body()).status_code == 200
    assert engines._fast[CUSTOM_06].engine is not failed_engine
