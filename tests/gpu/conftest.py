"""The GPU tier's fixtures: the checkpoint, the model loaded once, one shared fast engine, the results file.

Every test here carries the `gpu` marker and runs only when selected (`pytest -m gpu tests/gpu`, which is
what `make test-gpu` runs); the default `make test` skips them with a reason, and so does a selected run
without CUDA (unless QTTS_GPU_TEST_DEVICE=cpu, for working on the tests themselves: tiny checkpoints, fp32).

The shared engine is first driven by hand (`engine.step()`, nothing started: the graph tests, where every
request must join in the same step), then started on its threads (the threaded, streaming and recompile
tests). A stopped engine cannot be restarted, so the sync fixture skips once the engine has been started;
the files run in an order where that does not happen.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_tts_server.engine.fast.engine import FastEngine

from . import support
from .support import MAX_LEN, MAX_SLOTS, MODEL, Results, Tier

_TIER = Tier.from_env()
_RESULTS: Results | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tier unless `-m` selects `gpu`, and where there is no device to run it on."""
    markexpr = config.option.markexpr or ""
    selected = re.search(r"(?<!not )\bgpu\b", markexpr) is not None
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        if not selected:
            item.add_marker(pytest.mark.skip(reason="GPU tier: run it with `make test-gpu` (pytest -m gpu tests/gpu)"))
        elif _TIER is None:
            item.add_marker(
                pytest.mark.skip(
                    reason="GPU tier: no CUDA device (QTTS_GPU_TEST_DEVICE=cpu runs the bodies on the CPU, tiny models)"
                )
            )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test's outcome goes into the results file beside its numbers."""
    if _RESULTS is None or "gpu" not in report.keywords:
        return
    if report.when == "call" or report.outcome != "passed":
        name = report.nodeid.split("::")[-1]
        _RESULTS.record(name, outcome=report.outcome, seconds=round(report.duration, 1))


@pytest.fixture(scope="session")
def tier() -> Tier:
    assert _TIER is not None  # collection skipped every test otherwise
    return _TIER


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    full_size: bool


@pytest.fixture(scope="session")
def checkpoint(tier: Tier, request: pytest.FixtureRequest) -> Checkpoint:
    """The full-size random checkpoint under QTTS_GPU_TEST_MODELS, else (smaller, said loudly) a tiny one."""
    full = tier.models_dir / MODEL
    if tier.cuda and (full / "config.json").is_file():
        return Checkpoint(full, True)
    if tier.cuda:
        print(f"[gpu] WARNING: no {full}; running on the TINY checkpoint (python -m bench.checkpoint writes the 1.7B)")
    tiny: Path = request.getfixturevalue("tiny_models_dir")
    return Checkpoint(tiny / MODEL, False)


@pytest.fixture(scope="session")
def results(tier: Tier, checkpoint: Checkpoint) -> Results:
    global _RESULTS
    _RESULTS = Results(tier.results_path, support.header(tier, checkpoint.path, checkpoint.full_size))
    print(f"[gpu] results: {tier.results_path}")
    return _RESULTS


@pytest.fixture(scope="session")
def load(tier: Tier) -> Callable[[Path, torch.dtype], Any]:
    """Upstream `from_pretrained` on the tier's device (sdpa attention, as the server without flash-attn)."""

    def load(path: Path, dtype: torch.dtype) -> Any:
        from qwen_tts import Qwen3TTSModel

        return Qwen3TTSModel.from_pretrained(
            str(path), device_map=str(tier.device), dtype=dtype, attn_implementation="sdpa"
        )

    return load


@pytest.fixture(scope="session")
def tts(load: Callable[[Path, torch.dtype], Any], checkpoint: Checkpoint, tier: Tier, results: Results) -> Any:
    t0 = time.perf_counter()
    model = load(checkpoint.path, tier.dtype)
    results.record("setup", model_load_s=round(time.perf_counter() - t0, 1))
    return model


class SharedEngine:
    """The one FastEngine the graph, streaming and recompile tests share, warmed up as the server does."""

    def __init__(self, tts: Any, tier: Tier, results: Results) -> None:
        t0 = time.perf_counter()
        self.engine = FastEngine(
            tts,
            max_slots=MAX_SLOTS,
            max_len=MAX_LEN,
            admit_wait_s=0.04,  # the server's defaults (QTTS_ADMIT_WAIT_MS, QTTS_CODEC_WAIT_MS)
            codec_wait_s=0.1,
            compile=tier.compile,
            fused_attention=tier.fused_attention,
        )
        self.engine.warm_up()
        if tier.cuda:
            torch.cuda.synchronize(tier.device)
        self.compiles_after_warm_up = support.compiles()
        self.started = False
        results.record(
            "setup",
            engine_warm_up_s=round(time.perf_counter() - t0, 1),
            compiled=self.engine.runner.compiled,
            graphs_after_warm_up=support.captures(self.engine),
            compiles_after_warm_up=self.compiles_after_warm_up,
            batch_buckets=self.engine.buckets,
            kv_buckets=self.engine.kv_buckets,
        )

    def start(self) -> FastEngine:
        if not self.started:
            self.engine.start()
            self.started = True
        return self.engine


@pytest.fixture(scope="session")
def shared(tts: Any, tier: Tier, results: Results) -> Iterator[SharedEngine]:
    box = SharedEngine(tts, tier, results)
    yield box
    box.engine.stop()


@pytest.fixture
def sync_engine(shared: SharedEngine) -> FastEngine:
    """The shared engine, not started: the test steps it by hand."""
    if shared.started:
        pytest.skip("the shared engine was already started by an earlier test (run tests/gpu in file order)")
    return shared.engine


@pytest.fixture
def started_engine(shared: SharedEngine) -> FastEngine:
    """The shared engine running on its own threads, as the server runs it."""
    return shared.start()
