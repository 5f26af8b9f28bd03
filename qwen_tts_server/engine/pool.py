"""DevicePool: one Synthesizer per device of this host, behind the face the API already knows.

Why one process with a synthesizer per GPU, rather than a process per GPU behind a load balancer: the
synthesizers share the event loop, the files, the voice library and the metrics, and a request can go to
the GPU whose rows are free now (every admission gate is in this process), which a balancer cannot
see. Jobs and work spread over several hosts go through the queue and its workers instead.

Each synthesizer is independent: its own registry (models, memory budget, `QTTS_MEMORY_BUDGET_GB` per
device), fast engines (KV cache, graphs), voice-prompt cache (prompts are tensors on its device) and
admission gate. The pool only decides where a request goes:

- `model_for` picks a device for the model: among those where it is loaded, the one with a free
  row and the fewest items in flight for its rows (ties take turns, so a burst that arrives before
  any of it is admitted is spread too).
- When every device holding the model has its rows full, the next device (the one whose models hold
  the least memory) loads the model and starts its engine in the background; requests keep going to
  the loaded devices, queueing there, until it is up. A model is thus on one GPU while one GPU's
  rows carry its traffic, and on more when they do not.
- Only when every loaded device would refuse the request (its queue is full too) does the request
  wait for a device still coming up; with none left, the least loaded device answers 429.
- The LoadedModel returned belongs to one device's registry: `synthesize`, `stream` and the voice
  prompts go to that device's synthesizer, so a request, its segments and its prompt stay on one GPU.

Loading from the API (POST .../load) brings the model up on every device; unloading frees it on
every device; the model list shows the devices a model is loaded on. Downloads run once, through the
first device's registry.

With one device the server uses a Synthesizer directly (`build_synthesizer`): nothing here is in its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..audio.sources import ReferenceAudio
from ..config import Settings
from ..errors import NotFound, ServiceError
from ..metrics import Metrics
from .registry import LoadedModel, ModelRegistry, ModelState, ModelStatus, RuntimeOptions, gone
from .synthesizer import Synthesizer
from .types import AudioChunk, Mode, ModelInfo, SamplingParams, SynthesisItem, SynthesisResult, VoicePrompt

log = logging.getLogger(__name__)

WARM_RETRY_S = 30.0  # a device that failed to bring a model up is not tried in the background sooner


def build_synthesizer(settings: Settings, metrics: Metrics | None = None) -> Synthesizer | DevicePool:
    """The server's synthesizer: a Synthesizer on `device` (or the one entry of `devices`), or a pool of
    one per device when several are listed."""
    use_compile_cache(settings)
    if len(settings.devices) > 1:
        return DevicePool(settings, metrics=metrics)
    if settings.devices:
        check_devices(settings.devices)
        settings = settings.model_copy(update={"device": settings.devices[0], "devices": []})
    return Synthesizer(settings, metrics=metrics)


def use_compile_cache(settings: Settings) -> None:
    """Keep torch.compile's caches (inductor's generated code, Triton's kernels) in the configured folder,
    under the data volume by default, so a restarted server or container reuses them (measured on an
    H200, 1.7B: a load with its warm-up took 100 s on a cold cache, 78 s after a restart with it). An
    operator's own TORCHINDUCTOR_CACHE_DIR wins."""
    if not settings.compile or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    path = settings.compile_cache.resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def check_devices(devices: list[str]) -> None:
    """Fail at start, saying why, for a device torch cannot name or a GPU this host does not have
    (rather than a 503 on the first request sent there)."""
    import torch

    gpus: set[int] = set()
    for name in devices:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError) as exc:
            raise ServiceError(f"QTTS_DEVICES: '{name}' is not a device (use cpu, cuda or cuda:N): {exc}") from exc
        if device.type != "cuda":
            continue  # several CPU synthesizers are allowed: tests run a pool on `cpu,cpu`
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ServiceError(f"QTTS_DEVICES: '{name}' is not on this host ({count} CUDA device(s) visible)")
        if (device.index or 0) in gpus:  # two synthesizers would split one GPU's memory without knowing it
            raise ServiceError(f"QTTS_DEVICES: GPU {device.index or 0} is listed twice")
        gpus.add(device.index or 0)


def device_settings(settings: Settings, device: str) -> Settings:
    """One synthesizer's settings: everything shared, but its own device."""
    return settings.model_copy(update={"device": device, "devices": []})


