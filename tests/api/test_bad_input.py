"""Every bad input a client can send gets a 4xx naming the field and saying what to fix."""

from __future__ import annotations

import base64

import pytest

from .support import CUSTOM_06, error_of, sine_wav, upload


def post(client, path, body):
    return client.post(f"/api/v1/{path}", json=body)


@pytest.mark.parametrize(
    ("path", "body", "field", "words"),
    [
        ("custom-voice", {"text": "", "speaker": "ryan"}, "text", "empty"),
        ("custom-voice", {"text": "   \n\t", "speaker": "ryan"}, "text", "empty"),
        ("custom-voice", {"text": ["ok", " "], "speaker": "ryan"}, "text[1]", "empty"),
        ("custom-voice", {"text": "x" * 20001, "speaker": "ryan"}, "text", "limit of 20000"),
        ("custom-voice", {"text": ["a", "b"], "speaker": ["ryan", "eric", "dylan"]}, "text", "same length"),
        ("custom-voice", {"text": [], "speaker": "ryan"}, "text", "at least one"),
        ("custom-voice", {"text": ["a"] * 65, "speaker": "ryan"}, "text", "limit of 64"),
        ("custom-voice", {"text": "hi", "speaker": "ryan", "language": "klingon"}, "language", "unknown language"),
        ("custom-voice", {"text": ["a", "b"], "speaker": "ryan", "language": ["en", "xx"]}, "language[1]", "xx"),
        ("custom-voice", {"text": "hi", "speaker": "nobody"}, "speaker", "choose one of"),
        ("custom-voice", {"text": "hi", "speaker": ""}, "speaker", "required"),
        ("custom-voice", {"text": "hi"}, "speaker", "required"),
        ("custom-voice", {"text": "hi", "speaker": "ryan", "temperature": 0}, "temperature", "greater than 0"),
        ("custom-voice", {"text": "hi", "speaker": "ryan", "response_format": "aiff"}, "response_format", "wav"),
        ("custom-voice", {"text": "hi", "speaker": "ryan", "max_new_tokens": 10**6}, "max_new_tokens", "limit"),
        ("custom-voice", {"text": "hi", "speaker": "ryan", "max_duration_s": 10**5}, "max_duration_s", "limit"),
        ("custom-voice", {"text": "hi", "speaker": "ryan", "model": "../etc"}, "model", "not a valid model name"),
        ("voice-design", {"text": "hi"}, "instruct", "required"),
        ("voice-design", {"text": "hi", "instruct": "  "}, "instruct", "empty"),
        ("voice-design", {"text": ["a", "b"], "instruct": ["ok", ""]}, "instruct[1]", "empty"),
        ("voice-clone", {"text": "hi", "ref_text": "words"}, "ref_audio", "required"),
        ("voice-clone", {"text": "hi", "ref_audio": "  ", "ref_text": "words"}, "ref_audio", "empty"),
    ],
)
def test_rejected_before_any_model_work(client, path, body, field, words):
    response = post(client, path, body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == field
    assert words.lower() in error["message"].lower()


def test_unknown_field_is_ignored_and_named_in_warnings(client):
    # It was a 422 ("extra inputs are not permitted"); clients of the earlier service send fields we
    # do not know, which it ignored: now they are ignored too, and each is named, so a typo is seen.
    response = post(client, "custom-voice", {"text": "hi", "speaker": "ryan", "temprature": 0.5})
    assert response.status_code == 200, response.text
    assert response.json()["warnings"] == ["unknown field 'temprature' ignored"]


def test_instruct_to_a_model_that_ignores_it(client):
    response = post(
        client, "custom-voice", {"text": "hi", "speaker": "ryan", "instruct": "whisper", "model": CUSTOM_06}
    )
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "instruct" and "ignores instruct" in error["message"]
    # Without instruct the same model serves the request.
    ok = post(client, "custom-voice", {"text": "hi", "speaker": "ryan", "model": CUSTOM_06})
    assert ok.status_code == 200, ok.text


def test_clone_needs_ref_text_unless_x_vector_only(client):
    file_id = upload(client)
    response = post(client, "voice-clone", {"text": "hi", "ref_audio": file_id})
    assert response.status_code == 422
    assert error_of(response)["field"] == "ref_text"
    response = post(client, "voice-clone", {"text": ["a", "b"], "ref_audio": file_id, "ref_text": ["w", None]})
    assert error_of(response)["field"] == "ref_text[1]"
    assert post(client, "voice-clone", {"text": "hi", "ref_audio": file_id, "x_vector_only": True}).status_code == 200


def test_unknown_file_id(client):
    response = post(client, "voice-clone", {"text": "hi", "ref_audio": "file-" + "0" * 32, "ref_text": "w"})
    assert response.status_code == 404
    error = error_of(response)
    assert error["field"] == "ref_audio" and "upload" in error["message"]


def test_expired_file_id(make_client):
    client = make_client(file_ttl_s=0.5)
    file_id = upload(client)
    import time

    time.sleep(0.7)
    response = post(client, "voice-clone", {"text": "hi", "ref_audio": file_id, "ref_text": "w"})
    assert response.status_code == 404
    assert "expired" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("ref", "status", "words"),
    [
        ("!!!!not base64 at all, no way!!!!" * 4, 422, "base64"),
        ("data:audio/wav;base64,@@@@", 422, "base64"),
        (base64.b64encode(b"this is text, not audio at all" * 10).decode(), 422, "not decodable audio"),
        (base64.b64encode(sine_wav(0.1)).decode(), 422, "too short"),
        (base64.b64encode(sine_wav(12.0)).decode(), 422, "too long"),
        ("ftp://example.com/a.wav", 422, "http"),
        ("file:///etc/passwd", 422, "http"),
        ("http://127.0.0.1:9/a.wav", 422, "non-public address"),
        ("http://169.254.169.254/latest/meta-data", 422, "non-public address"),
        ("http://10.0.0.1/a.wav", 422, "non-public address"),
        ("http://[::1]/a.wav", 422, "non-public address"),
        ("/etc/passwd", 422, "paths are disabled"),
    ],
)
def test_bad_reference_audio(client, ref, status, words):
    response = post(client, "voice-clone", {"text": "hi", "ref_audio": ref, "ref_text": "words"})
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["field"] == "ref_audio"
    assert words.lower() in error["message"].lower()


