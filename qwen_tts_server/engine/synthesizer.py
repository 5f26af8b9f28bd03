"""Synthesizer: the one object the API talks to for synthesis.

It owns the model registry, the voice-prompt cache, and what runs the items: per loaded model a
fast engine (continuous batching on its own threads, the default), or the reference runner behind
the batcher, on one "GPU thread" where batches queue in arrival order. Voice prompts are computed
on that thread as well (beside the fast engines' threads, not queued behind them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..audio.sources import ReferenceAudio
from ..collector import freeze_after_load
from ..config import Settings
from ..errors import InvalidRequest, ModelUnavailable, Overloaded, ServiceError
from ..metrics import EngineReport, Metrics
from .admission import AdmissionGate
from .batcher import Batcher
from .fast.memory import WORKSPACE_BYTES, auto_slots, device_budget, row_bytes
from .fast.runtime import FastRuntime
from .fast.trace import StepTrace
from .reference import ReferenceRunner
from .registry import LoadedModel, ModelRegistry
from .types import (
    FRAME_RATE_HZ,
    AudioChunk,
    FinishReason,
    Mode,
    ModelInfo,
    SamplingParams,
    SynthesisItem,
    SynthesisResult,
    VoicePrompt,
)
from .voice_cache import VoicePromptCache
from .voice_prompt import compute_voice_prompt

DEFAULT_MAX_NEW_TOKENS = 4096  # upstream's default when a checkpoint does not set one
CPU_SLOTS = 8  # fast-engine rows on CPU when QTTS_MAX_SLOTS is unset (no VRAM budget to fill)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """Items merge into one batch only when all of these are equal."""

    model: str
    mode: Mode
    sampling: SamplingParams


class Synthesizer:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        registry: ModelRegistry | None = None,
        runner: ReferenceRunner | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = registry or ModelRegistry(settings)
        self.runner = runner or ReferenceRunner()
        self.voice_cache = VoicePromptCache(settings.voice_cache_entries)
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtts-gpu")
        # Engines are built (compiled, warmed up, graphs captured) on one thread: its cuBLAS handle with the
        # same capture streams (capture.StreamRegistry) reuses the same workspaces, engine after engine.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtts-engine-build")
        self._closed = False
        self.batcher: Batcher[SynthesisItem, SynthesisResult] = Batcher(
            self._run_batch, max_batch=settings.max_batch_size, window_s=settings.batch_window_ms / 1000
        )
        self.batcher.on_batch = self.metrics.batch_size.observe
        self.registry.on_load = self._on_load
        self.registry.on_unload = self._on_unload
        self._fast: dict[str, FastRuntime] = {}
        self._builds: dict[str, asyncio.Task[FastRuntime]] = {}  # engines being built, one per model
        self.gate = AdmissionGate(settings.max_queue)
        self._in_flight = 0
        self.metrics.engines.sources.append(weakref.WeakMethod(self._engine_reports))  # no cycle via metrics
        self.engine_failures: dict[str, str] = {}  # models whose engine a device fault stopped, until rebuilt
        self._restarts: set[asyncio.Task[None]] = set()

    def _engine_reports(self) -> list[EngineReport]:
        """Each started fast engine's steps, loop seconds, finished requests' phases and codec batches (for
        /metrics)."""
        device = self.registry.options.device
        engines = [(name, rt.engine) for name, rt in list(self._fast.items())]
        return [(name, device, e.steps, e.seconds, e.request_phases.snapshot(), e.codec_batches) for name, e in engines]

    def _on_load(self, name: str, ok: bool, seconds: float) -> None:
        self.metrics.model_loads.labels(model=name, result="ok" if ok else "error").inc()
        if ok:
            self.metrics.model_load_seconds.labels(model=name).observe(seconds)

    # ----- models -----
    async def model_for(self, name: str, mode: Mode) -> LoadedModel:
        """Load (lazily) the named model and check it can serve `mode`."""
        model = await self.registry.get(name)
        if model.info.model_type != mode.model_type:
            raise InvalidRequest(
                f"model '{model.name}' is a {model.info.model_type} checkpoint and cannot do "
                f"{mode.value.replace('_', ' ')}: use a {mode.model_type} model "
                f"({_example_model(mode)})",
                field="model",
            )
        return model

    async def load(self, name: str) -> LoadedModel:
        """Load the named model and start its engine with the whole warm-up (compile, graphs), so that
        its first request waits for nothing. One not on disk starts downloading (ModelDownloading)."""
        model = await self.registry.get(name)
        if self.settings.engine == "fast":
            await self.fast_runtime(model)
        return model

    async def unload(self, name: str) -> bool:
        """Unload a model (see `ModelRegistry.unload`); returns once its engine's memory is released."""
        return await self.registry.unload(name)

    async def _on_unload(self, name: str) -> None:
        """The registry dropped the model: stop its fast engine and let go of everything built on it
        (engine, KV cache, graphs, cached voice prompts), so its memory is free when unload returns."""
        self.gate.forget(name)
        self.engine_failures.pop(name, None)
        runtime = self._fast.pop(name, None)
        self.voice_cache.drop_model(name)
        if runtime is not None:
            await self._close(runtime)

    async def fast_runtime(self, model: LoadedModel) -> FastRuntime:
        """The model's fast engine, started once on first use, off the event loop: it allocates the
        KV cache and runs the warm-up (compile, graphs; a minute or more on a GPU). The build is one
        task per model that callers await shielded: a caller that goes away (client gone, time-out)
        neither cancels it nor leaves an engine nobody owns, and the next caller awaits the same build."""
        while True:
            runtime = self._usable_runtime(model)
            if runtime is not None:
                return runtime
            task = self._builds.get(model.name)
            if task is None:
                task = asyncio.ensure_future(self._build(model))
                self._builds[model.name] = task
                task.add_done_callback(lambda _t, name=model.name: self._builds.pop(name, None))
            runtime = await asyncio.shield(task)
            if runtime.tts is model.tts:
                return runtime
            # A build for an earlier load of this name: build again for this one (it checks it is current).

    def _usable_runtime(self, model: LoadedModel) -> FastRuntime | None:
        """The model's engine if it was built for this load of it and no device fault stopped it."""
        runtime = self._fast.get(model.name)
        if runtime is not None and runtime.tts is model.tts and runtime.engine.failure is None:
            return runtime
        return None

    async def _build(self, model: LoadedModel) -> FastRuntime:
        if (usable := self._usable_runtime(model)) is not None:
            return usable
        runtime = self._fast.get(model.name)
        if runtime is not None:  # built for an earlier load of this name, since unloaded, or failed
            if runtime.tts is model.tts:  # failed: the new engine's memory replaces its
                self.registry.add_memory(model.name, -self._engine_bytes(runtime))
            await self._close(self._fast.pop(model.name))
        self._check_current(model)  # never build an engine for a model that has left the registry
        s = self.settings
        try:
            build = functools.partial(
                FastRuntime,
                model.tts,
                max_slots=s.max_slots or self._auto_slots(model),
                max_len=s.max_context,
                max_prefill_tokens=s.max_prefill_tokens,
                admit_wait_s=s.admit_wait_ms / 1000,
                codec_wait_s=s.codec_wait_ms / 1000,
                codec_gather_streams=s.codec_gather_streams,
                compile=s.compile,
                compile_codec=s.compile_codec,
                fused_attention=s.fused_attention,
                stream_first_frames=s.stream_first_chunk_frames,
                stream_chunk_frames=s.stream_chunk_frames,
                stream_decoder=s.stream_decoder,
                trace=StepTrace(s.trace_dir, s.trace_after_steps) if s.trace_dir else None,
            )
            runtime = await asyncio.get_running_loop().run_in_executor(self._builder, build)
        except Exception as exc:  # e.g. out of memory for the KV cache
            raise ModelUnavailable(
                f"model '{model.name}' loaded but its engine could not start: {type(exc).__name__}: {exc}; "
                "lower QTTS_MAX_SLOTS or QTTS_MAX_CONTEXT",
                field="model",
            ) from exc
        if s.gc_freeze:  # the warm-up's objects out of the collector's scans, before the engine serves (collector.py)
            others = any(name != model.name for name in self._fast)
            await asyncio.get_running_loop().run_in_executor(self._builder, freeze_after_load, not others)
        if self._closed:  # the server shut down while this engine was built: nobody else would stop it
            runtime.close()
            raise ModelUnavailable(f"model '{model.name}': the server is shutting down", field="model")
        if not self.registry.is_current(model):  # unloaded while the engine started: not ours to keep
            await self._close(runtime)
            self._check_current(model)
        runtime.engine.on_step = self.metrics.batch_size.observe
        runtime.engine.on_failure = _restart_on_failure(self, model.name)
        # Its KV cache, and on CUDA the workspace its graphs and codec batches take, count
        # against the memory budget like weights do.
        self.registry.add_memory(model.name, self._engine_bytes(runtime))
        self.engine_failures.pop(model.name, None)
        self._fast[model.name] = runtime
        self.gate.set_rows(model.name, runtime.engine.scheduler.max_slots)
        return runtime

    @staticmethod
    def _engine_bytes(runtime: FastRuntime) -> int:
        workspace = WORKSPACE_BYTES if runtime.engine.device.type == "cuda" else 0
        return runtime.engine.cache_bytes + workspace

    async def restart(self, name: str) -> None:
        """Build a new engine for a model whose engine a device fault stopped (its requests got 503s).
        Until it is up `engine_failures` names the model (/ready is 503); if it cannot be built (the
        GPU is gone for good) it stays there, with why, for the orchestrator to restart the process."""
        model = self.registry.loaded_model(name)
        if model is None:  # unloaded meanwhile: nothing to restart
            self.engine_failures.pop(name, None)
            return
        log.warning(f"restarting the engine of model {name} after a device fault", extra={"model": name})
        try:
            await self.fast_runtime(model)  # the build a request may have started already, or a new one
        except Exception as exc:
            if not self.registry.is_current(model):
                self.engine_failures.pop(name, None)
                return
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            self.engine_failures[name] = f"its engine failed and could not be restarted: {message}"
            log.error(f"the engine of model {name} could not be restarted: {message}", extra={"model": name})
        else:
            log.info(f"the engine of model {name} is back", extra={"model": name})

    def _auto_slots(self, model: LoadedModel) -> int:
        """Rows for this model from the VRAM budget (see `auto_slots`)."""
        device = torch.device(model.device)
        if device.type != "cuda":
            return CPU_SLOTS
        budget = device_budget(device, self.settings.memory_budget_gb)
        used = self.registry.used_bytes() + self.registry.reserved_bytes()
        rows = auto_slots(row_bytes(model.tts, self.settings.max_context), budget, used)
        log.info("fast engine rows from the memory budget", extra={"model": model.name, "max_slots": rows})
        return rows

    def _check_current(self, model: LoadedModel) -> None:
        if not self.registry.is_current(model):
            raise ModelUnavailable(
                f"model '{model.name}' was unloaded while this request waited for it; retry (it loads again on demand)",
                field="model",
            )

    @staticmethod
    async def _close(runtime: FastRuntime) -> None:
        """Stop a fast engine off the event loop (stopping joins its threads) and wait for it. The worker
        thread gets the runtime through a box it empties, so nothing holds the runtime once it is closed."""
        box = [runtime]
        del runtime
        await asyncio.to_thread(_close_boxed, box)

    # ----- voice prompts -----
    async def voice_prompt(self, model: LoadedModel, ref: ReferenceAudio) -> VoicePrompt:
        """The cached cloning prompt for this reference audio, computed once per model.

        Keyed by (model, the audio's content hash): the prompt (speaker embedding and reference
        codes) depends on nothing else, so ICL and x-vector requests, and a file_id and base64 of
        the same bytes, share one entry. The audio is decoded only on a miss."""

        async def compute() -> VoicePrompt:
            audio = await ref.decoded()
            async with self.registry.using(model):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self._gpu, compute_voice_prompt, model.tts, audio.samples, audio.sample_rate
                )

        return await self._cached_prompt(model, ref.cache_key, compute)

    async def stored_voice_prompt(
        self, model: LoadedModel, cache_key: str, load: Callable[[str], VoicePrompt]
    ) -> VoicePrompt:
        """A prompt computed earlier and stored (a library voice): `load(device)` reads it (in a
        thread) on a miss. `cache_key` is its audio's content key, so it shares the entry with the
        same audio sent as a reference."""

        async def compute() -> VoicePrompt:
            return await asyncio.to_thread(load, model.device)

        return await self._cached_prompt(model, cache_key, compute)

    async def _cached_prompt(self, model: LoadedModel, cache_key: str, compute) -> VoicePrompt:
        prompt, hit = await self.voice_cache.get_or_compute((model.name, cache_key), compute)
        self.metrics.voice_cache.labels(result="hit" if hit else "miss").inc()
        return prompt

    # ----- synthesis -----
    async def synthesize(
        self, model: LoadedModel, mode: Mode, items: list[SynthesisItem], sampling: SamplingParams
    ) -> list[SynthesisResult]:
        """Generate every item; items of one call stay in order and in as few batches as fit.

        Raises Overloaded (429) at once when the model has no room for them (see AdmissionGate). A
        call larger than the model's whole capacity runs in consecutive groups that fit, so it is
        never refused for good."""
        check_items(model.info, mode, items)
        sampling = dataclasses.replace(sampling, max_new_tokens=self.frame_limit(model.info, sampling))
        results: list[SynthesisResult] = []
        if self.settings.engine == "fast":
            async with self.registry.using(model):
                runtime = await self.fast_runtime(model)  # its rows are the gate's capacity
                for group in self._groups(model.name, items):
                    with self._admitted(model.name, len(group)):
                        results += await runtime.generate(mode, group, sampling)
        else:
            self.gate.set_rows(model.name, self.settings.max_batch_size)
            for group in self._groups(model.name, items):
                with self._admitted(model.name, len(group)):
                    results += await self.batcher.submit(BatchKey(model.name, mode, sampling), group)
        for result in results:
            self._count(model.name, mode, result.duration_s, result.finish_reason)
        return results

    async def stream(
        self, model: LoadedModel, mode: Mode, item: SynthesisItem, sampling: SamplingParams
    ) -> AsyncIterator[AudioChunk]:
        """One item's audio in chunks as it is generated (the last carries the finish reason).

        The fast engine streams; the reference engine has no frame stream, so its audio comes as one
        chunk at the end. Closing the iterator early cancels the work."""
        check_items(model.info, mode, [item])
        sampling = dataclasses.replace(sampling, max_new_tokens=self.frame_limit(model.info, sampling))
        if self.settings.engine != "fast":
            self.gate.set_rows(model.name, self.settings.max_batch_size)
            with self._admitted(model.name, 1):
                (result,) = await self.batcher.submit(BatchKey(model.name, mode, sampling), [item])
            self._count(model.name, mode, result.duration_s, result.finish_reason)
            yield AudioChunk(result.samples, result.frames)
            yield AudioChunk(result.samples[:0], 0, finish_reason=result.finish_reason)
            return
        async with self.registry.using(model):
            runtime = await self.fast_runtime(model)  # its rows are the gate's capacity
            with self._admitted(model.name, 1):
                seconds = 0.0
                async for chunk in runtime.stream_audio(mode, item, sampling):
                    seconds += len(chunk.samples) / runtime.sample_rate
                    if chunk.finish_reason is not None:
                        self._count(model.name, mode, seconds, chunk.finish_reason)
                    yield chunk

    def _groups(self, model: str, items: list[SynthesisItem]) -> list[list[SynthesisItem]]:
        size = max(1, self.gate.load(model).capacity)
        return [items[i : i + size] for i in range(0, len(items), size)]

    @contextlib.contextmanager
    def _admitted(self, model: str, items: int) -> Iterator[None]:
        """Hold room for `items` in the model's admission gate; count refusals and cancellations."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.gate.admit(model, items))
            except Overloaded:
                self.metrics.rejected.inc()
                raise
            # inc/dec, not set: the engines of a device pool share one gauge, which shows their sum.
            self._in_flight += items
            self.metrics.queue_depth.inc(items)
            try:
                yield
            except (asyncio.CancelledError, GeneratorExit):  # client gone, deadline, stream closed early
                self.metrics.finished.labels(reason=FinishReason.CANCELLED.value).inc(items)
                raise
            finally:
                self._in_flight -= items
                self.metrics.queue_depth.dec(items)

    def _count(self, model: str, mode: Mode, seconds: float, reason: FinishReason | None) -> None:
        self.metrics.items.labels(model=model, mode=mode.value).inc()
        self.metrics.audio_seconds.labels(model=model, mode=mode.value).inc(seconds)
        self.metrics.finished.labels(reason=(reason or FinishReason.EOS).value).inc()

    def frame_limit(self, info: ModelInfo, sampling: SamplingParams) -> int:
        """Frames one utterance (one segment of a long text) may run to: the request's bound, else the
        checkpoint's default, never over the server's cap."""
        cap = int(self.settings.max_audio_seconds * FRAME_RATE_HZ)
        wanted = sampling.max_new_tokens or info.max_new_tokens_default or DEFAULT_MAX_NEW_TOKENS
        return max(1, min(int(wanted), cap))

    async def _run_batch(self, key: Hashable, items: list[SynthesisItem]) -> list[SynthesisResult]:
        assert isinstance(key, BatchKey)
        model = await self.registry.get(key.model)
        async with self.registry.using(model):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._gpu, self.runner.run, model, key.mode, items, key.sampling)

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    def device_loads(self) -> list[dict[str, Any]]:
        """Per device (here the one), its work: see `load_report`. A device pool lists each of its engines."""
        return [self.load_report()]

    def load_report(self) -> dict[str, Any]:
        """This engine's device, its memory, and per loaded model the items in flight against its rows
        (rows are 0 until the model's engine has started): for /ready and the model list."""
        models = {}
        for model in self.registry.loaded():
            load = self.gate.load(model.name)
            models[model.name] = {"in_flight": load.in_flight, "rows": load.rows, "capacity": load.capacity}
        return {
            "device": self.registry.options.device,
            "used_bytes": self.registry.used_bytes(),
            "queue_depth": self._in_flight,
            "models": models,
        }

    def batch_sizes(self) -> list[int]:
        """Items decoded together, per fast-engine step or per reference batch, since start."""
        if self.settings.engine == "fast":
            return [size for runtime in self._fast.values() for size in runtime.engine.batch_sizes]
        return list(self.batcher.batch_sizes)

    def close(self) -> None:
        self._closed = True
        for runtime in self._fast.values():
            runtime.close()
        self._fast.clear()
        self._gpu.shutdown(wait=True, cancel_futures=True)
        self._builder.shutdown(wait=False, cancel_futures=True)  # a build under way closes its engine when done


def _restart_on_failure(engine: Synthesizer, name: str) -> Callable[[BaseException], None]:
    """The fast engine's `on_failure` (called on its step thread): mark the model failed and restart its
    engine on the event loop. Holds the Synthesizer weakly: a fast engine never keeps its owner alive."""
    loop = asyncio.get_running_loop()
    owner = weakref.ref(engine)

    def start_restart() -> None:
        me = owner()
        if me is not None:
            me.engine_failures.setdefault(name, "its engine hit a device fault and is restarting")
            task = asyncio.ensure_future(me.restart(name))
            me._restarts.add(task)
            task.add_done_callback(me._restarts.discard)

    return lambda _exc: loop.call_soon_threadsafe(start_restart)


def _close_boxed(box: list[FastRuntime]) -> None:
    box.pop().close()


def _example_model(mode: Mode) -> str:
    return {
        Mode.CUSTOM_VOICE: "Qwen3-TTS-12Hz-1.7B-CustomVoice",
        Mode.VOICE_DESIGN: "Qwen3-TTS-12Hz-1.7B-VoiceDesign",
        Mode.VOICE_CLONE: "Qwen3-TTS-12Hz-1.7B-Base",
    }[mode]


def check_items(info: ModelInfo, mode: Mode, items: list[SynthesisItem]) -> None:
    """Reject what this checkpoint cannot do, naming the field (and index, for lists)."""

    def name(field: str, index: int) -> str:
        return f"{field}[{index}]" if len(items) > 1 else field

    for i, item in enumerate(items):
        if item.language not in info.languages:
            raise InvalidRequest(
                f"language '{item.language}' is not supported by model '{info.name}'; "
                f"use one of: {', '.join(info.languages)}",
                field=name("language", i),
            )
        if mode is Mode.CUSTOM_VOICE:
            if not item.speaker:
                raise InvalidRequest(
                    f"speaker is required for custom voice; choose one of: {', '.join(info.speakers)}",
                    field=name("speaker", i),
                )
            if item.speaker not in info.speakers:
                raise InvalidRequest(
                    f"speaker '{item.speaker}' is not available in model '{info.name}'; "
                    f"choose one of: {', '.join(info.speakers)}",
                    field=name("speaker", i),
                )
            if item.instruct and not info.accepts_instruct:
                raise InvalidRequest(
                    f"model '{info.name}' ignores instruct (0.6B CustomVoice checkpoints have no style "
                    "control): remove instruct, or use Qwen3-TTS-12Hz-1.7B-CustomVoice",
                    field=name("instruct", i),
                )
        if mode is Mode.VOICE_DESIGN and not item.instruct:
            raise InvalidRequest(
                "instruct is required for voice design: describe the voice, e.g. "
                "'a warm, low female voice, speaking slowly'",
                field=name("instruct", i),
            )
