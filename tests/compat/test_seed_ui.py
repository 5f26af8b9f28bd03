"""The earlier `voice-cloning` service's web page, replayed call by call as a browser sends them.

Its `ui/js/api.js` posts `JSON.stringify({...})` bodies (keys in the order the object literal names
them, no spaces) with `Content-Type: application/json` and, once the user typed one, `x-api-key`;
its clone button posts a `FormData` (`text`, `ref_audio` the file, `ref_text` when filled in,
`language`, `temperature`) with only `x-api-key` set (the browser writes the multipart header). It
plays `items[0].audio_base64`, shows `performance` (seconds, `toFixed(2)`) and, on errors, `detail`;
its history plays and downloads `url`s through `<audio>`/fetch and links, which send no key. The
page is served from another origin than the API. Each test sends exactly that and checks exactly
what the page reads.
"""

from __future__ import annotations

import base64
import io
import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import soundfile as sf

from qwen_tts_server.api.files import asks_for_audio
from tests.api.support import sine_wav

PAGE = "http://localhost:5500"  # where the page is served from: another origin than the API
KEY = "seed-ui-key"
BOUNDARY = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
FIREFOX_AUDIO = "audio/webm,audio/ogg,audio/wav,audio/*;q=0.9,application/ogg;q=0.7,video/*;q=0.6,*/*;q=0.5"
NAVIGATION = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


# ----- what the browser sends -----
def js(value: object) -> object:
    """A value as JavaScript holds it: numbers without a fractional part are integers (1, not 1.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: js(v) for k, v in value.items()}
    if isinstance(value, list):
        return [js(v) for v in value]
    return value


def stringify(body: dict) -> bytes:
    """JSON.stringify: keys in insertion order, no spaces, non-ASCII as is."""
    return json.dumps(js(body), separators=(",", ":"), ensure_ascii=False).encode()


def json_headers(key: str | None = None) -> dict[str, str]:
    """api.js `API.headers()`, plus what the browser adds to a cross-origin fetch()."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["x-api-key"] = key
    return headers | {"Origin": PAGE, "Accept": "*/*"}


def form_data(parts: list[tuple[str, object]]) -> bytes:
    """A FormData body as Chrome writes it: parts in append order; a File part carries its name and
    type; numbers are appended as String(n)."""
    out = b""
    for name, value in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        if isinstance(value, tuple):
            filename, data, media_type = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            out += f"Content-Type: {media_type}\r\n\r\n".encode() + data + b"\r\n"
        else:
            text = str(js(value))
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + text.encode() + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def form_headers(key: str | None = None) -> dict[str, str]:
    """api.js sends only x-api-key with a FormData; the browser writes the content type."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Origin": PAGE, "Accept": "*/*"}
    if key:
        headers["x-api-key"] = key
    return headers


# ----- the page's calls (api.js) -----
def voice_design(client, text, instruct, language, temperature=0.3, key=None):
    body = {"text": [text], "instruct": [instruct], "language": language, "temperature": temperature}
    return client.post("/api/v1/voice-design", content=stringify(body), headers=json_headers(key))


def custom_voice(client, text, speaker, language, instruct, temperature=0.3, key=None):
    body = {
        "text": [text],
        "speaker": [speaker],
        "language": language,
        "instruct": instruct or None,
        "temperature": temperature,
    }
    return client.post("/api/v1/custom-voice", content=stringify(body), headers=json_headers(key))


def upload_file(client, filename, data, key=None):
    parts = [("file", (filename, data, "audio/wav"))]
    return client.post("/api/v1/files/upload", content=form_data(parts), headers=form_headers(key))


def voice_clone(client, text, ref_audio, ref_text, language, temperature=0.3, enhanced=False, key=None):
    body = {
        "text": [text],
        "ref_audio": ref_audio,
        "ref_text": ref_text,
        "language": language,
        "temperature": temperature,
    }
    path = "/api/v1/voice-clone-enhanced" if enhanced else "/api/v1/voice-clone"
    return client.post(path, content=stringify(body), headers=json_headers(key))


def voice_clone_file(client, text, file, ref_text, language, temperature=0.3, enhanced=False, key=None, extra=()):
    parts: list[tuple[str, object]] = [("text", text), ("ref_audio", file)]
    if ref_text:
        parts.append(("ref_text", ref_text))
    parts += [("language", language), ("temperature", temperature), *extra]
    path = "/api/v1/voice-clone-enhanced-file" if enhanced else "/api/v1/voice-clone-file"
    return client.post(path, content=form_data(parts), headers=form_headers(key))


# ----- what the page reads -----
def played(response) -> tuple[bytes, float]:
    """ui-tts.js: `items[0].audio_base64` into a Blob for WaveSurfer, `performance` into the history
    (`performance.toFixed(2)`): both must be there and usable."""
    assert response.status_code == 200, response.text
    body = response.json()
    audio = base64.b64decode(body["items"][0]["audio_base64"], validate=True)
    samples, rate = sf.read(io.BytesIO(audio))
    assert rate == 24000 and len(samples) > 0
    assert isinstance(body["performance"], float) and body["performance"] > 0
    assert body["performance"] == pytest.approx(body["timing"]["total_ms"] / 1000, abs=1e-3)
    return audio, body["performance"]


def shown_error(response, status: int) -> str:
    """api.js: `data.detail` if a string, else JSON.stringify(data.detail)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["detail"] == body["error"]["message"]  # the native shape stays as it was
    return body["detail"]


