"""A request's work lives only as long as its client and its deadline.

An HTTP handler is not cancelled when its client hangs up, and a streaming response only notices at
its next write: without help, a client that leaves keeps its rows busy to the end and its output is
stored for a day. These helpers race the work against the client's `http.disconnect` (read from the
ASGI receive channel once the body has been read) and against the request's own deadline, and
cancel the work the moment either comes: the engine frees the request's row at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from ..errors import DeadlineExceeded, ServiceError
from ..metrics import Metrics

T = TypeVar("T")


class ClientGone(ServiceError):
    """The client disconnected; nobody reads this response (499, as nginx logs it)."""

    status_code = 499
    error_type = "client_closed_request"


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _deadline_error(timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the request took longer than its timeout_s ({timeout_s:g} s) and was cancelled; "
        "raise timeout_s or send shorter text",
        field="timeout_s",
    )


async def until_disconnect(request: Request, work: Awaitable[T], metrics: Metrics, timeout_s: float | None = None) -> T:
    """Await `work`, cancelling it when the client leaves (ClientGone) or `timeout_s` passes
    (DeadlineExceeded)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if watch in done:
            metrics.disconnects.inc()
            raise ClientGone("client disconnected")
        metrics.deadlines.inc()
        raise _deadline_error(timeout_s or 0)
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending


async def stream_until_disconnect(
    request: Request, chunks: AsyncIterator[T], metrics: Metrics, timeout_s: float | None = None
) -> AsyncIterator[T]:
    """Yield from `chunks` until they end, the client leaves or `timeout_s` passes; then close them
    (which cancels their work). A stream cut by its deadline just ends: the status line is long gone."""
    watch = asyncio.ensure_future(_disconnected(request))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    iterator = aiter(chunks)
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({step, watch}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
                (metrics.disconnects if watch in done else metrics.deadlines).inc()
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        watch.cancel()
        # A separate task, shielded: when this generator is itself cancelled, every await here is
        # cancelled again, and a step still running would make aclose() fail ("already running").
        cleanup = asyncio.ensure_future(_close(step, iterator))
        with contextlib.suppress(BaseException):
            await asyncio.shield(cleanup)


async def _close(step: asyncio.Future[object] | None, iterator: AsyncIterator[object]) -> None:
    """Cancel the pending step, then close the iterator (which cancels its work)."""
    if step is not None and not step.done():
        step.cancel()
        with contextlib.suppress(BaseException):
            await step
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(BaseException):
            await aclose()
