"""The memory budget counts loads in flight: two loads cannot both take the same room."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from qwen_tts_server.engine.registry import ModelRegistry, RuntimeOptions, estimate_memory, load_upstream
from qwen_tts_server.errors import ModelUnavailable

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
