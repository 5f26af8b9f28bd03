"""The job store's tests run on every metadata backend (tests/storage/conftest.py)."""

from tests.storage.conftest import database_url  # noqa: F401
