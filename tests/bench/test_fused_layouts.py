"""bench/fused_layouts.py on the CPU: its cases hold the same values in every layout, laid out as named, and a
case whose process fails becomes a row with the error, not a crash of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bench import fused_layouts

CPU = torch.device("cpu")


def _leaves(value: Any) -> Iterator[Any]:
    """Every argument, the layer's nested weights included."""
    if isinstance(value, tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_every_layout_holds_the_same_inputs_and_cache() -> None:
    cases = [fused_layouts.layer_case("talker", 2, layout, CPU, torch.float32) for layout in fused_layouts.LAYOUTS]
    for args, cache in cases:
        assert args[5] is cache  # decode_layer gets the cache returned
    args, cache = cases[0]
    for other_args, other_cache in cases[1:]:
        for a, b in zip(_leaves(args), _leaves(other_args), strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert torch.equal(cache, other_cache)


def test_the_layouts_are_what_they_say() -> None:
    own, layer = (fused_layouts.layer_case("predictor", 2, name, CPU, torch.float32)[1] for name in ("own", "layer"))
    assert own.is_contiguous() and own.storage_offset() == 0 and own.shape[0] == 2  # [K/V, row, ...] of its own
    assert not layer.is_contiguous() and layer.storage_offset() > 0  # a layer's view of a [K/V, layer, ...] tensor
    assert layer.untyped_storage().nbytes() == 3 * own.untyped_storage().nbytes()


def test_the_far_layout_puts_v_far_from_k_with_the_same_values() -> None:
    values = torch.randn(2, 3, 2, 4, 8)
    cache = fused_layouts._cache(values, "far", far=1000)
    assert torch.equal(cache, values) and cache.stride() == (1000, *values[0].stride())
    assert cache.untyped_storage().nbytes() == (1000 + values[0].numel()) * values.element_size()
    assert fused_layouts.FAR > 2**31 - 1  # what makes Triton pass the offset as an i64


def test_written_names_each_changed_vector() -> None:
    _, cache = fused_layouts.layer_case("predictor", 2, "own", CPU, torch.float32)
    before = cache.clone()
    cache[1, 1, 3, 7, 0] += 1.0
    assert fused_layouts.written(before, cache) == {(1, 1, 3, 7)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case fails for want of CUDA only where there is none")
def test_a_case_whose_process_fails_is_a_row_with_its_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the child runs from the repository wherever this one runs
    row = fused_layouts.run_case("predictor", 2, "own", compiled=False, timeout_s=120)
    assert row["layout"] == "own" and row["rows"] == 2 and "out_max_abs" not in row
    assert row["error"].startswith("exit status 1: ") and "NVIDIA driver" in row["error"], row


def test_compare_finds_the_fused_layer_equal_to_the_torch_layer_in_the_interpreter() -> None:
    """`compare` itself, on the CPU under Triton's interpreter (fp32: the two paths agree to rounding), for the
    talker's shape in each layout, eager and compiled with every size dynamic (as the engine compiles the
    talker; the op is opaque to torch.compile, so the interpreter runs it there too): nothing written astray,
    nothing missed."""
    code = (
        "from tests.engine.fast.test_attention_kernel import _interpreter_reads_scalar_arguments as patch; patch()\n"
        "import json, torch\n"
        "from bench.fused_layouts import LAYOUTS, compare\n"
        "for layout in LAYOUTS:\n"
        "    for compiled in (False, True):\n"
        "        row = compare('talker', 2, layout, compiled, 'cpu', torch.float32, dynamic='kv+rows')\n"
        "        print(json.dumps({'layout': layout, 'compiled': compiled, **row}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=fused_layouts.REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * len(fused_layouts.LAYOUTS)
    for row in rows:
        assert row["out_max_abs"] <= 1e-4 * row["out_max"] and row["cache_max_abs"] <= 1e-4, row
        assert row["stray_writes"] == row["missed_writes"] == 0, row
        assert row["torch_writes"] == 2 * 2 * fused_layouts.KV_HEADS, row  # into the cache given, not a copy
