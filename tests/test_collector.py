"""The garbage collector while serving: its pauses counted, a load's objects frozen out of its scans."""

from __future__ import annotations

import gc

from qwen_tts_server.collector import PAUSES, freeze_after_load


def test_every_collection_is_counted_by_generation() -> None:
    PAUSES.install()
    PAUSES.install()  # idempotent: one callback, each collection counted once
    assert gc.callbacks.count(PAUSES._callback) == 1
    before = (list(PAUSES.count), list(PAUSES.seconds))
    gc.collect(1)
    gc.collect()
    assert PAUSES.count[1] == before[0][1] + 1 and PAUSES.count[2] == before[0][2] + 1
    assert PAUSES.seconds[2] > before[1][2] and PAUSES.longest_s > 0


def test_freezing_keeps_existing_objects_out_of_later_collections() -> None:
    held = [[i] for i in range(10_000)]  # tracked objects that exist at "load" time
    try:
        freeze_after_load()
        frozen = gc.get_freeze_count()
        assert frozen >= len(held)
        garbage = []
        garbage.append(garbage)  # a cycle made after the freeze is still collected
        del garbage
        assert gc.collect() >= 1
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()  # the rest of the test process collects as usual
