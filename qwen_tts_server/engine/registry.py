"""Model registry: find a checkpoint, load it lazily, keep loaded models within a memory budget.

Resolution order for a model name: `<models_dir>/<name>` (the Docker volume shared with
ComfyUI), then a download from Hugging Face (`<hub_org>/<name>`) or ModelScope into that same
directory, so the next start finds it locally. A model that cannot be found or loaded is a 503
for requests that need it; other models keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import InvalidRequest, ModelUnavailable
from .types import ModelInfo

log = logging.getLogger(__name__)

PUBLISHED_MODELS: tuple[str, ...] = (
    "Qwen3-TTS-12Hz-1.7B-CustomVoice",
    "Qwen3-TTS-12Hz-0.6B-CustomVoice",
    "Qwen3-TTS-12Hz-1.7B-VoiceDesign",
    "Qwen3-TTS-12Hz-1.7B-Base",
    "Qwen3-TTS-12Hz-0.6B-Base",
)
_NAME_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelState(str, Enum):
    AVAILABLE = "available"  # known (published or on disk), not loaded
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass
class LoadedModel:
    """A loaded checkpoint and what the engine needs to know about it."""

    name: str
    path: Path
    tts: Any  # qwen_tts.Qwen3TTSModel
    info: ModelInfo
    memory_bytes: int
    device: str
    dtype: str
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    active: int = 0  # batches running on it; an active model is never unloaded


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: ModelState
    path: str | None = None
    memory_bytes: int | None = None
    device: str | None = None
    dtype: str | None = None
    model_type: str | None = None
    last_used: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how models run, resolved once from settings."""

    device: str
    dtype: str  # float32 | bfloat16 | float16
    attn_implementation: str

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        import torch

        device = settings.device
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        attn = settings.attn_implementation
        if attn == "auto":
            attn = "flash_attention_2" if device.startswith("cuda") and _has_flash_attn() else "sdpa"
        return cls(device=device, dtype=dtype, attn_implementation=attn)


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


Loader = Callable[[Path, RuntimeOptions], Any]


def load_upstream(path: Path, options: RuntimeOptions) -> Any:
    """Load a checkpoint directory through upstream `Qwen3TTSModel.from_pretrained`."""
    import torch
    from qwen_tts import Qwen3TTSModel

    return Qwen3TTSModel.from_pretrained(
        str(path),
        device_map=options.device,
        dtype=getattr(torch, options.dtype),
        attn_implementation=options.attn_implementation,
    )


def describe(name: str, tts: Any) -> ModelInfo:
    """Read what a loaded upstream model supports from its config."""
    model = tts.model
    size = str(model.tts_model_size or "")
    speakers = tuple(sorted(str(s).lower() for s in (model.get_supported_speakers() or ())))
    languages = tuple(str(x).lower() for x in (model.get_supported_languages() or ("auto",)))
    defaults = tts.generate_defaults or {}
    return ModelInfo(
        name=name,
        model_type=str(model.tts_model_type),
        size=size,
        speakers=speakers,
        languages=languages,
        # 0.6B CustomVoice checkpoints ignore instruct upstream; say so instead of dropping it.
        accepts_instruct=not (model.tts_model_type == "custom_voice" and size == "0b6"),
        sample_rate=int(model.speech_tokenizer.get_output_sample_rate()),
        max_new_tokens_default=defaults.get("max_new_tokens"),
    )


def memory_of(tts: Any) -> int:
    """Bytes held by the model's parameters and buffers, codec included."""
    total = 0
    modules = [tts.model]
    codec = getattr(tts.model, "speech_tokenizer", None)
    if codec is not None and getattr(codec, "model", None) is not None:
        modules.append(codec.model)
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            total += tensor.numel() * tensor.element_size()
    return total


