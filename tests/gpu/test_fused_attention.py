"""The fused decode attention (attention_kernel.py, QTTS_FUSED_ATTENTION) on the GPU, at the full-size model's
shapes, where the CPU tests cannot go: compiled inside `decode_layer` as the engine compiles it, and replayed
in a CUDA graph.

Per shape (the code predictor's: 64 rows at position 7 of 16 keys; the talker's: 2 and 64 rows at their own
positions, 256 of 512 cache positions read, several key blocks), on random bf16 weights and caches that are
laid out as the engine's are (the code predictor's a tensor per layer and K/V, the talker's views of one
larger tensor):

* compiled, the fused layer is close to the compiled torch layer (max abs difference recorded);
* it writes each row's key and value at its position, in place, and nothing else;
* a CUDA graph of it replays to the same bits as the call it was captured from.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.fused_layouts import HEAD_DIM, HEADS, KV_HEADS, layer_case
from qwen_tts_server.engine.fast import attention_kernel
from qwen_tts_server.engine.fast.model_runner import decode_layer

from .support import Results, Tier, max_abs

pytestmark = pytest.mark.gpu

# name: (shape, rows, cache layout as the engine has it: the code predictor's K and V tensors of their own, the
# talker's views of one tensor; bench/fused_layouts.py builds the cases and says more)
CASES = {
    "predictor_64": ("predictor", 64, "own"),
    "talker_2": ("talker", 2, "views"),
    "talker_64": ("talker", 64, "views"),
}


def _case(name: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, tuple[torch.Tensor, torch.Tensor]]:
    shape, rows, layout = CASES[name]
    return layer_case(shape, rows, layout, device, dtype)


def _written(caches: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, rows: int) -> torch.Tensor:
    """Each row's key and value at its position [row, K/V, kv head, dim]."""
    at = positions.expand(rows)
    return torch.stack(caches)[:, torch.arange(rows, device=at.device), :, at]


def _reset(caches: tuple[torch.Tensor, torch.Tensor], before: tuple[torch.Tensor, torch.Tensor]) -> None:
    for cache, saved in zip(caches, before, strict=True):
        cache.copy_(saved)


# Compiled on the talker's caches (views of one tensor) at 64 rows the kernel faults, which would fail every test
# after it in the process: skipped until the op takes the whole cache (docs/notes.md); the server refuses `all`.
FAULTS = pytest.mark.skip(reason="faults compiled on cache views at 64 rows (2026-12-07, H100); the server refuses it")


@pytest.mark.parametrize("shape", [pytest.param(s, marks=FAULTS) if s == "talker_64" else s for s in CASES])
def test_fused_attention_compiled_and_graphed(shape: str, tier: Tier, results: Results) -> None:
    if not attention_kernel.supported(tier.device, HEADS, KV_HEADS, HEAD_DIM):
        pytest.skip("the fused attention kernel needs CUDA and Triton")
    rows = CASES[shape][1]
    layer = torch.compile(decode_layer)
    with torch.inference_mode():
        args, kv_torch = _case(shape, tier.device, tier.dtype)
        before = tuple(cache.clone() for cache in kv_torch)
        expected = layer(*args, None, False)
        args, kv = _case(shape, tier.device, tier.dtype)
        got = layer(*args, None, True)
        positions = args[4]
        written = _written(kv, positions, rows)
        # Nothing but the written positions changed: put them back and the tensor is as it was.
        restored = torch.stack(kv)
        restored[:, torch.arange(rows, device=tier.device), :, positions.expand(rows)] = _written(
            before, positions, rows
        )
        untouched = torch.equal(restored, torch.stack(before))
        # A graph of the fused layer replays to the same bits as the call it was captured from.
        args, kv_graph = _case(shape, tier.device, tier.dtype)
        call = functools.partial(layer, *args, None, True)
        stream = torch.cuda.Stream(tier.device)
        stream.wait_stream(torch.cuda.current_stream(tier.device))
        with torch.cuda.stream(stream):
            call()  # warm-up on the capture stream
        torch.cuda.current_stream(tier.device).wait_stream(stream)
        _reset(kv_graph, before)
        direct = call().clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        _reset(kv_graph, before)
        graph.replay()
        torch.cuda.synchronize(tier.device)
    scale = float(expected.float().abs().max())
    diff = {"out": max_abs(got, expected), "keys_values": max_abs(written, _written(kv_torch, positions, rows))}
    results.record(
        f"fused_attention_{shape}", max_abs=diff, out_max=scale, untouched=untouched, replay=torch.equal(out, direct)
    )
    assert untouched, "the fused layer wrote cache positions other than each row's own"
    assert torch.equal(out, direct), "graph replay differs from the call it was captured from"
    assert diff["out"] <= 2**-5 * scale, diff
    assert diff["keys_values"] <= 2**-6 * float(written.float().abs().max()), diff
