"""`/v1/audio/speech/stream` with the `websockets` client against a real uvicorn server: text in
pieces, audio out as it is spoken, errors as messages then a close code, cancel and disconnect."""

from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from .support import metric, wait_until_idle, words

pytestmark = pytest.mark.slow

SR = 24000
BYTES_PER_SECOND = SR * 2  # pcm: s16le mono
FRAME_BYTES = 1920 * 2
CONFIG = {"type": "session.config", "model": "tts-1", "voice": "alloy", "seed": 11}
# Split mid-word and mid-sentence on purpose: the server cuts segments at sentence ends itself.
PIECES = ["Hello wo", "rld. How are", " you to", "day? I am fine, th", "ank you."]


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/audio/speech/stream"


def send(ws, message: dict | str | bytes) -> None:
    ws.send(message if isinstance(message, str | bytes) else json.dumps(message))


def session(base: str, messages: list, timeout_s: float = 30) -> tuple[list, bytes, int | None]:
    """Send `messages`, then read until the server closes: (JSON messages, audio bytes, close code)."""
    texts, audio = [], bytearray()
    with connect(ws_url(base)) as ws:
        for message in messages:
            send(ws, message)
        try:
            while True:
                message = ws.recv(timeout=timeout_s)
                if isinstance(message, bytes):
                    audio += message
                else:
                    texts.append(json.loads(message))
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
    return texts, bytes(audio), code


def speak(base: str, pieces: list[str] = PIECES, **config: object) -> tuple[list, bytes, int | None]:
    return session(
        base,
        [{**CONFIG, **config}, *({"type": "input.text", "text": p} for p in pieces), {"type": "input.done"}],
    )


def test_session_speaks_text_sent_in_pieces(live_server):
    base, app = live_server
    texts, audio, code = speak(base)
    ready, done = texts[0], texts[-1]
    assert len(texts) == 2, texts
    assert ready == {
        "type": "session.ready",
        "model": "Qwen3-TTS-12Hz-1.7B-CustomVoice",
        "sample_rate": SR,
        "response_format": "pcm",
    }
    assert done["type"] == "session.done" and done["finish_reason"] == "eos"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert len(audio) % 2 == 0 and audio
    assert abs(len(audio) - done["audio_seconds"] * BYTES_PER_SECOND) <= FRAME_BYTES
    assert len(audio) == usage["output_tokens"] * FRAME_BYTES  # every frame's samples, joined
    assert code == 1000
    assert wait_until_idle(app) == {}


def test_same_seed_same_audio_across_segments(live_server):
    """Two sessions with one seed and one text (several sentences, so several segments) give the
    same bytes: every segment uses the session's seed."""
    base, _ = live_server
    _, first, _ = speak(base)
    _, second, _ = speak(base)
    assert first == second
    _, other, _ = speak(base, seed=12)
    assert other != first


def test_other_format(live_server):
    base, _ = live_server
    texts, audio, code = speak(base, response_format="wav")
    assert texts[0]["response_format"] == "wav" and texts[-1]["type"] == "session.done"
    assert audio[:4] == b"RIFF" and code == 1000


def check_error(texts: list, code: int | None, expected_code: int, param: str | None = None) -> dict:
    assert texts and texts[-1]["type"] == "error", texts
    error = texts[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert code == expected_code, (code, error)
    return error


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (["not json at all"], None),
        ([{"type": "input.text", "text": "Hello."}], "type"),  # first message not session.config
        ([b"\x00\x01binary"], None),
        ([{"no": "type"}], "type"),
        ([{**CONFIG, "voice": "nobody"}], "voice"),
        ([{**CONFIG, "speed": 9}], "speed"),
        ([{**CONFIG, "input": "text belongs in input.text"}], None),
        ([CONFIG, {"type": "bogus"}], "type"),  # unknown message type
        ([CONFIG, {"type": "input.text", "text": 5}], "text"),
        ([CONFIG, {"type": "input.text", "text": "Hello \ud800 there."}], "text"),  # a lone surrogate
        ([CONFIG, {"type": "input.text", "text": "Bell \u0007 here."}], "text"),  # a control character
    ],
)
def test_bad_messages_give_an_error_then_a_policy_close(live_server, messages, param):
    base, app = live_server
    texts, _, code = session(base, messages)
    check_error(texts, code, 1008, param)
    assert wait_until_idle(app) == {}


