"""bench/fused_layouts.py on the CPU: its cases hold the same values in every layout, laid out as named, and a
case whose process fails becomes a row with the error, not a crash of the run."""

from __future__ import annotations

import torch

from bench import fused_layouts
from bench.fused_layouts import LAYOUTS, layer_case

CPU = torch.device("cpu")


def test_every_layout_holds_the_same_inputs_and_caches() -> None:
    cases = {layout: layer_case("talker", 2, layout, CPU, torch.float32) for layout in LAYOUTS}
    (args, caches) = cases["own"]
    for other_args, other_caches in list(cases.values())[1:]:
        for a, b in zip(args, other_args, strict=True):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
        for a, b in zip(caches, other_caches, strict=True):
            assert torch.equal(a, b)


def test_the_layouts_are_what_they_say() -> None:
    own, views, offsets = (layer_case("predictor", 2, layout, CPU, torch.float32)[1] for layout in LAYOUTS)
    storage = [[cache.untyped_storage().data_ptr() for cache in caches] for caches in (own, views, offsets)]
    assert storage[0][0] != storage[0][1] and own[0].storage_offset() == own[1].storage_offset() == 0
    assert storage[1][0] == storage[1][1] and views[1].storage_offset() > 0  # V a view of K's tensor
    assert storage[2][0] != storage[2][1] and min(cache.storage_offset() for cache in offsets) > 0


def test_written_names_each_changed_vector() -> None:
    _, caches = layer_case("predictor", 2, "own", CPU, torch.float32)
    before = tuple(cache.clone() for cache in caches)
    caches[1][1, 3, 7, 0] += 1.0
    assert fused_layouts._written(before, caches) == {(1, 1, 3, 7)}


def test_a_case_whose_process_fails_is_a_row_with_its_error() -> None:
    row = fused_layouts.run_case("predictor", 2, "own", compiled=False, timeout_s=120)  # no CUDA here
    assert row["layout"] == "own" and row["rows"] == 2
    assert "error" in row and "out_max_abs" not in row, row
