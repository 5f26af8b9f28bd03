"""Two API replicas on one metadata database and one shared blob folder see each other's files and
voices. Each "replica" here has its own engine (its own connections), as another process would; the
PostgreSQL case is the one replicas on several hosts use, SQLite the one of several processes on one."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from qwen_tts_server.errors import Conflict, NotFound
from qwen_tts_server.storage.database import close_databases
from qwen_tts_server.storage.disk import ORPHAN_GRACE_S
from qwen_tts_server.storage.files import FileRegistry
from qwen_tts_server.storage.voices import VoiceStore

from .test_files import FakeClock, _put
from .test_voices import ALICE, create, prompt


def _replicas(make):  # type: ignore[no-untyped-def]
    first = make()
    close_databases()  # forget the first one's engine, so the second opens its own
    second = make()
    assert first._engine is not second._engine
    return first, second


def test_replicas_share_files(tmp_path: Path, database_url: str) -> None:
    clock = FakeClock()
    root = tmp_path / "shared-files"
    a, b = _replicas(lambda: FileRegistry(root, database_url, default_ttl_s=100.0, clock=clock))

    rec = _put(a, b"made on a", kind="output")
    assert b.get(rec.id) == rec
    assert b.read_bytes(rec.id) == b"made on a"
    assert [r.id for r in b.list("output")] == [rec.id]

    other = _put(b, b"made on b")
    b.delete(rec.id)
    with pytest.raises(NotFound, match="does not exist"):
        a.get(rec.id)
    assert [r.id for r in a.list()] == [other.id]

    # b's cleanup keeps a's old blob that still has its row, and removes an expired file of a's.
    old = time.time() - ORPHAN_GRACE_S - 10
    os.utime(a.path(other.id), (old, old))
    short = _put(a, b"short-lived", ttl_s=10.0)
    short_blob = a.path(short.id)
    clock.now += 10.0
    assert b.cleanup_expired() == 1
    assert a.cleanup_expired() == 0  # already gone: not counted twice
    assert not short_blob.exists()
    assert a.read_bytes(other.id) == b"made on b"


def test_replicas_share_voices(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "shared-voices"
    a, b = _replicas(lambda: VoiceStore(root, database_url, clock=lambda: 1_700_000_000.0))

    rec = create(a, "narrator", owner=ALICE)
    assert b.get("NARRATOR", ALICE) == rec == b.get(rec.id, ALICE)
    assert torch.equal(b.load_prompt(rec.id).ref_code, prompt().ref_code)
    assert [v.id for v in b.list(ALICE)] == [rec.id]
    assert b.find("narrator", None) is None  # owners stay apart across replicas too
    with pytest.raises(Conflict):
        create(b, "Narrator", owner=ALICE)

    # The name taken between b's check and its insert (the race replicas can lose): the database's
    # unique index refuses it, and b's prompt blob goes away.
    monkeypatch.setattr(b, "ensure_free", lambda name, owner: None)
    with pytest.raises(Conflict):
        create(b, "NARRATOR", owner=ALICE)
    assert sorted(p.name for p in root.glob("*.safetensors")) == [f"{rec.id}.safetensors"]

    assert b.delete("narrator", ALICE) == rec
    assert a.find(rec.id, ALICE) is None and not a.path(rec.id).exists()


def test_replicas_racing_for_one_name_make_one_voice(tmp_path: Path, database_url: str) -> None:
    root = tmp_path / "shared-voices"
    stores = _replicas(lambda: VoiceStore(root, database_url))
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def make(store: VoiceStore) -> None:
        start.wait()
        try:
            create(store, "race")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=make, args=(stores[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
    assert len(stores[0].list(None)) == 1 and len(list(root.glob("*.safetensors"))) == 1
