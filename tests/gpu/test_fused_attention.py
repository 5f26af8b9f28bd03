"""The fused decode attention (attention_kernel.py, QTTS_FUSED_ATTENTION) on the GPU, at the full-size model's
shapes, where the CPU tests cannot go: compiled inside `decode_layer` as the engine compiles it, and replayed
in a CUDA graph.

Per shape (the code predictor's: 64 rows at position 7 of 16 keys; the talker's: 2 and 64 rows at their own
positions, 256 of 512 cache positions read, several key blocks), on random bf16 weights and caches that are
per-layer views of one larger tensor, as the engine's are:

* compiled, the fused layer is close to the compiled torch layer (max abs difference recorded);
* it writes each row's key and value at its position in place, in the larger tensor, and nothing else;
* a CUDA graph of it replays to the same bits as the call it was captured from.
"""

from __future__ import annotations

import functools

import pytest
import torch

from qwen_tts_server.engine.fast import attention_kernel
from qwen_tts_server.engine.fast.model_runner import decode_layer

from .support import Results, Tier, max_abs

pytestmark = pytest.mark.gpu

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
# name: (rows, hidden, MLP size, cache positions, keys read, one position for every row)
SHAPES = {
    "predictor_64": (64, 1024, 3072, 16, 16, True),
    "talker_2": (2, 2048, 6144, 512, 256, False),
    "talker_64": (64, 2048, 6144, 512, 256, False),
}


def _case(shape: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, torch.Tensor]:
    """decode_layer's arguments (slots and fused left out) and the [K/V, row, kv head, position, dim] tensor
    whose views the caches are."""
    rows, hidden, inter, length, kv_len, shared = SHAPES[shape]
    gen = torch.Generator(device="cpu").manual_seed(3)

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    qkv = rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, hidden, scale=hidden**-0.5)
    attn_args = (1 + rand(hidden, scale=0.1), 1e-6, qkv, None, 1 + rand(HEADS + KV_HEADS, HEAD_DIM, scale=0.1))
    attn_args += (1e-6, HEADS, KV_HEADS)
    out_args = (rand(hidden, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5), None, 1 + rand(hidden, scale=0.1))
    out_args += (1e-6, rand(2 * inter, hidden, scale=hidden**-0.5), rand(hidden, inter, scale=inter**-0.5))
    kv = rand(2, rows + 3, KV_HEADS, length, HEAD_DIM)
    x = rand(rows, 1, hidden)
    if shared:
        positions = torch.tensor([7], device=device)
        cos, sin = rand(1, HEAD_DIM), rand(1, HEAD_DIM)
        mask = (torch.arange(kv_len, device=device) <= 7)[None, None, None, :]
    else:
        positions = torch.randint(0, kv_len, (rows,), generator=gen).to(device)
        positions[0] = kv_len - 1  # one row sees every key it reads
        cos, sin = rand(rows, 1, 1, HEAD_DIM), rand(rows, 1, 1, HEAD_DIM)
        mask = (torch.arange(kv_len, device=device)[None, :] <= positions[:, None])[:, None, None, :]
    return (x, cos, sin, mask, positions, kv[0], kv[1], HEAD_DIM**-0.5, attn_args, out_args), kv


def _written(kv: torch.Tensor, positions: torch.Tensor, rows: int) -> torch.Tensor:
    """Each row's key and value at its position [row, K/V, kv head, dim]."""
    at = positions.expand(rows)
    return kv[:, torch.arange(rows, device=kv.device), :, at]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_attention_compiled_and_graphed(shape: str, tier: Tier, results: Results) -> None:
    if not attention_kernel.supported(tier.device, HEADS, KV_HEADS, HEAD_DIM):
        pytest.skip("the fused attention kernel needs CUDA and Triton")
    rows = SHAPES[shape][0]
    layer = torch.compile(decode_layer)
    with torch.inference_mode():
        args, kv_torch = _case(shape, tier.device, tier.dtype)
        before = kv_torch.clone()
        expected = layer(*args, None, False)
        args, kv = _case(shape, tier.device, tier.dtype)
        got = layer(*args, None, True)
        positions = args[4]
        written = _written(kv, positions, rows)
        # Nothing but the written positions changed: put them back and the tensor is as it was.
        restored = kv.clone()
        restored[:, torch.arange(rows, device=kv.device), :, positions.expand(rows)] = _written(before, positions, rows)
        untouched = torch.equal(restored, before)
        # A graph of the fused layer replays to the same bits as the call it was captured from.
        args, kv_graph = _case(shape, tier.device, tier.dtype)
        call = functools.partial(layer, *args, None, True)
        stream = torch.cuda.Stream(tier.device)
        stream.wait_stream(torch.cuda.current_stream(tier.device))
        with torch.cuda.stream(stream):
            call()  # warm-up on the capture stream
        torch.cuda.current_stream(tier.device).wait_stream(stream)
        kv_graph.copy_(before)
        direct = call().clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        kv_graph.copy_(before)
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
