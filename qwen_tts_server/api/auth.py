"""API keys: which key a connection presents, whether it is one of the server's, and the owner it
stands for. The HTTP middleware in app.py checks keys for every HTTP route; WebSocket routes are
not HTTP requests to it and check here (a browser cannot set headers on a WebSocket, so they also
take the key as an `api_key` query parameter)."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection


def presented_key(conn: HTTPConnection, *, query: bool = False) -> str | None:
    """`Authorization: Bearer <key>` or `X-API-Key: <key>`; with `query`, also `?api_key=<key>`."""
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = conn.headers.get("x-api-key")
    if key is None and query:
        key = conn.query_params.get("api_key")
    return key


def is_valid(presented: str | None, keys: list[str]) -> bool:
    given = (presented or "").encode()
    return any(hmac.compare_digest(given, key.encode()) for key in keys)


def owner_of(key: str | bytes) -> str:
    """The owner a key stands for: its SHA-256 (hex). The key itself is never stored."""
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode()).hexdigest()
