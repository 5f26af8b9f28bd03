"""The decode layer's own pieces: attention written as matmuls equals SDPA's, and compiled the layer
writes the KV cache in place and computes what it computes eagerly (the GPU runs it compiled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen_tts_server.engine.fast.model_runner import ModelRunner, decode_attention, decode_layer

from .test_engine_release import CUSTOM, has_cpp_compiler

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96


def _mask(used: torch.Tensor, length: int) -> torch.Tensor:
    return (torch.arange(length)[None, :] < used[:, None])[:, None, None, :]


def test_decode_attention_equals_sdpa_with_grouped_heads() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, HEADS, 1, HEAD_DIM)
    keys, values = torch.randn(3, KV_HEADS, 40, HEAD_DIM), torch.randn(3, KV_HEADS, 40, HEAD_DIM)
    mask = _mask(torch.tensor([1, 17, 40]), 40)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3, enable_gqa=True)
    got = decode_attention(q, keys, values, mask, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # A key a row may not see changes nothing: row 0 sees only position 0.
    keys[0, :, 1:] = 1e4
    torch.testing.assert_close(decode_attention(q, keys, values, mask, 0.3)[0], got[0])


def _layer_args() -> tuple[tuple, tuple]:
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape) * 0.1

    qkv = w((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    attn_args = (w(HIDDEN), 1e-6, qkv, None, w(HEADS + KV_HEADS, HEAD_DIM), 1e-6, HEADS, KV_HEADS)
    out_args = (w(HIDDEN, HEADS * HEAD_DIM), None, w(HIDDEN), 1e-6, w(2 * INTER, HIDDEN), w(HIDDEN, INTER))
    return attn_args, out_args


def _run(fn, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output and its cache's K and V halves (views of the one cache tensor it was given)."""
    torch.manual_seed(1)
    attn_args, out_args = _layer_args()
    cache = torch.randn(2, 6, KV_HEADS, 64, HEAD_DIM)
    x = torch.randn(3, 1, HIDDEN)
    positions = torch.tensor([5, 31, 0])
    cos, sin = torch.randn(3, 1, 1, HEAD_DIM), torch.randn(3, 1, 1, HEAD_DIM)
    mask = _mask(positions + 1, 32)
    with torch.inference_mode():
        out = fn(x, cos, sin, mask, positions, cache, 0.25, attn_args, out_args, slots)  # reads 32 keys
    return out, cache[0], cache[1]


def test_decode_layer_writes_each_rows_position_and_reads_its_own_row() -> None:
    out, k_cache, _ = _run(decode_layer)
    gathered, k_gathered, _ = _run(decode_layer, slots=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(gathered, out)
    torch.testing.assert_close(k_gathered, k_cache)
    moved, k_moved, _ = _run(decode_layer, slots=torch.tensor([4, 1, 5]))
    untouched, _, _ = _run(lambda *a: a[5][0].clone())  # the keys as they were before any write
    # Row 0 lives in slot 4 now: the write went there, and its output depends on slot 4's keys, not row 0's.
    assert not torch.equal(k_moved[4, :, 5], untouched[4, :, 5])
    assert torch.equal(k_moved[0], untouched[0])
    assert not torch.equal(moved[0], out[0])


@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_layer_writes_the_cache_in_place() -> None:
    """Compiled (as on the GPU), the cache write is part of the layer's graph: it must land in the
    caller's cache tensors, not in a copy, and the layer must compute what it does eagerly."""
    eager = _run(decode_layer)
    compiled = _run(torch.compile(decode_layer, dynamic=False))
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_code_predictor_matches_eager_and_writes_its_own_cache(load_tts) -> None:
    """Compiled, a codebook's step is one graph (every layer, the final norm, the head): it must pick the codes
    the eager step picks, sum the same frame embedding, and leave the keys and values in the runner's own
    cache tensors (a compiled graph that wrote into copies would still return the right codes)."""
    tts = load_tts(CUSTOM)
    runners = [ModelRunner(tts, max_slots=3, max_len=32, compile=compile) for compile in (False, True)]
    torch.manual_seed(2)
    past_hidden = torch.randn(3, tts.model.talker.config.hidden_size)
    code0 = torch.tensor([5, 17, 300])
    with torch.inference_mode():
        (eager_codes, eager_sum), (codes, embedding_sum) = (
            runner.predict_codes(past_hidden, code0, lambda _, logits: logits.argmax(-1)) for runner in runners
        )
    assert torch.equal(codes, eager_codes)
    torch.testing.assert_close(embedding_sum, eager_sum, rtol=1e-5, atol=1e-5)
    eager, compiled = runners
    caches = [runner.cp_caches for runner in (compiled, eager)]
    for got, expected in zip(*caches, strict=True):
        assert got[0, :3].abs().sum() > 0 and got[1, :3].abs().sum() > 0  # K and V written
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
