"""An app per test, on the project's tiny random checkpoints, over HTTP through TestClient."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwen_tts_server.api.app import create_app

from ..relay import Relay, relayed
from .support import settings_for


@pytest.fixture
def make_client(tiny_models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Build a client with settings overrides; every client is closed at the end of the test."""
    opened: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("models_dir", tiny_models_dir)
        settings = settings_for(**overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        opened.append(client)
        return client

    make.tmp = tmp_path  # type: ignore[attr-defined]
    yield make
    for client in reversed(opened):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def make_live_server(tiny_models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[str, FastAPI]]]:
    """Start the app under a real uvicorn server on a loopback port, in a background thread, with
    settings overrides; returns (base_url, app). Every server is stopped at the end of the test."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def make(**overrides: object) -> tuple[str, FastAPI]:
        overrides.setdefault("data_dir", tmp_path / f"data-{len(started)}")
        overrides.setdefault("models_dir", tiny_models_dir)
        app = create_app(settings_for(**overrides))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # bound here, so nothing else takes the port; uvicorn closes it
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-server", daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "the live server's thread died while starting"
            assert time.monotonic() < deadline, "the live server did not start within 60 s"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}", app

    yield make
    for server, thread in reversed(started):
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the live server did not stop within 30 s"


@pytest.fixture
def live_server(make_live_server: Callable[..., tuple[str, FastAPI]]) -> tuple[str, FastAPI]:
    """A real uvicorn server on the default test settings: (base_url, app)."""
    return make_live_server()


@pytest.fixture
def postgres_relay(postgres_url: str) -> Iterator[tuple[Relay, str]]:
    """A relay to the test's PostgreSQL database and the URL through it, to cut the database away from a
    server. Ask for it before `make_client`: the relay then outlives the server's shutdown."""
    with relayed(postgres_url) as pair:
        yield pair
