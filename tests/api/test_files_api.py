"""File registry over HTTP: upload, metadata, download, delete, limits, restart."""

from __future__ import annotations

import asyncio
import time
import types

import numpy as np
import pytest

from qwen_tts_server.api import tts
from qwen_tts_server.api.schemas import SynthesisOptions
from qwen_tts_server.engine.types import SynthesisResult
from qwen_tts_server.storage.database import sqlite_url
from qwen_tts_server.storage.files import FileRegistry

from .support import error_of, sine_wav, upload


def test_upload_metadata_download_delete(client):
    data = sine_wav(2.0)
    file_id = upload(client, data, filename="my voice.wav")
    # Metadata for a client that asks for JSON (`*/*` and audio Accept headers get the file).
    meta = client.get(f"/api/v1/files/{file_id}", headers={"accept": "application/json"}).json()
    assert meta["file_id"] == file_id and meta["kind"] == "upload"
    assert meta["duration_s"] == 2.0 and meta["sample_rate"] == 24000 and meta["size_bytes"] == len(data)
    content = client.get(f"/api/v1/files/{file_id}/content")
    assert content.status_code == 200 and content.content == data
    assert content.headers["content-type"].startswith("audio/wav")
    assert client.delete(f"/api/v1/files/{file_id}").json() == {"file_id": file_id, "deleted": True}
    gone = client.get(f"/api/v1/files/{file_id}")
    assert gone.status_code == 404 and error_of(gone)["type"] == "not_found"


def test_upload_that_is_not_audio(client):
    response = client.post("/api/v1/files/upload", files={"file": ("notes.txt", b"hello " * 100, "text/plain")})
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "file" and "not decodable audio" in error["message"]


def test_empty_upload(client):
    response = client.post("/api/v1/files/upload", files={"file": ("x.wav", b"", "audio/wav")})
    assert response.status_code == 422 and error_of(response)["field"] == "file"


def test_upload_too_large_is_413(make_client):
    client = make_client(max_upload_bytes=50_000)
    response = client.post("/api/v1/files/upload", files={"file": ("big.wav", sine_wav(3.0), "audio/wav")})
    assert response.status_code == 413
    assert "limit" in error_of(response)["message"]


def test_upload_too_short_or_too_long(client):
    short = client.post("/api/v1/files/upload", files={"file": ("s.wav", sine_wav(0.2), "audio/wav")})
    assert short.status_code == 422 and "too short" in error_of(short)["message"]
    long = client.post("/api/v1/files/upload", files={"file": ("l.wav", sine_wav(11.0), "audio/wav")})
    assert long.status_code == 422 and "too long" in error_of(long)["message"]


def test_missing_file_field(client):
    response = client.post("/api/v1/files/upload", data={"nothing": "here"})
    assert response.status_code == 422 and error_of(response)["field"] == "file"


def test_unknown_and_expired_ids(make_client):
    client = make_client(file_ttl_s=0.5)
    assert client.get("/api/v1/files/file-" + "a" * 32).status_code == 404
    assert client.get("/api/v1/files/not-an-id/content").status_code == 404
    file_id = upload(client)
    time.sleep(0.7)
    response = client.get(f"/api/v1/files/{file_id}/content")
    assert response.status_code == 404 and "expired" in error_of(response)["message"]


def test_files_survive_a_restart(make_client, tmp_path):
    data_dir = tmp_path / "persist"
    first = make_client(data_dir=data_dir)
    file_id = upload(first)
    output = first.post("/api/v1/custom-voice", json={"text": "Keep me.", "speaker": "ryan"}).json()["items"][0]
    first.__exit__(None, None, None)
    second = make_client(data_dir=data_dir)
    assert second.get(f"/api/v1/files/{file_id}").status_code == 200
    meta = second.get(f"/api/v1/files/{output['file_id']}", headers={"accept": "application/json"}).json()
    assert meta["kind"] == "output"
    assert second.get(f"/api/v1/files/{output['file_id']}/content").status_code == 200


