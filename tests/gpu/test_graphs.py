"""Graph replay equals eager, bit for bit, at several batch sizes; and what does move the numbers.

Issue 12: the benchmark's graph-vs-eager check printed identical=False in one H200 run and identical=True in
the next (same command, same commit). A moving difference is a race or an unpinned kernel choice. These tests
separate the candidates:

* at a fixed batch (every request admitted in the same step, engine stepped by hand), eager twice and graph
  replay twice: eager vs eager and graph vs graph show run-to-run nondeterminism (a race or a
  nondeterministic kernel); graph vs eager a kernel chosen differently under capture. Asserted: none.
* the same request as row 0 of batches of 1, 3, 8 and 16 rows: whether the batch a request lands in changes
  its numbers (bf16 matmuls pick other kernels at other sizes). Reported, not asserted: nothing promises it.
* on the engine's own thread: requests submitted before it starts (one batch) must equal the hand-stepped
  run; then requests submitted one by one while it runs, as the benchmark's check does, where the first
  request is admitted alone. Reported: if that run differs while everything else is exact, the benchmark's
  moving result is this admission race, not graph replay.

Requests sample (seeded: the sampler's draws are a pure function of seed, frame and codebook), one of them
with a prompt near the end of the first KV bucket, so every batch crosses from one KV bucket (and graph)
into the next during the run.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from qwen_tts_server.engine.fast.engine import FastEngine

from .support import (
    Request,
    Results,
    compare_runs,
    custom_prompt,
    graphs_off,
    prompt_of_length,
    recording,
    run_sync,
    sampling,
    text_of,
    wait_for,
)

pytestmark = pytest.mark.gpu

FRAMES = 32
BATCHES = (1, 3, 8, 16)
# Runs of each kind per batch size (eager and graph interleaved); more to hunt a rare moving difference.
REPEATS = max(2, int(os.environ.get("QTTS_GPU_TEST_REPEATS", "2")))
SPEAKERS = ("ryan", "vivian", "serena", "aiden", "dylan", "eric", "sohee", "ono_anna")


def requests(tts: Any, engine: FastEngine, rows: int) -> list[Request]:
    """`rows` sampled requests; row 0 is always the same one, with a prompt that ends ~FRAMES/2 positions
    before the first KV bucket's end."""
    long = prompt_of_length(tts, engine.kv_buckets[0] - FRAMES // 2)
    assert long.embeds.shape[0] < engine.kv_buckets[0], "the long prompt overshot the first KV bucket"
    out = [Request(long, sampling(tts, seed=1000), FRAMES)]
    for i in range(1, rows):
        prompt = custom_prompt(tts, text_of(4 + 3 * i, start=i), SPEAKERS[i % len(SPEAKERS)])
        out.append(Request(prompt, sampling(tts, seed=1000 + i), FRAMES))
    return out


def run(engine: FastEngine, reqs: list[Request], *, graphs: bool) -> list[Any]:
    with recording(engine) as steps:
        if graphs:
            run_sync(engine, reqs)
        else:
            with graphs_off(engine):
                run_sync(engine, reqs)
    return steps


def worst(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Of several comparisons with a first run, the first that is not exact (else the last)."""
    return next((c for c in comparisons if not (c["codes_identical"] and c["logits_bitwise_equal"])), comparisons[-1])


def diagnosis(eager: dict[str, Any], graph: dict[str, Any], replay: dict[str, Any]) -> str:
    if not (eager["logits_bitwise_equal"] and graph["logits_bitwise_equal"]):
        return "run-to-run nondeterminism at a fixed batch: a race or a nondeterministic kernel"
    if not replay["logits_bitwise_equal"]:
        return "graph replay differs from eager, reproducibly: a kernel chosen differently under capture"
    return "graph replay == eager, bit for bit, and both repeat exactly"


def row0_compared(alone: list[Any], batched: list[Any]) -> dict[str, Any]:
    """Row 0 (the same request) run alone and as row 0 of a bigger batch: its own logits and frames only."""
    pairs = list(zip(alone, batched, strict=True))
    diffs = [float((a.logits[0].double() - b.logits[0].double()).abs().max()) for a, b in pairs]
    differ = [k for k, (a, b) in enumerate(pairs) if not a.out[0].equal(b.out[0])]
    first = differ[0] if differ else None
    return {
        "logits_max_abs_before_frames_differ": max(diffs[:first] if first is not None else diffs, default=0.0),
        "first_frame_difference_step": first,
        "frames_identical": first is None,
    }


def test_graph_replay_equals_eager(sync_engine: FastEngine, tts: Any, results: Results) -> None:
    engine = sync_engine
    failures = []
    row0: dict[int, list[Any]] = {}
    for rows in [b for b in BATCHES if b <= engine.scheduler.max_slots]:
        reqs = requests(tts, engine, rows)
        eagers, graphs, codes = [], [], {}
        for _ in range(REPEATS):  # interleaved: eager, graph, eager, graph, ...
            eagers.append(run(engine, reqs, graphs=False))
            codes.setdefault("eager", [r.codes for r in reqs])
            graphs.append(run(engine, reqs, graphs=True))
            codes.setdefault("graph", [r.codes for r in reqs])
        eager, graph = eagers[0], graphs[0]
        replay = compare_runs(graph, eager)
        repeat_eager = worst([compare_runs(e, eager) for e in eagers[1:]])
        repeat_graph = worst([compare_runs(g, graph) for g in graphs[1:]])
        kv_used = sorted({s.kv_len for s in graph})
        results.record(
            f"graph_vs_eager_b{rows}",
            rows=rows,
            frames=FRAMES,
            runs_each=REPEATS,
            kv_lengths_used=kv_used,
            graph_vs_eager=replay,
            eager_vs_eager=repeat_eager,
            graph_vs_graph=repeat_graph,
            diagnosis=diagnosis(repeat_eager, repeat_graph, replay),
        )
        assert all(r[0].rows == rows for r in eagers + graphs), "not admitted as one batch"
        if engine.graphs is not None:
            assert len(kv_used) == 2, f"the run should cross a KV bucket, used {kv_used}"
        same_codes = all(a.equal(b) for a, b in zip(codes["graph"], codes["eager"], strict=True))
        pairs = (("graph vs eager", replay), ("eager vs eager", repeat_eager), ("graph vs graph", repeat_graph))
        for name, cmp in pairs:
            if not (cmp["codes_identical"] and cmp["logits_bitwise_equal"]):
                failures.append(f"b{rows} {name}: first difference {cmp['first_logits_difference']}")
        if not same_codes:
            failures.append(f"b{rows}: the requests' frames differ between graph and eager")
        row0[rows] = eager
    composition = {f"b1_vs_b{rows}": row0_compared(row0[1], steps) for rows, steps in row0.items() if rows > 1}
    results.record(
        "batch_composition",
        note="the same request (row 0) alone and in bigger batches, eager; nonzero: numbers depend on the batch",
        **composition,
    )
    assert not failures, "graph replay vs eager is not exact:\n" + "\n".join(failures)


def test_graph_replay_on_the_engine_thread(sync_engine: FastEngine, tts: Any, shared: Any, results: Results) -> None:
    """Hand-stepped eager run vs the engine's own thread (step stream, codec thread) replaying graphs."""
    engine = sync_engine
    reqs = requests(tts, engine, 4)
    reference = run(engine, reqs, graphs=False)
    expected = [r.codes for r in reqs]
    with recording(engine) as threaded:
        for r in reqs:
            engine.submit(r.make())  # all queued before the thread starts: one batch, as in the reference
        shared.start()
        wait_for(reqs, timeout_s=120)
    one_batch = compare_runs(threaded, reference)
    one_batch_same = [r.codes.equal(e) for r, e in zip(reqs, expected, strict=True)]

    # As the benchmark's check submits: one by one into a running engine, building a prompt before each.
    with recording(engine) as racy:
        for r in reqs:
            custom_prompt(tts, text_of(8), "ryan")  # the host time the benchmark spends per submission
            engine.submit(r.make())
        wait_for(reqs, timeout_s=120)
    results.record(
        "graph_vs_eager_threaded",
        submitted_before_start=one_batch,
        requests_identical_before_start=one_batch_same,
        first_step_rows_before_start=threaded[0].rows if threaded else None,
        requests_identical_while_running=[r.codes.equal(e) for r, e in zip(reqs, expected, strict=True)],
        first_step_rows_while_running=racy[0].rows if racy else None,
        step_rows_while_running=[s.rows for s in racy],
        note=(
            "while_running is the benchmark's way of submitting: the first request is often admitted alone, so "
            "the batches (and, in bf16, the numbers) differ from run to run; reported, not asserted"
        ),
    )
    assert threaded and threaded[0].rows == len(reqs), "the requests queued before start did not share a batch"
    assert all(one_batch_same), f"engine thread vs hand-stepped eager: frames differ {one_batch_same}"
    assert one_batch["logits_bitwise_equal"], (
        f"engine thread vs hand-stepped eager: first difference {one_batch['first_logits_difference']}"
    )
