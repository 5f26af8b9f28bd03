"""`bench.bench_engines.graph_check` on the CPU with the tiny model: both runs step the same batches.

CUDA graphs do not exist on the CPU, so both runs are eager here; what this covers is the admission
the check depends on (on the GPU a request's bf16 numbers depend on its batch size): every row is
admitted in the first step of each run, however the engine thread and the submitting thread interleave,
and each run's batch size per step is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bench.bench_engines import FastBench, Plan, Report, build_model, graph_check, parse_args

ROWS, FRAMES = 3, 6


@pytest.fixture(scope="module")
def fast() -> Iterator[FastBench]:
    tts = build_model("tiny", device="cpu", dtype=torch.float32)
    bench = FastBench(tts, max_slots=4, max_len=256, compile=False)
    try:
        yield bench
    finally:
        bench.close()


def check_result(fast: FastBench) -> dict[str, Any]:
    args = parse_args(["--tiny", "--check-rows", str(ROWS), "--check-frames", str(FRAMES)])
    plan = Plan.from_args(args)
    report = Report(args, torch.device("cpu"), torch.float32)
    graph_check(fast, plan, "tiny", report)
    return report.data["graph_checks"]["tiny"]


def test_graph_check_admits_every_row_in_the_first_step_of_both_runs(fast: FastBench) -> None:
    result = check_result(fast)
    one_batch = [ROWS] * FRAMES  # all rows from the first step, all holding exactly FRAMES frames
    assert result["batch_sizes"] == {"eager": one_batch, "graphs": one_batch}
    assert result["same_batches"]
    assert result["identical"], result  # fp32 eager twice over the same batches: bit-exact


def test_rows_share_a_batch_even_when_submitting_is_slow(fast: FastBench, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each submission followed by a pause longer than the engine's admission wait (0.04 s): a running
    engine would admit every row alone; held, it still admits them in one step."""
    submit = FastBench._submit

    def slow_submit(self: FastBench, *args: Any) -> None:
        submit(self, *args)
        time.sleep(0.1)

    monkeypatch.setattr(FastBench, "_submit", slow_submit)
    result = check_result(fast)
    one_batch = [ROWS] * FRAMES
    assert result["batch_sizes"] == {"eager": one_batch, "graphs": one_batch}