def test_a_full_disk_is_a_507_that_says_so_and_leaves_nothing_behind(make_client, small_disk):
    """The files folder on a real 128 KiB filesystem: an upload that does not fit fails with 507
    `storage_full` and Retry-After (the server's problem, not a 500 or the client's), and its partial file
    is gone: the next upload that fits is stored."""
    data_dir = make_client.tmp / "data"
    files = small_disk(data_dir / "files", 128)
    client = make_client(data_dir=data_dir)
    too_big = client.post("/api/v1/files/upload", files={"file": ("long.wav", sine_wav(4.0), "audio/wav")})
    assert too_big.status_code == 507 and too_big.headers["retry-after"] == "60"
    error = error_of(too_big)
    assert error["type"] == "storage_full" and "disk is full" in error["message"]
    assert list(files.iterdir()) == []
    file_id = upload(client, sine_wav(1.5))
    assert client.get(f"/api/v1/files/{file_id}/content").content == sine_wav(1.5)


def test_a_request_whose_outputs_do_not_all_fit_leaves_none_of_them(make_client, small_disk, monkeypatch):
    """Five outputs of 12-20 KB each (greedy: the tiny checkpoint ends them after 3-5 frames), stored at once
    on a 32 KiB files folder: one or two fit, the others do not. The request is a 507 and the outputs that
    were stored are deleted again, so nothing is left that the client was never told of; the room they took
    is free for the next request."""
    data_dir = make_client.tmp / "data"
    files = small_disk(data_dir / "files", 32)
    client = make_client(data_dir=data_dir)
    deleted, delete = [], FileRegistry.delete

    def counted_delete(self, file_id):
        deleted.append(file_id)
        delete(self, file_id)

    monkeypatch.setattr(FileRegistry, "delete", counted_delete)
    body = {"speaker": "ryan", "do_sample": False, "subtalker_do_sample": False, "response_format": "wav"}
    response = client.post("/api/v1/custom-voice", json=body | {"text": ["One.", "Two.", "Three.", "Four.", "Five."]})
    assert response.status_code == 507 and error_of(response)["type"] == "storage_full", response.text
    assert deleted and list(files.iterdir()) == [], "no output fitted: the test proved nothing"
    assert client.post("/api/v1/custom-voice", json=body | {"text": "One."}).status_code == 200


def test_a_full_database_disk_is_a_507_too(make_client, small_disk):
    """SQLite's file on a real 512 KiB filesystem (the files folder elsewhere): uploads fill its log until
    SQLite answers SQLITE_FULL; that upload is a 507 `storage_full`, not a 500, and reads still work."""
    from qwen_tts_server.storage.database import sqlite_url

    folder = small_disk(make_client.tmp / "db", 512)
    client = make_client(database_url=sqlite_url(folder / "registry.sqlite3"))
    stored, wav = [], sine_wav(1.5)
    for _ in range(500):
        response = client.post("/api/v1/files/upload", files={"file": ("a.wav", wav, "audio/wav")})
        if response.status_code != 201:
            break
        stored.append(response.json()["file_id"])
    assert stored, "the first upload already failed: the filesystem is too small for the schema"
    assert response.status_code == 507, response.text
    assert error_of(response)["type"] == "storage_full"
    assert client.get(f"/api/v1/files/{stored[0]}/content").content == wav


def test_outputs_stored_while_their_request_is_cancelled_are_deleted(tmp_path, monkeypatch):
    """A request cancelled (client gone, deadline) while its outputs are being stored: the stores finish in
    their threads, and what they stored is deleted, since nobody will ever be told of it."""
    files = FileRegistry(tmp_path / "files", sqlite_url(tmp_path / "registry.sqlite3"), default_ttl_s=3600.0)
    store, stored = tts._store, []

    def slow_store(*args):
        time.sleep(0.3)  # the cancel lands while the real store below runs
        item = store(*args)
        stored.append(item.file_id)
        return item

    monkeypatch.setattr(tts, "_store", slow_store)
    monkeypatch.setattr(tts, "file_url", lambda request, file_id, expires_at: f"/api/v1/files/{file_id}")
    svc = types.SimpleNamespace(files=files)
    body = SynthesisOptions(response_format="wav")
    results = [SynthesisResult(np.zeros(2400, dtype=np.float32), 24000, 1) for _ in range(3)]

    async def cancel_while_storing() -> None:
        task = asyncio.create_task(tts._store_all(None, svc, body, [None] * 3, results, False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the stores finish, then their outputs are deleted off the event loop
            await asyncio.sleep(0.05)
            if len(stored) == 3 and not files.list("output"):
                break

    asyncio.run(cancel_while_storing())
    assert len(stored) == 3, "the stores did not run: nothing to delete"
    assert files.list("output") == [] and list((tmp_path / "files").iterdir()) == []
