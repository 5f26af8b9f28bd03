"""Every error becomes JSON in the shape of the route's API (error_shapes), never an exception."""

from __future__ import annotations

import logging
import math
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError, StorageFull, StorageUnavailable
from ..logs import request_id_var
from ..storage.database import UNAVAILABLE_ERRORS, is_disk_full, is_unavailable
from .error_shapes import error_body

log = logging.getLogger("qwen_tts_server.api.app")


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes JSON in the shape of the route's API (error_shapes), never an exception.

    Unexpected exceptions are not left to a handler keyed `Exception`: Starlette gives that one to
    ServerErrorMiddleware, outside every middleware, so its 500 went out after the request context
    had ended (no x-request-id; the message quoted request id None), and that middleware re-raises,
    on which uvicorn closes the keep-alive connection. `AnswerUnhandled` answers them instead:
    innermost, inside the request context (the 500 gets the id, the access log and the metrics),
    and outermost, for what escapes the middleware itself. Bodies are rendered by `SafeJSON`,
    which cannot fail on text without a UTF-8 form (a lone surrogate in a message or a field).
    """

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        return _error_response(request, exc.status_code, exc.error_type, exc.message, exc.field, headers=headers)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        """An outage (down, unreachable, busy) is a 503 to retry, a full disk a 507; any other database error
        an internal one."""
        full = is_disk_full(exc)
        if not (full or is_unavailable(exc)):
            return _internal_error(request.scope, exc, _request_id_of(request.scope) or "-")
        cause = getattr(exc, "orig", None) or exc
        first_line = (str(cause).splitlines() or [""])[0]
        log.warning("the metadata database failed: %s: %s", type(cause).__name__, first_line)
        return await service_error(request, StorageFull() if full else StorageUnavailable())

    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, database_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # A value that fits no member of a union (`str | list[str]`) is reported once per member;
        # a member's own complaint (a bad character, a bound, an item) says more than "not a list".
        errors.sort(key=lambda err: str(err.get("type", "")).endswith("_type"))
        problems = [{"field": _field_of(err), "message": _message_of(err)} for err in errors]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else str(first["message"])
        return _error_response(request, 422, "invalid_request", message, first["field"], errors=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        return _error_response(request, exc.status_code, kind, str(exc.detail), None, headers=headers)

    # user_middleware runs outermost first: append = innermost, just outside ExceptionMiddleware.
    app.user_middleware.append(Middleware(AnswerUnhandled))
    app.add_middleware(AnswerUnhandled)


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Parts of a pydantic error location that name a union member's schema, not a request field.
_SCHEMA_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _field_of(err: dict) -> str | None:
    """`text`, `text[1]`, `voice.id`: the request field of a pydantic error, or None."""
    loc = list(err.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    field = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            field += f"[{part}]"
            continue
        part = str(part)
        named_by_client = err.get("type") == "extra_forbidden" and i == len(loc) - 1
        if not named_by_client and (
            part in _SCHEMA_TAGS or "[" in part or part.startswith("function-") or part[:1].isupper()
        ):
            continue  # e.g. 'list[function-after[check_text(), str]]', or a model's class name
        field = f"{field}.{part}" if field else part
    return field or None


def _message_of(err: dict) -> str:
    if err.get("type") == "string_unicode":  # a JSON key with a lone surrogate: pydantic can't name it
        return (
            "the request has a key or value that is not valid Unicode (a lone surrogate, such as a \\ud800 "
            "escape without its pair): send valid UTF-8 text"
        )
    return str(err.get("msg", "invalid value"))


def _error_response(
    request: Request,
    status: int,
    kind: str,
    message: str,
    field: str | None,
    *,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    body = error_body(request.scope.get("path", ""), status, kind, message, field, **extra)
    return SafeJSON(body, status_code=status, headers=headers)


def _log_unhandled(exc: BaseException, request_id: str) -> None:
    token = request_id_var.set(request_id)
    try:
        log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    finally:
        request_id_var.reset(token)


def _internal_error(scope: Scope, exc: BaseException, request_id: str) -> JSONResponse:
    _log_unhandled(exc, request_id)
    message = f"internal error ({type(exc).__name__}); quote request id {request_id} when reporting it"
    body = error_body(scope.get("path", ""), 500, "internal_error", message, None)
    return SafeJSON(body, status_code=500, headers={"x-request-id": request_id})


def _request_id_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


class SafeJSON(JSONResponse):
    """A JSONResponse whose rendering cannot raise: a body with text that has no UTF-8 form (a lone
    surrogate the client sent, echoed in a message or a field name), NaN or an object JSON has no
    form for is rendered again with those replaced (`\\ud800` as text, NaN as "nan")."""

    def render(self, content: object) -> bytes:
        try:
            return super().render(content)
        except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError, as is NaN
            return super().render(_encodable(content))


def _encodable(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(str(k)): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    try:
        return _encodable(str(value))
    except Exception:
        return f"<{type(value).__name__}>"


class AnswerUnhandled:
    """An exception that nothing else answered gets a JSON 500 with x-request-id, and the keep-alive
    connection stays open. A response already started cannot be replaced: that exception is raised
    on, for the server to close the connection (so the client sees the response is cut). The
    outermost instance also gives a request without an x-request-id one, before the request
    context reads it, so the id quoted in any 500 is the one in the logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id_of(scope)
        if not request_id:
            request_id = uuid.uuid4().hex[:16]
            scope["headers"] = [*scope.get("headers", ()), (b"x-request-id", request_id.encode())]
        started = complete = False

        async def tracked(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if complete:  # e.g. a background task after the response: nothing to tell the client
                _log_unhandled(exc, request_id)
                return
            if started:
                raise
            await _internal_error(scope, exc, request_id)(scope, receive, send)
