"""tests/services.py: each test's own PostgreSQL schema and Redis database, and a clear skip without them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from . import services


def test_postgres_urls_are_isolated_and_dropped(postgres_url: str) -> None:
    with services.postgres_url() as other:
        first, second = sa.create_engine(postgres_url), sa.create_engine(other)
        with first.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE files (id text)")
        with second.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE files (id text)")  # no clash: another schema
            conn.exec_driver_sql("INSERT INTO files VALUES ('x')")
        with first.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM files").scalar() == 0
        schema = sa.make_url(other).query["options"].partition("=")[2]
        # Left open on purpose: the helper ends these sessions before it drops the schema.
        lingering = second.connect()
        lingering.exec_driver_sql("SELECT 1")
    with first.connect() as conn:
        assert (
            conn.exec_driver_sql("SELECT count(*) FROM pg_namespace WHERE nspname = %(s)s", {"s": schema}).scalar() == 0
        )
    first.dispose()
    second.dispose()


def test_redis_url_is_an_empty_database_flushed_after(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("k", "v")
    with services.redis_url() as other:
        assert other != redis_url and redis.Redis.from_url(other).dbsize() == 0


@pytest.mark.parametrize("which", ["postgres", "redis"])
def test_a_missing_service_skips_saying_where_and_how(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "_unavailable", {})
    monkeypatch.setattr(services, "POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres:secret@127.0.0.1:9/postgres")
    monkeypatch.setattr(services, "REDIS_SERVER_URL", "redis://:secret@127.0.0.1:9/0")
    monkeypatch.delenv("QTTS_TEST_REQUIRE_SERVICES", raising=False)
    helper = services.postgres_url if which == "postgres" else services.redis_url
    with pytest.raises(pytest.skip.Exception) as skipped, helper():
        pass
    message = str(skipped.value)
    assert "127.0.0.1:9" in message and "secret" not in message and "start one" in message
    assert ("PostgreSQL" if which == "postgres" else "Redis") in message
    monkeypatch.setenv("QTTS_TEST_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception), helper():  # remembered: no second timeout
        pass
