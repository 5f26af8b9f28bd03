"""Serving: validated requests to audio, whole or streamed. Shared by the native routes, the OpenAI
routes and the WebSocket, so long text, seeds, speed and encoding follow one set of rules.

- Long text is split at sentence boundaries (text.segment) and generated as consecutive segments
  with one voice, one seed and one set of sampling options; segments are joined with a short fade,
  so the joins do not click. Whole results generate all segments at once (they batch); streams
  generate segment k+1 as soon as segment k is generated, while k is still playing.
- A request without a seed gets one drawn here, so all its segments share it.
- A request's frame bound (`max_new_tokens` / `max_duration_s`) bounds the item's whole audio; the
  server's cap bounds each segment. Audio cut at a bound ends with finish_reason `length`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from ..audio.encoders import open_encoder
from ..audio.join import SegmentJoiner, join_segments
from ..audio.tempo import TempoChanger, change_tempo
from ..engine.registry import LoadedModel
from ..engine.synthesizer import Synthesizer, check_items
from ..engine.types import SAMPLES_PER_FRAME, AudioChunk, FinishReason, Mode, SamplingParams, SynthesisItem
from ..engine.types import SynthesisResult as Result
from ..text.segment import split_text

SEED_BITS = 62


def with_seed(sampling: SamplingParams) -> SamplingParams:
    return sampling if sampling.seed is not None else dataclasses.replace(sampling, seed=secrets.randbits(SEED_BITS))


def segments_of(item: SynthesisItem, segment_chars: int) -> list[SynthesisItem]:
    texts = split_text(item.text, max_chars=segment_chars, language=item.language) or [item.text]
    return [dataclasses.replace(item, text=text) for text in texts]


def _worse(a: FinishReason, b: FinishReason | None) -> FinishReason:
    """The finish reason of a joined item: cancelled over length over eos."""
    order = (FinishReason.EOS, FinishReason.LENGTH, FinishReason.CANCELLED)
    return a if b is None or order.index(a) >= order.index(b) else b


class Speech:
    """One model's requests, as the routes see them."""

    def __init__(self, synthesizer: Synthesizer, model: LoadedModel, mode: Mode, sampling: SamplingParams) -> None:
        self.synthesizer = synthesizer
        self.model = model
        self.mode = mode
        self.sampling = sampling
        self.segment_chars = synthesizer.settings.segment_chars
        # The item's bound when the request set one; each segment may run to the server's cap.
        self.bound = synthesizer.frame_limit(model.info, sampling) if sampling.max_new_tokens is not None else None

    async def whole(self, items: list[SynthesisItem], speed: float = 1.0) -> list[Result]:
        """Every item's audio; all segments of all items go to the engine together."""
        check_items(self.model.info, self.mode, items)
        plans = [segments_of(item, self.segment_chars) for item in items]
        flat = [segment for plan in plans for segment in plan]
        # Segments of one item share a seed; single-segment items keep theirs unset, so the reference
        # engine can still merge unseeded requests into one batch.
        sampling = with_seed(self.sampling) if len(flat) > len(items) else self.sampling
        results = iter(await self.synthesizer.synthesize(self.model, self.mode, flat, sampling))
        return [self._joined([next(results) for _ in plan], speed) for plan in plans]

    def _joined(self, parts: list[Result], speed: float) -> Result:
        rate = parts[0].sample_rate
        samples = join_segments([p.samples for p in parts], rate)
        frames = sum(p.frames for p in parts)
        reason = FinishReason.EOS
        for part in parts:
            reason = _worse(reason, part.finish_reason)
        if self.bound is not None and frames > self.bound:
            frames, samples, reason = self.bound, samples[: self.bound * SAMPLES_PER_FRAME], FinishReason.LENGTH
        if speed != 1.0:
            samples = change_tempo(samples, rate, speed)
        return Result(samples, rate, frames, finish_reason=reason)

    async def stream(self, item: SynthesisItem) -> AsyncIterator[AudioChunk]:
        """One item's audio as it is generated, segment after segment; the last chunk carries the
        finish reason. Closing the iterator cancels whatever is still generating."""
        check_items(self.model.info, self.mode, [item])

        async def segments() -> AsyncIterator[SynthesisItem]:
            for segment in segments_of(item, self.segment_chars):
                yield segment

        # `async for` alone would leave the inner generator (and its engine work) running on close.
        async with contextlib.aclosing(self.stream_segments(segments())) as chunks:
            async for chunk in chunks:
                yield chunk

    async def stream_segments(self, segments: AsyncIterator[SynthesisItem]) -> AsyncIterator[AudioChunk]:
        """Segments' audio, joined, as they are generated; each segment starts generating as soon as it
        is known and the one before it is generated (so text that streams in keeps the audio going)."""
        pumps: asyncio.Queue[_Pump | Exception | None] = asyncio.Queue(maxsize=1)
        feeder = asyncio.ensure_future(self._feed(segments, pumps, with_seed(self.sampling)))
        joiner = SegmentJoiner(int(self.model.info.sample_rate))
        frames, reason = 0, FinishReason.EOS
        current: _Pump | None = None
        try:
            current = await _next_pump(pumps)
            while current is not None:
                async for chunk in current:
                    if chunk.finish_reason is not None:
                        reason = _worse(reason, chunk.finish_reason)
                        break
                    take = chunk.frames if self.bound is None else min(chunk.frames, self.bound - frames)
                    frames += take
                    out = joiner.add(chunk.samples[: take * SAMPLES_PER_FRAME])
                    if len(out):
                        yield AudioChunk(out, take)
                    if self.bound is not None and frames >= self.bound:
                        reason = FinishReason.LENGTH
                        break
                await current.close()
                current = None
                if reason is not FinishReason.EOS:
                    break
                current = await _next_pump(pumps)
                tail = joiner.end_segment(last=current is None)  # fade out only where a segment follows
                if len(tail):
                    yield AudioChunk(tail, 0)
            yield AudioChunk(joiner.end_segment(last=True), 0, finish_reason=reason)
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
            for pump in (current, *_drain(pumps)):
                if isinstance(pump, _Pump):
                    await pump.close()

    async def _feed(
        self,
        segments: AsyncIterator[SynthesisItem],
        pumps: asyncio.Queue[_Pump | Exception | None],
        sampling: SamplingParams,
    ) -> None:
        """Start each segment's generation once the one before it has finished generating (it is then
        still playing: generation runs several times faster than real time), so a stream holds one
        engine row at a time; then None (the end), or the error the segment source raised."""
        try:
            async for segment in segments:
                pump = _Pump(self.synthesizer.stream(self.model, self.mode, segment, sampling))
                try:
                    await pumps.put(pump)
                    await pump.generated.wait()
                except BaseException:
                    await pump.close()
                    raise
        except Exception as exc:
            await pumps.put(exc)
            return
        await pumps.put(None)


