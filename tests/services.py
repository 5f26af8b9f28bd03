"""The outside services some tests need, PostgreSQL and Redis: each test gets its own fresh, isolated
piece (a new schema, the only one its connections see; an empty Redis database number), removed
afterwards.

Where a service does not answer, the test is skipped with a message naming the service, the address
tried and how to start one; set QTTS_TEST_REQUIRE_SERVICES=1 to make that a failure instead (CI).
Addresses: QTTS_TEST_POSTGRES_URL (its user creates and drops schemas in that database) and
QTTS_TEST_REDIS_URL; the defaults are the local ones below.

Use the fixtures `postgres_url` and `redis_url` (tests/conftest.py), or these context managers:

    with postgres_url() as url:  # postgresql+psycopg://...?options=-csearch_path%3Dqtts_test_...
        ...
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

POSTGRES_ADMIN_URL = os.environ.get("QTTS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_SERVER_URL = os.environ.get("QTTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CONNECT_TIMEOUT_S = 3

_START_POSTGRES = (
    "start one (e.g. `docker run -d --name qtts-postgres -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust "
    "postgres:16`) or point QTTS_TEST_POSTGRES_URL at a database whose user may create schemas"
)
_START_REDIS = (
    "start one (e.g. `docker run -d --name qtts-redis -p 6379:6379 redis:7`, or `redis-server --daemonize yes`) "
    "or point QTTS_TEST_REDIS_URL at one"
)
_unavailable: dict[str, str] = {}  # service -> why, so a missing service costs one timeout a session


def postgres_url() -> contextlib.AbstractContextManager[str]:
    """A SQLAlchemy URL (postgresql+psycopg://) whose connections see a new, empty schema of the test
    database and nothing else (it is their search_path): one test's own database, made in milliseconds
    where CREATE DATABASE takes half a second. Dropped afterwards, after ending any session the test
    left open on it. Skips if PostgreSQL does not answer."""
    return _postgres_schema()


def redis_url() -> contextlib.AbstractContextManager[str]:
    """An empty Redis database number for one test (redis://host:port/<n>), reserved while the test
    runs and flushed afterwards. Skips if Redis does not answer."""
    return _redis_database()


def _missing(service: str, address: str, error: BaseException | str, how: str) -> NoReturn:
    message = f"{service} is not answering at {address} ({_reason(error)}): {how}"
    _unavailable[service] = message
    _give_up(message)


def _give_up(message: str) -> NoReturn:
    if os.environ.get("QTTS_TEST_REQUIRE_SERVICES", "") not in ("", "0"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _reason(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


# ----- PostgreSQL -----

_LEFTOVER_AGE_S = 6 * 3600  # schemas of killed test runs, dropped by the next run
_swept = False


@contextlib.contextmanager
def _postgres_schema() -> Iterator[str]:
    import psycopg
    import sqlalchemy as sa
    from psycopg import sql

    global _swept
    admin = sa.make_url(POSTGRES_ADMIN_URL)
    address = admin.render_as_string(hide_password=True)
    if "PostgreSQL" in _unavailable:
        _give_up(_unavailable["PostgreSQL"])
    libpq = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = psycopg.connect(libpq, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # psycopg.OperationalError, mostly
        _missing("PostgreSQL", address, exc, _START_POSTGRES)
    with conn:
        if not _swept:
            _swept = True
            _drop_leftovers(conn)
        name = f"qtts_test_{int(time.time())}_{uuid.uuid4().hex[:12]}"
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        # Every connection made with this URL works in the new schema alone, and is named after it.
        url = admin.set(drivername="postgresql+psycopg").update_query_dict(
            {"options": f"-csearch_path={name}", "application_name": name}
        )
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            _drop(conn, name)


def _drop(conn, name: str) -> None:  # type: ignore[no-untyped-def]
    from psycopg import sql

    # Sessions the test left open (pools, a stuck transaction) could hold locks that block the DROP.
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _drop_leftovers(conn) -> None:  # type: ignore[no-untyped-def]
    rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'qtts\\_test\\_%'").fetchall()
    for (name,) in rows:
        try:
            created = int(name.split("_")[2])
        except (IndexError, ValueError):
            continue
        if created < time.time() - _LEFTOVER_AGE_S:
            _drop(conn, name)


# ----- Redis -----

_CLAIM_TTL_S = 3600  # a claim outlives any test, and ends by itself if the test process is killed


@contextlib.contextmanager
def _redis_database() -> Iterator[str]:
    import redis

    server = REDIS_SERVER_URL
    parts = urllib.parse.urlsplit(server)
    address = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no password in messages
    if "Redis" in _unavailable:
        _give_up(_unavailable["Redis"])
    try:
        control = redis.Redis.from_url(server, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=10)
        control.ping()
    except Exception as exc:  # redis.ConnectionError, mostly
        _missing("Redis", address, exc, _START_REDIS)
    try:
        count = int(control.config_get("databases").get("databases", 16))
    except redis.ResponseError:  # CONFIG disabled (managed Redis): assume the default
        count = 16
    token = uuid.uuid4().hex
    # Claims live in database 0; tests get 1..count-1, only ones that are empty (nobody's data is flushed).
    for number in range(1, count):
        claim = f"qtts-test:db:{number}"
        if not control.set(claim, token, nx=True, ex=_CLAIM_TTL_S):
            continue  # another test (maybe in another process) has it
        url = parts._replace(path=f"/{number}").geturl()
        db = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S)
        if db.dbsize() != 0:
            control.delete(claim)
            db.close()
            continue
        try:
            yield url
        finally:
            db.flushdb()
            db.close()
            if control.get(claim) == token.encode():
                control.delete(claim)
            control.close()
        return
    control.close()
    _give_up(
        f"Redis at {address} has no empty database (1..{count - 1}) for this test: flush one, or raise `databases`"
    )
