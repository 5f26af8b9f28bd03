"""After `FastEngine.warm_up`, nothing serving can reach compiles: every frame a step can ask for (all batch
buckets, all KV buckets, all sampling-plan pairs) and prefill as `_prefill` runs it (packed prompts of several
lengths and counts, unpadded and padded to the token buckets, into the last rows, and codebook 0 sampled).

A compile at request time stalls every stream for seconds, and on CUDA a compile inside graph capture once
failed the capture. The GPU tier checks this on the H200 (tests/gpu/test_recompile.py), but with `max_len`
512 it never reaches a middle KV bucket, and it runs only where a GPU is lent: this runs the same check in
every CI run, on the CPU, with `max_len` 1024 (KV buckets 256, 512 and the whole cache). The compiles are
real (inductor's C++ backend): ~90 s of CPU on 2 cores.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo

from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.prefill import BucketedPrefill
from qwen_tts_server.engine.fast.sampler import PLANS

from .test_compile_shapes import frames
from .test_engine_release import CUSTOM, has_cpp_compiler

MAX_SLOTS, MAX_LEN = 4, 1024


@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_nothing_serving_can_reach_compiles_after_the_warm_up(load_tts):
    torch._dynamo.reset()  # what other tests compiled must not stand in for this warm-up
    engine = FastEngine(load_tts(CUSTOM), max_slots=MAX_SLOTS, max_len=MAX_LEN, compile=True, cuda_graphs=False)
    assert engine.kv_buckets == [256, 512, 1024] and engine.buckets == [1, 2, 4]
    before = frames()
    with torch.inference_mode():
        engine.warm_up()
        assert frames() > before, "the warm-up compiled nothing: compile is not on"
        compiled = []

        def check(what: str, start: int) -> None:
            if frames() != start:
                compiled.append(what)

        for plans in itertools.product(PLANS, PLANS):
            for size, kv_len in itertools.product(engine.buckets, engine.kv_buckets):
                start = frames()
                with engine.preserved_rows(size):
                    engine.frame(size, kv_len, plans)
                check(f"frame: {size} rows, KV {kv_len}, plans {plans}", start)

        width = engine.rows.hidden.shape[-1]
        bucketed = BucketedPrefill(engine.runner, 2048)
        for lengths in ([3], [50], [MAX_LEN - 2], [5, 6], [30, 40, 10], [9] * MAX_SLOTS, [2, 300]):
            prompts = [torch.randn(n, width) for n in lengths]
            first = MAX_SLOTS - len(prompts)  # admitted after the running requests, as the scheduler does
            slots = list(range(first, MAX_SLOTS))
            for prefill in (engine.runner, bucketed):
                start = frames()
                _, logits = prefill.prefill_many(slots, prompts)
                check(f"prefill {type(prefill).__name__} {lengths}", start)
                for plan in PLANS:
                    start = frames()
                    engine.first_code(logits, slice(first, MAX_SLOTS), plan)
                    check(f"codebook 0 after prefill {lengths} into rows {first}.., plan {plan}", start)
    assert compiled == []
