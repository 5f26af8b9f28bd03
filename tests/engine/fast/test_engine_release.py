"""A stopped fast engine lets go of its memory at once: no reference cycle keeps it for the collector.

FastEngine used to sit in cycles (FrameGraphs.engine <-> FastEngine.graphs; the codec worker's
`busy` lambda and `finish` callback bound to the engine), so dropping the last outside reference
freed nothing until a later `gc.collect()`, while the memory budget already counted it as free.
These tests hold a weak reference and check it dies as soon as the last strong one goes, with the
cycle collector disabled.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from qwen_tts_server.engine.fast.engine import FastEngine, FrameGraphs
from qwen_tts_server.engine.fast.runtime import FastRuntime
from qwen_tts_server.engine.types import Mode, SamplingParams, SynthesisItem

CUSTOM = "Qwen3-TTS-12Hz-0.6B-CustomVoice"


@pytest.fixture
def no_cycle_collection() -> Iterator[None]:
    gc.collect()  # unrelated garbage from earlier tests must not be what the checks see
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_an_engine_with_frame_graphs_is_freed_by_reference_counting_alone(load_tts, no_cycle_collection):
    engine = FastEngine(load_tts(CUSTOM), max_slots=2, max_len=256, cuda_graphs=True)
    assert isinstance(engine.graphs, FrameGraphs)  # the object that used to point back at the engine
    dead = weakref.ref(engine)
    graphs = weakref.ref(engine.graphs)
    del engine
    assert dead() is None and graphs() is None


def test_a_runtime_that_served_requests_is_freed_once_closed(load_tts, no_cycle_collection):
    runtime = FastRuntime(load_tts(CUSTOM), max_slots=2, max_len=256, max_prefill_tokens=256)
    items = [SynthesisItem(text="Hello there.", language="english", speaker="ryan")]

    (result,) = asyncio.run(runtime.generate(Mode.CUSTOM_VOICE, items, SamplingParams(max_new_tokens=8, seed=1)))
    assert result.frames > 0
    engine = weakref.ref(runtime.engine)
    codec_worker = weakref.ref(runtime.engine.codec_worker)
    runtime.close()
    assert engine().cache_bytes == 0  # stop() already dropped the KV cache and per-row state
    del runtime
    assert engine() is None and codec_worker() is None


def test_stop_releases_the_caches_and_graphs_even_while_someone_holds_the_engine(load_tts):
    engine = FastEngine(load_tts(CUSTOM), max_slots=2, max_len=256, cuda_graphs=True)
    assert engine.cache_bytes > 0
    engine.start()
    engine.stop()
    assert engine.cache_bytes == 0 and engine.graphs is None
    assert not engine.codec._graphs and engine.runner.k_cache == []
    engine.stop()  # a second stop is harmless
