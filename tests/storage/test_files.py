from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from qwen_tts_server.errors import NotFound
from qwen_tts_server.storage.database import close_databases
from qwen_tts_server.storage.disk import ORPHAN_GRACE_S
from qwen_tts_server.storage.files import FileRecord, FileRegistry, is_file_id


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def paths(tmp_path: Path, database_url: str) -> tuple[Path, str]:
    """The blob folder and the metadata database (tests/storage/conftest.py: once per backend)."""
    return tmp_path / "files", database_url


@pytest.fixture
def registry(paths: tuple[Path, str], clock: FakeClock) -> FileRegistry:
    return FileRegistry(paths[0], paths[1], default_ttl_s=100.0, clock=clock)


def _put(reg: FileRegistry, data: bytes = b"RIFF....", **kw: object) -> FileRecord:
    args: dict = {"kind": "upload", "filename": "voice.wav", "media_type": "audio/wav"} | kw
    return reg.put(data, **args)


def test_put_get_read(registry: FileRegistry, clock: FakeClock) -> None:
    rec = _put(registry, b"hello", duration_s=1.5, sample_rate=16000)
    assert is_file_id(rec.id) and len(rec.id) == len("file-") + 32
    assert rec.size_bytes == 5 and rec.kind == "upload" and rec.filename == "voice.wav"
    assert rec.created_at == clock.now and rec.expires_at == clock.now + 100.0
    assert rec.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert registry.get(rec.id) == rec
    assert registry.read_bytes(rec.id) == b"hello"
    assert registry.path(rec.id).read_bytes() == b"hello"
    assert registry.path(rec.id).parent == registry.root


def test_public_dict_is_json_friendly(registry: FileRegistry) -> None:
    rec = _put(registry, kind="output", ttl_s=60.0)
    body = json.loads(json.dumps(rec.to_public_dict()))
    assert body["id"] == rec.id and body["kind"] == "output" and body["duration_s"] is None
    assert body["created_at_iso"] == "2023-11-14T22:13:20Z"
    assert body["expires_at_iso"] == "2023-11-14T22:14:20Z"


def test_filename_is_reduced_to_a_base_name(registry: FileRegistry) -> None:
    assert _put(registry, filename="../../etc/passwd").filename == "passwd"
    assert _put(registry, filename="C:\\x\\a\nb.wav").filename == "ab.wav"
    assert _put(registry, filename="").filename == "file"


def test_restart_sees_old_files(paths: tuple[Path, str], clock: FakeClock) -> None:
    first = FileRegistry(paths[0], paths[1], default_ttl_s=100.0, clock=clock)
    rec = _put(first, b"persist me")
    close_databases()  # as at shutdown: the next one opens the database afresh
    second = FileRegistry(paths[0], paths[1], default_ttl_s=100.0, clock=clock)
    assert second.get(rec.id) == rec
    assert second.read_bytes(rec.id) == b"persist me"
    assert [r.id for r in second.list()] == [rec.id]


def test_expiry_says_expired_then_cleanup_removes_blob(registry: FileRegistry, clock: FakeClock) -> None:
    short = _put(registry, b"a", ttl_s=10.0)
    long = _put(registry, b"b", ttl_s=1000.0)
    blob = registry.path(short.id)
    clock.now += 10.0
    with pytest.raises(NotFound) as err:
        registry.get(short.id)
    assert "expired at 2023-11-14T22:13:30Z; upload it again" in err.value.message
    with pytest.raises(NotFound, match="expired"):
        registry.read_bytes(short.id)
    assert blob.exists()  # expired rows and blobs stay until cleanup
    assert [r.id for r in registry.list()] == [long.id]
    assert registry.cleanup_expired() == 1
    assert not blob.exists()
    with pytest.raises(NotFound, match="does not exist"):
        registry.get(short.id)
    assert registry.read_bytes(long.id) == b"b"
    assert registry.cleanup_expired() == 0


def test_cleanup_removes_stale_temp_and_orphan_blobs_only(registry: FileRegistry) -> None:
    keep = _put(registry)
    old = time.time() - ORPHAN_GRACE_S - 10
    stale_tmp = registry.root / ".tmp-abc"
    fresh_tmp = registry.root / ".tmp-def"
    orphan = registry.root / ("file-" + "0" * 32)
    unrelated = registry.root / "README"
    for p in (stale_tmp, fresh_tmp, orphan, unrelated):
        p.write_bytes(b"x")
    for p in (stale_tmp, orphan, unrelated, registry.path(keep.id)):
        os.utime(p, (old, old))
    assert registry.cleanup_expired() == 0
    assert not stale_tmp.exists() and not orphan.exists()
    assert fresh_tmp.exists() and unrelated.exists()
    assert registry.read_bytes(keep.id) == b"RIFF...."


