"""storage.database: one engine per URL, transactions that take SQLite's write lock up front, reads
that take none, and several threads and processes on one database."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from qwen_tts_server.storage.database import autocommit, close_databases, open_database, sqlite_url

metadata = sa.MetaData()
counter = sa.Table("counter", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("n", sa.Integer))
rows = sa.Table("rows", metadata, sa.Column("id", sa.Text, primary_key=True), sa.Column("writer", sa.Text))


def test_one_engine_per_url_and_tables_created(database_url: str) -> None:
    engine = open_database(database_url, metadata)
    assert open_database(database_url) is engine
    assert {"counter", "rows"} <= set(sa.inspect(engine).get_table_names())
    close_databases()
    again = open_database(database_url, metadata)  # tables already there: no error
    assert again is not engine


def test_sqlite_writes_begin_immediate_and_reads_begin_nothing(tmp_path: Path) -> None:
    engine = open_database(sqlite_url(tmp_path / "db.sqlite3"), metadata)
    statements: list[str] = []
    sa.event.listen(engine, "connect", lambda dbapi, _record: dbapi.set_trace_callback(statements.append))
    engine.dispose()  # new connections, with the trace
    with engine.begin() as conn:
        conn.execute(rows.insert().values(id="a", writer="x"))
    assert [s.split()[0] for s in statements if not s.startswith("PRAGMA")] == ["BEGIN", "INSERT", "COMMIT"]
    assert statements[statements.index("BEGIN IMMEDIATE") + 1].startswith("INSERT")
    statements.clear()
    with autocommit(engine).connect() as conn:
        assert conn.execute(sa.select(rows.c.id)).scalars().all() == ["a"]
    assert not [s for s in statements if s.startswith(("BEGIN", "COMMIT", "ROLLBACK"))]
    statements.clear()
    with engine.begin() as conn:  # the same pooled connection, lent as AUTOCOMMIT just before
        conn.execute(rows.insert().values(id="b", writer="x"))
    assert "BEGIN IMMEDIATE" in statements and statements[-1] == "COMMIT"
    close_databases()


def test_a_failed_transaction_leaves_nothing(database_url: str) -> None:
    engine = open_database(database_url, metadata)
    try:
        with engine.begin() as conn:
            conn.execute(rows.insert().values(id="kept-only-if-committed", writer="x"))
            conn.execute(rows.insert().values(id="kept-only-if-committed", writer="y"))  # primary key clash
    except sa.exc.IntegrityError:
        pass
    with autocommit(engine).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(rows)).scalar() == 0


def test_threads_read_and_write_at_once(database_url: str) -> None:
    engine = open_database(database_url, metadata)
    reads = autocommit(engine)
    with engine.begin() as conn:
        conn.execute(counter.insert().values(id=1, n=0))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                with engine.begin() as conn:
                    conn.execute(rows.insert().values(id=f"{t}-{i}", writer=str(t)))
                    conn.execute(counter.update().values(n=counter.c.n + 1))
                with reads.connect() as conn:
                    assert conn.execute(sa.select(rows.c.id).where(rows.c.id == f"{t}-{i}")).first() is not None
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with reads.connect() as conn:
        assert conn.execute(sa.select(counter.c.n)).scalar() == 200
        assert conn.execute(sa.select(sa.func.count()).select_from(rows)).scalar() == 200


_WRITER = textwrap.dedent(
    """
    import sys, threading
    import sqlalchemy as sa
    sys.path.insert(0, sys.argv[3])
    from tests.storage.test_database import counter, metadata, rows
    from qwen_tts_server.storage.database import open_database

    engine = open_database(sys.argv[1], metadata)
    name = sys.argv[2]

    errors = []

    def work(t):
        try:
            for i in range(20):
                with engine.begin() as conn:  # read, then write what was read: lost updates if not serialised
                    n = conn.execute(sa.select(counter.c.n).where(counter.c.id == 1)).scalar_one()
                    conn.execute(counter.update().where(counter.c.id == 1).values(n=n + 1))
                    conn.execute(rows.insert().values(id=f"{name}-{t}-{i}", writer=name))
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.exit("; ".join(errors) or None)
    """
)


def test_two_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    """Read-then-write transactions from two processes (three threads each): BEGIN IMMEDIATE makes
    them wait their turn, where a deferred BEGIN would fail with 'database is locked' on upgrading."""
    url = sqlite_url(tmp_path / "shared.sqlite3")
    engine = open_database(url, metadata)
    with engine.begin() as conn:
        conn.execute(counter.insert().values(id=1, n=0))
    root = str(Path(__file__).resolve().parents[2])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, name, root], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for name in ("p1", "p2")
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with autocommit(engine).connect() as conn:
        assert conn.execute(sa.select(counter.c.n)).scalar() == 2 * 3 * 20
        writers = dict(conn.execute(sa.select(rows.c.writer, sa.func.count()).group_by(rows.c.writer)).all())
    assert writers == {"p1": 60, "p2": 60}


# The schema the stores made with sqlite3 before SQLAlchemy: such a database must open unchanged.
_OLD_SCHEMA = """
CREATE TABLE files (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, filename TEXT NOT NULL, media_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, duration_s REAL,
    sample_rate INTEGER, sha256 TEXT NOT NULL
);
CREATE INDEX files_expires_at ON files (expires_at);
CREATE TABLE voices (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL, mode TEXT NOT NULL,
    ref_text TEXT, source TEXT NOT NULL, description TEXT, sample_text TEXT, language TEXT,
    audio_sha256 TEXT NOT NULL, duration_s REAL, created_at REAL NOT NULL
);
CREATE UNIQUE INDEX voices_owner_name ON voices (owner, name COLLATE NOCASE);
"""


def test_a_database_made_before_sqlalchemy_opens_as_it_is(tmp_path: Path) -> None:
    import sqlite3

    from qwen_tts_server.errors import Conflict
    from qwen_tts_server.storage.files import FileRegistry
    from qwen_tts_server.storage.voices import VoiceStore

    from .test_voices import create

    path = tmp_path / "registry.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SCHEMA)
    file_id, voice_id = "file-" + "1" * 32, "voice-" + "2" * 32
    old.execute(
        "INSERT INTO files VALUES (?, 'upload', 'a.wav', 'audio/wav', 5, 1.0, 4102444800.0, 1.5, 24000, ?)",
        (file_id, "0" * 64),
    )
    old.execute(
        "INSERT INTO voices VALUES (?, '', 'Narrator', 'm', 'icl', 'hi', 'file', NULL, NULL, NULL, ?, 2.0, 1.0)",
        (voice_id, "0" * 64),
    )
    old.commit()
    old.close()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / file_id).write_bytes(b"hello")

    files = FileRegistry(tmp_path / "files", sqlite_url(path), default_ttl_s=100.0)
    voices = VoiceStore(tmp_path / "voices", sqlite_url(path))
    assert files.read_bytes(file_id) == b"hello" and files.get(file_id).sample_rate == 24000
    assert voices.get("narrator", None).id == voice_id
    with pytest.raises(Conflict):
        create(voices, "NARRATOR")
    close_databases()


def _use_in_child(url: str) -> None:
    engine = open_database(url)  # the inherited engine, as it is at the fork
    assert engine.pool.checkedin() == 0, "the parent's pooled connection came along"
    with engine.begin() as conn:
        conn.execute(rows.insert().values(id="child", writer="child"))


def test_a_forked_child_gets_its_own_connections(database_url: str) -> None:
    import multiprocessing

    engine = open_database(database_url, metadata)
    with autocommit(engine).connect() as conn:  # a pooled connection the child must not use
        conn.execute(sa.select(rows.c.id)).all()
    assert engine.pool.checkedin() == 1
    child = multiprocessing.get_context("fork").Process(target=_use_in_child, args=(database_url,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    with autocommit(engine).connect() as conn:  # the parent's connection still works after the child's exit
        assert conn.execute(sa.select(rows.c.writer)).scalars().all() == ["child"]
