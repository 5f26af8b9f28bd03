"""Compiled, one graph serves the shapes and layouts that differ only by the path that calls it.

Every compile the engine's warm-up needs costs seconds of load (on an H200 ~6 s each, cold), and a compile
after warm-up stalls serving. So the compiled functions must not recompile for what does not change the
code: the KV length of a decode step (but reading the whole cache, a contiguous slice, which compiles
apart), whether the sampler's rows are the first rows of the engine's per-row tables (a frame) or the rows
just admitted (prefill), or whether the code predictor's logits are the last of two positions
(its prefill) or of one (its decode steps). The whole check (after `warmup._compile_everything`, frames at
every batch and KV bucket and plan pair and prefills of several lengths and counts convert no new frame) needs
the whole warm-up, ~90 s of CPU compiles on 2 cores: too slow for this suite.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from qwen_tts_server.engine.fast.model_runner import ModelRunner
from qwen_tts_server.engine.fast.sampler import RowSampling, Sampler, SamplingPlan

from .test_engine_release import CUSTOM, has_cpp_compiler

pytestmark = pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_compile_state() -> None:
    """Each test counts compiles from a clean slate: what earlier tests compiled (other shapes, dimensions
    already made dynamic) would change what these calls compile."""
    torch._dynamo.reset()


def frames() -> int:
    """Frames dynamo converted so far: each compile or recompile is one."""
    return int(counters["frames"]["total"])


def test_compiled_decode_serves_every_kv_length_with_one_compile_but_the_whole_cache(load_tts) -> None:
    runner = ModelRunner(load_tts(CUSTOM), max_slots=2, max_len=1024, compile=True)
    with torch.inference_mode():  # the engine's inputs are made in inference mode, as every layer's output is
        x = torch.zeros(2, runner.norm.weight.shape[0])
        positions = torch.tensor([3, 200])
        runner.decode(x, positions, kv_len=256)
        before = frames()
        for kv_len in (512, 768, 256):
            runner.decode(x, positions, kv_len=kv_len)
        assert frames() == before, "a KV length recompiled the decode layer"
        runner.decode(x, positions, kv_len=1024)  # the whole cache: a contiguous slice, one compile more
        assert frames() <= before + 1
        before = frames()
        runner.decode(x, positions, kv_len=1024)
        runner.decode(x, positions, kv_len=384)
        assert frames() == before


def test_compiled_sampler_serves_prefill_and_frame_inputs_with_one_compile() -> None:
    vocab, rows = 1100, 4
    sampler = Sampler(vocab, vocab - 1)
    sampler.enable_compile()
    plan = SamplingPlan(64)
    # The engine's per-row tables: made outside inference mode, once.
    table = RowSampling.make(rows, do_sample=[True, False, True, True], top_k=50, seed=[1, 2, 3, 4])
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    with torch.inference_mode():
        for size in (2, 1):
            step = torch.ones(size, dtype=torch.long)
            logits = torch.randn(size, vocab)
            head, admitted = slice(0, size), slice(rows - size, rows)
            # Codebook 0: a frame passes the first rows of the tables, prefill the rows just admitted (views
            # further in). Both kinds are views of tables made outside inference mode: normal tensors.
            sampler.talker(logits, table.span(head), seen[head], step, plan)
            before = frames()
            prefill = sampler.talker(logits, table.span(admitted), seen[admitted], step, plan)
            assert frames() == before, f"{size} rows: prefill's sampling recompiled the frame's"
            # The admitted rows' own options: the same draws as those rows gathered by index.
            gathered = sampler.talker(logits, table.select(torch.arange(rows - size, rows)), seen[admitted], step, plan)
            assert torch.equal(prefill, gathered)
            # Codebooks 1-15: the last position's logits after the code predictor's prefill (2 positions)
            # and after one of its decode steps (1 position).
            cp_prefill, cp_step = torch.randn(size, 2, vocab), torch.randn(size, 1, vocab)
            sampler.code_predictor(cp_prefill[:, -1], table.span(head), step, 1, plan)
            before = frames()
            sampler.code_predictor(cp_step[:, -1], table.span(head), step, 2, plan)
            assert frames() == before, f"{size} rows: a decode step's logits recompiled the prefill's"
            sampler.code_predictor(torch.randn(size, vocab), table.span(head), step, 3, plan)  # as the runner's
            assert frames() == before, f"{size} rows: fp32 [B, V] logits recompiled the sliced ones'"
