"""The garbage collector while serving: its pauses counted, a load's objects frozen out of its scans."""

from __future__ import annotations

import gc
import weakref

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
    """What exists at the freeze is out of later collections' walks (a cycle of it that becomes garbage stays),
    and what is made after it is collected as ever. (Not by counting frozen objects: other threads free
    frozen objects by reference counting at any time.)"""

    class Node:
        pass

    loaded = Node()
    loaded.me = loaded  # a cycle that exists at "load" time
    held = weakref.ref(loaded)
    freeze_after_load(full=True)
    assert gc.get_freeze_count() > 0
    del loaded
    gc.collect()
    assert held() is not None, "a later collection walked the frozen objects"

    made_after = Node()
    made_after.me = made_after  # a cycle made after the freeze
    later = weakref.ref(made_after)
    del made_after
    gc.collect()
    assert later() is None, "a cycle made after the freeze was not collected"


def test_the_freezes_own_collection_is_not_counted_as_a_serving_pause() -> None:
    PAUSES.install()
    before = (list(PAUSES.count), PAUSES.longest_s)
    freeze_after_load(full=True)
    freeze_after_load(full=False)  # another engine serving: the young generations only
    assert (PAUSES.count, PAUSES.longest_s) == before


def test_a_load_beside_a_serving_engine_does_not_walk_the_old_generation() -> None:
    """With another engine serving, the freeze collects only the young generations: cyclic garbage already
    in the old one is frozen rather than found (a full walk would stop every stream for up to a second)."""

    class Node:
        pass

    node = Node()
    node.me = node  # a cycle: only the collector frees it
    gc.collect(1)  # survivors of the young generations move to the old one
    probe = weakref.ref(node)
    del node
    freeze_after_load(full=False)
    assert probe() is not None, "the old generation was walked"
    gc.unfreeze()
    gc.collect()
    assert probe() is None
