"""The voice library over HTTP: create (upload, file_id, description), list/get/delete on both APIs,
use by name (/v1/audio/speech, the WebSocket, the native clone endpoint), restarts, owners, errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from .support import BASE_06, BASE_17, error_of, loaded_model, sine_wav, upload, words

WS = "/v1/audio/speech/stream"


def create(client: TestClient, name: str = "narrator", headers: dict | None = None, **body: object):
    return client.post("/api/v1/voices", json={"name": name, **body}, headers=headers)


def create_from_file(client: TestClient, name: str = "narrator", headers: dict | None = None, **body: object) -> dict:
    if "ref_audio" not in body:
        response = client.post(
            "/api/v1/files/upload", files={"file": ("ref.wav", sine_wav(), "audio/wav")}, headers=headers
        )
        assert response.status_code == 201, response.text
        body["ref_audio"] = response.json()["file_id"]
    body.setdefault("ref_text", "the reference words")
    body.setdefault("model", BASE_06)
    response = create(client, name, headers, **body)
    assert response.status_code == 201, response.text
    return response.json()


def upload_voice(client: TestClient, name: str = "mine", headers: dict | None = None, **fields: str):
    return client.post(
        "/v1/audio/voices",
        data={"name": name, "consent": "cons_1234", **fields},
        files={"audio_sample": ("me.wav", sine_wav(), "audio/wav")},
        headers=headers,
    )


def speech(client: TestClient, voice: object, headers: dict | None = None, **body: object):
    payload = {"model": "tts-1", "input": "Hello there.", "voice": voice, "response_format": "wav", "seed": 3}
    return client.post("/v1/audio/speech", json=payload | body, headers=headers)


def seconds(wav: bytes) -> float:
    samples, rate = sf.read(io.BytesIO(wav))
    return len(samples) / rate


def ws_session(client: TestClient, config: dict, url: str = WS, headers: dict | None = None):
    """A whole WebSocket session: (JSON messages, audio bytes, close code)."""
    texts, audio, code = [], bytearray(), None
    with client.websocket_connect(url, headers=headers or {}) as ws:
        if config:
            ws.send_json({"type": "session.config", "response_format": "pcm", "seed": 5, **config})
            ws.send_json({"type": "input.text", "text": "Hello there. How are you today?"})
            ws.send_json({"type": "input.done"})
        while True:
            message = ws.receive()
            if message["type"] == "websocket.close":
                code = message.get("code")
                break
            if message.get("bytes") is not None:
                audio += message["bytes"]
            else:
                texts.append(json.loads(message["text"]))
    return texts, bytes(audio), code


# ----- creating -----
def test_create_from_a_file_id(client):
    voice = create_from_file(client)
    assert voice["id"].startswith("voice-") and voice["name"] == "narrator"
    assert voice["model"] == BASE_06 and voice["mode"] == "icl" and voice["source"] == "file"
    assert voice["ref_text"] == "the reference words" and voice["duration_s"] == pytest.approx(1.5)
    assert "owner" not in voice
    assert client.get("/api/v1/voices/narrator").json() == voice
    assert client.get(f"/api/v1/voices/{voice['id']}").json() == voice


def test_create_from_base64_without_a_transcript_is_x_vector(client):
    encoded = base64.b64encode(sine_wav(1.2)).decode()
    voice = create_from_file(client, "plain", ref_audio=encoded, ref_text=None)
    assert voice["mode"] == "x_vector" and voice["source"] == "upload" and voice["ref_text"] is None


def test_create_from_an_upload_in_openai_shape(client):
    response = upload_voice(client, ref_text="what I said", model=BASE_06)
    assert response.status_code == 200, response.text
    voice = response.json()
    assert voice["object"] == "audio.voice" and voice["type"] == "audio_sample"
    assert voice["name"] == "mine" and voice["id"].startswith("voice-") and isinstance(voice["created_at"], int)
    assert voice["mode"] == "icl" and voice["source"] == "upload" and voice["model"] == BASE_06
    # Without ref_text: x-vector; OpenAI's model "auto" is the server's default Base model.
    plain = upload_voice(client, "plain", model="auto").json()
    assert plain["mode"] == "x_vector" and plain["model"] == BASE_17


def test_create_from_a_description(client):
    response = create(
        client, "captain", description="A gruff, low male voice", sample_text=words(12), language="en", model=BASE_06
    )
    assert response.status_code == 201, response.text
    voice = response.json()
    assert voice["source"] == "design" and voice["mode"] == "icl"
    assert voice["description"] == "A gruff, low male voice" and voice["sample_text"] == words(12)
    assert voice["ref_text"] == words(12) and voice["language"] == "english" and voice["model"] == BASE_06
    sample = client.get(f"/api/v1/files/{voice['sample_file_id']}/content")
    assert sample.status_code == 200 and seconds(sample.content) == pytest.approx(voice["duration_s"], abs=0.01)
    listed = client.get("/v1/audio/voices").json()["data"][0]
    assert listed["type"] == "prompt" and listed["prompt"] == "A gruff, low male voice"
    # and it speaks
    assert speech(client, "captain").status_code == 200


def test_a_design_whose_sample_cannot_be_stored_leaves_no_voice(make_client, small_disk):
    """The voice is stored, then its sample file: on a full disk (the files folder on a real 16 KiB
    filesystem) the request is a 507, and the voice goes too, so the client's retry finds its name free."""
    data_dir = make_client.tmp / "data"
    small_disk(data_dir / "files", 16)
    client = make_client(data_dir=data_dir)
    body = {"description": "A gruff, low male voice", "sample_text": words(12), "language": "en", "model": BASE_06}
    response = create(client, "captain", **body)
    assert response.status_code == 507 and error_of(response)["type"] == "storage_full"
    assert client.get("/api/v1/voices").json() == {"voices": []}