def estimate_memory(path: Path, dtype: str) -> int:
    """Bytes a checkpoint will take once loaded, from its safetensors headers (no weights read)."""
    from safetensors import safe_open

    itemsize = 4 if dtype == "float32" else 2
    total = 0
    for file in sorted(path.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                numel = 1
                for dim in handle.get_slice(key).get_shape():
                    numel *= dim
                total += numel * itemsize
    return total


class ModelRegistry:
    """Resolves, loads and unloads models; one per process, shared by all requests."""

    def __init__(self, settings: Settings, *, loader: Loader = load_upstream) -> None:
        self.settings = settings
        self.options = RuntimeOptions.from_settings(settings)
        self._loader = loader
        self._loaded: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._idle = asyncio.Condition()
        self._budget_lock = asyncio.Lock()
        self._reserved: dict[str, int] = {}  # bytes promised to loads in flight, counted in the budget
        self.load_count = 0  # successful loads; for tests and metrics
        self.on_load: Callable[[str, bool, float], None] | None = None  # (name, ok, seconds)
        self.on_unload: Callable[[str], None] | None = None  # release what was built on the model

    # ----- names and paths -----
    def canonical_name(self, name: str) -> str:
        """`Qwen/Qwen3-TTS-12Hz-1.7B-Base` and `Qwen3-TTS-12Hz-1.7B-Base` are one model."""
        name = name.strip()
        if not _NAME_RE.match(name) or ".." in name:
            raise InvalidRequest(
                f"model '{name}' is not a valid model name: use a checkpoint folder name such as "
                f"'{PUBLISHED_MODELS[0]}' (letters, digits, '.', '_', '-', optionally 'org/name')",
                field="model",
            )
        return name.rsplit("/", 1)[-1]

    def local_path(self, name: str) -> Path:
        return self.settings.models_dir / self.canonical_name(name)

    def resolve(self, name: str) -> Path:
        """Find the checkpoint on disk, downloading it if allowed. Runs in a worker thread."""
        local = self.local_path(name)
        if (local / "config.json").is_file():
            return local
        source = self.settings.download_source
        repo_id = name if "/" in name else f"{self.settings.hub_org}/{name}"
        if source == "none":
            raise ModelUnavailable(
                f"model '{name}' was not found at {local} and downloads are disabled "
                "(QTTS_DOWNLOAD_SOURCE=none): put the checkpoint folder there or enable downloads",
                field="model",
            )
        try:
            if source == "huggingface":
                from huggingface_hub import snapshot_download

                snapshot_download(repo_id=repo_id, local_dir=str(local))
            else:
                try:
                    from modelscope import snapshot_download as ms_snapshot_download
                except ImportError as exc:
                    raise ModelUnavailable(
                        "QTTS_DOWNLOAD_SOURCE=modelscope needs the optional extra: "
                        "pip install 'qwen-tts-server[modelscope]'",
                        field="model",
                    ) from exc
                ms_snapshot_download(repo_id, local_dir=str(local))
        except ModelUnavailable:
            raise
        except Exception as exc:  # network, auth, missing repo: all mean "not available"
            raise ModelUnavailable(
                f"model '{name}' is not in {self.settings.models_dir} and could not be downloaded "
                f"from {source} ({repo_id}): {type(exc).__name__}: {exc}",
                field="model",
            ) from exc
        if not (local / "config.json").is_file():
            raise ModelUnavailable(f"download of '{repo_id}' has no config.json", field="model")
        return local

    # ----- loading -----
    async def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it on first use. Concurrent first calls load it once."""
        key = self.canonical_name(name)
        model = self._loaded.get(key)
        if model is not None:
            model.last_used = time.time()
            return model
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(name, key))
            self._loading[key] = task
            task.add_done_callback(lambda _t, k=key: self._loading.pop(k, None))
        return await asyncio.shield(task)

    async def _load(self, name: str, key: str) -> LoadedModel:
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.resolve, name)
            await self._make_room(key, await asyncio.to_thread(estimate_memory, path, self.options.dtype))
            tts = await asyncio.to_thread(self._loader, path, self.options)
            info = describe(key, tts)
        except ModelUnavailable as exc:
            self._reserved.pop(key, None)
            self._errors[key] = exc.message
            self._report(key, False, started)
            raise
        except Exception as exc:
            self._reserved.pop(key, None)
            message = f"model '{key}' could not be loaded: {type(exc).__name__}: {exc}"
            log.exception("model load failed", extra={"model": key})
            self._errors[key] = message
            self._report(key, False, started)
            raise ModelUnavailable(message, field="model") from exc
        self._reserved.pop(key, None)
        model = LoadedModel(
            name=key,
            path=path,
            tts=tts,
            info=info,
            memory_bytes=memory_of(tts),
            device=self.options.device,
            dtype=self.options.dtype,
        )
        self._loaded[key] = model
        self._errors.pop(key, None)
        self.load_count += 1
        self._report(key, True, started)
        log.info("model loaded", extra={"model": key, "seconds": round(time.perf_counter() - started, 3)})
        return model

    def _report(self, key: str, ok: bool, started: float) -> None:
        if self.on_load is not None:
            self.on_load(key, ok, time.perf_counter() - started)

    async def _make_room(self, key: str, needed: int) -> None:
        """Unload idle models, least recently used first, until `needed` more bytes fit."""
        budget_gb = self.settings.memory_budget_gb
        if budget_gb is None:
            return
        budget = int(budget_gb * 1024**3)
        async with self._budget_lock:
            if needed > budget:
                raise ModelUnavailable(
                    f"model '{key}' needs about {needed / 1024**3:.2f} GB, more than the whole memory "
                    f"budget (QTTS_MEMORY_BUDGET_GB={budget_gb})",
                    field="model",
                )
            while self.used_bytes() + self.reserved_bytes() + needed > budget:
                idle = sorted((m for m in self._loaded.values() if m.active == 0), key=lambda m: m.last_used)
                if not idle:
                    raise ModelUnavailable(
                        f"model '{key}' needs about {needed / 1024**3:.2f} GB but the memory budget "
                        f"({budget_gb} GB) is held by models that are busy or loading; retry shortly",
                        field="model",
                    )
                log.info("unloading to fit budget", extra={"model": idle[0].name, "for_model": key})
                self._drop(idle[0].name)
            self._reserved[key] = needed  # until the load ends: a concurrent load cannot take it too

    def used_bytes(self) -> int:
        return sum(m.memory_bytes for m in self._loaded.values())

    def reserved_bytes(self) -> int:
        """Bytes promised to loads still in flight."""
        return sum(self._reserved.values())

    def add_memory(self, name: str, nbytes: int) -> None:
        """Count memory a loaded model's engine allocated (its KV cache) against the budget too."""
        model = self._loaded.get(self.canonical_name(name))
        if model is not None:
            model.memory_bytes += nbytes

    async def load(self, name: str) -> LoadedModel:
        return await self.get(name)

    async def unload(self, name: str) -> bool:
        """Unload a model once the batches running on it finish. False if it was not loaded."""
        key = self.canonical_name(name)
        async with self._idle:
            await self._idle.wait_for(lambda: key not in self._loaded or self._loaded[key].active == 0)
            if key not in self._loaded:
                return False
            self._drop(key)
            return True

    def _drop(self, key: str) -> None:
        if self._loaded.pop(key, None) is not None and self.on_unload is not None:
            self.on_unload(key)
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @contextlib.asynccontextmanager
    async def using(self, model: LoadedModel) -> AsyncIterator[LoadedModel]:
        """Mark a model busy for the duration of a batch, so it is not unloaded under it."""
        model.active += 1
        model.last_used = time.time()
        try:
            yield model
        finally:
            model.active -= 1
            async with self._idle:
                self._idle.notify_all()

    # ----- listing -----
    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def statuses(self) -> list[ModelStatus]:
        names: list[str] = list(PUBLISHED_MODELS)
        models_dir = self.settings.models_dir
        if models_dir.is_dir():
            for child in sorted(models_dir.iterdir()):
                # Folders whose names no request could use (spaces, leading dots) are not models here.
                usable = _NAME_RE.match(child.name) and ".." not in child.name
                if usable and (child / "config.json").is_file() and child.name not in names:
                    names.append(child.name)
        for key in list(self._loaded) + list(self._errors):
            if key not in names:
                names.append(key)
        return [self.status(n) for n in names]

    def status(self, name: str) -> ModelStatus:
        key = self.canonical_name(name)
        local = self.local_path(key)
        path = str(local) if (local / "config.json").is_file() else None
        model = self._loaded.get(key)
        if model is not None:
            return ModelStatus(
                name=key,
                state=ModelState.LOADED,
                path=str(model.path),
                memory_bytes=model.memory_bytes,
                device=model.device,
                dtype=model.dtype,
                model_type=model.info.model_type,
                last_used=model.last_used,
            )
        if key in self._loading:
            return ModelStatus(name=key, state=ModelState.LOADING, path=path)
        if key in self._errors:
            return ModelStatus(name=key, state=ModelState.FAILED, path=path, error=self._errors[key])
        return ModelStatus(name=key, state=ModelState.AVAILABLE, path=path)
