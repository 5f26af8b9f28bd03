"""The device pool on two CPU "devices": routing, streams, saturation and unloading, on the real
engines and the tiny checkpoints (a pool of `cpu,cpu` runs exactly the code `cuda:0,cuda:1` does,
bar the device string)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwen_tts_server.audio.codec_io import DecodedAudio
from qwen_tts_server.audio.sources import ReferenceAudio
from qwen_tts_server.engine.pool import DevicePool, build_synthesizer, check_devices, use_compile_cache
from qwen_tts_server.engine.registry import ModelState
from qwen_tts_server.engine.synthesizer import Synthesizer
from qwen_tts_server.engine.types import FinishReason, Mode, SamplingParams, SynthesisItem
from qwen_tts_server.errors import ModelUnavailable, Overloaded, ServiceError

from ..api.support import BASE_06, CUSTOM_06, settings_for

GREEDY = SamplingParams(do_sample=False, subtalker_do_sample=False, max_new_tokens=40)
ITEM = SynthesisItem(text="Hello there, how are you today?", speaker="vivian")


def run_pool(tiny_models_dir: Path, tmp_path: Path, test: Callable[[DevicePool], Awaitable[Any]], **overrides: Any):
    """Run `test` on a pool of two CPU engines, closing it at the end."""
    settings = settings_for(models_dir=tiny_models_dir, data_dir=tmp_path, devices="cpu,cpu", **overrides)
    pool = build_synthesizer(settings)
    assert isinstance(pool, DevicePool) and len(pool.synthesizers) == 2
    try:
        return asyncio.run(test(pool))
    finally:
        pool.close()


def served(engine: Synthesizer) -> int:
    """Items this engine decoded (summed over its fast engines' steps)."""
    return sum(engine.batch_sizes())


async def synth(pool: DevicePool, item: SynthesisItem = ITEM) -> Synthesizer:
    """One request as the API makes it: a model from `model_for`, then synthesis; returns the engine
    that served it."""
    model = await pool.model_for(CUSTOM_06, Mode.CUSTOM_VOICE)
    (result,) = await pool.synthesize(model, Mode.CUSTOM_VOICE, [item], GREEDY)
    assert result.frames > 0 and len(result.samples) > 0
    return pool._owner(model)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_one_device_is_a_plain_engine(tiny_models_dir: Path, tmp_path: Path) -> None:
    """No pool (and no indirection) unless several devices are listed."""
    plain = build_synthesizer(settings_for(models_dir=tiny_models_dir, data_dir=tmp_path))
    listed = build_synthesizer(
        settings_for(models_dir=tiny_models_dir, data_dir=tmp_path, device="auto", devices="cpu")
    )
    try:
        assert type(plain) is Synthesizer and type(listed) is Synthesizer
        assert listed.registry.options.device == "cpu"
    finally:
        plain.close()
        listed.close()


def test_devices_this_host_lacks_fail_at_start() -> None:
    with pytest.raises(ServiceError, match="not on this host"):
        check_devices(["cpu", "cuda:63"])
    with pytest.raises(ServiceError, match="not a device"):
        check_devices(["gpu-one"])
    with pytest.raises(ValueError, match="explicitly"):
        settings_for(models_dir=Path("."), data_dir=Path("."), devices="auto,auto")


def test_concurrent_requests_spread_over_both_devices(tiny_models_dir: Path, tmp_path: Path) -> None:
    async def test(pool: DevicePool) -> None:
        model = await pool.load(CUSTOM_06)  # up on both devices, engines started
        assert all(e.registry.loaded_model(CUSTOM_06) is not None for e in pool.synthesizers)
        assert model.info.model_type == "custom_voice"
        owners = await asyncio.gather(*(synth(pool) for _ in range(4)))
        assert {id(owner) for owner in owners} == {id(e) for e in pool.synthesizers}, "one device took every request"
        assert all(served(engine) > 0 for engine in pool.synthesizers)  # both engines decoded items
        assert pool.queue_depth == 0

        status = pool.registry.status(CUSTOM_06)
        assert status.state is ModelState.LOADED and status.device == "cpu,cpu"
        assert status.memory_bytes == sum(e.registry.used_bytes() for e in pool.synthesizers)
        loads = pool.device_loads()
        assert [d["device"] for d in loads] == ["cpu", "cpu"]
        assert all(d["models"][CUSTOM_06]["rows"] == 2 for d in loads)

    run_pool(tiny_models_dir, tmp_path, test, max_slots=2)


def test_a_stream_stays_on_its_device_and_ends_with_its_reason(tiny_models_dir: Path, tmp_path: Path) -> None:
    async def test(pool: DevicePool) -> None:
        model = await pool.model_for(CUSTOM_06, Mode.CUSTOM_VOICE)
        owner = pool._owner(model)
        chunks = [chunk async for chunk in pool.stream(model, Mode.CUSTOM_VOICE, ITEM, GREEDY)]
        assert chunks[-1].finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
        assert sum(len(c.samples) for c in chunks) > 0 and len(chunks) > 2
        assert served(owner) > 0 and owner.queue_depth == 0
        assert sum(served(e) for e in pool.synthesizers) == served(owner)  # the other device did nothing

    run_pool(tiny_models_dir, tmp_path, test)


def test_a_saturated_device_sends_new_work_to_the_other(tiny_models_dir: Path, tmp_path: Path) -> None:
    """One row and no queue: while a stream holds the first device's row, the next request does not
    get 429 but goes to the second device, which loads the model for it."""

    async def test(pool: DevicePool) -> None:
        first = await pool.model_for(CUSTOM_06, Mode.CUSTOM_VOICE)
        assert pool._owner(first) is pool.synthesizers[0]  # a cold pool starts on the first device only
        stream = pool.stream(first, Mode.CUSTOM_VOICE, ITEM, GREEDY)
        await stream.__anext__()  # admitted: it holds the row until the stream is closed
        assert pool.synthesizers[0].gate.load(CUSTOM_06).saturated
        assert pool.synthesizers[1].registry.loaded_model(CUSTOM_06) is None
        try:
            assert await synth(pool) is pool.synthesizers[1]
            assert pool.gate.saturated() == []  # the second device still takes work
        finally:
            await stream.aclose()
        with pytest.raises(Overloaded):  # the one engine, asked directly, refuses beyond its row
            engine = pool.synthesizers[0]
            model = engine.registry.loaded_model(CUSTOM_06)
            held = engine.stream(model, Mode.CUSTOM_VOICE, ITEM, GREEDY)
            try:
                await held.__anext__()
                await engine.synthesize(model, Mode.CUSTOM_VOICE, [ITEM], GREEDY)
            finally:
                await held.aclose()

    run_pool(tiny_models_dir, tmp_path, test, max_slots=1, max_queue=0)


def test_a_busy_device_brings_the_model_up_on_the_other_meanwhile(tiny_models_dir: Path, tmp_path: Path) -> None:
    """Rows full but queue room left: the request queues on the loaded device (no wait for a load),
    and the other device loads the model in the background; once it is up, new work goes there."""

    async def test(pool: DevicePool) -> None:
        first = await pool.model_for(CUSTOM_06, Mode.CUSTOM_VOICE)
        stream = pool.stream(first, Mode.CUSTOM_VOICE, ITEM, GREEDY)
        await stream.__anext__()
        try:
            second = await pool.model_for(CUSTOM_06, Mode.CUSTOM_VOICE)
            assert pool._owner(second) is pool.synthesizers[0]  # queued where the model is
            assert (1, CUSTOM_06) in pool._warming
            await wait_for(lambda: not pool._warming)
            assert pool.synthesizers[1].gate.load(CUSTOM_06).rows == 1  # loaded, and its engine started
            assert await synth(pool) is pool.synthesizers[1]
        finally:
            await stream.aclose()

    run_pool(tiny_models_dir, tmp_path, test, max_slots=1, max_queue=4)


def test_voice_prompts_are_computed_on_the_models_device(tiny_models_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    audio = DecodedAudio(samples=(0.1 * rng.standard_normal(24000)).astype(np.float32), sample_rate=24000)

    async def test(pool: DevicePool) -> None:
        await pool.load(BASE_06)
        model = pool.synthesizers[1].registry.loaded_model(BASE_06)
        prompt = await pool.voice_prompt(model, ReferenceAudio("sha256:test", audio=audio))
        assert prompt.ref_code is not None
        assert len(pool.synthesizers[1].voice_cache._entries) == 1 and not pool.synthesizers[0].voice_cache._entries

    run_pool(tiny_models_dir, tmp_path, test)


def test_unload_frees_every_device(tiny_models_dir: Path, tmp_path: Path) -> None:
    async def test(pool: DevicePool) -> None:
        await pool.load(CUSTOM_06)
        stale = pool.synthesizers[1].registry.loaded_model(CUSTOM_06)
        assert await pool.unload(f"Qwen/{CUSTOM_06}") is True
        for engine in pool.synthesizers:
            assert not engine.registry.loaded() and not engine._fast and engine.registry.used_bytes() == 0
        assert pool.registry.status(CUSTOM_06).state is ModelState.AVAILABLE
        assert await pool.unload(CUSTOM_06) is False
        with pytest.raises(ModelUnavailable, match="unloaded"):  # a request that looked it up before
            await pool.synthesize(stale, Mode.CUSTOM_VOICE, [ITEM], GREEDY)
        assert await synth(pool) is pool.synthesizers[0]  # loads again on demand

    run_pool(tiny_models_dir, tmp_path, test)


def test_the_compile_cache_lives_under_the_data_dir_unless_the_operator_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # so that the test's own setting is undone after it
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    use_compile_cache(settings_for(models_dir=tmp_path, data_dir=tmp_path / "data", compile=False))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # nothing compiles: nothing to set
    use_compile_cache(settings_for(models_dir=tmp_path, data_dir=tmp_path / "data"))
    cache = tmp_path / "data" / "compile-cache"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.resolve()) and cache.is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/mine")
    use_compile_cache(settings_for(models_dir=tmp_path, data_dir=tmp_path / "other", compile_cache_dir=tmp_path / "c"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/srv/mine"