def test_design_through_the_openai_prompt_type(client):
    response = client.post(
        "/v1/audio/voices",
        data={"name": "bard", "type": "prompt", "prompt": "A bright young voice", "model": BASE_06},
    )
    assert response.status_code == 200, response.text
    voice = response.json()
    assert voice["type"] == "prompt" and voice["prompt"] == "A bright young voice" and voice["sample_text"]


# ----- listing, deleting -----
def test_list_get_delete(client):
    first = create_from_file(client, "one")
    second = create_from_file(client, "two", ref_text=None)
    native = client.get("/api/v1/voices").json()
    assert [v["name"] for v in native["voices"]] == ["one", "two"]
    openai = client.get("/v1/audio/voices").json()
    assert openai["object"] == "list"
    assert [(v["id"], v["name"], v["object"]) for v in openai["data"]] == [
        (first["id"], "one", "audio.voice"),
        (second["id"], "two", "audio.voice"),
    ]
    for v in openai["data"]:
        assert {"id", "name", "object", "created_at", "type", "model", "mode"} <= set(v)
    assert client.get(f"/v1/audio/voices/{first['id']}").json()["name"] == "one"

    gone = client.delete("/api/v1/voices/one")
    assert gone.status_code == 200 and gone.json() == {"id": first["id"], "name": "one", "deleted": True}
    deleted = client.delete(f"/v1/audio/voices/{second['id']}").json()
    assert deleted == {"id": second["id"], "object": "audio.voice.deleted", "deleted": True, "name": "two"}
    assert client.get("/api/v1/voices").json() == {"voices": []}
    assert client.get("/api/v1/voices/one").status_code == 404


# ----- using -----
def test_use_in_openai_speech_by_name_and_by_id(client):
    voice = create_from_file(client, "Narrator")
    by_name = speech(client, "narrator")  # any case
    assert by_name.status_code == 200, by_name.text
    assert by_name.headers["content-type"] == "audio/wav" and seconds(by_name.content) > 0
    by_id = speech(client, {"id": voice["id"]})
    assert by_id.status_code == 200 and by_id.content == by_name.content  # same voice, same seed
    as_ref = speech(client, None, ref_audio="voice:Narrator")
    assert as_ref.status_code == 200 and as_ref.content == by_name.content
    # The voice's own model, named, works; another model is refused with the reason.
    assert speech(client, "narrator", model=BASE_06).status_code == 200
    wrong = speech(client, "narrator", model=BASE_17)
    assert wrong.status_code == 422 and error_of(wrong)["param"] == "model" and BASE_06 in error_of(wrong)["message"]


def test_built_in_names_keep_their_meaning(client):
    taken = upload_voice(client, "Ryan")
    assert taken.status_code == 409 and error_of(taken)["param"] == "name"
    native = create(client, "Alloy", ref_audio=upload(client))
    assert native.status_code == 409 and error_of(native)["field"] == "name"
    assert speech(client, "ryan").status_code == 200
    assert speech(client, "alloy").status_code == 200


def test_use_on_the_native_clone_endpoint(client):
    create_from_file(client, "narrator")
    create_from_file(client, "plain", ref_text=None)
    body = {"text": "Hello there.", "seed": 4, "return_audio_inline": True}
    by_voice = client.post("/api/v1/voice-clone", json=body | {"voice": "narrator"})
    assert by_voice.status_code == 200, by_voice.text
    assert by_voice.json()["model"] == BASE_06  # the voice's model, without naming it
    by_ref = client.post("/api/v1/voice-clone", json=body | {"ref_audio": "voice:narrator"})
    assert by_ref.status_code == 200, by_ref.text
    assert by_ref.json()["items"][0]["audio_base64"] == by_voice.json()["items"][0]["audio_base64"]
    # A batch mixing stored voices and reference audio, one per item.
    file_id = upload(client)
    mixed = client.post(
        "/api/v1/voice-clone",
        json={
            "text": ["one", "two", "three"],
            "voice": ["narrator", "plain", None],
            "ref_audio": [None, None, file_id],
            "ref_text": [None, None, "words"],
            "model": BASE_06,
        },
    )
    assert mixed.status_code == 200, mixed.text
    assert len(mixed.json()["items"]) == 3