@dataclass(frozen=True)
class _View:
    """One device as routing sees one model on it, at one moment."""

    index: int
    synthesizer: Synthesizer
    loaded: bool  # loaded there, and its engine started (not still coming up)
    pending: bool  # loading there, or its engine starting
    unloading: bool
    in_flight: int
    rows: int
    capacity: int
    held_bytes: int  # memory its models hold (and loads in flight reserve): where a new model goes

    @property
    def free_row(self) -> bool:
        return self.in_flight < self.rows

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.capacity

    @property
    def cold(self) -> bool:
        return not (self.loaded or self.pending or self.unloading)


class DevicePool:
    """Several synthesizers, one per device, with the methods the API uses of a Synthesizer."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        check_devices(settings.devices)
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.synthesizers = [Synthesizer(device_settings(settings, d), metrics=self.metrics) for d in settings.devices]
        self.registry = PoolRegistry(self)
        self.gate = PoolGate(self.synthesizers)
        self._turn = 0
        self._warming: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._warm_failed: dict[tuple[int, str], float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----- routing -----
    async def model_for(self, name: str, mode: Mode) -> LoadedModel:
        """The model on the device that should take this request (see the module's docstring)."""
        return await self.route(name).model_for(name, mode)

    def route(self, name: str) -> Synthesizer:
        """The synthesizer the next request for `name` goes to; may start bringing the model up elsewhere."""
        primary = self.synthesizers[0].registry
        key = self.registry.key(name)  # 404 for an unknown name, before any device is chosen
        if not primary.is_local(key) and not any(e.registry.loaded_model(key) for e in self.synthesizers):
            return self.synthesizers[0]  # not on disk: downloaded once, by the first device's registry
        views = [self._view(i, key) for i in range(len(self.synthesizers))]
        self._turn += 1
        loaded = [v for v in views if v.loaded]
        free = [v for v in loaded if v.free_row]
        if free:
            return self._least_loaded(free).synthesizer
        started = self._warm_another(views, key)  # every loaded device's rows are busy (or none has it)
        open_ = [v for v in loaded if not v.saturated]
        if open_:
            return self._least_loaded(open_).synthesizer  # queue there while another device comes up
        pending = [v for v in views if v.pending] + ([started] if started is not None else [])
        if pending:
            return pending[0].synthesizer  # wait for a device coming up rather than be refused
        cold = [v for v in views if v.cold]
        if cold:
            return min(cold, key=lambda v: (v.held_bytes, v.index)).synthesizer  # load it with this request
        return self._least_loaded(loaded or views).synthesizer  # every device is full: its gate says 429

    def _view(self, index: int, key: str) -> _View:
        synthesizer = self.synthesizers[index]
        registry = synthesizer.registry
        model = registry.loaded_model(key)
        warming = (index, key) in self._warming
        load = synthesizer.gate.load(key)
        rows = load.rows or (self.settings.max_batch_size if self.settings.engine == "reference" else 0)
        return _View(
            index=index,
            synthesizer=synthesizer,
            loaded=model is not None and not warming and not registry.is_unloading(key),
            pending=registry.is_loading(key) or warming,
            unloading=registry.is_unloading(key),
            in_flight=load.in_flight,
            rows=rows,
            capacity=rows + synthesizer.gate.max_queue,
            held_bytes=registry.used_bytes() + registry.reserved_bytes(),
        )

    def _least_loaded(self, views: list[_View]) -> _View:
        """Fewest items in flight for its rows; equal ones take turns."""
        n = len(self.synthesizers)
        return min(views, key=lambda v: (v.in_flight / max(v.rows, 1), (v.index - self._turn) % n))

    def _warm_another(self, views: list[_View], key: str) -> _View | None:
        """Start bringing the model up on one more device, unless one is already coming up."""
        if any(v.pending for v in views):
            return None
        now = time.monotonic()
        cold = [v for v in views if v.cold and now - self._warm_failed.get((v.index, key), -1e9) >= WARM_RETRY_S]
        if not cold:
            return None
        best = min(cold, key=lambda v: (v.held_bytes, v.index))
        self._loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self._warm(best.index, key))
        self._warming[(best.index, key)] = task
        task.add_done_callback(lambda _t, k=(best.index, key): self._warming.pop(k, None))
        device = best.synthesizer.registry.options.device
        log.info(
            f"bringing model {key} up on {device} too (the other devices' rows are busy)",
            extra={"model": key, "device": device},
        )
        return best

    async def _warm(self, index: int, key: str) -> None:
        """Load the model on one device and start its engine; a failure is logged (and reported in the
        model list by that device's registry), and routing keeps to the other devices."""
        try:
            await self._bring_up(index, key)
        except Exception as exc:
            self._warm_failed[(index, key)] = time.monotonic()
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            log.warning(f"model {key} could not be brought up on device {index}: {message}", extra={"model": key})
        else:
            self._warm_failed.pop((index, key), None)

    async def _bring_up(self, index: int, key: str) -> LoadedModel:
        synthesizer = self.synthesizers[index]
        model = await synthesizer.registry.get(key)
        if self.settings.engine == "fast":
            await synthesizer.fast_runtime(model)  # KV cache and graphs now, not on the first request routed here
        return model

    def _owner(self, model: LoadedModel) -> Synthesizer:
        """The synthesizer whose registry loaded `model`: its work and prompts must stay on that device."""
        for synthesizer in self.synthesizers:
            if synthesizer.registry.holds(model):
                return synthesizer
        raise gone(model.name)

    # ----- what the API calls, sent to the model's own synthesizer -----
    async def synthesize(
        self, model: LoadedModel, mode: Mode, items: list[SynthesisItem], sampling: SamplingParams
    ) -> list[SynthesisResult]:
        return await self._owner(model).synthesize(model, mode, items, sampling)

    async def stream(
        self, model: LoadedModel, mode: Mode, item: SynthesisItem, sampling: SamplingParams
    ) -> AsyncIterator[AudioChunk]:
        async with contextlib.aclosing(self._owner(model).stream(model, mode, item, sampling)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def voice_prompt(self, model: LoadedModel, ref: ReferenceAudio) -> VoicePrompt:
        return await self._owner(model).voice_prompt(model, ref)

    async def stored_voice_prompt(
        self, model: LoadedModel, cache_key: str, load: Callable[[str], VoicePrompt]
    ) -> VoicePrompt:
        return await self._owner(model).stored_voice_prompt(model, cache_key, load)

    def frame_limit(self, info: ModelInfo, sampling: SamplingParams) -> int:
        return self.synthesizers[0].frame_limit(info, sampling)

    # ----- every device -----
    async def load(self, name: str) -> LoadedModel:
        """Load the model on every device and start its engines; the first device's model is returned.
        One not on disk starts downloading instead (ModelDownloading, as with one device)."""
        key = self.registry.key(name)
        if not self.synthesizers[0].registry.is_local(key):
            return await self.synthesizers[0].registry.get(key)
        results = await asyncio.gather(
            *(self._bring_up(i, key) for i in range(len(self.synthesizers))), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results[0]  # type: ignore[return-value]  # every result is a LoadedModel here

    async def unload(self, name: str) -> bool:
        """Unload the model from every device (see `ModelRegistry.unload`); True if any had it."""
        key = self.registry.key(name)
        warming = [task for (_, k), task in list(self._warming.items()) if k == key]
        if warming:  # a device still coming up would keep the model after this unload
            await asyncio.gather(*warming, return_exceptions=True)
        return any(await asyncio.gather(*(synthesizer.unload(key) for synthesizer in self.synthesizers)))

    @property
    def queue_depth(self) -> int:
        return sum(synthesizer.queue_depth for synthesizer in self.synthesizers)

    @property
    def engine_failures(self) -> dict[str, str]:
        """Every device's models whose engine a device fault stopped (see Synthesizer.restart)."""
        return {
            f"{name} on {synthesizer.registry.options.device}": message
            for synthesizer in self.synthesizers
            for name, message in synthesizer.engine_failures.items()
        }

    def device_loads(self) -> list[dict[str, Any]]:
        return [synthesizer.load_report() for synthesizer in self.synthesizers]

    def batch_sizes(self) -> list[int]:
        return [size for synthesizer in self.synthesizers for size in synthesizer.batch_sizes()]

    def close(self) -> None:
        """Stop every synthesizer. Called from a worker thread while the event loop waits: background
        bring-ups are cancelled on the loop."""
        if self._loop is not None:
            for task in list(self._warming.values()):
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.call_soon_threadsafe(task.cancel)
        for synthesizer in self.synthesizers:
            synthesizer.close()


class PoolGate:
    """The pool's admission state as /ready reads it."""

    def __init__(self, synthesizers: list[Synthesizer]) -> None:
        self._synthesizers = synthesizers

    def saturated(self) -> list[str]:
        """Models every device would refuse: saturated wherever loaded, and on no device that could
        still take them (a device without the model loads it for the next request instead)."""
        return sorted(set.intersection(*(set(s.gate.saturated()) for s in self._synthesizers)))


class PoolRegistry:
    """The model registry's face over every device: names and downloads through the first device's
    registry, states and memory from all of them (a model is loaded on a list of devices)."""

    def __init__(self, pool: DevicePool) -> None:
        self._pool = pool
        self.settings = pool.settings

    @property
    def _registries(self) -> list[ModelRegistry]:
        return [s.registry for s in self._pool.synthesizers]

    @property
    def _primary(self) -> ModelRegistry:
        return self._pool.synthesizers[0].registry

    @property
    def options(self) -> RuntimeOptions:
        """The first device's options, naming every device (e.g. `cuda:0,cuda:1`)."""
        devices = ",".join(r.options.device for r in self._registries)
        return dataclasses.replace(self._primary.options, device=devices)

    # names and paths: the same on every device
    def key(self, name: str) -> str:
        try:
            return self._primary.key(name)
        except NotFound:  # loaded on another device, and gone from disk and configuration since
            for registry in self._registries[1:]:
                with contextlib.suppress(NotFound):
                    return registry.key(name)
            raise

    def canonical_name(self, name: str) -> str:
        return self._primary.canonical_name(name)

    def known_names(self) -> list[str]:
        return self._primary.known_names()

    def configured_names(self) -> list[str]:
        return self._primary.configured_names()

    def local_names(self) -> list[str]:
        return self._primary.local_names()

    def is_local(self, key: str) -> bool:
        return self._primary.is_local(key)

    def local_path(self, name: str) -> Path:
        return self._primary.local_path(name)

    def download(self, name: str) -> Path:
        return self._primary.download(name)

    def resolve(self, name: str) -> Path:
        return self._primary.resolve(name)

    def startup_report(self) -> list[str]:
        devices = ", ".join(r.options.device for r in self._registries)
        line = (
            f"devices: {devices}, one engine each; a request goes to the device with a free row and the fewest "
            "items in flight for the model, and a model is brought up on another device when its devices' rows "
            "are busy (QTTS_MEMORY_BUDGET_GB applies per device)"
        )
        return [line, *self._primary.startup_report()]

    # loading
    async def get(self, name: str) -> LoadedModel:
        """The model on the device a request for it would go to (loading it there if need be)."""
        return await self._pool.route(name).registry.get(name)

    async def unload(self, name: str) -> bool:
        return await self._pool.unload(name)

    # state
    def loaded(self) -> list[LoadedModel]:
        """Every device's loaded models (a model loaded on two devices is here twice)."""
        return [model for registry in self._registries for model in registry.loaded()]

    def used_bytes(self) -> int:
        return sum(r.used_bytes() for r in self._registries)

    def reserved_bytes(self) -> int:
        return sum(r.reserved_bytes() for r in self._registries)

    def statuses(self) -> list[ModelStatus]:
        by_name: dict[str, list[ModelStatus]] = {}
        for registry in self._registries:
            for status in registry.statuses():
                by_name.setdefault(status.name, []).append(status)
        return [merge_statuses(statuses) for statuses in by_name.values()]

    def status(self, name: str) -> ModelStatus:
        key = self.key(name)
        statuses = []
        for registry in self._registries:
            with contextlib.suppress(NotFound):
                statuses.append(registry.status(key))
        return merge_statuses(statuses)


def merge_statuses(statuses: list[ModelStatus]) -> ModelStatus:
    """One model's state over the devices: loaded wherever it is loaded (`device` lists them, memory is
    their sum); else downloading, loading or failed on any device; else available."""
    loaded = [s for s in statuses if s.state is ModelState.LOADED]
    if loaded:
        return dataclasses.replace(
            loaded[0],
            device=",".join(s.device or "" for s in loaded),
            memory_bytes=sum(s.memory_bytes or 0 for s in loaded),
            last_used=max(s.last_used or 0.0 for s in loaded),
        )
    for state in (ModelState.DOWNLOADING, ModelState.LOADING, ModelState.FAILED):
        for status in statuses:
            if status.state is state:
                return status
    return statuses[0]
