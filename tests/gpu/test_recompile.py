"""No compile and no graph capture after warm-up, under a mixed workload on the running engine.

Warm-up compiles the layer parts and the sampler for both sampling plans (`PLANS`: at most 64 candidates, or
the whole vocabulary; greedy, temperature, top-k and top-p are data) at two batch sizes and two packed-prefill
shapes (the first recompile marks those dimensions dynamic), and captures the frame graph of every (batch
bucket, KV bucket, plan pair) and the streaming decoder's. A compile or a capture while serving
stalls every stream, so after warm-up none may happen: not at other batch sizes, prompt lengths, KV buckets,
sampling options, nor with streams and whole-utterance decodes in the mix.

Three rounds on the running engine (a burst that fills every row, then arrivals one at a time while others
run, so batches shrink and grow through the buckets; mixed lengths and prompt lengths, one prompt near the
first KV bucket's end; some requests streaming, some decoded whole, some returning codes only):

1. the checkpoint's default options and others that keep the narrow plan;
2. mixed options: greedy, top-p, greedy codebook 0 with a sampled code predictor, top_k over 64, top_k 0;
3. the mixed round again.

Counted: dynamo's converted frames (every compile or recompile is one) and the graphs the engine holds;
recompile logging is on for the test, so a recompile prints its reason in the run log.
"""

from __future__ import annotations

import collections
import random
import time
from typing import Any

import pytest
import torch

from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.sampler import _choose

from .support import (
    Request,
    Results,
    Tier,
    captures,
    compiles,
    custom_prompt,
    prompt_of_length,
    sampling,
    text_of,
    wait_for,
)

pytestmark = pytest.mark.gpu

DEFAULT_PLAN = (
    {},  # the checkpoint's defaults: sampling, top_k 50
    {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.2, "subtalker_temperature": 0.6, "subtalker_top_k": 30},
)
MIXED = (
    *DEFAULT_PLAN,
    {"do_sample": False, "subtalker_do_sample": False},  # greedy
    {"top_p": 0.8, "subtalker_top_p": 0.9},
    {"do_sample": False},  # greedy codebook 0, sampled code predictor
    {"top_k": 200, "subtalker_top_k": 0},  # the wide plan
    {"top_k": 0, "top_p": 0.9},
)
LENGTHS = (5, 17, 30, 45)


def workload(tts: Any, engine: FastEngine, variants: tuple[dict[str, Any], ...]) -> list[tuple[float, Request]]:
    """(delay before submitting, request), see the module docstring."""
    rng = random.Random(12)
    near_end = prompt_of_length(tts, engine.kv_buckets[0] - 10)
    out = []
    for i in range(engine.scheduler.max_slots + 12):
        prompt = near_end if i % 7 == 3 else custom_prompt(tts, text_of(rng.randint(3, 40), start=i))
        request = Request(
            prompt,
            sampling(tts, seed=500 + i, **variants[i % len(variants)]),
            frames=rng.choice(LENGTHS),
            stream=i % 4 == 0,
            decode_audio=i % 4 == 1,
        )
        out.append((0.0 if i < engine.scheduler.max_slots else rng.uniform(0.0, 0.06), request))
    return out


def frame_graph_keys(engine: FastEngine) -> set[Any]:
    return set(engine.graphs._graphs) if engine.graphs is not None else set()


def run_round(engine: FastEngine, items: list[tuple[float, Request]]) -> dict[str, Any]:
    """Submit the round's requests on schedule, wait for all; what it compiled and captured."""
    start_steps, sizes_before = engine.steps, len(engine.batch_sizes)
    compiles0, graphs0, keys0 = compiles(), captures(engine), frame_graph_keys(engine)
    t0 = time.perf_counter()
    for delay, request in items:
        time.sleep(delay)
        engine.submit(request.make())
    wait_for([r for _, r in items], timeout_s=180)
    sizes = list(engine.batch_sizes)[sizes_before:]
    return {
        "requests": len(items),
        "steps": engine.steps - start_steps,
        "wall_s": round(time.perf_counter() - t0, 2),
        "steps_by_batch_size": dict(sorted(collections.Counter(sizes).items())),
        "compiles": compiles() - compiles0,
        "graphs_before": graphs0,
        "graphs_after": captures(engine),
        "new_frame_graphs": sorted(f"b{k[0]} kv{k[1]} {k[2]} {k[3]}" for k in frame_graph_keys(engine) - keys0),
    }


def test_no_recompilation_after_warm_up(
    started_engine: FastEngine, shared: Any, tts: Any, tier: Tier, results: Results
) -> None:
    engine = started_engine
    torch._logging.set_logs(recompiles=True)
    try:
        plain = run_round(engine, workload(tts, engine, DEFAULT_PLAN))
        mixed = run_round(engine, workload(tts, engine, MIXED))
        again = run_round(engine, workload(tts, engine, MIXED))
    finally:
        torch._logging.set_logs()
    since_warm_up = compiles() - shared.compiles_after_warm_up
    named = (("default_plan", plain), ("mixed", mixed), ("mixed_again", again))
    rounds = dict(named)
    results.record(
        "recompile",
        **rounds,
        compiles_since_warm_up_all_tests=since_warm_up,
        still_compiled=engine.runner.compiled,
        graphs_still_on=engine.graphs is not None,
    )
    if tier.compile:
        assert engine.runner.compiled and engine.sampler._choose is not _choose, "torch.compile was switched off"
    if tier.cuda:
        assert engine.graphs is not None, "frame graphs were dropped (a capture failed): see the log"
    for name, r in rounds.items():
        assert r["compiles"] == 0, f"{r['compiles']} compiles in round {name} (reasons in the log)"
        assert r["graphs_after"] == r["graphs_before"], f"graphs captured while serving in round {name}: {r}"
    assert since_warm_up == 0, f"{since_warm_up} compiles since warm-up, across the tier's tests"