# ----- the tabs -----
def test_voice_design_and_custom_voice_play_inline_audio(make_client):
    client = make_client(inline_audio_default=True)
    played(voice_design(client, "Welcome to the show.", "A warm, low female voice", "en"))
    played(custom_voice(client, "Hello there.", "ryan", "en", "cheerful"))
    played(custom_voice(client, "Hello there.", "vivian", "auto", ""))  # empty instruct: null


def test_inline_audio_stays_opt_in_by_default(make_client):
    strict = make_client()
    item = custom_voice(strict, "Hello.", "ryan", "en", "").json()["items"][0]
    assert "audio_base64" not in item and item["url"]
    body = {"text": "Hello.", "speaker": "ryan", "return_audio_inline": True}
    assert strict.post("/api/v1/custom-voice", json=body).json()["items"][0]["audio_base64"]
    lenient = make_client(inline_audio_default=True, data_dir=make_client.tmp / "lenient")
    body = {"text": "Hello.", "speaker": "ryan", "return_audio_inline": False}
    assert "audio_base64" not in lenient.post("/api/v1/custom-voice", json=body).json()["items"][0]


def test_clone_button_multipart_without_transcript_is_x_vector(make_client):
    client = make_client()  # the clone routes carry audio_base64 whatever QTTS_INLINE_AUDIO_DEFAULT says
    clip = ("my voice.wav", sine_wav(2.0), "audio/wav")
    response = voice_clone_file(client, "Good evening, everyone.", clip, "", "en")
    played(response)
    assert any("x_vector_only" in w for w in response.json()["warnings"])
    with_transcript = voice_clone_file(client, "Good evening.", clip, "What the clip says.", "auto", 0.7)
    played(with_transcript)
    assert "warnings" not in with_transcript.json()
    enhanced = voice_clone_file(client, "Good evening.", clip, "", "en", enhanced=True)
    played(enhanced)
    assert any("enhancement" in w for w in enhanced.json()["warnings"])
    # custom_id (the earlier service's form field) is echoed; other native options work as form
    # fields; fields nobody knows are named.
    extra = [("custom_id", "line-7"), ("seed", "42"), ("response_format", "flac"), ("bogus", "1")]
    tagged = voice_clone_file(client, "Good evening.", clip, "", "en", extra=extra).json()
    assert tagged["items"][0]["custom_id"] == "line-7" and tagged["items"][0]["format"] == "flac"
    assert "unknown field 'bogus' ignored" in tagged["warnings"]


def test_clone_button_errors_are_shown_from_detail(make_client):
    client = make_client(api_keys=[KEY], min_ref_audio_s=1.0)
    clip = ("my voice.wav", sine_wav(2.0), "audio/wav")
    assert "API key" in shown_error(voice_clone_file(client, "Hi.", clip, "", "en"), 401)
    not_audio = ("notes.wav", b"this is not audio at all " * 40, "audio/wav")
    detail = shown_error(voice_clone_file(client, "Hi.", not_audio, "", "en", key=KEY), 422)
    assert "ref_audio" in detail and "not decodable audio" in detail
    short = ("short.wav", sine_wav(0.3), "audio/wav")
    assert "too short" in shown_error(voice_clone_file(client, "Hi.", short, "", "en", key=KEY), 422)
    hot = shown_error(voice_clone_file(client, "Hi.", clip, "", "en", temperature=9, key=KEY), 422)
    assert "temperature" in hot
    played(voice_clone_file(client, "Hi.", clip, "", "en", key=KEY))


