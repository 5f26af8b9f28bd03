"""Large JSON request bodies are parsed off the event loop, a slice at a time.

FastAPI parses a JSON body with one `json.loads` call on the event loop. For a voice-clone request
carrying a 20 MB reference as base64 (27 M characters) that is 40-200 ms (on a busy 2-core machine)
in which no other request, health probes included, is answered. Running that call in a worker thread
alone does not help: json's C scanner holds the GIL for the whole parse, so the loop waits for it
just the same.

`loads_in_slices` gives what `json.loads` gives, but decodes every long string value (the base64) in
slices of 256 KiB, each a C call of well under a millisecond after which other threads may run; the
rest of the body, small once those strings are cut out, is one quick `json.loads`. `OffLoopJSONRoute`,
the route class of routers whose bodies may be that large, runs it in a worker thread for bodies of
`THRESHOLD` bytes and more, and hands the result to FastAPI's own handler, which then uses it instead
of parsing again (Starlette's `Request.json()` keeps the parsed body in `Request._json`).

Anything unusual (not UTF-8, a body of many small strings, invalid JSON) is parsed by `json.loads`
itself, so the value and every error are json's own; FastAPI parses an invalid body again on the
loop and answers it as before.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import params
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..text.checks import pause_for_other_threads

__all__ = ["LONG_STRING", "SLICE", "THRESHOLD", "OffLoopJSONRoute", "loads_in_slices", "parse_large_json"]

THRESHOLD = 1 << 20  # smaller bodies parse on the loop in a few ms, as FastAPI does it
LONG_STRING = 1 << 16  # string values from this many bytes on are decoded in slices
SLICE = 1 << 18  # bytes of a long string per json call: ~0.2 ms
_MAX_QUOTES = 1 << 16  # more strings than this: the body is structure, not one big value
_QUOTE, _BACKSLASH = 0x22, 0x5C
_CUT_SEARCH = 4096  # how far back from a slice's end to look for a place to cut it
_JSON_WHITESPACE = b" \t\n\r"

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class _Unsuitable(Exception):
    """The body is not one this module speeds up: `json.loads` parses it."""


def loads_in_slices(body: bytes) -> Any:
    """`json.loads(body)`, the same value or the same exception, computed so that no single call
    holds the GIL for long when the body's bulk is a few long strings."""
    try:
        spans = _long_strings(body)
    except _Unsuitable:
        spans = []
    if not spans:
        return json.loads(body)
    try:
        return _parse_around(body, spans)
    except (_Unsuitable, ValueError, RecursionError):  # ValueError: json's and UTF-8's errors
        return json.loads(body)


def _long_strings(body: bytes) -> list[tuple[int, int]]:
    """(start, end) of the contents of every string value of LONG_STRING bytes or more, in order.

    In valid JSON every `"` not escaped by an odd run of backslashes opens or closes a string, so
    they pair up in order; keys (a string followed by `:`) are left alone."""
    if len(body) < LONG_STRING or json.detect_encoding(body) != "utf-8":
        raise _Unsuitable
    codes = np.frombuffer(body, dtype=np.uint8)
    found = [np.flatnonzero(codes[at : at + SLICE] == _QUOTE) + at for at in range(0, len(body), SLICE)]
    quotes = np.concatenate(found)
    if len(quotes) > _MAX_QUOTES:
        raise _Unsuitable
    after_backslash = quotes[(quotes > 0) & (codes[quotes - 1] == _BACKSLASH)]
    escaped = [q for q in after_backslash.tolist() if _backslashes_before(body, q) % 2]
    if escaped:
        quotes = quotes[~np.isin(quotes, escaped)]
    if len(quotes) % 2:
        raise _Unsuitable  # unbalanced: not JSON, json.loads says where
    starts, ends = quotes[0::2] + 1, quotes[1::2]
    long = np.flatnonzero(ends - starts >= LONG_STRING)
    spans = [(int(starts[k]), int(ends[k])) for k in long]
    return [(start, end) for start, end in spans if not _is_key(body, end)]


def _backslashes_before(body: bytes, at: int, start: int = 0) -> int:
    """How many backslashes stand right before `at` (from `start` on); an odd count escapes `at`."""
    window = body[max(start, at - 64) : at]
    run = len(window) - len(window.rstrip(b"\\"))
    if run == 64:
        raise _Unsuitable  # a run this long is no base64: not worth counting
    return run


def _is_key(body: bytes, end: int) -> bool:
    """Whether the string closed by the quote at `end` is an object key (or might be: when 64 bytes
    of whitespace follow it, it is left to json)."""
    after = body[end + 1 : end + 65].lstrip(_JSON_WHITESPACE)
    return after[:1] == b":" or (not after and end + 65 < len(body))