async def _next_pump(pumps: asyncio.Queue[_Pump | Exception | None]) -> _Pump | None:
    item = await pumps.get()
    if isinstance(item, Exception):
        raise item
    return item


def _drain(pumps: asyncio.Queue[_Pump | Exception | None]) -> list[_Pump | Exception | None]:
    out = []
    while not pumps.empty():
        out.append(pumps.get_nowait())
    return out


class _Pump:
    """Runs an async iterator of chunks in its own task, into a queue: a segment can start
    generating before its turn to be played."""

    _END = object()

    def __init__(self, chunks: AsyncIterator[AudioChunk]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.generated = asyncio.Event()  # the source has ended (or failed)
        self._chunks = chunks
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for chunk in self._chunks:
                self._queue.put_nowait(chunk)
        except Exception as exc:  # handed to the reader, raised where it reads
            self._queue.put_nowait(exc)
        finally:
            self._queue.put_nowait(self._END)
            self.generated.set()

    def __aiter__(self) -> _Pump:
        return self

    async def __anext__(self) -> AudioChunk:
        item = await self._queue.get()
        if item is self._END:
            self._queue.put_nowait(item)
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


class StreamEncoder:
    """Speed change (if any) then a streaming encoder: float chunks in, format bytes out."""

    def __init__(self, fmt: str, sample_rate: int, speed: float = 1.0) -> None:
        self.tempo = TempoChanger(speed, sample_rate) if speed != 1.0 else None
        self.encoder = open_encoder(fmt, sample_rate)

    def write(self, samples: np.ndarray) -> bytes:
        if self.tempo is not None:
            samples = self.tempo.process(samples)
        return self.encoder.write(samples) if len(samples) else b""

    def close(self) -> bytes:
        head = b""
        if self.tempo is not None:
            rest = self.tempo.flush()
            head = self.encoder.write(rest) if len(rest) else b""
        return head + self.encoder.close()