def test_voice_clone_json_without_transcript(make_client):
    client = make_client()
    file_id = upload_file(client, "ref.wav", sine_wav(2.0)).json()["file_id"]
    # The native route stays strict by default (QTTS_CLONE_WITHOUT_TRANSCRIPT=error)...
    assert "ref_text" in shown_error(voice_clone(client, "Hi.", file_id, None, "en"), 422)
    assert "ref_text" in shown_error(voice_clone(client, "Hi.", file_id, "", "en"), 422)
    # ...the earlier service's enhanced route clones by x-vector...
    enhanced = voice_clone(client, "Hi.", file_id, None, "en", enhanced=True)
    played(enhanced)
    assert any("x_vector_only" in w for w in enhanced.json()["warnings"])
    # ...and so does the native one where the operator says so.
    lenient = make_client(clone_without_transcript="xvector", inline_audio_default=True)
    file_id = upload_file(lenient, "ref.wav", sine_wav(2.0)).json()["file_id"]
    response = voice_clone(lenient, "Hi.", file_id, None, "en")
    played(response)
    assert any("x_vector_only" in w for w in response.json()["warnings"])
    played(voice_clone(lenient, "Hi.", file_id, "What the clip says.", "en"))


def test_errors_carry_detail_as_a_string(make_client):
    client = make_client()
    detail = shown_error(custom_voice(client, "Hi.", "Speaker_001", "en", ""), 422)
    assert "speaker" in detail.lower()
    assert shown_error(client.get("/api/v1/files/file-" + "0" * 32, headers={"Accept": "*/*"}), 404)
    assert shown_error(client.get("/api/v1/nothing"), 404)
    # OpenAI's routes keep OpenAI's shape exactly.
    openai = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "nobody", "input": "hi"})
    assert openai.status_code >= 400 and set(openai.json()) == {"error"}


def test_unknown_fields_are_accepted_and_reported(make_client):
    client = make_client(inline_audio_default=True)
    body = {"text": ["Hi."], "speaker": ["ryan"], "language": "en", "instruct": None, "temperature": 0.3}
    body |= {"operation": "custom_voice", "return_timestamps": False}
    response = client.post("/api/v1/custom-voice", content=stringify(body), headers=json_headers())
    played(response)
    assert response.json()["warnings"] == [
        "unknown field 'operation' ignored",
        "unknown field 'return_timestamps' ignored",
    ]
    many = {"text": "Hi.", "instruct": "A calm voice"} | {f"x{i}": i for i in range(25)}
    warnings = client.post("/api/v1/voice-design", json=many).json()["warnings"]
    assert len(warnings) == 21 and warnings[-1] == "and 5 more unknown fields ignored"
    # A known field with a bad value is still a 422.
    assert shown_error(client.post("/api/v1/voice-design", json={"text": "Hi.", "instruct": "x", "seed": -1}), 422)


