"""storage.database's outages: what background work waits out, what it raises at once, and the count /metrics shows."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from qwen_tts_server.errors import StorageFull
from qwen_tts_server.storage import database
from qwen_tts_server.storage.database import OUTAGE_RETRIES, outage_of, through_outages


@pytest.fixture
def no_sleep(monkeypatch) -> list[float]:
    """The backoff's waits, recorded instead of slept."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(database.asyncio, "sleep", sleep)
    return waits


def test_a_full_disk_is_waited_out_and_counted(no_sleep) -> None:
    tries = iter([StorageFull("full"), StorageFull("full"), None])

    def write() -> str:
        failure = next(tries)
        if failure is not None:
            raise failure
        return "stored"

    before = dict(OUTAGE_RETRIES.counts)
    assert asyncio.run(through_outages(write)) == "stored"
    assert no_sleep == [0.5, 1.0]
    assert OUTAGE_RETRIES.counts["disk_full"] - before["disk_full"] == 2
    assert OUTAGE_RETRIES.counts["database_unavailable"] == before["database_unavailable"]


def test_a_lasting_database_fault_raises_at_once_and_is_not_counted(no_sleep) -> None:
    """An error of a database type that is no outage (a missing table) is a bug to see, not to wait out."""

    def write() -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("no such table: items"))

    before = dict(OUTAGE_RETRIES.counts)
    with pytest.raises(sa.exc.OperationalError, match="no such table"):
        asyncio.run(through_outages(write))
    assert no_sleep == [] and OUTAGE_RETRIES.counts == before


def test_any_other_error_raises_at_once_and_is_not_counted(no_sleep) -> None:
    def write() -> None:
        raise ValueError("a bug, not an outage")

    before = dict(OUTAGE_RETRIES.counts)
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(through_outages(write))
    assert no_sleep == [] and OUTAGE_RETRIES.counts == before
    assert outage_of(ValueError()) is None and outage_of(StorageFull("full")) == "disk_full"
