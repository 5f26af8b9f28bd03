"""Values the engine cannot use are a 422 naming the field; no input makes a 500 or drops the connection.

Numbers are checked in the dtype the sampler uses (float32 for temperature and repetition_penalty):
`temperature: 1e-45` is a positive double, but logits / 1.4e-45 (its float32 value) overflow to
+-inf and EOS is never chosen. Text is checked for what the tokenizer and a UTF-8 response cannot
carry. Bodies are sent as raw bytes where Python's JSON parser takes what json= would not send
(NaN, Infinity, lone surrogate escapes).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from qwen_tts_server.api.app import create_app
from qwen_tts_server.api.validation import TEMPERATURE_RANGE
from qwen_tts_server.engine.fast.sampler import RowSampling, choose
from qwen_tts_server.errors import InvalidRequest

from .support import error_of, settings_for

HI = '"text": "hi", "speaker": "ryan"'


def post_raw(client, path: str, raw: str):
    """POST `raw` (JSON text, possibly with NaN or \\ud800 escapes) as it is."""
    return client.post(f"/api/v1/{path}", content=raw.encode(), headers={"content-type": "application/json"})


def assert_invalid(response, field: str, *words: str) -> dict:
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request"
    assert error["field"] == field, error
    assert error["message"].startswith(f"{field}: ")
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert response.headers["x-request-id"]
    return error


TEMPERATURE = ("0.001 to 5", "do_sample: false")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("temperature", "1e-45", ("at least 0.001", "overflow", *TEMPERATURE)),
        ("temperature", "1e-300", ("at least 0.001", *TEMPERATURE)),
        ("temperature", "5e-324", ("at least 0.001", *TEMPERATURE)),
        ("temperature", "0.000999", ("at least 0.001", *TEMPERATURE)),
        ("temperature", "0", ("greater than 0", *TEMPERATURE)),
        ("temperature", "-0.5", ("greater than 0", *TEMPERATURE)),
        ("temperature", "5.0001", ("at most 5", *TEMPERATURE)),
        ("temperature", "NaN", ("finite number", "got nan", *TEMPERATURE)),
        ("temperature", "Infinity", ("finite number", *TEMPERATURE)),
        ("temperature", "-Infinity", ("finite number", *TEMPERATURE)),
        ("temperature", "1e400", ("finite number", *TEMPERATURE)),  # a JSON number that is inf as a double
        ("top_p", "1e-45", ("at least 0.001", "0.001 to 1", "do_sample: false")),
        ("top_p", "5e-324", ("at least 0.001", "0.001 to 1")),
        ("top_p", "0", ("greater than 0", "0.001 to 1")),
        ("top_p", "1.5", ("at most 1", "0.001 to 1")),
        ("top_p", "NaN", ("finite number", "0.001 to 1")),
        ("repetition_penalty", "1e-45", ("at least 0.2", "0.2 to 5", "1 means no penalty")),
        ("repetition_penalty", "5e-324", ("at least 0.2", "0.2 to 5")),
        ("repetition_penalty", "0.1", ("at least 0.2", "0.2 to 5")),
        ("repetition_penalty", "0", ("greater than 0", "0.2 to 5")),
        ("repetition_penalty", "6", ("at most 5", "0.2 to 5")),
        ("repetition_penalty", "Infinity", ("finite number", "0.2 to 5")),
        ("top_k", "0", ("at least 1", "whole number from 1 to 3072")),
        ("top_k", "3073", ("at most 3072", "whole number from 1 to 3072")),
        ("top_k", "1e30", ("at most 3072", "whole number from 1 to 3072")),
        ("top_k", "2.5", ("must be a whole number", "whole number from 1 to 3072")),
        ("top_k", "NaN", ("must be a whole number", "whole number from 1 to 3072")),
        ("top_k", '"9999"', ("at most 3072",)),  # a string still gets the bounds
        ("seed", "0.5", ("must be a whole number", "from 0 to 9223372036854775807")),
        ("seed", "-1", ("at least 0", "from 0 to 9223372036854775807")),
        ("seed", str(2**63), ("at most 9223372036854775807", "from 0 to 9223372036854775807")),
        ("seed", str(10**40), ("at most", "from 0 to 9223372036854775807")),
        ("max_duration_s", "NaN", ("finite number",)),
        ("timeout_s", "Infinity", ("finite number",)),
    ],
)
def test_numbers_out_of_range(client, field, value, words):
    response = post_raw(client, "custom-voice", f'{{{HI}, "{field}": {value}}}')
    says_what_to_send = () if field in ("max_duration_s", "timeout_s") else ("send",)
    assert_invalid(response, field, *says_what_to_send, *words)


def test_the_bounds_themselves_are_served(client):
    lowest = {"temperature": 0.001, "top_p": 0.001, "repetition_penalty": 0.2, "top_k": 1, "seed": 0}
    highest = {"temperature": 5, "top_p": 1, "repetition_penalty": 5, "top_k": 3072, "seed": 2**63 - 1}
    for sampling in (lowest, highest):
        body = {"text": "hi", "speaker": "ryan", "max_new_tokens": 6} | sampling
        response = client.post("/api/v1/custom-voice", json=body)
        assert response.status_code == 200, response.text
        assert 1 <= response.json()["items"][0]["frames"] <= 6


def test_the_lowest_temperature_keeps_eos_reachable_in_float32():
    """Why 1e-3 and not just > 0: EOS holds the largest logit; at 1e-45 every positive logit is
    +inf after the division and argmax takes the first of them, never EOS."""
    vocab, eos = 3072, 3070
    logits = torch.full((1, vocab), -5.0)
    logits[0, :50] = torch.linspace(1.0, 2.0, 50)
    logits[0, eos] = 10.0
    step = torch.zeros(1, dtype=torch.long)

    def eos_share(temperature: float) -> float:
        params = RowSampling.make(1, temperature=temperature, top_k=50)
        return sum(int(choose(logits, params, step + i, 0)) == eos for i in range(50)) / 50

    assert eos_share(TEMPERATURE_RANGE[0]) == 1.0
    assert eos_share(1e-45) == 0.0  # the bug: now refused with 422
    # Pessimistic logits (1e4, times the largest repetition penalty) stay finite at the bound.
    assert torch.isfinite(torch.tensor([5e4], dtype=torch.float32) / torch.tensor(TEMPERATURE_RANGE[0])).all()


# ----- text -----
SURROGATE = ("lone surrogate", "U+D800", "index 1", "send valid UTF-8")


@pytest.mark.parametrize(
    ("path", "raw", "field", "words"),
    [
        ("custom-voice", '{"text": "a\\ud800b", "speaker": "vivian"}', "text", SURROGATE),
        ("custom-voice", '{"text": "\\udc00", "speaker": "vivian"}', "text", ("lone surrogate", "U+DC00")),
        ("custom-voice", '{"text": "a\\ud83d", "speaker": "vivian"}', "text", ("lone surrogate", "U+D83D")),
        ("custom-voice", '{"text": ["ok", "a\\ud800b"], "speaker": "vivian"}', "text[1]", SURROGATE),
        ("custom-voice", '{"text": "a\\u0000b", "speaker": "ryan"}', "text", ("control character U+0000", "remove")),
        ("custom-voice", '{"text": "a\\u001bb", "speaker": "ryan"}', "text", ("control character U+001B", "tab")),
        ("custom-voice", '{"text": "a\\ufffe", "speaker": "ryan"}', "text", ("noncharacter U+FFFE", "remove")),
        ("custom-voice", '{"text": "a\\uffff", "speaker": "ryan"}', "text", ("noncharacter U+FFFF",)),
        ("custom-voice", '{"text": "a\\ufdd0", "speaker": "ryan"}', "text", ("noncharacter U+FDD0",)),
        ("custom-voice", '{"text": "a\\ud83f\\udffe", "speaker": "ryan"}', "text", ("noncharacter U+1FFFE",)),
        ("custom-voice", '{"text": "hi", "speaker": "a\\ud800b"}', "speaker", SURROGATE),
        ("custom-voice", '{"text": "hi", "speaker": ["ryan", "\\u0007"]}', "speaker[1]", ("control character",)),
        ("custom-voice", f'{{{HI}, "instruct": "a\\ud800b"}}', "instruct", SURROGATE),
        ("custom-voice", f'{{{HI}, "instruct": [null, "a\\ud800b"]}}', "instruct[1]", SURROGATE),
        ("custom-voice", f'{{{HI}, "custom_id": "a\\ud800b"}}', "custom_id", SURROGATE),
        ("custom-voice", f'{{{HI}, "custom_id": ["x", "a\\u0000"]}}', "custom_id[1]", ("control character",)),
        ("custom-voice", f'{{{HI}, "language": "a\\ud800b"}}', "language", SURROGATE),
        ("custom-voice", f'{{{HI}, "model": "a\\ud800b"}}', "model", SURROGATE),
        ("voice-design", '{"text": "hi", "instruct": "a\\ud800b"}', "instruct", SURROGATE),
        ("voice-clone", '{"text": "hi", "ref_audio": "a\\ud800b", "ref_text": "w"}', "ref_audio", SURROGATE),
        ("voice-clone", '{"text": "hi", "ref_audio": "x", "ref_text": "a\\ud800b"}', "ref_text", SURROGATE),
        ("voice-clone", '{"text": "a\\ud800b", "ref_audio": "x", "ref_text": "w"}', "text", SURROGATE),
    ],
)
def test_text_the_tokenizer_cannot_take(client, path, raw, field, words):
    assert_invalid(post_raw(client, path, raw), field, *words)


def test_text_with_tabs_newlines_and_astral_characters_is_served(client):
    raw = '{"text": "Tab\\there,\\r\\nnew \\ud83d\\ude00 \\u00e9t\\u00e9.", "speaker": "ryan", "max_new_tokens": 4}'
    response = post_raw(client, "custom-voice", raw)
    assert response.status_code == 200, response.text


# ----- the error path itself never fails -----
def test_a_key_with_a_surrogate_is_a_422_not_a_500(client):
    response = post_raw(client, "custom-voice", f'{{{HI}, "a\\ud800b": 1}}')
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request" and error["field"] is None
    assert "lone surrogate" in error["message"] and "send valid UTF-8" in error["message"]


def test_a_service_error_carrying_a_surrogate_is_escaped_not_a_500(client, monkeypatch):
    async def refuse(*args, **kwargs):
        raise InvalidRequest("speaker 'a\ud800b' is not available: choose one of ryan, vivian", field="spe\ud800")

    monkeypatch.setattr(client.app.state.services.synthesizer, "model_for", refuse)
    response = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan"})
    assert response.status_code == 422, response.text
    error = error_of(response)  # valid UTF-8 JSON, the surrogate written out as text
    assert error["type"] == "invalid_request" and error["field"] == "spe\\ud800"
    assert error["message"] == "speaker 'a\\ud800b' is not available: choose one of ryan, vivian"
    assert response.headers["x-request-id"]


def test_an_unexpected_error_is_a_500_with_the_request_id_and_the_client_goes_on(client, monkeypatch):
    calls = []

    async def explode(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("bug \ud800 with a surrogate in its message")

    engine = client.app.state.services.synthesizer
    original = engine.model_for
    monkeypatch.setattr(engine, "model_for", explode)
    # The TestClient raises server exceptions by default: none escapes the app any more.
    response = client.post(
        "/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan"}, headers={"x-request-id": "r1"}
    )
    assert response.status_code == 500 and calls
    error = error_of(response)
    assert error["type"] == "internal_error" and error["field"] is None
    assert "RuntimeError" in error["message"] and "quote request id r1" in error["message"]
    assert response.headers["x-request-id"] == "r1"
    generated = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan"})
    assert generated.status_code == 500
    assert f"request id {generated.headers['x-request-id']} " in error_of(generated)["message"]
    # Counted like any other response.
    assert 'route="/api/v1/custom-voice",status="500"' in client.get("/metrics").text
    monkeypatch.setattr(engine, "model_for", original)
    ok = client.post("/api/v1/custom-voice", json={"text": "hi", "speaker": "ryan", "max_new_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_an_error_in_the_middleware_itself_is_still_json_with_the_request_id(client, monkeypatch):
    class Broken:
        def labels(self, **_):
            raise RuntimeError("metrics backend down")

    monkeypatch.setattr(client.app.state.services.metrics, "requests", Broken())
    response = client.get("/health", headers={"x-request-id": "mw-1"})
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "internal_error" and "quote request id mw-1" in error["message"]
    assert response.headers["x-request-id"] == "mw-1"


def test_openai_routes_get_openais_shape(client):
    raw = '{"model": "tts-1", "input": "hi", "voice": "ryan", "temperature": NaN}'
    response = client.post("/v1/audio/speech", content=raw.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == "temperature" and "0.001 to 5" in error["message"]
    missing = client.get("/v1/no-such-route")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "Not Found",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }


# ----- over a real socket: a refused request leaves the keep-alive connection usable -----
def http_exchange(stream, sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    status_line = stream.readline()
    assert status_line, "the server closed the connection"
    status = int(status_line.split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", 0)))
    return status, headers, body


def http_request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{extra}"
    if "transfer-encoding" not in extra:
        head += f"content-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.slow
def test_keep_alive_survives_refusals_and_errors_on_a_real_server(tiny_models_dir, tmp_path):
    import uvicorn

    app = create_app(settings_for(models_dir=tiny_models_dir, data_dir=tmp_path / "data", max_json_bytes=4096))

    @app.get("/api/v1/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as stream:
            surrogate = b'{"text": "a\\ud800b", "speaker": "vivian"}'
            status, headers, body = http_exchange(stream, sock, http_request("POST", "/api/v1/custom-voice", surrogate))
            assert status == 422 and json.loads(body)["error"]["field"] == "text"
            assert "close" not in headers.get("connection", "")
            status, headers, body = http_exchange(stream, sock, http_request("GET", "/api/v1/boom"))
            assert status == 500 and json.loads(body)["error"]["type"] == "internal_error"
            assert headers["x-request-id"] in json.loads(body)["error"]["message"]
            assert "close" not in headers.get("connection", "")
            nan = b'{"text": "hi", "speaker": "ryan", "temperature": NaN}'
            status, _, body = http_exchange(stream, sock, http_request("POST", "/api/v1/custom-voice", nan))
            assert status == 422 and json.loads(body)["error"]["field"] == "temperature"
            status, _, _ = http_exchange(stream, sock, http_request("GET", "/health"))
            assert status == 200  # four requests, one connection
        # Declared over the cap: 413 before a byte of the body is sent, then the connection closes.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as stream:
            head = http_request("POST", "/api/v1/custom-voice", extra="content-length: 1000000000\r\n")
            head = head.replace(b"content-length: 0\r\n", b"")
            status, headers, body = http_exchange(stream, sock, head)
            assert status == 413 and json.loads(body)["error"]["type"] == "payload_too_large"
            assert headers["connection"] == "close" and stream.read() == b""
        # Chunked, no length: refused once the chunks pass the cap.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as stream:
            chunk = b" " * 2000
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
            request = http_request("POST", "/api/v1/custom-voice", chunks, extra="transfer-encoding: chunked\r\n")
            status, headers, body = http_exchange(stream, sock, request)
            assert status == 413 and json.loads(body)["error"]["type"] == "payload_too_large"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