def test_native_clone_errors(client):
    create_from_file(client, "narrator")
    file_id = upload(client)
    cases = [
        ({"voice": "nobody"}, 404, "voice", "does not exist"),
        ({"ref_audio": "voice:nobody"}, 404, "ref_audio", "does not exist"),
        ({"voice": "narrator", "ref_audio": file_id}, 422, "voice", "not both"),
        ({"voice": "narrator", "ref_text": "x"}, 422, "ref_text", "transcript"),
        ({"voice": "narrator", "model": BASE_17}, 422, "model", BASE_06),
        ({"voice": "ryan"}, 404, "voice", "custom-voice"),
        ({}, 422, "ref_audio", "required"),
    ]
    for extra, status, field, words_ in cases:
        response = client.post("/api/v1/voice-clone", json={"text": "hi", **extra})
        assert response.status_code == status, (extra, response.text)
        error = error_of(response)
        assert error["field"] == field and words_ in error["message"], (extra, error)


def test_use_in_the_websocket(client):
    create_from_file(client, "narrator")
    texts, audio, code = ws_session(client, {"voice": "narrator", "model": "tts-1"})
    assert texts[0]["type"] == "session.ready" and texts[0]["model"] == BASE_06, texts
    assert texts[-1]["type"] == "session.done" and audio and code == 1000
    texts, _, code = ws_session(client, {"voice": "nobody", "model": "tts-1"})
    assert texts[-1]["type"] == "error" and texts[-1]["error"]["param"] == "voice" and code == 1008


def test_survives_a_restart(make_client):
    first = make_client()
    voice = create_from_file(first, "narrator")
    before = speech(first, "narrator")
    assert before.status_code == 200
    second = make_client()  # a new app (new engine, empty cache) on the same data_dir
    assert second.get("/api/v1/voices/narrator").json() == voice
    tts = loaded_model(second, BASE_06)
    calls = []
    hook = tts.model.speaker_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        after = speech(second, "narrator")
    finally:
        hook.remove()
    assert after.status_code == 200, after.text
    assert after.content == before.content  # the stored prompt, exactly
    assert calls == []  # read from disk, not computed again
    assert second.app.state.services.synthesizer.voice_cache.misses == 1


def test_duplicate_unknown_and_bad_input(client):
    create_from_file(client, "narrator")
    again = create(client, "NARRATOR", ref_audio=upload(client))
    assert again.status_code == 409 and error_of(again) == {
        "type": "conflict",
        "message": "a voice named 'NARRATOR' already exists: choose another name, or delete it first",
        "field": "name",
    }
    openai_again = upload_voice(client, "narrator")
    assert openai_again.status_code == 409 and error_of(openai_again)["code"] == "conflict"
    assert set(error_of(openai_again)) == {"message", "type", "param", "code"}

    assert client.get("/api/v1/voices/nobody").status_code == 404
    assert client.delete("/api/v1/voices/nobody").status_code == 404
    missing = client.delete("/v1/audio/voices/voice-" + "0" * 32)
    assert missing.status_code == 404 and error_of(missing)["type"] == "invalid_request_error"
    unknown = speech(client, "nobody")
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "voice"

    bad = [
        (create(client, "a/b", ref_audio=upload(client)), "name"),
        (create(client, "x" * 65, ref_audio=upload(client)), "name"),
        (create(client, "noise", ref_audio=base64.b64encode(b"not audio at all " * 20).decode()), "ref_audio"),
        (create(client, "short", ref_audio=base64.b64encode(sine_wav(0.1)).decode()), "ref_audio"),
        (create(client, "both", ref_audio=upload(client), description="a voice"), "description"),
        (create(client, "neither"), "ref_audio"),
        (create(client, "mixed", description="a voice", ref_text="w"), "ref_text"),
    ]
    for response, field in bad:
        assert response.status_code == 422, response.text
        assert error_of(response)["field"] == field, response.text
    bad_upload = client.post(
        "/v1/audio/voices", data={"name": "noise"}, files={"audio_sample": ("x.wav", b"not audio" * 50, "audio/wav")}
    )
    assert bad_upload.status_code == 422 and error_of(bad_upload)["param"] == "audio_sample"
    no_sample = client.post("/v1/audio/voices", data={"name": "nothing"})
    assert no_sample.status_code == 422 and error_of(no_sample)["param"] == "audio_sample"
    control = client.post(
        "/v1/audio/voices",
        data={"name": "bell", "ref_text": "ring \x07 ring"},
        files={"audio_sample": ("x.wav", sine_wav(), "audio/wav")},
    )
    assert control.status_code == 422 and error_of(control)["param"] == "ref_text", control.text
    assert "control character" in error_of(control)["message"]
    assert [v["name"] for v in client.get("/api/v1/voices").json()["voices"]] == ["narrator"]