def test_delete(registry: FileRegistry) -> None:
    rec = _put(registry)
    blob = registry.path(rec.id)
    registry.delete(rec.id)
    assert not blob.exists()
    with pytest.raises(NotFound, match="does not exist"):
        registry.get(rec.id)
    with pytest.raises(NotFound):
        registry.delete(rec.id)


def test_delete_works_on_expired(registry: FileRegistry, clock: FakeClock) -> None:
    rec = _put(registry, ttl_s=1.0)
    clock.now += 5
    registry.delete(rec.id)
    assert registry.cleanup_expired() == 0


@pytest.mark.parametrize("bad", ["file-" + "f" * 32, "nope", "file-XYZ", "../registry.sqlite3", "x" * 500])
def test_unknown_and_malformed_ids_are_not_found(registry: FileRegistry, bad: str) -> None:
    with pytest.raises(NotFound) as err:
        registry.get(bad)
    assert "does not exist; upload it again" in err.value.message
    assert len(err.value.message) < 200
    with pytest.raises(NotFound):
        registry.path(bad)
    with pytest.raises(NotFound):
        registry.delete(bad)


def test_missing_blob_is_not_found(registry: FileRegistry) -> None:
    rec = _put(registry)
    registry.path(rec.id).unlink()
    with pytest.raises(NotFound, match="missing from storage"):
        registry.read_bytes(rec.id)


def test_list_filters_by_kind(registry: FileRegistry, clock: FakeClock) -> None:
    up = _put(registry, kind="upload")
    clock.now += 1
    out = _put(registry, kind="output")
    assert [r.id for r in registry.list()] == [up.id, out.id]
    assert [r.id for r in registry.list("output")] == [out.id]
    assert [r.id for r in registry.list(kind="upload")] == [up.id]


def test_bad_arguments(registry: FileRegistry) -> None:
    with pytest.raises(ValueError):
        _put(registry, kind="other")
    with pytest.raises(ValueError):
        _put(registry, ttl_s=0)
    assert list(registry.root.iterdir()) == []


def test_is_file_id() -> None:
    assert is_file_id("file-" + "0123456789abcdef" * 2)
    assert not is_file_id("file-" + "0123456789ABCDEF" * 2)
    assert not is_file_id("file-" + "0" * 31)
    assert not is_file_id("file-" + "0" * 32 + "\n")


def test_concurrent_puts(registry: FileRegistry) -> None:
    errors: list[BaseException] = []
    ids: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(20):
                data = f"{n}-{i}".encode()
                rec = _put(registry, data)
                assert registry.read_bytes(rec.id) == data
                with lock:
                    ids.append(rec.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 160
    assert len(registry.list()) == 160
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")]


# ----- what an upload is, from its bytes -----
def _encoded(fmt: str) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    from qwen_tts_server.audio.encoders import encode_audio

    samples = (0.2 * np.sin(np.arange(24000) / 10)).astype(np.float32)
    if fmt in ("wav", "flac"):
        buf = io.BytesIO()
        sf.write(buf, samples, 24000, format=fmt.upper())
        return buf.getvalue()
    return encode_audio(samples, 24000, fmt)


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [("wav", "audio/wav"), ("flac", "audio/flac"), ("opus", "audio/ogg"), ("mp3", "audio/mpeg")],
)
def test_real_audio_files_are_recognised(fmt: str, media_type: str) -> None:
    from qwen_tts_server.storage.files import sniff_media_type

    assert sniff_media_type(_encoded(fmt)) == media_type


def test_sniffing_reads_the_magic_bytes() -> None:
    from qwen_tts_server.storage.files import sniff_media_type

    assert sniff_media_type(b"RIFF\x24\x00\x00\x00WAVEfmt ") == "audio/wav"
    assert sniff_media_type(b"RF64\xff\xff\xff\xffWAVEds64") == "audio/wav"
    assert sniff_media_type(b"fLaC\x00\x00\x00\x22") == "audio/flac"
    assert sniff_media_type(b"OggS\x00\x02") == "audio/ogg"
    assert sniff_media_type(b"ID3\x04\x00\x00\x00\x00\x00\x00") == "audio/mpeg"
    assert sniff_media_type(bytes([0xFF, 0xFB, 0x90, 0x64])) == "audio/mpeg"  # MPEG-1 layer III, 128 kbit/s
    assert sniff_media_type(bytes([0xFF, 0xF3, 0x48, 0xC4])) == "audio/mpeg"  # MPEG-2 layer III
    assert sniff_media_type(bytes([0xFF, 0xFB, 0xF0, 0x64])) is None  # bitrate index 1111 is invalid
    assert sniff_media_type(bytes([0xFF, 0xF9, 0x90, 0x64])) is None  # layer 00 is reserved (AAC ADTS)
    assert sniff_media_type(b"RIFF\x24\x00\x00\x00AVI LIST") is None
    assert sniff_media_type(b"PK\x03\x04") is None
    assert sniff_media_type(b"") is None