def test_path_outside_the_allow_list(make_client, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside.wav"
    outside.write_bytes(sine_wav())
    client = make_client(allowed_audio_dirs=[allowed])
    for ref, words in ((str(outside), "not inside an allowed directory"), (f"{allowed}/../outside.wav", "'..'")):
        response = post(client, "voice-clone", {"text": "hi", "ref_audio": ref, "ref_text": "w"})
        assert response.status_code == 422, response.text
        error = error_of(response)
        assert error["field"] == "ref_audio" and words in error["message"]


def test_malformed_json(client):
    response = client.post("/api/v1/custom-voice", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_of(response)["type"] == "invalid_request"


@pytest.fixture
def loopback_audio():
    """A loopback HTTP server: /ok.wav, /big.wav (over the limit), /slow.wav (answers late)."""
    import http.server
    import threading
    import time

    payload = sine_wav(1.0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/slow.wav":
                time.sleep(3.0)
            body = payload * 40 if self.path == "/big.wav" else payload
            self.send_response(200)
            self.send_header("content-type", "audio/wav")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_reference_urls(make_client, loopback_audio):
    client = make_client(allow_private_urls=True, max_upload_bytes=500_000, ref_audio_url_timeout_s=1.0)
    body = {"text": "hi", "x_vector_only": True}
    ok = post(client, "voice-clone", body | {"ref_audio": f"{loopback_audio}/ok.wav"})
    assert ok.status_code == 200, ok.text
    big = post(client, "voice-clone", body | {"ref_audio": f"{loopback_audio}/big.wav"})
    assert big.status_code == 413 and error_of(big)["field"] == "ref_audio"
    slow = post(client, "voice-clone", body | {"ref_audio": f"{loopback_audio}/slow.wav"})
    assert slow.status_code == 422 and "did not answer" in error_of(slow)["message"]


def test_text_longer_than_the_fast_engines_context(make_client):
    client = make_client(max_context=64)
    response = post(client, "custom-voice", {"text": "word " * 200, "speaker": "ryan"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "text" and "too long" in error["message"]