# ----- owners -----
def test_a_voice_belongs_to_its_key(make_client):
    client = make_client(api_keys=["k1", "k2"])
    one, two = {"Authorization": "Bearer k1"}, {"X-API-Key": "k2"}
    voice = create_from_file(client, "narrator", headers=one)
    assert [v["name"] for v in client.get("/api/v1/voices", headers=one).json()["voices"]] == ["narrator"]
    # Another key can neither list, get, use nor delete it: it does not exist for that key.
    assert client.get("/api/v1/voices", headers=two).json() == {"voices": []}
    assert client.get("/v1/audio/voices", headers=two).json()["data"] == []
    for path in ("/api/v1/voices/narrator", f"/api/v1/voices/{voice['id']}", f"/v1/audio/voices/{voice['id']}"):
        assert client.get(path, headers=two).status_code == 404
        assert client.delete(path, headers=two).status_code == 404
    assert speech(client, "narrator", headers=two).status_code == 404
    assert speech(client, {"id": voice["id"]}, headers=two).status_code == 404
    clone = client.post("/api/v1/voice-clone", json={"text": "hi", "voice": "narrator"}, headers=two)
    assert clone.status_code == 404
    # The same name is free for the other key, and is its own voice.
    mine = upload_voice(client, "narrator", headers=two)
    assert mine.status_code == 200 and mine.json()["id"] != voice["id"]
    assert speech(client, "narrator", headers=one).status_code == 200
    # Without a key: 401, as every route.
    assert client.get("/api/v1/voices").status_code == 401
    assert client.get("/v1/audio/voices").status_code == 401


def test_websocket_checks_the_key_and_its_voices(make_client):
    client = make_client(api_keys=["k1", "k2"])
    create_from_file(client, "narrator", headers={"Authorization": "Bearer k1"})
    config = {"voice": "narrator", "model": "tts-1"}
    texts, _, code = ws_session(client, {})
    assert code == 1008 and texts[-1]["error"]["code"] == "unauthorized"
    texts, _, code = ws_session(client, {}, url=WS + "?api_key=wrong")
    assert code == 1008 and texts[-1]["error"]["code"] == "unauthorized"
    texts, audio, code = ws_session(client, config, url=WS + "?api_key=k1")
    assert texts[-1]["type"] == "session.done" and audio and code == 1000
    texts, audio, code = ws_session(client, config, headers={"x-api-key": "k1"})
    assert texts[-1]["type"] == "session.done" and audio and code == 1000
    texts, _, code = ws_session(client, config, headers={"authorization": "Bearer k2"})
    assert texts[-1]["type"] == "error" and texts[-1]["error"]["param"] == "voice" and code == 1008


# ----- the openai client -----
@pytest.mark.slow
def test_the_openai_client(live_server, tmp_path):
    from openai import NotFoundError, OpenAI

    base, _ = live_server
    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    sample = tmp_path / "me.wav"
    sample.write_bytes(sine_wav())
    with sample.open("rb") as f:
        voice = client.audio.voices.create(name="narrator", audio_sample=f, consent="cons_1234")
    assert voice.object == "audio.voice" and voice.name == "narrator" and voice.id.startswith("voice-")
    by_name = client.audio.speech.create(model="tts-1", voice="narrator", input="Hello there.", response_format="wav")
    assert seconds(by_name.read()) > 0
    by_id = client.audio.speech.create(
        model="tts-1", voice={"id": voice.id}, input="Hello there.", response_format="wav"
    )
    assert seconds(by_id.read()) > 0
    deleted = client.audio.voices.delete(voice.id)
    assert deleted.deleted and deleted.id == voice.id
    designed = client.audio.voices.create(name="bard", type="prompt", prompt="A bright young voice")
    assert designed.type == "prompt" and designed.prompt == "A bright young voice"
    assert seconds(client.audio.speech.create(model="tts-1", voice="bard", input="Hi.", response_format="wav").read())
    with pytest.raises(NotFoundError):
        client.audio.speech.create(model="tts-1", voice="narrator", input="Hello there.")
