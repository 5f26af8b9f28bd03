"""The fused decode attention (attention_kernel.py, QTTS_FUSED_ATTENTION) on the GPU, at the full-size model's
shapes, where the CPU tests cannot go: compiled inside `decode_layer` as the engine compiles it (the row count,
and the talker's KV length, for any size), and replayed in a CUDA graph.

Per shape (the code predictor's: 64 rows at position 7 of 16 keys; the talker's: 2 and 64 rows at their own
positions, 256 of 512 cache positions read, several key blocks), on random bf16 weights and a cache laid out as
the engine's are (the code predictor's a tensor per layer, the talker's a layer's view of one larger tensor, and
once with K and V 2**31 elements apart, as the talker's are at the server's default sizes: the kernel's i64 version):

* compiled, the fused layer is close to the compiled torch layer (max abs difference recorded);
* it writes each row's key and value at its position, in place, and nothing else;
* a CUDA graph of it replays to the same bits as the call it was captured from.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.fused_layouts import HEAD_DIM, HEADS, KV_HEADS, layer_case, mark_dynamic_case, written
from qwen_tts_server.engine.fast import attention_kernel
from qwen_tts_server.engine.fast.model_runner import decode_layer

from .support import Results, Tier, max_abs

pytestmark = pytest.mark.gpu

# name: (shape, rows, cache layout and sizes compiled dynamic as the engine has them; bench/fused_layouts.py builds
# the cases and says more)
CASES = {
    "predictor_64": ("predictor", 64, "own", "rows"),
    "talker_2": ("talker", 2, "layer", "kv+rows"),
    "talker_64": ("talker", 64, "layer", "kv+rows"),
    # K and V 2**31 elements apart: the kernel's i64 version, which the talker runs at the server's default sizes
    "talker_64_i64": ("talker", 64, "far", "kv+rows"),
}


FAR_CASE_BYTES = 14 * 2**30  # three "far" caches of 4.3 GB in bf16 at once (the torch, fused and graph runs)


def _case(name: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, torch.Tensor]:
    shape, rows, layout, dynamic = CASES[name]
    args, cache = layer_case(shape, rows, layout, device, dtype)
    mark_dynamic_case(args, dynamic)
    return args, cache


@pytest.mark.parametrize("shape", list(CASES))
def test_fused_attention_compiled_and_graphed(shape: str, tier: Tier, results: Results) -> None:
    if not attention_kernel.supported(tier.device, HEADS, KV_HEADS, HEAD_DIM):
        pytest.skip("the fused attention kernel needs CUDA and Triton")
    if CASES[shape][2] == "far" and torch.cuda.mem_get_info(tier.device)[0] < FAR_CASE_BYTES:
        pytest.skip("three caches with K and V 2**31 elements apart need ~14 GB of free GPU memory")
    layer = torch.compile(decode_layer)
    with torch.inference_mode():
        args, torch_cache = _case(shape, tier.device, tier.dtype)
        before = torch_cache.clone()
        expected = layer(*args, None, False)
        args, cache = _case(shape, tier.device, tier.dtype)
        got = layer(*args, None, True)
        # A graph of the fused layer replays to the same bits as the call it was captured from.
        args, graph_cache = _case(shape, tier.device, tier.dtype)
        call = functools.partial(layer, *args, None, True)
        stream = torch.cuda.Stream(tier.device)
        stream.wait_stream(torch.cuda.current_stream(tier.device))
        with torch.cuda.stream(stream):
            call()  # warm-up on the capture stream
        torch.cuda.current_stream(tier.device).wait_stream(stream)
        graph_cache.copy_(before)
        direct = call().clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        graph_cache.copy_(before)
        graph.replay()
        torch.cuda.synchronize(tier.device)
    wrote, torch_wrote = written(before, cache), written(before, torch_cache)
    scale = float(expected.float().abs().max())
    diff = {"out": max_abs(got, expected), "cache": max_abs(cache, torch_cache)}
    same_writes, replay = wrote == torch_wrote, torch.equal(out, direct)
    results.record(f"fused_attention_{shape}", max_abs=diff, out_max=scale, same_writes=same_writes, replay=replay)
    assert len(torch_wrote) == 2 * CASES[shape][1] * KV_HEADS, "the compiled torch layer wrote into a copy"
    assert same_writes, f"{len(wrote - torch_wrote)} vectors written astray, {len(torch_wrote - wrote)} missed"
    assert replay, "graph replay differs from the call it was captured from"
    assert diff["out"] <= 2**-5 * scale, diff
    assert diff["cache"] <= 2**-6 * float(torch_cache.float().abs().max()), diff
