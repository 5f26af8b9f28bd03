"""Request bodies are capped before they are read: 413 in the route's error shape, at once."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import StreamingResponse

from qwen_tts_server.api.app import create_app
from qwen_tts_server.api.error_shapes import error_body
from qwen_tts_server.api.limits import MULTIPART_OVERHEAD_BYTES, BodyLimit

from .support import error_of, settings_for, sine_wav

LIMIT = 4096
SMALL = {"text": "hi", "speaker": "ryan", "do_sample": False, "max_new_tokens": 2}


def padded(body: dict, size: int) -> bytes:
    """`body` as JSON with trailing whitespace to exactly `size` bytes (still valid JSON)."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def assert_too_large(response, words: str) -> None:
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error == {"type": "payload_too_large", "message": error["message"], "field": None}
    assert words in error["message"] and "send" in error["message"]
    assert response.headers["connection"] == "close"  # the rest of the body is not read
    assert response.headers["x-request-id"]


@pytest.fixture
def capped(make_client):
    return make_client(max_json_bytes=LIMIT)


def test_json_at_the_limit_is_served(capped):
    response = capped.post(
        "/api/v1/custom-voice", content=padded(SMALL, LIMIT), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text


def test_json_over_the_limit_from_content_length(capped):
    response = capped.post(
        "/api/v1/custom-voice", content=padded(SMALL, LIMIT + 1), headers={"content-type": "application/json"}
    )
    assert_too_large(response, f"limit of 4 KiB ({LIMIT} bytes)")
    assert "file_id" in error_of(response)["message"]  # what to send instead of inline base64


def test_json_over_the_limit_with_an_understated_content_length(capped):
    # Content-Length says 100, the body is larger: the bytes are counted as they arrive.
    response = capped.post(
        "/api/v1/custom-voice",
        content=padded(SMALL, LIMIT * 3),
        headers={"content-type": "application/json", "content-length": "100"},
    )
    assert_too_large(response, f"({LIMIT} bytes)")


def test_json_over_the_limit_without_content_length(capped):
    def chunks():
        yield padded(SMALL, LIMIT * 2)

    response = capped.post("/api/v1/custom-voice", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # sent chunked
    assert_too_large(response, f"({LIMIT} bytes)")


def test_the_default_json_limit_takes_a_20_mb_base64_reference(make_client):
    settings = make_client().app.state.services.settings
    assert settings.max_json_bytes == 32 * 1024 * 1024
    base64_chars = 4 * -(-settings.max_upload_bytes // 3)  # an upload-sized clip, inline
    assert base64_chars + 1000 < settings.max_json_bytes


def test_openai_routes_get_openais_shape(capped):
    body = {"model": "tts-1", "input": "hi", "voice": "ryan"}
    response = capped.post(
        "/v1/audio/speech", content=padded(body, LIMIT + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "payload_too_large"
    assert error["param"] is None and f"({LIMIT} bytes)" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_multipart_is_capped_at_the_upload_limit_plus_form_overhead(make_client):
    client = make_client(max_upload_bytes=50_000)
    # Over the file limit but within the form's allowance: the upload route itself says so.
    response = client.post("/api/v1/files/upload", files={"file": ("big.wav", sine_wav(3.0), "audio/wav")})
    assert response.status_code == 413 and error_of(response)["field"] == "file"
    # Over the upload limit plus 1 MiB: refused before the form is parsed.
    data = b"\0" * (50_000 + MULTIPART_OVERHEAD_BYTES + 1)
    response = client.post("/api/v1/files/upload", files={"file": ("huge.wav", data, "audio/wav")})
    assert_too_large(response, "shorter audio clip")
    assert "1.0 MiB (1098576 bytes)" in error_of(response)["message"]


def test_error_body_shapes():
    native = error_body("/api/v1/custom-voice", 413, "payload_too_large", "too big", None)
    assert native == {"error": {"type": "payload_too_large", "message": "too big", "field": None}, "detail": "too big"}
    assert error_body("/api/v1/x", 422, "invalid_request", "m", "text[1]", errors=[])["error"]["errors"] == []
    openai = error_body("/v1/audio/speech", 413, "payload_too_large", "too big", None, errors=[])
    assert openai == {
        "error": {"message": "too big", "type": "invalid_request_error", "param": None, "code": "payload_too_large"}
    }
    assert error_body("/v1", 500, "internal_error", "m", None)["error"]["type"] == "server_error"
    assert "field" in error_body("/v1x", 404, "not_found", "m", None)["error"]  # not under /v1/


# ----- the middleware alone, on raw ASGI messages -----
def run_asgi(app, scope: dict, chunks: list[bytes]) -> tuple[list[dict], int]:
    """Call `app` once; return the messages it sent and how many body chunks it pulled."""
    sent: list[dict] = []
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await asyncio.sleep(3600)  # a client that says nothing more
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent, pulled


def http_scope(path: str = "/echo", headers: list | None = None) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }


def small_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts():
            for i in range(3):
                yield f"part{i};".encode()
                await asyncio.sleep(0)

        return StreamingResponse(parts(), media_type="text/plain")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("x" * 10_000)  # larger than the body cap: not a body
        await websocket.close()

    return app


def test_stops_reading_once_over_the_cap():
    app = BodyLimit(small_app(), json_bytes=10_000, multipart_bytes=10_000)
    sent, pulled = run_asgi(app, http_scope(), [b" " * 4000] * 100)
    assert pulled == 3  # 12000 bytes > 10000: the other 97 chunks are never read
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1  # the app's 400 was dropped
    assert json.loads(sent[1]["body"])["error"]["type"] == "payload_too_large"


def test_declared_length_over_the_cap_reads_nothing():
    app = BodyLimit(small_app(), json_bytes=10_000, multipart_bytes=10_000)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"10001")]
    sent, pulled = run_asgi(app, http_scope(headers=headers), [b" " * 10_001])
    assert pulled == 0 and sent[0]["status"] == 413


def test_bodies_under_the_cap_and_streaming_responses_pass_untouched():
    app = BodyLimit(small_app(), json_bytes=10_000, multipart_bytes=10_000)
    sent, pulled = run_asgi(app, http_scope(), [b"x" * 5000, b"y" * 5000])
    assert pulled == 2 and sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"size": 10_000}
    scope = http_scope("/stream") | {"method": "GET"}
    sent, _ = run_asgi(app, scope, [b""])
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"part0;part1;part2;"
    assert len([m for m in sent if m["type"] == "http.response.body"]) >= 3  # still chunked


def test_websockets_pass_untouched(tmp_path, tiny_models_dir):
    from fastapi.testclient import TestClient

    app = BodyLimit(small_app(), json_bytes=1024, multipart_bytes=1024)
    with TestClient(app).websocket_connect("/ws") as ws:
        assert len(ws.receive_text()) == 10_000
    # And in the real app, where BodyLimit is installed by create_app.
    real = create_app(settings_for(models_dir=tiny_models_dir, data_dir=tmp_path / "data", max_json_bytes=1024))
    assert any(m.cls is BodyLimit for m in real.user_middleware)
