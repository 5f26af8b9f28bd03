"""The two shapes of an error body, chosen by the request's path.

Native routes (`/api/v1/...`, `/health`, ...): `{"error": {"type", "message", "field"}, "detail"}`,
where `type` is our error type (`invalid_request`, `payload_too_large`, ...), `field` names the request
field (with a list index, e.g. `text[2]`) or is null, and `detail` repeats the message as a string
(where FastAPI-style clients read it).

OpenAI-compatible routes (`/v1/...`): OpenAI's `{"error": {"message", "type", "param", "code"}}`,
which its SDKs parse: `type` is `invalid_request_error` (4xx) or `server_error` (5xx), `param` is
the field and `code` our error type.
"""

from __future__ import annotations

from typing import Any

OPENAI_PREFIX = "/v1"


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(
    path: str, status: int, type: str, message: str, field: str | None = None, **extra: Any
) -> dict[str, Any]:
    """`{"error": {...}}` in the shape the route at `path` speaks. `extra` keys (e.g. the list of
    every validation problem) are added to native bodies only; OpenAI's shape has no room for them."""
    if is_openai_path(path):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": field, "code": type}}
    # `detail`: the message again, where FastAPI's own errors (and clients written for them, such as
    # the earlier voice-cloning service's web page) look for it.
    return {"error": {"type": type, "message": message, "field": field, **extra}, "detail": message}
