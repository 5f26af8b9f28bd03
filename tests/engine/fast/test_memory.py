"""The per-row memory estimate matches what the engine allocates; budgets turn into row counts."""

from __future__ import annotations

import pytest

from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.memory import (
    WORKSPACE_BYTES,
    CudaEngines,
    GiB,
    auto_slots,
    row_bytes,
    slots_for_budget,
)

CUSTOM = "Qwen3-TTS-12Hz-1.7B-CustomVoice"


def test_row_bytes_is_what_the_engine_allocates_per_row(load_tts) -> None:
    tts = load_tts(CUSTOM)
    per_row = row_bytes(tts, max_len=128)
    engine = FastEngine(tts, max_slots=3, max_len=128)
    assert abs(engine.cache_bytes - 3 * per_row) <= 3 * 128  # row_bytes also counts a few scalars
    # Doubling the context doubles the KV part, which dominates.
    assert 1.8 < row_bytes(tts, max_len=256) / per_row <= 2.0


def test_slots_for_budget() -> None:
    assert slots_for_budget(per_row=GiB, available=10 * GiB) == 10
    assert slots_for_budget(per_row=GiB, available=1000 * GiB) == 128
    assert slots_for_budget(per_row=GiB, available=1000 * GiB, cap=64) == 64
    with pytest.raises(ValueError, match="one request row needs 1.00 GiB"):
        slots_for_budget(per_row=GiB, available=GiB // 2)


def test_auto_slots_leave_room_for_a_second_model() -> None:
    budget, weights = 72 * GiB, 5 * GiB
    first = auto_slots(per_row=GiB // 2, budget=budget, used=weights)
    assert first == 59  # half of 72 - 5 - 8 GiB, in half-GiB rows
    used = weights + first * (GiB // 2) + WORKSPACE_BYTES
    second = auto_slots(per_row=GiB // 2, budget=budget, used=used + weights)
    assert second >= 1
    with pytest.raises(ValueError):
        auto_slots(per_row=GiB // 2, budget=budget, used=budget)


def test_cublas_workspaces_are_freed_only_when_the_last_cuda_engine_goes():
    """A captured graph holds its cuBLAS workspace's address: while any engine lives, none is freed."""

    class Engine:  # what CudaEngines holds: any object, weakly
        pass

    engines = CudaEngines()
    first, second = Engine(), Engine()
    engines.add(first)
    engines.add(second)
    assert engines.release(first) is False  # the second one's graphs may still replay
    assert engines.release(second) is True
    third = Engine()
    engines.add(third)
    del third  # an engine that failed to start and was dropped does not hold the workspaces forever
    assert engines.release(Engine()) is True
