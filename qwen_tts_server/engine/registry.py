"""Model registry: which names are models, where their checkpoints are, loading them lazily, and
keeping loaded models within a memory budget.

Only known names resolve: the published checkpoints, names the operator lists in
`QTTS_EXTRA_MODELS`, and folders with a `config.json` already under `QTTS_MODELS_DIR` (the Docker
volume shared with ComfyUI). `Qwen/<name>` is `<name>` when `Qwen` is the configured hub org; any
other org, or any other name, is a 404 that lists the known names: it reaches no hub, and leaves no
entry or metric series behind. A known checkpoint that is not on disk is downloaded from the
configured org only (`QTTS_HUB_ORG/<name>`, only the published layout's files), in the background:
requests meanwhile get a 503 with the progress and a Retry-After, and the listing shows the bytes.
The download lands in a hidden staging folder and is moved into place when complete, so a half
downloaded folder is never taken for a checkpoint. A model that cannot be found or loaded is a 503
for requests that need it; other models keep serving.

Unloading stops admitting work for the model at once (new requests get a 503 with Retry-After until
it is gone, then load it again on demand), waits up to `QTTS_UNLOAD_TIMEOUT_S` for the work running
on it, and only returns once what was built on it (its fast engine: KV cache, graphs) is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import InvalidRequest, ModelUnavailable, NotFound, ServiceError
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
# The files of a published checkpoint: configs, tokenizer (vocab.json, merges.txt) and safetensors
# weights, the speech tokenizer's included. Nothing executable (no .py, no pickled .bin/.pt) is fetched.
HUB_FILES: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")
DOWNLOAD_RETRY_AFTER_S = 5  # what a request for a model being downloaded is told
DOWNLOAD_FAILED_BACKOFF_S = 30.0  # a failed download is not retried (by requests) sooner than this
UNLOAD_RETRY_AFTER_S = 2
PROGRESS_POLL_S = 1.0
PROGRESS_LOG_S = 10.0


class ModelState(str, Enum):
    AVAILABLE = "available"  # known (published, configured or on disk), not loaded
    DOWNLOADING = "downloading"
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
    unloaded: bool = False  # set when it leaves the registry: it takes no new work


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
    download: dict[str, Any] | None = None  # while downloading: source, repo_id, bytes_done, bytes_total, percent


@dataclass
class DownloadProgress:
    """A download in flight; `bytes_done` is read from the staging folder as it fills."""

    name: str
    source: str
    repo_id: str
    staging: Path
    started: float = field(default_factory=time.time)
    bytes_done: int = 0
    bytes_total: int | None = None  # from the hub's file list, when it gives sizes

    @property
    def percent(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    def describe(self) -> str:
        done = _size(self.bytes_done)
        if self.percent is None:
            return f"{done} so far"
        return f"{self.percent:.0f}% ({done} of {_size(self.bytes_total or 0)})"

    def to_dict(self) -> dict[str, Any]:
        percent = self.percent
        return {
            "source": self.source,
            "repo_id": self.repo_id,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "percent": None if percent is None else round(percent, 1),
            "started_at": self.started,
        }


class ModelDownloading(ModelUnavailable):
    """The model is being downloaded: a 503 with Retry-After, and the progress so far."""

    def __init__(self, message: str, progress: DownloadProgress) -> None:
        super().__init__(message, field="model")
        self.progress = progress
        self.retry_after_s = DOWNLOAD_RETRY_AFTER_S


def _unavailable(message: str, retry_after_s: int | None = None) -> ModelUnavailable:
    exc = ModelUnavailable(message, field="model")
    if retry_after_s is not None:
        exc.retry_after_s = retry_after_s  # type: ignore[attr-defined]  # read by the error handler
    return exc


def gone(name: str) -> ModelUnavailable:
    """What a request gets for a model that left the registry after the request looked it up."""
    return _unavailable(
        f"model '{name}' was unloaded before this request could use it; retry (it loads again on demand)",
        UNLOAD_RETRY_AFTER_S,
    )


def _size(nbytes: int) -> str:
    if nbytes >= 1024**3:
        return f"{nbytes / 1024**3:.2f} GB"
    return f"{nbytes / 1024**2:.1f} MB"


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (partial downloads included); 0 if it does not exist."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# (source, repo_id, destination folder, progress or None) -> None; raises on failure.
Downloader = Callable[[str, str, Path, "DownloadProgress | None"], None]


def hub_download(source: str, repo_id: str, dest: Path, progress: DownloadProgress | None) -> None:
    """Fetch a checkpoint's files (HUB_FILES only) from Hugging Face or ModelScope into `dest`.

    With `progress` (the server), the hub's own progress bars are turned off (the registry logs and
    reports progress itself) and the expected total is read from the hub's file list first; without
    it (the CLI), the hub's progress bars show."""
    if source == "huggingface":
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.utils import disable_progress_bars, filter_repo_objects

        if progress is not None:
            disable_progress_bars()
            with contextlib.suppress(Exception):  # sizes are a nicety; the download says what failed
                info = HfApi().model_info(repo_id, files_metadata=True)
                siblings = {s.rfilename: s.size or 0 for s in info.siblings or ()}
                wanted = filter_repo_objects(list(siblings), allow_patterns=list(HUB_FILES))
                progress.bytes_total = sum(siblings[name] for name in wanted) or None
        snapshot_download(repo_id=repo_id, local_dir=str(dest), allow_patterns=list(HUB_FILES))
        return
    try:
        from modelscope import snapshot_download as ms_snapshot_download
    except ImportError as exc:
        raise ModelUnavailable(
            "QTTS_DOWNLOAD_SOURCE=modelscope needs the optional extra: pip install 'qwen-tts-server[modelscope]'",
            field="model",
        ) from exc
    ms_snapshot_download(repo_id, local_dir=str(dest), allow_patterns=list(HUB_FILES))


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

