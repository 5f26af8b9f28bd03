"""Audio chunks to HTTP: raw chunked bytes, or server-sent events as OpenAI sends them.

The first chunk is awaited before the response starts, so whatever fails before any audio exists
(a full queue, a bad voice, a model that cannot load) is still a proper status code and error body;
after that the status line is gone and a failure ends the stream. The client leaving, or the
request's deadline, closes the chunk iterator, which cancels the work in the engine.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..audio.codec_io import MEDIA_TYPES
from ..engine.types import AudioChunk, FinishReason
from .deps import services
from .lifecycle import stream_until_disconnect, until_disconnect
from .speech import StreamEncoder

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # proxies must not hold chunks back


async def _primed(request: Request, chunks: AsyncIterator[AudioChunk], timeout_s: float | None) -> list[AudioChunk]:
    """Wait for the first chunk (errors before any audio stay HTTP errors)."""
    iterator = aiter(chunks)
    try:
        first = await until_disconnect(request, anext(iterator), services(request).metrics, timeout_s)
    except BaseException:
        await iterator.aclose()  # type: ignore[attr-defined]
        raise
    return [first]


async def _chunks_after(first: list[AudioChunk], rest: AsyncIterator[AudioChunk]) -> AsyncIterator[AudioChunk]:
    try:
        for chunk in first:
            yield chunk
        if first[-1].finish_reason is None:
            async for chunk in rest:
                yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # closing this must cancel the work


async def audio_stream_response(
    request: Request,
    chunks: AsyncIterator[AudioChunk],
    fmt: str,
    sample_rate: int,
    timeout_s: float | None = None,
    speed: float = 1.0,
) -> StreamingResponse:
    """Chunked audio bytes in `fmt`, written as the audio is generated."""
    first = await _primed(request, chunks, timeout_s)
    encoder = StreamEncoder(fmt, sample_rate, speed)

    async def body() -> AsyncIterator[bytes]:
        metrics = services(request).metrics
        metrics.streams.inc()
        try:
            source = stream_until_disconnect(request, _chunks_after(first, chunks), metrics, timeout_s)
            async for chunk in source:
                data = encoder.write(chunk.samples)
                if data:
                    yield data
            tail = encoder.close()
            if tail:
                yield tail
        finally:
            metrics.streams.dec()

    return _AudioStreamingResponse(body(), media_type=MEDIA_TYPES[fmt], headers=STREAM_HEADERS)


class _AudioStreamingResponse(StreamingResponse):
    """Streams the body without Starlette's own disconnect listener (ASGI < 2.4): that listener and
    `stream_until_disconnect` race for the client's `http.disconnect`, and when Starlette's wins it
    cancels the body mid-await, so the disconnect went uncounted and the work was never closed."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await self.stream_response(send)


def sse_event(payload: dict[str, object]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def sse_stream_response(
    request: Request,
    chunks: AsyncIterator[AudioChunk],
    fmt: str,
    sample_rate: int,
    input_tokens: int,
    timeout_s: float | None = None,
    speed: float = 1.0,
) -> StreamingResponse:
    """Server-sent events: `speech.audio.delta` with base64 audio in `fmt`, then `speech.audio.done`
    with the usage (input: text tokens; output: codec frames, 12.5 a second) and, beyond OpenAI's
    fields, how the speech ended and its seconds."""
    first = await _primed(request, chunks, timeout_s)
    encoder = StreamEncoder(fmt, sample_rate, speed)

    def delta(data: bytes) -> bytes:
        return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

    async def body() -> AsyncIterator[bytes]:
        metrics = services(request).metrics
        metrics.streams.inc()
        reason: FinishReason = FinishReason.CANCELLED
        seconds, frames = 0.0, 0
        try:
            source = stream_until_disconnect(request, _chunks_after(first, chunks), metrics, timeout_s)
            async for chunk in source:
                seconds += len(chunk.samples) / sample_rate
                frames += chunk.frames
                reason = chunk.finish_reason or reason
                data = encoder.write(chunk.samples)
                if data:
                    yield delta(data)
            tail = encoder.close()
            if tail:
                yield delta(tail)
            usage = {"input_tokens": input_tokens, "output_tokens": frames, "total_tokens": input_tokens + frames}
            done = {"type": "speech.audio.done", "usage": usage, "finish_reason": reason.value}
            yield sse_event({**done, "audio_seconds": round(seconds / speed, 3)})
        finally:
            metrics.streams.dec()

    return _AudioStreamingResponse(body(), media_type="text/event-stream", headers=STREAM_HEADERS)
