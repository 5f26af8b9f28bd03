"""`/v1/audio/speech/stream`: text in as it is written (an LLM's tokens), audio out as it is spoken.

Protocol (JSON text messages; audio as binary messages):
  client: {"type": "session.config", <SpeechRequest fields but input and stream_format>}  (first)
          {"type": "input.text", "text": "..."}   any number of pieces
          {"type": "input.done"}                  no more text: finish speaking and end
          {"type": "cancel"}                      stop now
  server: {"type": "session.ready", "model", "sample_rate", "response_format"}
          binary audio in response_format (default pcm: s16le mono), as it is generated
          {"type": "session.done", "finish_reason", "usage", "audio_seconds"}
          {"type": "error", "error": {"message", "type", "param", "code"}}, then the socket closes

Text is cut into segments at sentence ends as it arrives (text.segment.SentenceBuffer); every segment
uses the session's one voice, seed and sampling. A client that leaves, cancels or stays silent past
QTTS_WS_IDLE_TIMEOUT_S ends the session and cancels its work in the engine.

With API keys on, the socket needs one as HTTP routes do (`Authorization: Bearer`, `X-API-Key`), or,
since browsers cannot set headers on a WebSocket, as an `api_key` query parameter; without it the
server sends an `unauthorized` error and closes with 1008. The key also decides whose stored voices
`voice` can name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError

from ...engine.synthesizer import check_items
from ...engine.types import FinishReason, SynthesisItem
from ...errors import InvalidRequest, ServiceError, StorageUnavailable, Unauthorized
from ...storage.database import is_unavailable
from ...text.checks import checked_text
from ...text.segment import SentenceBuffer
from ..auth import is_valid, owner_of, presented_key
from ..error_shapes import error_body
from ..speech import Speech, StreamEncoder
from .protocol import SpeechRequest
from .serving import PARAMS, input_tokens, resolve_mode, speech_item, stored_voice

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_ERROR, CLOSE_TRY_AGAIN = 1008, 1009, 1011, 1013
PENDING_TEXT = "..."  # stands for the session's text while the voice is checked; segments replace it


class SessionEnded(Exception):
    """The client cancelled, left or went silent: stop without an error message."""


@router.websocket("/audio/speech/stream")
async def speech_stream(websocket: WebSocket) -> None:
    await websocket.accept()
    keys = websocket.app.state.services.settings.api_keys
    owner = None
    if keys:  # the HTTP middleware does not see WebSockets: the same rule, here
        key = presented_key(websocket, query=True)
        if not is_valid(key, keys):
            error = Unauthorized(
                "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>', "
                "or ?api_key=<key> in the URL"
            )
            body = error_body("/v1/", error.status_code, error.error_type, error.message, None)
            with contextlib.suppress(Exception):
                await websocket.send_json({"type": "error", **body})
                await websocket.close(code=CLOSE_POLICY)
            return
        owner = owner_of(key or "")
    session = SpeechSession(websocket, owner)
    await session.run()


class SpeechSession:
    def __init__(self, websocket: WebSocket, owner: str | None = None) -> None:
        self.ws = websocket
        self.owner = owner  # SHA-256 of the session's API key (None without keys): whose voices it sees
        self.svc = websocket.app.state.services
        self.settings = self.svc.settings
        self.texts: asyncio.Queue[str | None] = asyncio.Queue()
        self.characters = 0

    async def run(self) -> None:
        self.svc.metrics.streams.inc()
        try:
            config = await self._config()
            speech, template, fmt, tokens_of = await self._prepare(config)
            await self._speak(speech, template, fmt, config.speed, tokens_of)
        except SessionEnded:
            pass
        except ServiceError as exc:
            await self._error(exc, _close_code(exc))
        except Exception as exc:  # never leave a socket hanging on a bug
            if is_unavailable(exc):  # the database is away: say so, and to come back
                await self._error(StorageUnavailable(), CLOSE_TRY_AGAIN)
                return
            log.exception("speech WebSocket session failed")
            await self._error(exc, CLOSE_ERROR)
        finally:
            self.svc.metrics.streams.dec()
            with contextlib.suppress(Exception):
                await self.ws.close()

    # ----- receiving -----
    async def _receive(self, idle: bool = True) -> dict[str, Any]:
        """The next JSON message, within the idle time-out (unless `idle` is false) and the size limit."""
        try:
            timeout = self.settings.ws_idle_timeout_s if idle else None
            message = await asyncio.wait_for(self.ws.receive(), timeout=timeout)
        except asyncio.TimeoutError:
            raise InvalidRequest(
                f"no message for {self.settings.ws_idle_timeout_s:g} s: the session is closed "
                "(send input.text or input.done sooner)",
                field=None,
            ) from None
        if message["type"] == "websocket.disconnect":
            self.svc.metrics.disconnects.inc()
            raise SessionEnded
        raw = message.get("text")
        if raw is None:
            raise InvalidRequest("send JSON text messages, not binary ones", field=None)
        if len(raw.encode("utf-8", "surrogatepass")) > self.settings.ws_max_message_bytes:
            raise _TooBig(f"message over {self.settings.ws_max_message_bytes} bytes: send text in smaller pieces")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"message is not JSON: {exc.msg}", field=None) from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise InvalidRequest('every message is a JSON object with a "type"', field="type")
        return data

    async def _config(self) -> SpeechRequest:
        data = await self._receive()
        if data.pop("type") != "session.config":
            raise InvalidRequest('the first message must be {"type": "session.config", ...}', field="type")
        if "input" in data or "stream_format" in data:
            raise InvalidRequest("session.config takes no input or stream_format: send input.text messages", field=None)
        data.setdefault("response_format", "pcm")
        data["input"] = PENDING_TEXT  # the text comes later, in input.text messages
        try:
            return SpeechRequest.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ()))
            raise InvalidRequest(f"{field}: {err.get('msg')}", field=field or None) from None

    async def _read_texts(self) -> None:
        """Text pieces into the queue until input.done (None); after it, only a cancel or the client
        leaving (no idle time-out: the audio may take longer than that) ends the session early."""
        done = False
        try:
            while True:
                data = await self._receive(idle=not done)
                kind = data["type"]
                if kind == "input.text" and done:
                    raise InvalidRequest("input.text after input.done: start a new session", field="type")
                if kind == "input.text":
                    text = data.get("text")
                    if not isinstance(text, str):
                        raise InvalidRequest('input.text needs "text": a string', field="text")
                    checked_text("text", text)
                    self.characters += len(text)
                    if self.characters > self.settings.max_text_chars:
                        raise InvalidRequest(
                            f"the session's text is over this server's limit of {self.settings.max_text_chars} "
                            "characters: start a new session",
                            field="text",
                        )
                    self.texts.put_nowait(text)
                elif kind == "input.done" and not done:
                    self.texts.put_nowait(None)
                    done = True
                elif kind in ("cancel", "response.cancel"):
                    raise SessionEnded
                else:
                    raise InvalidRequest(
                        f"unknown message type '{kind}': use input.text, input.done or cancel", field="type"
                    )
        except BaseException as exc:
            self.texts.put_nowait(None)
            raise exc

    # ----- speaking -----
    async def _prepare(self, config: SpeechRequest) -> tuple[Speech, SynthesisItem, str, Any]:
        try:
            voice = await stored_voice(self.svc, config, self.owner)
            model, mode = await resolve_mode(self.svc.synthesizer, config, voice)
            template = await speech_item(self.svc, config, model, mode, voice)
            check_items(model.info, mode, [template])
        except ServiceError as exc:
            exc.field = PARAMS.get(exc.field or "", exc.field)
            raise
        speech = Speech(self.svc.synthesizer, model, mode, config.sampling(self.settings))
        await self.ws.send_json(
            {
                "type": "session.ready",
                "model": model.name,
                "sample_rate": model.info.sample_rate,
                "response_format": config.response_format,
            }
        )
        return speech, template, config.response_format, lambda text: input_tokens(model, text)

    async def _segments(self, template: SynthesisItem, language: str) -> AsyncIterator[SynthesisItem]:
        buffer = SentenceBuffer(max_chars=self.settings.segment_chars, language=language)
        while (text := await self.texts.get()) is not None:
            for segment in buffer.feed(text):
                yield _with_text(template, segment)
        for segment in buffer.flush():
            yield _with_text(template, segment)

    async def _speak(self, speech: Speech, template: SynthesisItem, fmt: str, speed: float, tokens_of: Any) -> None:
        reader = asyncio.ensure_future(self._read_texts())
        encoder = StreamEncoder(fmt, int(speech.model.info.sample_rate), speed)
        started = time.perf_counter()
        frames, seconds, reason, spoken = 0, 0.0, FinishReason.CANCELLED, []

        async def segments() -> AsyncIterator[SynthesisItem]:
            async for segment in self._segments(template, template.language):
                spoken.append(segment.text)
                yield segment

        try:
            async for chunk in _until(reader, speech.stream_segments(segments())):
                frames += chunk.frames
                seconds += len(chunk.samples) / speech.model.info.sample_rate
                reason = chunk.finish_reason or reason
                data = encoder.write(chunk.samples)
                if data:
                    await self.ws.send_bytes(data)
            tail = encoder.close()
            if tail:
                await self.ws.send_bytes(tail)
            if reader.done() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
            tokens = sum(tokens_of(text) for text in spoken)
            await self.ws.send_json(
                {
                    "type": "session.done",
                    "finish_reason": reason.value,
                    "usage": {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames},
                    "audio_seconds": round(seconds / speed, 3),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _error(self, exc: BaseException, code: int) -> None:
        if isinstance(exc, ServiceError):
            body = error_body("/v1/", exc.status_code, exc.error_type, exc.message, exc.field)
        else:
            body = error_body("/v1/", 500, "internal_error", f"internal error ({type(exc).__name__})", None)
        with contextlib.suppress(Exception):
            await self.ws.send_json({"type": "error", **body})
            await self.ws.close(code=code)


def _close_code(exc: ServiceError) -> int:
    """The close code of an error the client can act on: too big, try again later (the server is busy or a
    part of it is away: 429, 503), or a request to fix."""
    if exc.status_code == 413:
        return CLOSE_TOO_BIG
    if exc.status_code in (429, 503):
        return CLOSE_TRY_AGAIN
    return CLOSE_POLICY


class _TooBig(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


def _with_text(template: SynthesisItem, text: str) -> SynthesisItem:
    return dataclasses.replace(template, text=text)


async def _until(reader: asyncio.Future[None], chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Chunks until they end, or the text reader fails (bad message, cancel, client gone)."""
    iterator = aiter(chunks)
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            if not reader.done():
                await asyncio.wait({step, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done() and reader.exception() is not None:
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
                raise reader.exception()  # type: ignore[misc]
            try:
                chunk = await step
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        with contextlib.suppress(BaseException):
            await iterator.aclose()  # type: ignore[attr-defined]
