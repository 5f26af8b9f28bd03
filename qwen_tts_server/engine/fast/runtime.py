"""The asyncio face of one model's fast engine: submit items, await audio, or stream audio or frames.

The engine loop runs on its own thread; results and frames come back to the event loop through
`call_soon_threadsafe`. A caller that goes away (task cancelled) cancels its requests, which frees
their slots at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from torch import Tensor

from ...errors import InvalidRequest
from ..types import AudioChunk, Mode, SamplingParams, SynthesisItem, SynthesisResult
from .engine import FastEngine
from .prompt import prompt_for_item
from .sequence import AudioStream, Sequence, SequenceSampling

_UPSTREAM = SequenceSampling()  # upstream's hard defaults
# The options a request, the checkpoint or upstream sets: every field but the seed (drawn when unset) and
# min_frames (benchmarks only).
_OPTIONS = tuple(f.name for f in dataclasses.fields(SequenceSampling) if f.name not in ("seed", "min_frames"))
_CONFIG_NAMES = {"subtalker_do_sample": "subtalker_dosample"}  # how generation_config.json spells it


def resolve_sampling(sampling: SamplingParams, generate_defaults: dict[str, Any]) -> SequenceSampling:
    """Request options over checkpoint defaults over upstream's; a missing seed is drawn at random."""

    def pick(name: str) -> Any:
        value = getattr(sampling, name)
        if value is None:
            value = generate_defaults.get(_CONFIG_NAMES.get(name, name), getattr(_UPSTREAM, name))
        return type(getattr(_UPSTREAM, name))(value)  # bool, float or int, as the field is

    seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
    return SequenceSampling(**{name: pick(name) for name in _OPTIONS}, seed=seed)


class FastRuntime:
    def __init__(
        self,
        tts: Any,
        *,
        max_slots: int,
        max_len: int,
        max_prefill_tokens: int,
        compile: bool = False,
        **engine_options: Any,
    ) -> None:
        """One model's engine, warmed up and running. The sizes are required (the server computes them); the
        other `FastEngine` options (waits, codec compile, fused attention, stream chunks and decoder, trace) go to
        it as they are, with its defaults (options.py). `compile` only on CUDA: on the CPU inductor's C++ compile
        costs more than it saves."""
        self.tts = tts
        self.sample_rate = int(tts.model.speech_tokenizer.get_output_sample_rate())
        on_cuda = tts.model.talker.codec_head.weight.device.type == "cuda"
        sizes = {"max_slots": max_slots, "max_len": max_len, "max_prefill_tokens": max_prefill_tokens}
        self.engine = FastEngine(tts, **sizes, compile=compile and on_cuda, **engine_options)
        # Compile and capture everything a request could reach before serving (see FastEngine.warm_up).
        self.engine.warm_up()
        self.engine.start()

    async def generate(self, mode: Mode, items: list[SynthesisItem], sampling: SamplingParams) -> list[SynthesisResult]:
        """Whole utterances: each item finishes (and is returned) as soon as its own audio is ready."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Sequence]] = []
        seqs: list[Sequence] = []
        try:
            for item in items:
                future: asyncio.Future[Sequence] = loop.create_future()
                seq = await self._sequence(mode, item, sampling)
                seq.on_finish = lambda s, f=future: loop.call_soon_threadsafe(_settle, f, s)
                futures.append(future)
                seqs.append(self._submit(seq))
            done = await asyncio.gather(*futures)
        except BaseException:
            for seq in seqs:
                self.engine.cancel(seq)
            raise
        return [SynthesisResult(s.audio, self.sample_rate, s.num_frames, finish_reason=s.finish_reason) for s in done]

    async def stream_audio(
        self, mode: Mode, item: SynthesisItem, sampling: SamplingParams
    ) -> AsyncIterator[AudioChunk]:
        """One request's audio in chunks as it is generated; the last chunk carries the finish reason.
        Leaving the loop early (client gone) cancels the request: its row frees at the next step."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        seq = await self._sequence(mode, item, sampling)
        seq.stream = AudioStream(
            on_audio=lambda _s, audio: loop.call_soon_threadsafe(chunks.put_nowait, audio),
        )
        seq.on_finish = lambda _s: loop.call_soon_threadsafe(chunks.put_nowait, None)
        self._submit(seq)
        try:
            while (audio := await chunks.get()) is not None:
                yield AudioChunk(audio, frames=len(audio) // self.engine.codec.samples_per_frame)
            if seq.error is not None:
                raise seq.error
            yield AudioChunk(np.zeros(0, dtype=np.float32), frames=0, finish_reason=seq.finish_reason)
        finally:
            if seq.finish_reason is None:
                self.engine.cancel(seq)

    async def stream(self, mode: Mode, item: SynthesisItem, sampling: SamplingParams) -> AsyncIterator[Tensor]:
        """One request's codec frames ([16] codes each) as they are produced."""
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[Tensor | None] = asyncio.Queue()
        seq = await self._sequence(mode, item, sampling)
        seq.decode_audio = False  # the caller gets codes; decoding the whole utterance would be wasted
        seq.on_frame = lambda _s, frame: loop.call_soon_threadsafe(frames.put_nowait, frame)
        seq.on_finish = lambda _s: loop.call_soon_threadsafe(frames.put_nowait, None)
        self._submit(seq)
        try:
            while (frame := await frames.get()) is not None:
                yield frame
            if seq.error is not None:
                raise seq.error
        finally:
            if seq.finish_reason is None:
                self.engine.cancel(seq)

    def _submit(self, seq: Sequence) -> Sequence:
        try:
            return self.engine.submit(seq)
        except ValueError as exc:  # the prompt does not fit this server's context
            raise InvalidRequest(
                f"text is too long for this server: {exc}; split it into shorter items (or raise QTTS_MAX_CONTEXT)",
                field="text",
            ) from exc

    async def _sequence(self, mode: Mode, item: SynthesisItem, sampling: SamplingParams) -> Sequence:
        arrived = time.perf_counter()
        prompt = await asyncio.to_thread(prompt_for_item, self.tts, mode, item)
        assert sampling.max_new_tokens is not None, "the engine sets a frame limit on every request"
        return Sequence(
            prompt=prompt,
            arrived_at=arrived,
            sampling=resolve_sampling(sampling, self.tts.generate_defaults or {}),
            max_frames=sampling.max_new_tokens,
        )

    def close(self) -> None:
        self.engine.stop()


def _settle(future: asyncio.Future[Sequence], seq: Sequence) -> None:
    if future.done():
        return
    if seq.error is not None:
        future.set_exception(seq.error)
    else:
        future.set_result(seq)
