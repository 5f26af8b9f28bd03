"""The metadata database every store shares: SQLite in the data folder by default, PostgreSQL when
`QTTS_DATABASE_URL` names one (several API replicas and workers then see the same files, voices and
jobs). Stores talk to it through SQLAlchemy Core, so one set of statements serves both.

How stores use an engine:

* writes (and read-then-write steps) in `with engine.begin() as conn:`, one transaction. On SQLite
  that transaction starts with BEGIN IMMEDIATE: it takes the write lock up front (waiting up to the
  busy timeout for another thread or process to finish), so two writers never deadlock upgrading a
  read lock, and a failed statement rolls the whole block back.
* plain reads through `autocommit(engine)`: every statement on its own, no transaction. On SQLite
  (WAL) such a read never waits for a writer; on PostgreSQL it saves the BEGIN/ROLLBACK round trips.

SQLite runs in WAL mode with a busy timeout, so several threads and processes on one host can
share the file; PostgreSQL is for replicas on several hosts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from ..errors import StorageFull

log = logging.getLogger(__name__)
T = TypeVar("T")

# The exception types a database outage arrives as; `is_unavailable` tells an outage from a lasting fault
# (a missing table, a read-only file), which is an internal error and not worth a retry.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (sa.exc.DBAPIError, sa.exc.TimeoutError)
# PostgreSQL's SQLSTATEs for "the server is not there or not taking this now": connection exceptions (class
# 08), admin or crash shutdown and cannot-connect-now, too many connections, serialization failure,
# deadlock, lock not available, and a read-only transaction (a standby after a failover).
_PG_TRANSIENT_CLASSES = ("08",)
_PG_TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01", "55P03", "25006"})
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")
_PG_DISK_FULL = "53100"


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is down, unreachable or busy for now: worth a 503 and a retry."""
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(_PG_TRANSIENT_CLASSES) or sqlstate in _PG_TRANSIENT_STATES
    if type(orig).__module__.startswith("psycopg"):  # no SQLSTATE: no server answered (refused, reset)
        return isinstance(exc, sa.exc.OperationalError)
    return isinstance(exc, sa.exc.OperationalError) and any(m in str(orig) for m in _SQLITE_TRANSIENT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says a disk the server writes to is full: `StorageFull` (files, voices) or the database's
    (SQLite's SQLITE_FULL, PostgreSQL's disk_full). A 507 to a client; for background work, worth waiting out."""
    if isinstance(exc, StorageFull):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    orig = exc.orig
    return getattr(orig, "sqlstate", None) == _PG_DISK_FULL or getattr(orig, "sqlite_errorcode", None) == (
        sqlite3.SQLITE_FULL
    )


_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()
_BUSY_TIMEOUT_S = 30
# PostgreSQL: replicas starting together take this advisory lock to create the tables one at a time.
_SCHEMA_LOCK_KEY = zlib.crc32(b"qwen-tts-server schema")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def open_database(url: str, metadata: sa.MetaData | None = None) -> sa.Engine:
    """The engine for `url` (one per URL in a process; the stores share its pool), with `metadata`'s
    tables created if they are missing."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create(url)
    if metadata is not None:
        _create_tables(engine, metadata)
    return engine


def autocommit(engine: sa.Engine) -> sa.Engine:
    """`engine` (same pool) with every statement its own transaction: for reads (see the module doc)."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


# What an outage worth waiting out (the database down or busy, a disk full) arrives as; `outage_of` tells.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (*UNAVAILABLE_ERRORS, StorageFull)


def outage_of(exc: BaseException) -> str | None:
    """Why background work should wait `exc` out ("disk_full" or "database_unavailable"), or None: no outage."""
    if is_disk_full(exc):
        return "disk_full"
    return "database_unavailable" if is_unavailable(exc) else None


class OutageRetries:
    """How many times background work has waited out an outage, by `outage_of`'s reason, in this process: a full
    disk otherwise shows only in the log, while job items wait with their audio in hand (for /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"disk_full": 0, "database_unavailable": 0}

    def add(self, reason: str) -> None:
        with self._lock:
            self.counts[reason] += 1


OUTAGE_RETRIES = OutageRetries()


class OutageBackoff:
    """Waits between tries while the database is down or busy, or a disk is full: 0.5 s, doubling up to 30 s."""

    def __init__(self) -> None:
        self.wait_s = 0.5

    def next_wait(self, exc: BaseException) -> float:
        """The wait before the next try of an outage `exc` (logged as one line, not a traceback; counted)."""
        wait_s = self.wait_s
        reason = outage_of(exc) or "database_unavailable"
        what = "a disk is full" if reason == "disk_full" else "the database is unavailable"
        log.warning("%s (%s); trying again in %.1f s", what, type(exc).__name__, wait_s)
        OUTAGE_RETRIES.add(reason)
        self.wait_s = min(2 * wait_s, 30.0)
        return wait_s

    async def wait(self, exc: BaseException) -> None:
        await asyncio.sleep(self.next_wait(exc))

    async def wait_out(self, exc: BaseException) -> None:
        """Wait before the next try if `exc` is an outage (see `outage_of`); else raise it."""
        if outage_of(exc) is None:
            raise exc
        await self.wait(exc)


async def through_outages(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)` in a thread, tried again while the database is down or busy, or while the disk
    it writes to (files or database) is full: for background work that must not drop what it has to write
    (a job item's audio, its result). Other errors raise."""
    backoff = OutageBackoff()
    while True:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except OUTAGE_ERRORS as exc:
            await backoff.wait_out(exc)


def close_databases() -> None:
    """Dispose every pool (at shutdown, and in tests that start over)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()


def _after_fork_in_child() -> None:
    """A forked child (Celery's prefork pool, a pre-forking server) must not talk over its parent's
    connections: the engines stay, with new pools; the parent's sockets are left to the parent."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for engine in list(_engines.values()):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _create_tables(engine: sa.Engine, metadata: sa.MetaData) -> None:
    with engine.begin() as conn:  # on SQLite, BEGIN IMMEDIATE already serialises this
        if conn.dialect.name == "postgresql":
            # Without it, two replicas starting at once both see a table missing and one CREATE fails.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
        metadata.create_all(conn, checkfirst=True)


def _create(url: str) -> sa.Engine:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    pool: dict[str, int] = {}
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        pool = {"pool_size": 10, "max_overflow": 20}  # a file (SQLAlchemy picks the pool of the others)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_S}, **pool)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # The driver in autocommit: it emits no BEGIN of its own; `_begin` below emits ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @sa.event.listens_for(engine, "checkout")
    def _driver_autocommit(dbapi_connection, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
        # SQLAlchemy resets a connection lent as AUTOCOMMIT to the driver's implicit-BEGIN mode
        # (isolation_level ""); put it back, so every checkout starts the same way.
        if dbapi_connection.isolation_level is not None:
            dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return  # autocommit(engine): each statement alone, no lock held between them
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

    return engine