def _parse_around(body: bytes, spans: list[tuple[int, int]]) -> Any:
    """Parse `body` with each long string replaced by a short marker, then put the strings, decoded
    a slice at a time, where their markers are."""
    tag = secrets.token_hex(8)  # a client cannot send a marker it cannot guess
    parts: list[bytes] = []
    markers: dict[str, tuple[int, int]] = {}
    done = 0
    for i, (start, end) in enumerate(spans):
        parts += [body[done:start], f"\\u0000{tag}:{i}".encode()]
        markers[f"\x00{tag}:{i}"] = (start, end)
        done = end
    parts.append(body[done:])
    value = json.loads(b"".join(parts))
    strings = {marker: _string_in_slices(body, start, end) for marker, (start, end) in markers.items()}
    return _put_back(value, strings)


def _string_in_slices(body: bytes, start: int, end: int) -> str:
    """The value of the JSON string whose contents are `body[start:end]`, decoded a slice at a time.

    Slices are cut where a cut changes nothing: not inside a UTF-8 sequence, not inside an escape,
    and not between the two `\\uXXXX` escapes of a surrogate pair, which decoded apart would be two
    lone surrogates instead of one character. Each slice is decoded as `json.loads` decodes a body
    (UTF-8, surrogates passed through) and then as a JSON string (escapes, refused control bytes).
    The final join is one call over the whole string (~3 ms, up to ~20 ms when its 27 MB of memory
    is touched for the first time); growing the string by `+=` instead relies on CPython resizing it
    in place, which it did not do here (each step copied it: 250 ms)."""
    pieces: list[str] = []
    while end - start > SLICE:
        cut = _cut(body, start, start + SLICE)
        if cut is None:
            break  # escapes everywhere: the rest in one call
        pieces.append(_json_string(body[start:cut]))
        start = cut
        pause_for_other_threads()
    pieces.append(_json_string(body[start:end]))
    return "".join(pieces)


def _json_string(contents: bytes) -> str:
    return json.loads('"' + contents.decode("utf-8", "surrogatepass") + '"')


def _cut(body: bytes, start: int, at: int) -> int | None:
    """A position in (start, at] where a string's contents `body[start:...]` may be cut, or None."""
    for cut in range(at, max(start, at - _CUT_SEARCH), -1):
        if _can_cut(body, start, cut):
            return cut
    return None


def _can_cut(body: bytes, start: int, cut: int) -> bool:
    """Whether cutting at `cut` leaves both sides as they were: not inside a UTF-8 sequence, not
    inside an escape (2 bytes, or 6 for \\uXXXX), and not right after a high surrogate's escape,
    which the next escape may pair with."""
    if 0x80 <= body[cut] < 0xC0:
        return False
    for at in range(max(start, cut - 6), cut):  # the escapes that could cover `cut` or end there
        if body[at] != _BACKSLASH:
            continue
        if _backslashes_before(body, at, start) % 2:
            continue  # the second half of a \\ escape
        if body[at + 1] != ord("u"):
            if at + 2 > cut:
                return False
        elif at + 6 > cut or body[at + 2 : at + 4].upper() in (b"D8", b"D9", b"DA", b"DB"):
            return False
    return True


def _put_back(value: Any, strings: dict[str, str]) -> Any:
    """`value` with every marker string replaced by its string (each marker occurs exactly once)."""
    box = [value]  # a string standing alone is put back as the item of a list
    placed = 0
    stack: list[dict | list] = [box]
    while stack:
        node = stack.pop()
        for key, item in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(item, str):
                if item in strings:
                    node[key] = strings[item]
                    placed += 1
            elif isinstance(item, dict | list):
                stack.append(item)
    if placed != len(strings):
        raise _Unsuitable  # a marker was not where a string value stood: let json decide
    return box[0]


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test: application/json or application/*+json."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith("application/") and (kind == "application/json" or kind.endswith("+json"))


async def parse_large_json(request: Request) -> None:
    """Read a JSON body and, from THRESHOLD bytes on, parse it in a worker thread; keep both where
    `Request.body()` and `Request.json()` look first (`_body`, `_json`). The body's pieces are joined
    in a worker thread too: bytes.join gives the GIL away while it copies, which Starlette's join of
    27 MB on the loop (3-20 ms) did not. Anything that goes wrong is left for FastAPI to meet and
    answer as it always does (reading the body again, or parsing it itself)."""
    if not _is_json(request.headers.get("content-type")):
        return
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) < THRESHOLD:
        return  # FastAPI reads and parses it on the loop: a few ms at most
    try:
        chunks = [chunk async for chunk in request.stream()]
    except HTTPException:
        raise  # the body limit's 413
    except Exception:
        return
    request._body = body = await asyncio.to_thread(b"".join, chunks)
    if len(body) < THRESHOLD:
        return
    try:
        request._json = await asyncio.to_thread(loads_in_slices, body)
    except Exception:
        return


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose JSON body, when large, is parsed in a worker thread a slice at a time (see
    the module's docstring). Use it as `APIRouter(route_class=OffLoopJSONRoute)`."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        body_field = getattr(self, "body_field", None)
        if body_field is None or isinstance(body_field.field_info, params.Form):
            return handler  # no JSON body to parse

        async def parse_then_handle(request: Request) -> Response:
            await parse_large_json(request)
            return await handler(request)

        return parse_then_handle
