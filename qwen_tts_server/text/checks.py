"""Text no speech can come from, or that breaks the pipeline: refused with a message that says what to fix.

A lone surrogate (a JSON `\\ud800` escape without its pair) is a Python str that the Rust tokenizer cannot
take (TypeError, a 500 before this check) and that cannot even be encoded as UTF-8 in a response. Used by
the API's field types (`api.validation.SpeechText`, `ReferenceText`), by form fields and WebSocket messages
(`checked_text`) and by the reference-audio resolver (`checked_text_in_slices`, in a worker thread).
Messages leave out the field's name where the API's error handler puts it in front.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
from pydantic_core import PydanticCustomError

from ..errors import InvalidRequest

# Refused: C0 controls except tab, line feed and carriage return; lone surrogates; the 66 Unicode
# noncharacters (U+FDD0..U+FDEF and the last two code points of every plane: U+FFFE is a
# byte-swapped BOM, the usual sign of text decoded with the wrong encoding). The tokenizer would
# take controls and noncharacters, but no speech comes from them and they break logs and files.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_BAD_TEXT = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff{_NONCHARACTERS}]")
_C0_BYTES = np.array([c for c in range(32) if c not in (9, 10, 13)], dtype=np.uint8)
_LONG = 1 << 16


def _first_bad(text: str) -> int | None:
    """Index of the first refused character, or None."""
    if len(text) > _LONG and text.isascii():
        # Base64 reference audio can be 27 M characters; numpy looks at them 25x faster than re, and
        # when none is below 32 (plain base64, no line breaks) its min() settles it in a millisecond.
        codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        if codes.min() >= 32:
            return None
        low = np.flatnonzero(codes < 32)
        hits = low[np.isin(codes[low], _C0_BYTES)]
        return int(hits[0]) if hits.size else None
    match = _BAD_TEXT.search(text)
    return match.start() if match else None


def check_text(text: str) -> str:
    """`text` unchanged, or a PydanticCustomError naming the first character to remove."""
    at = _first_bad(text)
    if at is None:
        return text
    raise PydanticCustomError("invalid_text", _refusal(text, at))


def _refusal(text: str, at: int) -> str:
    """Why the character at index `at` is refused and what to do, without the field's name."""
    code = ord(text[at])
    where = f"U+{code:04X} at index {at}"
    if 0xD800 <= code <= 0xDFFF:
        return (
            f"has a lone surrogate {where}, which is not a Unicode character: send valid UTF-8 text "
            "(in JSON a \\ud800-\\udbff escape must be followed by its \\udc00-\\udfff pair)"
        )
    if code < 32:
        return f"has the control character {where}: remove it (tab, line feed and carriage return are allowed)"
    return (
        f"has the Unicode noncharacter {where} (often text decoded with the wrong encoding or byte order): "
        "remove it or send the text as UTF-8"
    )


def checked_text(field: str, text: str) -> str:
    """`check_text` outside a pydantic model (form fields, WebSocket messages): a 422 naming `field`."""
    try:
        return check_text(text)
    except PydanticCustomError as exc:
        raise InvalidRequest(f"{field} {exc}", field=field) from None


# A slice of a long string checked in one call: ~1 ms of numpy for ASCII (re is slower), so another
# thread, the event loop's included, waits at most that long for the GIL.
TEXT_SLICE = 1 << 20


_PAUSE_EVERY_S = 0.002
_paused = threading.local()


def pause_for_other_threads() -> None:
    """Give the GIL away for a moment, between two slices of long work in a worker thread, when
    2 ms have passed since this thread last did. A thread that wants it (the event loop, woken by a
    request) would otherwise wait for the interpreter's switch interval, 5 ms, each time it wakes
    while the worker computes; pausing after every slice instead made a 20 MB reference take
    ~100 ms longer to resolve."""
    now = time.perf_counter()
    if now - getattr(_paused, "at", 0.0) < _PAUSE_EVERY_S:
        return
    time.sleep(0.0001)
    _paused.at = time.perf_counter()


def checked_text_in_slices(field: str, text: str) -> str:
    """`checked_text` a slice at a time: for a string of millions of characters checked in a worker
    thread, where one call over all of it would hold the GIL (and so the event loop) for tens of ms."""
    for start in range(0, len(text), TEXT_SLICE):
        if start:
            pause_for_other_threads()
        at = _first_bad(text[start : start + TEXT_SLICE])
        if at is not None:
            raise InvalidRequest(f"{field} {_refusal(text, start + at)}", field=field)
    return text


def check_reference_text(text: str) -> str:
    """`check_text` for strings up to 64 K characters; longer ones (base64 reference audio, up to
    27 M characters) pass unchecked here, on the event loop, where checking them took ~35 ms: the
    reference resolver checks them with `checked_text_in_slices` in a worker thread before any use."""
    return check_text(text) if len(text) <= _LONG else text
