"""Request bodies are capped before they are read (pure ASGI, nothing buffered here).

Without a cap FastAPI reads a JSON body whole into memory before validating it, so one client could
make the server hold gigabytes. `BodyLimit` refuses with 413:

- at once, from Content-Length, before the app runs or a byte of the body is read (a client that
  sent `Expect: 100-continue` never sends the body at all);
- while the body streams in (chunked transfer, or a Content-Length that understates it): the
  byte count is checked per message, and once over the cap nothing more is read; whatever the
  app makes of the failed read (FastAPI: a 400) is dropped and the 413 sent instead.

The 413 carries `connection: close`: the rest of the body is not read, so the connection cannot
carry another request. JSON (and any other non-multipart body) is capped at `max_json_bytes`;
multipart uploads at `max_upload_bytes` plus 1 MiB of form overhead (the upload route then checks
the file itself against `max_upload_bytes`). WebSocket and lifespan scopes pass through untouched,
and responses are never held back: a streaming response streams as before.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .error_shapes import error_body

MULTIPART_OVERHEAD_BYTES = 1 << 20


class _BodyTooLarge(HTTPException):
    """Raised from `receive` once over the cap. An HTTPException, so FastAPI's body parsing passes it
    on as it is (anything else becomes a 400) and no handler logs it as unexpected; whatever
    response the app makes of it is replaced by ours."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


class BodyLimit:
    def __init__(self, app: ASGIApp, *, json_bytes: int, multipart_bytes: int) -> None:
        self.app = app
        self.json_bytes = json_bytes
        self.multipart_bytes = multipart_bytes

    @classmethod
    def limits(cls, settings: Settings) -> dict[str, int]:
        """Keyword arguments for `app.add_middleware(BodyLimit, **BodyLimit.limits(settings))`."""
        return {
            "json_bytes": settings.max_json_bytes,
            "multipart_bytes": settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        limit = self.multipart_bytes if multipart else self.json_bytes
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            await _refuse(scope, send, limit, multipart)
            return

        received = 0
        over = False  # the body went over the cap: stop reading, drop the app's answer
        started = False  # a response went out before that (nothing left to replace)

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
            # The app let the failed read escape; the 413 below answers it.
        if over and not started:
            await _refuse(scope, send, limit, multipart)


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


async def _refuse(scope: Scope, send: Send, limit: int, multipart: bool) -> None:
    size = _size(limit)
    if multipart:
        message = (
            f"the upload is larger than this server's limit of {size}: send a shorter audio clip "
            "(a few seconds to a minute of speech is enough for cloning)"
        )
    else:
        message = (
            f"the request body is larger than this server's limit of {size}: send less per request "
            "(split a batch or long text into several requests; upload reference audio once with "
            "POST /api/v1/files/upload and send its file_id or a URL instead of inline base64)"
        )
    body = json.dumps(error_body(scope.get("path", ""), 413, "payload_too_large", message, None)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _size(limit: int) -> str:
    human = f"{limit / (1 << 20):.1f} MiB" if limit >= 1 << 20 else f"{limit / 1024:.0f} KiB"
    return f"{human} ({limit} bytes)"
