"""Structured logs: one JSON object per line, carrying the request id of the request being served."""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.addFilter(_RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("qwen_tts_server")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# ----- upstream's start-up noise -----
# `import qwen_tts` prints a flash-attn notice to stdout (qwen_tts.core.tokenizer_25hz, which only the
# 25 Hz tokenizer uses; the server picks its attention itself), and its import of the `sox` package
# runs `sox -h` through a shell, whose "sox: not found" goes straight to file descriptor 2, and then
# logs "SoX could not be found!" (nothing here uses SoX). Both are dropped, and nothing else.
_FLASH_ATTN_NOTICE = (
    "\n********\nWarning: flash-attn is not installed. Will only run the manual PyTorch version. "
    "Please install flash-attn for faster inference.\n********\n \n"
)


class _DropSoxNotFound(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SoX could not be found")


@contextlib.contextmanager
def _child_stderr_to_devnull() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (what a child process inherits)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding host): nothing to silence
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_upstream_quietly() -> None:
    """Import `qwen_tts` (and `sox`, which it imports) without their start-up noise. Call it before
    anything imports them, at start-up (it touches file descriptor 2 while `sox` is imported, so not
    while other threads may be logging). Errors and any other output pass through unchanged."""
    if "qwen_tts" in sys.modules:
        return
    logging.getLogger("sox").addFilter(_DropSoxNotFound())
    if "sox" not in sys.modules:
        with contextlib.suppress(ImportError), _child_stderr_to_devnull():
            import sox  # noqa: F401  # its `sox -h` probe: the shell's "not found" goes to fd 2
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            import qwen_tts  # noqa: F401
    finally:
        rest = captured.getvalue().replace(_FLASH_ATTN_NOTICE, "")
        if rest:
            sys.stdout.write(rest)
