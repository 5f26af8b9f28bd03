"""A request's work lives as long as its client and its deadline, and a full model says no at once.
Real uvicorn server, real sockets (TestClient cannot hang up mid-response)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from .support import CUSTOM_17, engine_work, metric, wait_until_idle, words

pytestmark = pytest.mark.slow

# About 400 frames: seconds of work on a CPU, far longer than a first chunk or a short timeout, so
# the moment a test acts is always while the request is still generating.
LONG = words(300)
ONE_SEGMENT = {"segment_chars": 2000}  # so one request is one engine sequence, and counts are exact


def native(text: str = LONG, **extra: object) -> dict[str, object]:
    return {"text": text, "speaker": "vivian", "seed": 1, **extra}


def metrics_text(base: str) -> str:
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def warm_up(base: str) -> None:
    """Load the model and start its engine (a short stream: nothing is stored)."""
    body = native("Hi.", stream=True, response_format="pcm")
    response = httpx.post(f"{base}/api/v1/custom-voice", json=body, timeout=120)  # includes the model's load
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def slow_steps(app, step_s: float) -> Iterator[None]:
    """Every engine step takes at least `step_s` more: a stream's first chunk (a few steps) still comes at once,
    and a long one runs for seconds on any CPU, however fast or loaded."""
    (runtime,) = app.state.services.synthesizer._fast.values()
    engine = runtime.engine
    on_step = engine.on_step

    def slowed(batch: int) -> None:
        if on_step is not None:
            on_step(batch)
        time.sleep(step_s)

    engine.on_step = slowed
    try:
        yield
    finally:
        engine.on_step = on_step


def stored(app) -> int:
    return len(app.state.services.files.list())


def read_first_chunk_and_hang_up(base: str, path: str, body: dict) -> bytes:
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}{path}", json=body) as response:
        assert response.status_code == 200, response.read()
        first = next(response.iter_bytes())
    # Leaving both blocks closes the half-read response's connection: the client is gone.
    return first


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/custom-voice", native(stream=True, response_format="pcm")),
        ("/api/v1/custom-voice", native(stream=True, response_format="mp3")),
        ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "wav"}),
        ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": LONG, "stream_format": "sse"}),
    ],
    ids=["native-pcm", "native-mp3", "openai-wav", "openai-sse"],
)
def test_stream_client_that_hangs_up_cancels_the_work(make_live_server, path, body):
    base, app = make_live_server(**ONE_SEGMENT)
    warm_up(base)
    files_before = stored(app)
    assert read_first_chunk_and_hang_up(base, path, body)
    assert wait_until_idle(app, timeout_s=5) == {}, "the engine kept generating for a client that left"
    text = metrics_text(base)
    assert metric(text, "qtts_client_disconnects_total") == 1
    assert metric(text, "qtts_finished_total", reason="cancelled") == 1
    assert metric(text, "qtts_finished_total", reason="eos") == 1  # the warm-up only
    assert metric(text, "qtts_streams") == 0
    assert stored(app) == files_before == 0


def test_long_text_stream_hang_up_cancels_every_segment(make_live_server):
    """Several segments: the one playing and the one generating ahead are both cancelled."""
    base, app = make_live_server(segment_chars=100)
    warm_up(base)
    read_first_chunk_and_hang_up(base, "/api/v1/custom-voice", native(stream=True, response_format="pcm"))
    assert wait_until_idle(app, timeout_s=5) == {}
    text = metrics_text(base)
    assert metric(text, "qtts_client_disconnects_total") == 1
    assert metric(text, "qtts_finished_total", reason="cancelled") >= 1
    assert metric(text, "qtts_finished_total", reason="eos") == 1  # the warm-up only


def test_whole_request_client_that_gives_up_cancels_the_work(make_live_server):
    base, app = make_live_server(**ONE_SEGMENT)
    warm_up(base)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/api/v1/custom-voice", json=native(), timeout=0.3)
    assert wait_until_idle(app, timeout_s=5) == {}
    text = metrics_text(base)
    assert metric(text, "qtts_client_disconnects_total") == 1
    assert metric(text, "qtts_finished_total", reason="cancelled") == 1
    assert metric(text, "qtts_finished_total", reason="eos") == 1
    time.sleep(0.3)  # storing would have happened right after generation: make sure it never does
    assert stored(app) == 0


def test_openai_whole_format_client_that_gives_up_cancels_the_work(make_live_server):
    base, app = make_live_server(**ONE_SEGMENT)
    warm_up(base)
    body = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "flac"}  # flac: sent whole
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/audio/speech", json=body, timeout=0.3)
    assert wait_until_idle(app, timeout_s=5) == {}
    text = metrics_text(base)
    assert metric(text, "qtts_client_disconnects_total") == 1
    assert metric(text, "qtts_finished_total", reason="cancelled") == 1


def test_deadline_gives_504_and_frees_the_engine(make_live_server):
    base, app = make_live_server(**ONE_SEGMENT)
    warm_up(base)
    started = time.monotonic()
    response = httpx.post(f"{base}/api/v1/custom-voice", json=native(timeout_s=0.2), timeout=30)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "deadline_exceeded" and error["field"] == "timeout_s"
    assert time.monotonic() - started < 5
    assert wait_until_idle(app, timeout_s=5) == {}
    # The OpenAI route, whole format: the same, in OpenAI's shape.
    body = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "flac", "timeout_s": 0.2}
    response = httpx.post(f"{base}/v1/audio/speech", json=body, timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert response.json()["error"]["param"] == "timeout_s"
    assert wait_until_idle(app, timeout_s=5) == {}
    text = metrics_text(base)
    assert metric(text, "qtts_deadline_exceeded_total") == 2
    assert metric(text, "qtts_finished_total", reason="cancelled") == 2
    assert metric(text, "qtts_client_disconnects_total") == 0
    assert stored(app) == 0


def test_deadline_cuts_a_stream_short(make_live_server):
    """Once audio flows the status line is gone: a stream past its deadline just ends, early."""
    base, app = make_live_server(**ONE_SEGMENT)
    warm_up(base)
    body = native(stream=True, response_format="pcm", timeout_s=1.5)  # its first chunk comes well inside it
    with slow_steps(app, 0.02):  # ~400 steps: 8 s at least
        cut = httpx.post(f"{base}/api/v1/custom-voice", json=body, timeout=30)
    # Audio, cut short: at most a frame a step (1920 samples of 2 bytes) until the deadline, and a chunk in flight.
    assert cut.status_code == 200 and 0 < len(cut.content) < 2 * 1920 * (1.5 / 0.02 + 12), len(cut.content)
    assert wait_until_idle(app, timeout_s=5) == {}
    text = metrics_text(base)
    assert metric(text, "qtts_deadline_exceeded_total") == 1
    assert metric(text, "qtts_finished_total", reason="cancelled") == 1
    assert metric(text, "qtts_finished_total", reason="eos") == 1  # the warm-up: the stream never ended


def test_sse_cut_by_its_deadline_says_so(make_live_server):
    base, app = make_live_server(**ONE_SEGMENT)
    warm_up(base)
    body = {"model": "tts-1", "voice": "alloy", "input": LONG, "stream_format": "sse", "timeout_s": 1.5}
    with slow_steps(app, 0.02):
        response = httpx.post(f"{base}/v1/audio/speech", json=body, timeout=30)
    assert response.status_code == 200
    last = response.text.strip().split("\n\n")[-1]
    assert '"speech.audio.done"' in last and '"finish_reason":"cancelled"' in last
    assert wait_until_idle(app, timeout_s=5) == {}


class Background:
    """A very long streaming request in a thread; `close()` hangs up."""

    def __init__(self, base: str) -> None:
        self.status: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base,), daemon=True)
        self.thread.start()

    def _run(self, base: str) -> None:
        body = native(LONG, stream=True, response_format="pcm")
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{base}/api/v1/custom-voice", json=body) as r:
            self.status = r.status_code
            for _ in r.iter_bytes():
                if self.stop.is_set():
                    return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def wait_admitted(app, count: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while engine_work(app)["admitted"].get(CUSTOM_17, 0) < count:
        assert time.monotonic() < deadline, engine_work(app)
        time.sleep(0.02)


def test_full_model_refuses_at_once_with_retry_after(make_live_server):
    """One row and one queue place: a running stream and a waiting one fill the model; a third
    request is refused at once with 429 and Retry-After, and /ready says the model is saturated."""
    base, app = make_live_server(max_slots=1, max_queue=1, **ONE_SEGMENT)
    warm_up(base)
    ready = httpx.get(f"{base}/ready").json()
    assert ready["status"] == "ready" and ready["saturated_models"] == []
    running, waiting = Background(base), Background(base)
    try:
        wait_admitted(app, 2)
        started = time.monotonic()
        refused = httpx.post(f"{base}/api/v1/custom-voice", json=native("Hi."), timeout=30)
        assert time.monotonic() - started < 2  # at once, not after the others
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "overloaded" and CUSTOM_17 in error["message"]
        streamed = httpx.post(f"{base}/api/v1/custom-voice", json=native("Hi.", stream=True), timeout=30)
        assert streamed.status_code == 429 and int(streamed.headers["retry-after"]) >= 1
        openai = httpx.post(f"{base}/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi."})
        assert openai.status_code == 429 and int(openai.headers["retry-after"]) >= 1
        assert openai.json()["error"]["code"] == "overloaded"
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "saturated" and ready.json()["saturated_models"] == [CUSTOM_17]
        assert metric(metrics_text(base), "qtts_rejected_total") == 3
    finally:
        running.close()
        waiting.close()
    assert running.status == waiting.status == 200
    assert wait_until_idle(app, timeout_s=10) == {}
    ready = httpx.get(f"{base}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert httpx.post(f"{base}/api/v1/custom-voice", json=native("Hi."), timeout=30).status_code == 200


def test_client_that_gives_up_while_queued_leaves_the_queue(make_live_server):
    """A stream still waiting for a row (no audio yet, so no status line either) whose client gives
    up is taken out of the engine's queue at once; the running request is not disturbed."""
    base, app = make_live_server(max_slots=1, max_queue=1, **ONE_SEGMENT)
    warm_up(base)
    running = Background(base)
    try:
        wait_admitted(app, 1)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base}/api/v1/custom-voice", json=native(stream=True, response_format="pcm"), timeout=0.5)
        deadline = time.monotonic() + 5
        while engine_work(app)["admitted"].get(CUSTOM_17, 0) != 1 or engine_work(app)["waiting"]:
            assert time.monotonic() < deadline, engine_work(app)
            time.sleep(0.02)
        assert engine_work(app)["running"] == {CUSTOM_17: 1}  # the first one goes on
        assert metric(metrics_text(base), "qtts_client_disconnects_total") == 1
    finally:
        running.close()
    assert running.status == 200
    assert wait_until_idle(app) == {}


