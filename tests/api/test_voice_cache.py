"""The voice-prompt cache keys on the reference's content: a file_id and base64 (or a data: URI) of
the same bytes share one entry, and a cached prompt is found before the audio is read or decoded."""

from __future__ import annotations

import base64

from qwen_tts_server.audio.sources import ReferenceAudioResolver
from qwen_tts_server.storage.files import FileRegistry

from .support import BASE_06, metric, sine_wav, upload


def clone(client, ref: str, **body: object):
    payload = {"text": "hello", "ref_audio": ref, "ref_text": "the words", "model": BASE_06} | body
    response = client.post("/api/v1/voice-clone", json=payload)
    assert response.status_code == 200, response.text
    return response


def test_file_id_and_base64_of_the_same_bytes_share_one_entry(client, monkeypatch):
    decoded, read = [], []
    decode, read_bytes = ReferenceAudioResolver._decode, FileRegistry.read_bytes
    monkeypatch.setattr(ReferenceAudioResolver, "_decode", lambda self, *a: decoded.append(1) or decode(self, *a))
    monkeypatch.setattr(FileRegistry, "read_bytes", lambda self, *a: read.append(1) or read_bytes(self, *a))
    wav = sine_wav(1.3)
    file_id = upload(client, wav)
    encoded = base64.b64encode(wav).decode()

    clone(client, file_id)
    assert (decoded, read) == ([1], [1])  # the first time: read, decoded, prompt computed
    clone(client, encoded, x_vector_only=True)  # other transport, other mode: the same prompt
    clone(client, f"data:audio/wav;base64,{encoded}", ref_text="other words")
    clone(client, file_id)
    assert (decoded, read) == ([1], [1])  # found by content before reading or decoding again

    cache = client.app.state.services.synthesizer.voice_cache
    assert (len(cache), cache.misses, cache.hits) == (1, 1, 3)
    text = client.get("/metrics").text
    assert metric(text, "qtts_voice_prompt_cache_total", result="miss") == 1
    assert metric(text, "qtts_voice_prompt_cache_total", result="hit") == 3
    # Other bytes are another entry; and the same bytes on another model too.
    clone(client, base64.b64encode(sine_wav(1.3, freq=330.0)).decode())
    clone(client, file_id, model="Qwen3-TTS-12Hz-1.7B-Base")
    assert (len(cache), cache.misses) == (3, 3)


def test_bad_audio_is_still_refused_and_not_cached(client):
    bad = base64.b64encode(b"this is text, not audio at all" * 10).decode()
    for _ in range(2):
        response = client.post(
            "/api/v1/voice-clone", json={"text": "hi", "ref_audio": bad, "ref_text": "w", "model": BASE_06}
        )
        assert response.status_code == 422 and response.json()["error"]["field"] == "ref_audio"
    assert len(client.app.state.services.synthesizer.voice_cache) == 0


def test_a_stored_voice_shares_the_entry_of_its_audio(client):
    wav = sine_wav(1.4)
    file_id = upload(client, wav)
    response = client.post(
        "/api/v1/voices", json={"name": "narrator", "ref_audio": file_id, "ref_text": "w", "model": BASE_06}
    )
    assert response.status_code == 201, response.text
    cache = client.app.state.services.synthesizer.voice_cache
    assert (len(cache), cache.misses) == (1, 1)
    clone(client, base64.b64encode(wav).decode())  # the voice's audio sent again: the same entry
    speech = client.post("/api/v1/voice-clone", json={"text": "hi", "voice": "narrator"})
    assert speech.status_code == 200, speech.text
    assert (len(cache), cache.misses, cache.hits) == (1, 1, 2)
