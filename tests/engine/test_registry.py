"""The registry: which names are models, downloads into place, the memory budget, and unloading."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from qwen_tts_server.engine.registry import HUB_FILES, ModelRegistry, RuntimeOptions, estimate_memory, load_upstream
from qwen_tts_server.errors import ModelUnavailable, NotFound

from ..api.support import BASE_06, CUSTOM_06, settings_for


def test_a_load_in_flight_holds_its_room_in_the_budget(tiny_models_dir: Path, tmp_path: Path) -> None:
    one = estimate_memory(tiny_models_dir / CUSTOM_06, "float32")
    settings = settings_for(models_dir=tiny_models_dir, data_dir=tmp_path, memory_budget_gb=1.5 * one / 1024**3)
    gate = threading.Event()

    def slow_loader(path: Path, options: RuntimeOptions) -> Any:
        gate.wait(timeout=30)  # the first load is still running when the second asks for room
        return load_upstream(path, options)

    async def main() -> None:
        registry = ModelRegistry(settings, loader=slow_loader)
        first = asyncio.ensure_future(registry.get(CUSTOM_06))
        while not registry.reserved_bytes():
            await asyncio.sleep(0.01)
        with pytest.raises(ModelUnavailable, match="busy or loading"):
            await registry.get(BASE_06)
        gate.set()
        model = await first
        assert model.name == CUSTOM_06 and registry.reserved_bytes() == 0
        # Loaded and idle now: the second model evicts it instead of failing.
        assert (await registry.get(BASE_06)).name == BASE_06
        assert [m.name for m in registry.loaded()] == [BASE_06]

    asyncio.run(main())


# ----- names -----
def test_only_known_names_resolve(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "Local-Folder").mkdir()
    (models / "Local-Folder" / "config.json").write_text("{}")
    (models / "No-Config").mkdir()
    (models / ".Half.download").mkdir()  # a download in progress is no model
    (models / ".Half.download" / "config.json").write_text("{}")
    settings = settings_for(models_dir=models, data_dir=tmp_path, extra_models="Qwen/Extra-One, Plain-Two, evil/Three")
    registry = ModelRegistry(settings)
    assert registry.key(f"Qwen/{CUSTOM_06}") == CUSTOM_06 == registry.key(CUSTOM_06)
    assert registry.key("Extra-One") == "Extra-One" and registry.key("Qwen/Plain-Two") == "Plain-Two"
    assert registry.key("Local-Folder") == "Local-Folder"
    for name in ("Three", "evil/Three", f"evil-user/{CUSTOM_06}", "No-Config", "Half.download", "made-up"):
        with pytest.raises(NotFound) as caught:
            registry.key(name)
        assert CUSTOM_06 in caught.value.message and "Extra-One" in caught.value.message
    assert registry.known_names()[-3:] == ["Extra-One", "Plain-Two", "Local-Folder"]
    assert [s.name for s in registry.statuses()] == registry.known_names()


def test_hub_downloads_take_only_the_published_files() -> None:
    from huggingface_hub.utils import filter_repo_objects

    published = [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "speech_tokenizer/config.json",
        "speech_tokenizer/configuration.json",
        "speech_tokenizer/model.safetensors",
        "speech_tokenizer/preprocessor_config.json",
    ]
    unwanted = ["modeling_evil.py", "pytorch_model.bin", "speech_tokenizer/weights.pt", "x.pkl", "setup.sh"]
    kept = list(filter_repo_objects(published + unwanted, allow_patterns=list(HUB_FILES)))
    assert kept == published


def test_a_finished_download_is_moved_into_place(tiny_models_dir: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, str, Path]] = []

    def copy(source: str, repo_id: str, dest: Path, progress: Any) -> None:
        seen.append((source, repo_id, dest))
        assert not (tmp_path / "m" / CUSTOM_06).exists()  # nothing at the model's own path meanwhile
        shutil.copytree(tiny_models_dir / CUSTOM_06, dest, dirs_exist_ok=True)

    settings = settings_for(models_dir=tmp_path / "m", data_dir=tmp_path, download_source="huggingface")
    registry = ModelRegistry(settings, downloader=copy)
    assert registry.download(f"Qwen/{CUSTOM_06}") == tmp_path / "m" / CUSTOM_06
    assert seen == [("huggingface", f"Qwen/{CUSTOM_06}", tmp_path / "m" / f".{CUSTOM_06}.download")]
    assert (tmp_path / "m" / CUSTOM_06 / "config.json").is_file() and not seen[0][2].exists()
    assert registry.download(CUSTOM_06) == tmp_path / "m" / CUSTOM_06 and len(seen) == 1  # found locally now


# ----- unloading -----
def test_unload_refuses_new_work_and_waits_for_running_work(tiny_models_dir: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(settings_for(models_dir=tiny_models_dir, data_dir=tmp_path))

    async def main() -> None:
        model = await registry.get(CUSTOM_06)
        release = asyncio.Event()

        async def busy() -> None:
            async with registry.using(model):
                await release.wait()

        work = asyncio.ensure_future(busy())
        await asyncio.sleep(0)
        unload = asyncio.ensure_future(registry.unload(CUSTOM_06))
        await asyncio.sleep(0.05)
        assert not unload.done()  # waiting for the running work
        with pytest.raises(ModelUnavailable, match="being unloaded") as caught:
            await registry.get(CUSTOM_06)  # no new work meanwhile
        assert caught.value.retry_after_s > 0  # type: ignore[attr-defined]
        with pytest.raises(ModelUnavailable, match="unloaded before"):
            async with registry.using(model):
                pass
        release.set()
        await work
        assert await unload is True and not registry.loaded() and model.unloaded
        assert await registry.unload(CUSTOM_06) is False
        assert (await registry.get(CUSTOM_06)) is not model  # loads again on demand

    asyncio.run(main())


def test_unload_gives_up_waiting_after_its_time_out(tiny_models_dir: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(settings_for(models_dir=tiny_models_dir, data_dir=tmp_path, unload_timeout_s=0.1))

    async def main() -> None:
        model = await registry.get(CUSTOM_06)
        inside, fail = asyncio.Event(), asyncio.Event()

        async def stuck() -> None:
            async with registry.using(model):
                inside.set()
                await fail.wait()
                raise RuntimeError("the model was unloaded while this request was in progress")

        work = asyncio.ensure_future(stuck())
        await inside.wait()
        assert await asyncio.wait_for(registry.unload(CUSTOM_06), 5) is True
        assert not registry.loaded()
        fail.set()  # the engine fails the request it was running: the client gets a clear 503
        with pytest.raises(ModelUnavailable, match="unloaded while this request was in progress"):
            await work

    asyncio.run(main())


def test_a_model_evicted_between_lookup_and_use_is_a_503(tiny_models_dir: Path, tmp_path: Path) -> None:
    from qwen_tts_server.engine.synthesizer import Synthesizer

    settings = settings_for(models_dir=tiny_models_dir, data_dir=tmp_path)
    engine = Synthesizer(settings)

    async def main() -> None:
        model = await engine.registry.get(CUSTOM_06)  # a request looked it up ...
        assert await engine.unload(CUSTOM_06)  # ... and it went before the request used it
        with pytest.raises(ModelUnavailable, match="unloaded"):
            async with engine.registry.using(model):
                pass
        with pytest.raises(ModelUnavailable, match="unloaded"):
            await engine.fast_runtime(model)
        assert not engine._fast  # no engine was started for a model that has left

    try:
        asyncio.run(main())
    finally:
        engine.close()
