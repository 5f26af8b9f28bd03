"""The SQLite database the stores share: one connection per store, used by every thread under the
store's lock, in autocommit mode (every statement is its own durable transaction), WAL journal."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_database(db_path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating the folder) and apply `schema` (CREATE ... IF NOT EXISTS statements)."""
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db
