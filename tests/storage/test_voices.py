"""VoiceStore: metadata beside the file registry's (SQLite or PostgreSQL), prompts as safetensors, owners apart."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen_tts_server.engine.types import VoicePrompt
from qwen_tts_server.errors import Conflict, InvalidRequest, NotFound
from qwen_tts_server.storage.database import close_databases
from qwen_tts_server.storage.disk import ORPHAN_GRACE_S
from qwen_tts_server.storage.files import FileRegistry
from qwen_tts_server.storage.voices import VoiceStore, check_name, is_voice_id

ALICE, BOB = "a" * 64, "b" * 64


@pytest.fixture
def paths(tmp_path: Path, database_url: str) -> tuple[Path, str]:
    """The prompt folder and the metadata database (tests/storage/conftest.py: once per backend)."""
    return tmp_path / "voices", database_url


@pytest.fixture
def store(paths: tuple[Path, str]) -> VoiceStore:
    return VoiceStore(paths[0], paths[1], clock=lambda: 1_700_000_000.0)


def prompt(seed: int = 0, frames: int = 7) -> VoicePrompt:
    g = torch.Generator().manual_seed(seed)
    return VoicePrompt(
        speaker_embedding=torch.randn(32, generator=g, dtype=torch.float32).to(torch.bfloat16),
        ref_code=torch.randint(0, 2048, (frames, 16), generator=g),
    )


def create(store: VoiceStore, name: str = "narrator", owner: str | None = None, **kw: object):
    args: dict = {
        "name": name,
        "owner": owner,
        "model": "Qwen3-TTS-12Hz-0.6B-Base",
        "prompt": prompt(),
        "audio_sha256": "0" * 64,
        "source": "file",
        "ref_text": "what the clip says",
    } | kw
    return store.create(**args)


def test_create_get_and_the_prompt_round_trips(store: VoiceStore) -> None:
    p = prompt(3)
    rec = create(store, prompt=p, duration_s=2.5)
    assert is_voice_id(rec.id) and rec.mode == "icl" and not rec.x_vector_only
    assert rec.created_at == 1_700_000_000.0 and rec.owner is None
    assert store.get("narrator", None) == rec == store.get(rec.id, None)
    assert store.get("NARRATOR", None) == rec  # names match in any case, as speakers do
    loaded = store.load_prompt(rec.id)
    assert torch.equal(loaded.speaker_embedding, p.speaker_embedding)
    assert loaded.speaker_embedding.dtype == torch.bfloat16  # the dtype it was computed in
    assert torch.equal(loaded.ref_code, p.ref_code)
    public = rec.to_public_dict()
    assert "owner" not in public and public["created_at_iso"] == "2023-11-14T22:13:20Z"


def test_the_file_is_safetensors_with_what_it_is_in_its_header(store: VoiceStore) -> None:
    rec = create(store, x_vector_only=True)
    path = store.path(rec.id)
    assert path.parent == store.root and path.name == f"{rec.id}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"speaker_embedding", "ref_code"}
    assert meta["model"] == "Qwen3-TTS-12Hz-0.6B-Base" and meta["x_vector_only"] == "true"
    assert meta["ref_text"] == "what the clip says" and meta["mode"] == "x_vector"
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]  # written via a temp file


def test_mode_follows_the_transcript(store: VoiceStore) -> None:
    assert create(store, "a", ref_text=None).mode == "x_vector"
    assert create(store, "b", ref_text="words").mode == "icl"
    assert create(store, "c", ref_text="words", x_vector_only=True).mode == "x_vector"


def test_names_are_unique_per_owner(store: VoiceStore) -> None:
    create(store, "narrator", owner=ALICE)
    with pytest.raises(Conflict) as err:
        create(store, "Narrator", owner=ALICE)
    assert err.value.status_code == 409 and err.value.field == "name"
    create(store, "narrator", owner=BOB)  # another owner may use the name
    create(store, "narrator", owner=None)
    assert len(list(store.root.glob("*.safetensors"))) == 3  # the refused one left no blob


def test_names_fold_ascii_letters_only_on_every_backend(store: VoiceStore) -> None:
    zoe = create(store, "Zoë")
    assert store.get("ZOë", None) == zoe  # ASCII letters match in any case
    assert store.find("ZOË", None) is None  # other letters as written (SQLite's NOCASE; PostgreSQL alike)
    assert create(store, "ZOË").name == "ZOË"
    with pytest.raises(Conflict):
        create(store, "zoë")


def test_owners_do_not_see_each_others_voices(store: VoiceStore) -> None:
    mine = create(store, "mine", owner=ALICE)
    create(store, "theirs", owner=BOB)
    create(store, "nobodys", owner=None)
    assert [v.name for v in store.list(ALICE)] == ["mine"]
    assert [v.name for v in store.list(None)] == ["nobodys"]
    assert store.find("mine", BOB) is None and store.find(mine.id, BOB) is None
    with pytest.raises(NotFound):
        store.get("mine", None)
    with pytest.raises(NotFound):
        store.delete(mine.id, BOB)
    assert store.get("mine", ALICE) == mine


def test_delete_removes_row_and_prompt(store: VoiceStore) -> None:
    rec = create(store)
    assert store.delete("narrator", None) == rec
    assert store.find("narrator", None) is None and not store.path(rec.id).exists()
    with pytest.raises(NotFound):
        store.delete("narrator", None)
    create(store)  # the name is free again


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("narrator", True),
        ("My voice 2", True),
        ("v1.0-final_take", True),
        ("Zoë", True),
        ("声音", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("   ", False),
        ("a/b", False),
        ("-dash-first", False),
        ("semi;colon", False),
        ("voice-" + "0" * 32, False),  # looks like an id
    ],
)
def test_name_rules(name: str, ok: bool) -> None:
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(InvalidRequest) as err:
            check_name(name)
        assert err.value.status_code == 422 and err.value.field == "name"


def test_names_are_stripped(store: VoiceStore) -> None:
    assert create(store, "  narrator ").name == "narrator"


def test_survives_a_restart_beside_the_file_registry(paths: tuple[Path, str], tmp_path: Path) -> None:
    files = FileRegistry(tmp_path / "files", paths[1], default_ttl_s=100.0)
    first = VoiceStore(*paths)
    rec = create(first, owner=ALICE)
    close_databases()  # as at shutdown: the next one opens the database afresh
    second = VoiceStore(*paths)
    assert second.get("narrator", ALICE) == rec
    assert torch.equal(second.load_prompt(rec.id).ref_code, prompt().ref_code)
    assert files.list() == []  # one database, two tables, no interference


def test_concurrent_creates_of_one_name_give_one_voice(store: VoiceStore) -> None:
    outcomes: list[str] = []

    def make() -> None:
        try:
            create(store, "race")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
    assert len(store.list(None)) == 1 and len(list(store.root.glob("*.safetensors"))) == 1


def test_a_missing_prompt_file_is_not_found(store: VoiceStore) -> None:
    rec = create(store)
    store.path(rec.id).unlink()
    with pytest.raises(NotFound):
        store.load_prompt(rec.id)


def test_a_start_removes_the_temp_files_a_crash_left_but_not_a_write_in_flight(paths: tuple[Path, str]) -> None:
    """A crash between writing a prompt's temp file and renaming it leaves the temp file: the next start removes
    it once it is older than a write could take; a younger one may be another replica's write in flight."""
    store = VoiceStore(*paths)
    kept = create(store)
    stale, fresh = store.root / ".tmp-abc", store.root / ".tmp-def"
    for path in (stale, fresh):
        path.write_bytes(b"x")
    old = time.time() - ORPHAN_GRACE_S - 10
    os.utime(stale, (old, old))
    restarted = VoiceStore(*paths)
    assert not stale.exists() and fresh.exists()
    assert torch.equal(restarted.load_prompt(kept.id).ref_code, prompt().ref_code)
