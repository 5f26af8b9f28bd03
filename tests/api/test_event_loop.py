"""Slow work stays off the event loop: /health answers promptly while a 20 MB reference is resolved.

A voice-clone request carrying a ~20 MB reference as base64 (27 M characters of JSON) held the
event loop for about 0.35-0.5 s while the base64 was checked, stripped of whitespace, decoded and
hashed and the audio decoded: every other request (health probes included) waited. Now those steps
run in worker threads, and the whitespace strip, which held the GIL ~0.35 s in one regex call (a
thread would not have helped), is a 20x faster split. What still delays a probe: the body's JSON
parsing and validation on the loop, and the longest single GIL-holding call in a worker (the base64
decode).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from qwen_tts_server.audio import sources

from .support import BASE_17

SECONDS = 52.0  # 48 kHz stereo float32: 384 kB a second, so ~20 MB
# Measured on the 2-core test machine: the slowest /health call during the request took 55-62 ms
# with the fix, and 350-365 ms with the resolver's steps run on the loop as before (the control
# below). 200 ms leaves 3x headroom for a machine busy with other work, and still fails the control.
BOUND_S = 0.2


def big_reference() -> bytes:
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal((int(SECONDS * 48000), 2))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, 48000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def health_latencies_during(base: str, body: bytes) -> tuple[list[float], httpx.Response]:
    """Send the clone request from a thread; meanwhile time /health calls until it is answered."""
    result: dict[str, httpx.Response] = {}
    sent = threading.Event()

    def post() -> None:
        with httpx.Client(timeout=120) as client:
            sent.set()
            result["response"] = client.post(
                f"{base}/api/v1/voice-clone", content=body, headers={"content-type": "application/json"}
            )

    latencies: list[float] = []
    poster = threading.Thread(target=post)
    # The server shares this process with the whole test session's objects: a full cycle collection
    # (hundreds of ms with torch and many apps built) could land in the window and hold the GIL. That
    # pause is not what this measures, so the collector waits until the end (in both tests alike).
    gc.collect()
    gc.disable()
    try:
        with httpx.Client(timeout=30) as client:
            client.get(f"{base}/health")  # connection open before measuring
            poster.start()
            sent.wait()
            while poster.is_alive():
                started = time.perf_counter()
                assert client.get(f"{base}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        poster.join()
    finally:
        gc.enable()
    return latencies, result["response"]


@pytest.fixture(scope="module")
def clone_body() -> bytes:
    audio = big_reference()
    assert 19_000_000 < len(audio) < 20_500_000
    text = base64.b64encode(audio).decode("ascii")
    return json.dumps({"text": "Hello.", "ref_audio": text, "ref_text": "Words.", "model": BASE_17}).encode()


def serve(make_live_server) -> str:
    # The reference is decoded in full and then refused as too long: every step of resolving it runs,
    # without the test waiting for a clone of 52 s of noise.
    base, _ = make_live_server(max_ref_audio_s=SECONDS - 2, max_upload_bytes=21 * 1024 * 1024)
    assert httpx.post(f"{base}/api/v1/models/{BASE_17}/load", timeout=120).status_code == 200
    return base


def test_health_answers_while_a_20_mb_reference_is_decoded(make_live_server, clone_body):
    base = serve(make_live_server)
    latencies, response = health_latencies_during(base, clone_body)
    assert response.status_code == 422 and "too long" in response.json()["error"]["message"], response.text
    assert len(latencies) >= 5, latencies  # the decode took long enough to measure
    assert max(latencies) < BOUND_S, sorted(latencies)[-5:]


def test_the_same_reference_decoded_on_the_loop_stalls_health(make_live_server, clone_body, monkeypatch):
    """The control: with the resolver's steps run inline on the event loop and the regex strip, as
    before the fix, the same request holds /health past the bound, so the test above can fail."""

    class Inline:
        def __getattr__(self, name: str) -> object:
            return getattr(asyncio, name)

        @staticmethod
        async def to_thread(fn, /, *args, **kwargs):
            return fn(*args, **kwargs)

    fixed = sources.ReferenceAudioResolver._from_base64

    def as_before(self, text: str, field: str) -> bytes:
        sources._WHITESPACE_RE.sub("", text)  # the whitespace strip as it was: one regex call
        return fixed(self, text, field)

    monkeypatch.setattr(sources, "asyncio", Inline())
    monkeypatch.setattr(sources.ReferenceAudioResolver, "_from_base64", as_before)
    base = serve(make_live_server)
    latencies, response = health_latencies_during(base, clone_body)
    assert response.status_code == 422
    assert max(latencies) > BOUND_S, sorted(latencies)[-5:]
