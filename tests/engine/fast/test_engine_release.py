"""A stopped fast engine lets go of its memory at once: no reference cycle keeps it for the collector.

FastEngine used to sit in cycles (FrameGraphs.engine <-> FastEngine.graphs; the codec worker's
`busy` lambda and `finish` callback bound to the engine), so dropping the last outside reference
freed nothing until a later `gc.collect()`, while the memory budget already counted it as free.
These tests hold a weak reference and check it dies as soon as the last strong one goes, with the
cycle collector disabled.

torch.compile's caches outlive every engine (dynamo keeps them on the code objects of the module-level
functions it compiled), so they must hold no tensor of a model: the weights go into the compiled
functions as inputs, and what the caches keep of them is fake tensors (shapes and dtypes, no memory).
"""

from __future__ import annotations

import asyncio
import weakref

import pytest
import torch

from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.frame_graphs import FrameGraphs
from qwen_tts_server.engine.fast.model_runner import ModelRunner, decode_layer
from qwen_tts_server.engine.fast.runtime import FastRuntime
from qwen_tts_server.engine.fast.sampler import RowSampling, Sampler, _talker_choose
from qwen_tts_server.engine.types import Mode, SamplingParams, SynthesisItem

CUSTOM = "Qwen3-TTS-12Hz-0.6B-CustomVoice"


def test_an_engine_with_frame_graphs_is_freed_by_reference_counting_alone(load_tts, no_collector):
    engine = FastEngine(load_tts(CUSTOM), max_slots=2, max_len=256, cuda_graphs=True)
    assert isinstance(engine.graphs, FrameGraphs)  # the object that used to point back at the engine
    dead = weakref.ref(engine)
    graphs = weakref.ref(engine.graphs)
    del engine
    assert dead() is None and graphs() is None


def test_a_runtime_that_served_requests_is_freed_once_closed(load_tts, no_collector):
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
    assert not engine.codec._graphs and engine.runner.caches == []
    engine.stop()  # a second stop is harmless


def has_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (by its own search)."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_functions_keep_no_tensor_of_a_dropped_model(tiny_models_dir, no_collector):
    """A model of its own (the session's shared ones never die) runs one talker step and one sampling
    through the compiled layer and sampler functions, then goes: its fused and upstream weights and the
    sampler's tensors must die with it. One step keeps the compile to a few graphs (~25 s on a 2-core CPU)."""
    from qwen_tts import Qwen3TTSModel

    tts = Qwen3TTSModel.from_pretrained(
        str(tiny_models_dir / CUSTOM), device_map="cpu", dtype=torch.float32, attn_implementation="sdpa"
    )
    runner = ModelRunner(tts, max_slots=2, max_len=32, compile=True)
    sampler = Sampler.for_model(tts)
    sampler.enable_compile()
    # torch.compile raises when it cannot compile, so with the wrappers in place the calls below ran compiled.
    assert runner.decode_layer is not decode_layer and sampler._talker_choose is not _talker_choose
    _, logits = runner.decode(torch.zeros(1, tts.model.talker.config.hidden_size), torch.tensor([3]))
    seen = torch.zeros(1, runner.vocab_size, dtype=torch.bool)
    sampler.talker(logits, RowSampling.make(1), seen, torch.zeros(1, dtype=torch.long))

    mlp = tts.model.talker.model.layers[0].mlp
    gate_up = runner.layers[0].out_args[4]  # fused at runner start: a tensor of the runner's own making
    held = [weakref.ref(t) for t in (gate_up, mlp.down_proj.weight, sampler.suppress, tts)]
    del tts, runner, sampler, mlp, gate_up, logits, seen
    assert [ref() is None for ref in held] == [True] * len(held)
