"""The stores' tests run on every metadata backend: SQLite (a file under tmp_path) and PostgreSQL (a
fresh database, or a skip when none answers: tests/services.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_tts_server.storage.database import close_databases, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The metadata database's URL, once per backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "db" / "registry.sqlite3")
    else:
        yield request.getfixturevalue("postgres_url")
    close_databases()