def test_a_database_outage_closes_with_1013_try_again_later(postgres_relay, make_live_server):
    relay, through_relay = postgres_relay
    base, app = make_live_server(database_url=through_relay)
    relay.close()  # the session's lookup of a stored voice meets the outage
    try:
        texts, _, code = session(base, [{**CONFIG, "voice": "my-narrator"}])
    finally:
        relay.open()
    error = check_error(texts, code, 1013)
    assert error["code"] == "storage_unavailable", error
    assert wait_until_idle(app) == {}


def test_oversized_message_closes_with_1009(make_live_server):
    base, app = make_live_server(ws_max_message_bytes=1024)
    texts, _, code = session(base, [CONFIG, {"type": "input.text", "text": "x" * 2000}])
    error = check_error(texts, code, 1009)
    assert "1024" in error["message"]
    assert wait_until_idle(app) == {}


def test_idle_client_is_closed(make_live_server):
    base, app = make_live_server(ws_idle_timeout_s=0.5)
    started = time.monotonic()
    texts, _, code = session(base, [CONFIG])  # config, then silence
    assert texts[0]["type"] == "session.ready"
    error = check_error(texts, code, 1008)
    assert "0.5 s" in error["message"]
    assert time.monotonic() - started < 10
    assert wait_until_idle(app) == {}


def test_idle_timeout_does_not_cut_audio_after_input_done(make_live_server):
    """After input.done the client has nothing more to say: the audio may take longer than the idle
    time-out and must still be spoken to the end."""
    base, _ = make_live_server(ws_idle_timeout_s=0.1)  # far shorter than generating 120 words
    texts, _, code = speak(base, [words(120)])
    assert texts[-1]["type"] == "session.done", texts[-1]
    assert texts[-1]["finish_reason"] == "eos"
    assert code == 1000


def test_text_after_input_done_is_an_error(live_server):
    base, _ = live_server
    texts, _, code = session(
        base, [CONFIG, {"type": "input.text", "text": words(60)}, {"type": "input.done"}, {"type": "input.text"}]
    )
    check_error(texts, code, 1008)


def read_until_audio(ws) -> None:
    ready = json.loads(ws.recv(timeout=30))
    assert ready["type"] == "session.ready"
    assert isinstance(ws.recv(timeout=30), bytes)  # audio is flowing


@pytest.mark.parametrize("when", ["before input.done", "after input.done"])
def test_cancel_mid_stream_frees_the_engine(live_server, when):
    base, app = live_server
    with connect(ws_url(base)) as ws:
        send(ws, CONFIG)
        send(ws, {"type": "input.text", "text": words(300)})
        if when == "after input.done":
            send(ws, {"type": "input.done"})
        read_until_audio(ws)
        send(ws, {"type": "cancel"})
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(ws.recv(timeout=10))
        assert not any(isinstance(m, str) and '"session.done"' in m for m in messages)
    assert wait_until_idle(app, timeout_s=5) == {}
    text = app.state.services.metrics.render().decode()
    assert metric(text, "qtts_finished_total", reason="cancelled") >= 1
    assert metric(text, "qtts_finished_total", reason="eos") == 0


@pytest.mark.parametrize("when", ["before input.done", "after input.done"])
def test_client_disconnect_mid_stream_frees_the_engine(live_server, when):
    base, app = live_server
    with connect(ws_url(base)) as ws:
        send(ws, CONFIG)
        send(ws, {"type": "input.text", "text": words(300)})
        if when == "after input.done":
            send(ws, {"type": "input.done"})
        read_until_audio(ws)
        ws.close_socket()  # gone, without a closing handshake
    assert wait_until_idle(app, timeout_s=5) == {}
    text = app.state.services.metrics.render().decode()
    assert metric(text, "qtts_client_disconnects_total") == 1
    assert metric(text, "qtts_finished_total", reason="eos") == 0
    assert metric(text, "qtts_streams") == 0