# ----- another origin: CORS -----
def test_cors_preflight_and_headers(make_client):
    client = make_client(cors_origins=f"{PAGE}/,http://other.example", api_keys=[KEY], inline_audio_default=True)
    preflight = client.options(
        "/api/v1/voice-design",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key",
        },
    )
    assert preflight.status_code == 200, preflight.text  # answered before the key check: no key here
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "x-api-key" in allowed and "content-type" in allowed
    # The multipart clone's preflight (only x-api-key is non-simple).
    multipart = client.options(
        "/api/v1/voice-clone-file",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert multipart.status_code == 200 and multipart.headers["access-control-allow-origin"] == PAGE

    response = voice_design(client, "Hi.", "A calm voice", "en", key=KEY)
    played(response)
    assert response.headers["access-control-allow-origin"] == PAGE
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    # Errors, 401 included, are readable by the page.
    refused = voice_design(client, "Hi.", "A calm voice", "en")
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE
    # Downloads too (WaveSurfer fetches the url cross-origin).
    download = client.get(response.json()["items"][0]["url"], headers={"Origin": PAGE, "Accept": "*/*"})
    assert download.status_code == 200 and download.headers["access-control-allow-origin"] == PAGE
    # An origin not listed gets no CORS headers, and its preflight is refused.
    stranger = client.options(
        "/api/v1/voice-design",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers


def test_cors_any_origin_and_off_by_default(make_client):
    anyone = make_client(cors_origins="*")
    preflight = anyone.options(
        "/api/v1/custom-voice",
        headers={"Origin": "http://anywhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    off = make_client(data_dir=make_client.tmp / "off")
    preflight = off.options("/api/v1/custom-voice", headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in off.get("/health", headers={"Origin": PAGE}).headers


# ----- downloads: signed URLs, and old links to /api/v1/files/{id} -----
def test_signed_download_urls_work_without_a_key(make_client):
    client = make_client(api_keys=[KEY], inline_audio_default=True)
    response = custom_voice(client, "Hi.", "ryan", "en", "", key=KEY)
    audio, _ = played(response)
    item = response.json()["items"][0]
    url = urlsplit(item["url"])
    query = parse_qs(url.query)
    assert url.path == f"/api/v1/files/{item['file_id']}/content"
    expires = int(query["expires"][0])
    record = client.app.state.services.files.get(item["file_id"])
    assert expires == int(record.expires_at) and expires > time.time() + 3600  # the file's own lifetime

    # <audio src=url> / WaveSurfer's fetch / a download link: no key header.
    for accept in (FIREFOX_AUDIO, "*/*", NAVIGATION):
        got = client.get(item["url"], headers={"Accept": accept})
        assert got.status_code == 200 and got.content == audio
    # The same signature opens the old link shape, which gives the audio to whoever asks for it.
    old = client.get(f"/api/v1/files/{item['file_id']}?{url.query}", headers={"Accept": FIREFOX_AUDIO})
    assert old.status_code == 200 and old.content == audio

    sig, other = query["sig"][0], "file-" + "0" * 32
    tampered = [
        f"{url.path}?expires={expires}&sig={sig[:-1]}{'0' if sig[-1] != '0' else '1'}",  # the signature
        f"{url.path}?expires={expires + 1}&sig={sig}",  # the expiry
        f"/api/v1/files/{other}/content?expires={expires}&sig={sig}",  # another file
        f"{url.path}?expires=soon&sig={sig}",
    ]
    for bad in tampered:
        assert shown_error(client.get(bad), 403), bad
    expired = client.app.state.url_signer.query(item["file_id"], time.time() - 1)
    assert "expired" in shown_error(client.get(f"{url.path}?{expired}"), 403)
    # Without a signature a download needs a key as before; a signature opens nothing else.
    assert shown_error(client.get(url.path), 401)
    assert client.get(url.path, headers={"x-api-key": KEY}).content == audio
    assert shown_error(client.get(f"/api/v1/models?{url.query}"), 401)
    assert shown_error(client.delete(f"/api/v1/files/{item['file_id']}?{url.query}"), 401)
    # The upload's and the metadata's urls are signed too.
    upload = upload_file(client, "ref.wav", sine_wav(), key=KEY).json()
    assert client.get(upload["url"]).status_code == 200
    meta = client.get(f"/api/v1/files/{upload['file_id']}", headers={"Accept": "application/json", "x-api-key": KEY})
    assert client.get(meta.json()["url"]).content == sine_wav()


def test_urls_are_plain_without_keys(make_client):
    client = make_client(inline_audio_default=True)
    item = custom_voice(client, "Hi.", "ryan", "en", "").json()["items"][0]
    assert "?" not in item["url"] and client.get(item["url"]).status_code == 200


def test_old_download_links_give_audio_to_who_asks_for_it(make_client):
    client = make_client(inline_audio_default=True)
    audio, _ = played(custom_voice(client, "Hi.", "ryan", "en", ""))
    file_id = custom_voice(client, "Hi.", "ryan", "en", "").json()["items"][0]["file_id"]
    link = f"/api/v1/files/{file_id}"
    for accept in (FIREFOX_AUDIO, "*/*", NAVIGATION, "audio/wav"):
        got = client.get(link, headers={"Accept": accept})
        assert got.status_code == 200 and got.headers["content-type"].startswith("audio/wav"), accept
        sf.read(io.BytesIO(got.content))
        assert "accept" in got.headers["vary"].lower()
    for accept in ("application/json", "application/json, text/plain, */*", "*/*;q=0.5, application/json"):
        got = client.get(link, headers={"Accept": accept})
        assert got.headers["content-type"] == "application/json" and got.json()["file_id"] == file_id, accept
    assert client.get(f"{link}?format=json", headers={"Accept": FIREFOX_AUDIO}).json()["file_id"] == file_id
    forced = client.get(f"{link}?format=audio", headers={"Accept": "application/json"})
    assert forced.headers["content-type"].startswith("audio/")


@pytest.mark.parametrize(
    ("accept", "audio"),
    [
        (None, False),
        ("", False),
        ("application/json", False),
        ("application/json, text/plain, */*", False),  # axios
        ("*/*, application/json", False),  # a tie goes to JSON
        ("application/problem+json, */*;q=0.1", False),
        ("text/html", False),
        ("*/*", True),  # fetch(), curl, WaveSurfer
        (FIREFOX_AUDIO, True),  # <audio>
        (NAVIGATION, True),  # a link
        ("application/json;q=0.5, audio/*", True),
        ("audio/*;q=0", False),
        ("audio/wav;q=nonsense", False),
        ("AUDIO/WAV", True),
    ],
)
def test_accept_rule(accept, audio):
    assert asks_for_audio(accept) is audio


# ----- the batch tab (ui-batch.js) -----
def batch_item(mode, text, *, item_id, file_id=None, ref_text=None, instruct=None, speaker=None, lang="auto"):
    """One entry of `UI.runBatch`'s `queueItems`, keys in its order, empty fields as it sends them."""
    operation = {"design": "voice_design", "custom": "custom_voice", "clone": "voice_clone"}[mode]
    return {
        "text": text,
        "operation": operation,
        "ref_audio": file_id or None,
        "ref_text": ref_text or None,
        "instruct": instruct or None,
        "speaker": speaker or None,
        "language": lang or "auto",
        "temperature": 0.3,
        "return_timestamps": False,
        "custom_id": item_id,
    }


def submit_batch(client, items, key=None):
    body = {"items": items, "label": "Web UI Batch 10:42:07 AM "}
    return client.post("/api/v1/queue/submit", content=stringify(body), headers=json_headers(key))


def poll_until_settled(client, batch_id, key=None, timeout_s=120.0) -> dict:
    """`UI.pollQueueStatus`: GET status until completed, partial or error."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/api/v1/queue/status/{batch_id}", headers=json_headers(key))
        assert response.status_code == 200, response.text
        status = response.json()
        assert status["status"] in ("queued", "processing", "partial", "completed", "error")
        assert status["total"] == len(status["items"])
        for item in status["items"]:  # `UI.updateQueueProgress` finds each row by custom_id
            assert item["status"] in ("queued", "processing", "done", "error")
        if status["status"] in ("completed", "partial", "error"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def test_batch_tab_runs_a_mixed_batch_through_the_queue(make_client):
    client = make_client(api_keys=[KEY])
    file_id = upload_file(client, "ref.wav", sine_wav(1.5), key=KEY).json()["file_id"]
    items = [
        batch_item("custom", "Hello from the batch.", item_id="lq1a2b3c", speaker="ryan"),
        batch_item("design", "Designed in a batch.", item_id="lq1a2b3d", instruct="A bright young voice."),
        batch_item("clone", "Cloned in a batch.", item_id="lq1a2b3e", file_id=file_id),  # no transcript
    ]
    submitted = submit_batch(client, items, key=KEY)
    assert submitted.status_code == 200, submitted.text
    body = submitted.json()
    assert body["total_items"] == 3 and len(body["item_ids"]) == 3 and body["status"] == "queued"
    status = poll_until_settled(client, body["batch_id"], key=KEY)
    assert status["status"] == "completed" and status["completed"] == 3 and status["failed"] == 0
    results = client.get(f"/api/v1/queue/results/{body['batch_id']}", headers=json_headers(KEY)).json()
    assert [item["custom_id"] for item in results["items"]] == ["lq1a2b3c", "lq1a2b3d", "lq1a2b3e"]
    assert [item["item_id"] for item in results["items"]] == body["item_ids"]
    for item in results["items"]:  # `UI.addToHistory(mode, item.url, ...)`: an <audio src>, no key header
        assert item["status"] == "done" and item["error"] is None
        audio = client.get(item["url"], headers={"Accept": FIREFOX_AUDIO, "Origin": PAGE})
        assert audio.status_code == 200 and sf.read(io.BytesIO(audio.content))[1] == 24000


def test_batch_tab_sees_failed_items_and_errors_in_detail(make_client):
    client = make_client()
    asr = submit_batch(client, [{**batch_item("custom", "x", item_id="a", speaker="ryan"), "operation": "transcribe"}])
    assert "speech recognition is not served here" in shown_error(asr, 422)
    unknown_speaker = [
        batch_item("custom", "Fine.", item_id="ok", speaker="ryan"),
        batch_item("custom", "Who?", item_id="bad", speaker="nobody-at-all"),
    ]
    body = submit_batch(client, unknown_speaker).json()
    status = poll_until_settled(client, body["batch_id"])
    assert status["status"] == "partial" and status["completed"] == 1 and status["failed"] == 1
    failed = status["items"][1]
    assert failed["status"] == "error" and failed["url"] is None and "nobody-at-all" in failed["error"]
    assert "does not exist" in shown_error(client.get("/api/v1/queue/status/b1"), 404)