# `from_pretrained` is not thread-safe: transformers builds the model under process-wide patches (meta
# device, skipped weight init), so two loads at once (two models, or one model on two devices of a
# device pool) can leave one with meta tensors. One load at a time, per process.
_LOAD_LOCK = threading.Lock()


def load_upstream(path: Path, options: RuntimeOptions) -> Any:
    """Load a checkpoint directory through upstream `Qwen3TTSModel.from_pretrained`."""
    import torch
    from qwen_tts import Qwen3TTSModel

    with _LOAD_LOCK:
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
    """Resolves, downloads, loads and unloads models; one per process, shared by all requests."""

    def __init__(
        self, settings: Settings, *, loader: Loader = load_upstream, downloader: Downloader | None = None
    ) -> None:
        self.settings = settings
        self.options = RuntimeOptions.from_settings(settings)
        self._loader = loader
        self._downloader = downloader or hub_download
        self._loaded: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._failed_at: dict[str, float] = {}  # when a download failed (monotonic), for its back-off
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._downloads: dict[str, DownloadProgress] = {}
        self._download_tasks: dict[str, asyncio.Task[None]] = {}
        self._unloading: dict[str, asyncio.Task[bool]] = {}
        self._idle = asyncio.Condition()
        self._budget_lock = asyncio.Lock()
        self._reserved: dict[str, int] = {}  # bytes promised to loads in flight, counted in the budget
        self.load_count = 0  # successful loads; for tests and metrics
        self.on_load: Callable[[str, bool, float], None] | None = None  # (name, ok, seconds)
        # Release what was built on the model (its fast engine); may be a coroutine function, awaited
        # before unload returns.
        self.on_unload: Callable[[str], Awaitable[None] | None] | None = None

    # ----- names and paths -----
    def canonical_name(self, name: str) -> str:
        """The model's key: `Qwen/Qwen3-TTS-12Hz-1.7B-Base` (with `Qwen` the configured hub org) and
        `Qwen3-TTS-12Hz-1.7B-Base` are one model. A name with another org is no model here (404)."""
        name = name.strip()
        if not _NAME_RE.match(name) or ".." in name:
            raise InvalidRequest(
                f"model '{name}' is not a valid model name: use a checkpoint folder name such as "
                f"'{PUBLISHED_MODELS[0]}' (letters, digits, '.', '_', '-', optionally '{self.settings.hub_org}/name')",
                field="model",
            )
        org, _, base = name.rpartition("/")
        if org and org.casefold() != self.settings.hub_org.casefold():
            raise self._unknown(name, f"models come only from the configured organisation '{self.settings.hub_org}'")
        return base

    def configured_names(self) -> list[str]:
        """The published names and the operator's QTTS_EXTRA_MODELS, in that order."""
        names = list(PUBLISHED_MODELS)
        for extra in self.settings.extra_models:
            org, _, base = extra.strip().rpartition("/")
            if not base or (org and org.casefold() != self.settings.hub_org.casefold()):
                continue  # another org's name cannot be downloaded from ours; `_unknown` lists what is
            if _NAME_RE.match(base) and ".." not in base and base not in names:
                names.append(base)
        return names

    def local_names(self) -> list[str]:
        """Folders under models_dir with a config.json whose names a request can use."""
        models_dir = self.settings.models_dir
        if not models_dir.is_dir():
            return []
        found = []
        for child in sorted(models_dir.iterdir()):
            # Folders whose names no request could use (spaces, leading dots: staging) are not models here.
            if _NAME_RE.match(child.name) and ".." not in child.name and (child / "config.json").is_file():
                found.append(child.name)
        return found

    def known_names(self) -> list[str]:
        return list(dict.fromkeys([*self.configured_names(), *self.local_names()]))

    def key(self, name: str) -> str:
        """The canonical name of a known model; NotFound (404, listing the known names) otherwise.
        Looks at nothing but the configuration and the models folder: no hub is asked."""
        key = self.canonical_name(name)
        if key in self._loaded or key in self.configured_names() or self.is_local(key):
            return key
        raise self._unknown(name)

    def _unknown(self, name: str, why: str | None = None) -> NotFound:
        reason = f" ({why})" if why else ""
        return NotFound(
            f"model '{name}' is not known to this server{reason}; known models: {', '.join(self.known_names())}. "
            f"Put a checkpoint folder under {self.settings.models_dir}, or list a name of "
            f"{self.settings.hub_org}'s in QTTS_EXTRA_MODELS",
            field="model",
        )

    def local_path(self, name: str) -> Path:
        return self.settings.models_dir / self.canonical_name(name)

    def is_local(self, key: str) -> bool:
        return (self.settings.models_dir / key / "config.json").is_file()

    def _staging(self, key: str) -> Path:
        return self.settings.models_dir / f".{key}.download"

    # ----- downloads -----
    def resolve(self, name: str) -> Path:
        """The checkpoint folder on disk, downloading it first if allowed (blocking: the CLI, threads)."""
        return self.download(name)

    def download(self, name: str, progress: DownloadProgress | None = None) -> Path:
        """Fetch a known model from the configured org into `<models_dir>/<name>` (through a staging
        folder, moved into place once complete). Blocking; raises ModelUnavailable saying why."""
        key = self.key(name)
        local = self.settings.models_dir / key
        if self.is_local(key):
            return local
        source = self.settings.download_source
        if source == "none":
            raise ModelUnavailable(
                f"model '{key}' was not found at {local} and downloads are disabled "
                "(QTTS_DOWNLOAD_SOURCE=none): put the checkpoint folder there or enable downloads",
                field="model",
            )
        if local.exists() and (not local.is_dir() or any(local.iterdir())):
            raise ModelUnavailable(
                f"{local} exists but holds no checkpoint (no config.json): complete it, or remove it so "
                f"'{key}' can be downloaded",
                field="model",
            )
        repo_id = f"{self.settings.hub_org}/{key}"
        staging = self._staging(key)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._downloader(source, repo_id, staging, progress)
        except ModelUnavailable:
            raise
        except Exception as exc:  # network, auth, missing repo: all mean "not available"
            raise ModelUnavailable(
                f"model '{key}' is not in {self.settings.models_dir} and could not be downloaded "
                f"from {source} ({repo_id}): {type(exc).__name__}: {exc}",
                field="model",
            ) from exc
        if not (staging / "config.json").is_file():
            raise ModelUnavailable(f"the download of '{repo_id}' has no config.json", field="model")
        with contextlib.suppress(FileNotFoundError):
            local.rmdir()  # an empty folder left by hand or by an older version
        os.replace(staging, local)
        return local

    def _start_download(self, key: str) -> DownloadProgress:
        source = self.settings.download_source
        progress = DownloadProgress(key, source, f"{self.settings.hub_org}/{key}", self._staging(key))
        self._downloads[key] = progress
        self._errors.pop(key, None)
        task = asyncio.ensure_future(self._download_in_background(key, progress))
        self._download_tasks[key] = task
        task.add_done_callback(lambda _t, k=key: self._download_tasks.pop(k, None))
        log.info(
            f"model {key} is not in {self.settings.models_dir}: downloading it from {source} ({progress.repo_id})",
            extra={"model": key, "source": source, "repo_id": progress.repo_id},
        )
        return progress

    async def _download_in_background(self, key: str, progress: DownloadProgress) -> None:
        """Run the download on a daemon thread (a stop of the server does not wait for it), reading the
        bytes so far from the staging folder every second, logging them every few seconds."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def work() -> None:
            outcome: BaseException | None = None
            try:
                self.download(key, progress)
            except BaseException as exc:  # handed to the event loop, which reports it
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the server stopped meanwhile: nobody to tell
                loop.call_soon_threadsafe(_settle_future, done, outcome)

        threading.Thread(target=work, name=f"qtts-download-{key}", daemon=True).start()
        started = time.perf_counter()
        logged = started
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), PROGRESS_POLL_S)
                if not done.done() and progress.staging.exists():
                    progress.bytes_done = await asyncio.to_thread(dir_bytes, progress.staging)
                if done.done():
                    break
                if time.perf_counter() - logged >= PROGRESS_LOG_S:
                    logged = time.perf_counter()
                    log.info(
                        f"downloading model {key}: {progress.describe()}",
                        extra={"model": key, "bytes_done": progress.bytes_done, "bytes_total": progress.bytes_total},
                    )
            done.result()
        except ServiceError as exc:
            self._download_failed(key, exc.message, started)
        except Exception as exc:
            self._download_failed(key, f"model '{key}' could not be downloaded: {type(exc).__name__}: {exc}", started)
        else:
            self._failed_at.pop(key, None)
            seconds = time.perf_counter() - started
            log.info(
                f"model {key} downloaded ({_size(dir_bytes(self.settings.models_dir / key))} in {seconds:.0f} s)",
                extra={"model": key, "seconds": round(seconds, 1)},
            )
        finally:
            self._downloads.pop(key, None)

    def _download_failed(self, key: str, message: str, started: float) -> None:
        self._errors[key] = message
        self._failed_at[key] = time.monotonic()
        self._report(key, False, started)
        log.warning(f"download of model {key} failed: {message}", extra={"model": key})

    def _missing(self, key: str) -> ModelUnavailable:
        """What a request for a known model that is not on disk gets: downloads off, a download in
        progress (started now if need be), or the last download's failure during its back-off."""
        if self.settings.download_source == "none":
            local = self.settings.models_dir / key
            return ModelUnavailable(
                f"model '{key}' was not found at {local} and downloads are disabled "
                "(QTTS_DOWNLOAD_SOURCE=none): put the checkpoint folder there or enable downloads",
                field="model",
            )
        progress = self._downloads.get(key)
        if progress is None:
            failed_at = self._failed_at.get(key)
            if failed_at is not None and time.monotonic() - failed_at < DOWNLOAD_FAILED_BACKOFF_S:
                left = DOWNLOAD_FAILED_BACKOFF_S - (time.monotonic() - failed_at)
                return _unavailable(
                    f"{self._errors.get(key, 'download failed')} (retried in {left:.0f} s)", 1 + int(left)
                )
            progress = self._start_download(key)
        return ModelDownloading(
            f"model '{key}' is downloading from {progress.source} ({progress.repo_id}), {progress.describe()}; "
            "retry in a moment",
            progress,
        )

    # ----- loading -----
    async def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it on first use (concurrent first calls load it once). A known
        model that is not on disk starts downloading in the background: ModelDownloading (503)."""
        key = self.key(name)
        if key in self._unloading:
            raise self._being_unloaded(key)
        model = self._loaded.get(key)
        if model is not None:
            model.last_used = time.time()
            return model
        task = self._loading.get(key)
        if task is None:
            if not self.is_local(key):
                raise self._missing(key)
            task = asyncio.ensure_future(self._load(key))
            self._loading[key] = task
            task.add_done_callback(lambda _t, k=key: self._loading.pop(k, None))
        return await asyncio.shield(task)

    def _being_unloaded(self, key: str) -> ModelUnavailable:
        return _unavailable(
            f"model '{key}' is being unloaded; retry in a moment (it loads again on demand)", UNLOAD_RETRY_AFTER_S
        )

    async def _load(self, key: str) -> LoadedModel:
        started = time.perf_counter()
        path = self.settings.models_dir / key
        try:
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
                idle = sorted(
                    (m for m in self._loaded.values() if m.active == 0 and m.name not in self._unloading),
                    key=lambda m: m.last_used,
                )
                if not idle:
                    raise _unavailable(
                        f"model '{key}' needs about {needed / 1024**3:.2f} GB but the memory budget "
                        f"({budget_gb} GB) is held by models that are busy or loading; retry shortly",
                        UNLOAD_RETRY_AFTER_S,
                    )
                log.info("unloading to fit budget", extra={"model": idle[0].name, "for_model": key})
                await self._drop(idle[0].name)
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

    def is_current(self, model: LoadedModel) -> bool:
        """The model is loaded (this load of it, not an earlier one) and not being unloaded."""
        return not model.unloaded and self._loaded.get(model.name) is model and model.name not in self._unloading

    def holds(self, model: LoadedModel) -> bool:
        """This registry loaded `model` and still has it (a device pool finds a model's engine by this)."""
        return self._loaded.get(model.name) is model

    def loaded_model(self, key: str) -> LoadedModel | None:
        """The model loaded under this key, if any; never loads."""
        return self._loaded.get(key)

    def is_loading(self, key: str) -> bool:
        return key in self._loading

    def is_unloading(self, key: str) -> bool:
        return key in self._unloading

    # ----- unloading -----
    async def unload(self, name: str) -> bool:
        """Unload a model: no new work from now on, running work gets up to `unload_timeout_s`, then
        its engine is stopped and released. Returns once the memory is freed; False if it was not loaded."""
        key = self.key(name)
        task = self._unloading.get(key)
        if task is None:
            model = self._loaded.get(key)
            if model is None:
                return False
            task = asyncio.ensure_future(self._unload(key, model))
            self._unloading[key] = task
            task.add_done_callback(lambda _t, k=key: self._unloading.pop(k, None))
        return await asyncio.shield(task)

    async def _unload(self, key: str, model: LoadedModel) -> bool:
        timeout_s = self.settings.unload_timeout_s
        async with self._idle:
            try:
                if model.active:
                    await asyncio.wait_for(self._idle.wait_for(lambda: model.active == 0), timeout_s)
            except asyncio.TimeoutError:
                log.warning(
                    f"model {key} still has work running after {timeout_s:g} s; unloading it anyway (that work fails)",
                    extra={"model": key, "active": model.active},
                )
        if self._loaded.get(key) is not model:
            return False  # evicted meanwhile
        await self._drop(key)
        return True

    async def _drop(self, key: str) -> None:
        """Remove the model, release what was built on it (awaited), then return its memory to the
        allocator, off the event loop."""
        model = self._loaded.pop(key, None)
        if model is None:
            return
        model.unloaded = True
        if self.on_unload is not None:
            released = self.on_unload(key)
            if inspect.isawaitable(released):
                await released
        del model
        await asyncio.to_thread(release_memory)
        log.info("model unloaded", extra={"model": key})

    @contextlib.asynccontextmanager
    async def using(self, model: LoadedModel) -> AsyncIterator[LoadedModel]:
        """Mark a model busy for the duration of a batch, so it is not unloaded under it.

        A model unloaded (or being unloaded) since the request looked it up takes no new work: a 503
        with Retry-After. Work that an unload stopped after its time-out fails with a 503 too."""
        if not self.is_current(model):
            raise gone(model.name)
        model.active += 1
        model.last_used = time.time()
        try:
            yield model
        except ServiceError:
            raise
        except Exception as exc:
            if model.unloaded:
                raise _unavailable(
                    f"model '{model.name}' was unloaded while this request was in progress; retry",
                    UNLOAD_RETRY_AFTER_S,
                ) from exc
            raise
        finally:
            model.active -= 1
            async with self._idle:
                self._idle.notify_all()

    # ----- listing -----
    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def statuses(self) -> list[ModelStatus]:
        names = self.known_names()
        for key in list(self._loaded) + list(self._errors):
            if key not in names:
                names.append(key)
        return [self._status(n) for n in names]

    def status(self, name: str) -> ModelStatus:
        """State of a known model (NotFound for any other name)."""
        return self._status(self.key(name))

    def _status(self, key: str) -> ModelStatus:
        local = self.settings.models_dir / key
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
        progress = self._downloads.get(key)
        if progress is not None:
            return ModelStatus(name=key, state=ModelState.DOWNLOADING, download=progress.to_dict())
        if key in self._loading:
            return ModelStatus(name=key, state=ModelState.LOADING, path=path)
        if key in self._errors:
            return ModelStatus(name=key, state=ModelState.FAILED, path=path, error=self._errors[key])
        return ModelStatus(name=key, state=ModelState.AVAILABLE, path=path)

    def startup_report(self) -> list[str]:
        """Lines for the start-up log: what is on disk, and what happens to what is not."""
        models_dir = self.settings.models_dir.resolve()
        local = self.local_names()
        missing = [n for n in self.configured_names() if n not in local]
        lines = [f"models folder: {models_dir}" + ("" if models_dir.is_dir() else " (does not exist yet)")]
        lines.append(f"models found there: {', '.join(local) if local else 'none'}")
        if missing:
            source = self.settings.download_source
            if source == "none":
                lines.append(
                    f"not found, and downloads are off (QTTS_DOWNLOAD_SOURCE=none): {', '.join(missing)}; "
                    f"requests for them get 503 until their folders are put in {models_dir}"
                )
            else:
                lines.append(
                    f"not found: {', '.join(missing)}; each is downloaded from {source} "
                    f"({self.settings.hub_org}/<name>) on first use, in the background (requests get 503 "
                    f"with the progress meanwhile), or now with: qwen-tts-server models download <name>"
                )
        return lines


def release_memory() -> None:
    """Hand the CUDA blocks an unload freed back to the driver (so other processes, and nvidia-smi,
    see them free). Blocking: run it in a thread.

    No `gc.collect()`: nothing an unload drops sits in a reference cycle (the fast engine has none,
    and upstream's model is freed by reference counting too; tests check both with the collector
    off), so the memory is free the moment the last reference goes. A full collection would also
    hold the GIL, and so the event loop, for a fraction of a second."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _settle_future(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