def test_no_queue_serves_one_request_per_row(make_live_server):
    base, app = make_live_server(max_slots=1, max_queue=0, **ONE_SEGMENT)
    first = httpx.post(f"{base}/api/v1/custom-voice", json=native("Hi."), timeout=30)
    assert first.status_code == 200, first.text
    running = Background(base)
    try:
        wait_admitted(app, 1)
        refused = httpx.post(f"{base}/api/v1/custom-voice", json=native("Hi."), timeout=30)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    finally:
        running.close()


FOUR_SENTENCES = "The first sentence is here. The second one follows it. A third sentence comes next. And a fourth."


def test_long_stream_is_not_refused_by_its_own_segments(make_live_server):
    """A stream holds one engine row at a time: on a model with one row and one queue place, a
    four-segment stream is not refused by its own next segments (it used to get 200, the first
    segments' audio, then break with 'response already started' in the server log)."""
    body = native(FOUR_SENTENCES, stream=True, response_format="pcm")
    roomy, _ = make_live_server(segment_chars=40)
    expected = httpx.post(f"{roomy}/api/v1/custom-voice", json=body, timeout=60)
    assert expected.status_code == 200 and len(expected.content) > 0
    base, _ = make_live_server(max_slots=1, max_queue=1, segment_chars=40)
    warm_up(base)
    streamed = httpx.post(f"{base}/api/v1/custom-voice", json=body, timeout=60)
    assert streamed.status_code == 200
    assert len(streamed.content) == len(expected.content)


def test_long_text_fits_a_small_queue(make_live_server):
    base, _ = make_live_server(max_slots=1, max_queue=1, segment_chars=40)
    warm_up(base)
    whole = httpx.post(f"{base}/api/v1/custom-voice", json=native(FOUR_SENTENCES), timeout=60)
    assert whole.status_code == 200, whole.text
