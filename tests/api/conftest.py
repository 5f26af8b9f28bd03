"""An app per test, on the project's tiny random checkpoints, over HTTP through TestClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qwen_tts_server.api.app import create_app

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
