"""The API tests' fixtures (an app per test on the tiny checkpoints, over TestClient)."""

from __future__ import annotations

from tests.api.conftest import make_client  # noqa: F401
