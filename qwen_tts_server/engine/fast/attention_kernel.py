"""One decode layer's attention as one Triton kernel: q/k RMSNorm, RoPE, the K/V cache write and attention
over the cache, for one new position per row (CUDA only; the rest of the engine does not need Triton).

Why: at one stream a frame is ~1,870 kernels of ~3 us (103 decode layers: 28 of the talker, 75 of the code
predictor), and what it costs is their number. Compiled, a layer's attention was six of them: the q/k norm
and RoPE with the key's cache write, the value's cache write, the scores, the softmax's two passes and the
weighted sum (bench.profile_step --kernels-only, H100, 2026-12-06). Here it is one: a program per (row, kv
head) reads the fused q/k/v projection's output, normalizes and rotates its key and its group of query
heads, writes the key and value into the cache, and attends over the row's visible cache positions with an
online softmax, all in fp32, the new key taken from registers rather than read back. The code predictor's 16
keys are one block of scalar products; the talker's longer rows go in blocks of keys through the tensor cores
(`tl.dot`, the group's queries padded to a tile's 16 rows; `launch_constants`) rather than scalar products
(uncompiled at one row on an H100 the scalar version took ~28 us a talker layer, 6 us a predictor one).

Numerics: the same operations as `model_runner.split_heads` + `decode_attention`, but in fp32 between the
bf16 input and the bf16 output (the scores are not rounded to bf16; the talker's probabilities are, as the
torch path's), so it is close to, not bitwise equal to, that path; it is deterministic (no atomics), so a
CUDA graph replays it bit for bit. The GPU tier compares the engine with upstream teacher-forced. On the CPU
the engine keeps the torch path (exact against upstream), and so do shapes the kernel does not take
(`supported`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

try:  # Triton comes with torch's CUDA builds; without it (a CPU build) the engine keeps the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every test machine has it
    triton = None


TILE_MAX = 512  # query heads per kv head x head size: the scalar loop's fp32 tiles are [group, 16, head size]
HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs 16 or more; above 128 the tiles would spill (not measured)


def supported(device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these shapes on this device: CUDA with Triton, a power-of-two group of query
    heads per kv head and a head size of HEAD_DIMS (the kernel's register tiles), no larger together than
    TILE_MAX. Qwen3-TTS has 128 and groups of 2 (the CPU tests compile those for sm_90 without a spill)."""
    group = heads // kv_heads if kv_heads else 0
    powers = group > 0 and group & (group - 1) == 0
    fits = powers and head_dim in HEAD_DIMS and heads == group * kv_heads and group * head_dim <= TILE_MAX
    return triton is not None and device.type == "cuda" and fits


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        qkv,
        qkv_row,
        qk_norm,
        cos,
        sin,
        rope_row,
        positions,
        pos_row,
        rows,
        k_cache,
        kv_offset,
        cache_row,
        cache_head,
        cache_pos,
        mask,
        mask_row,
        mask_pos,
        out,
        out_row,
        kv_len,
        qk_eps,
        scale,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        DOT: tl.constexpr,
        ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)  # the kv head; its query heads are h * GROUP .. h * GROUP + GROUP - 1
        # In fp32 whatever they come as: as fp64 (how inductor passes a traced kernel's floats) every product
        # with them would be fp64.
        qk_eps = tl.cast(qk_eps, tl.float32)
        scale = tl.cast(scale, tl.float32)
        v_cache = k_cache + kv_offset  # a layer's cache is one tensor [K/V, row, kv head, position, D]
        GROUP: tl.constexpr = HEADS // KV_HEADS  # ROWS >= GROUP: see launch_constants
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, D)
        rot = (d + HALF) % D  # rotate_half: [-x[HALF:], x[:HALF]]
        sign = tl.where(d < HALF, -1.0, 1.0)
        c = tl.load(cos + b * rope_row + d).to(tl.float32)
        s = tl.load(sin + b * rope_row + d).to(tl.float32)
        base = qkv + b * qkv_row

        # The new key: normed, rotated, rounded as the cache holds it; the value as it is.
        k_at = (HEADS + h) * D
        kx = tl.load(base + k_at + d).to(tl.float32)
        kr = tl.load(base + k_at + rot).to(tl.float32)
        k_inv = tl.rsqrt(tl.sum(kx * kx, axis=0) / D + qk_eps)
        kw = tl.load(qk_norm + k_at + d).to(tl.float32)
        kwr = tl.load(qk_norm + k_at + rot).to(tl.float32)
        k_new = (kx * k_inv * kw * c + sign * kr * k_inv * kwr * s).to(k_cache.dtype.element_ty)
        v_new = tl.load(base + (HEADS + KV_HEADS + h) * D + d)
        row = tl.load(rows + b)
        pos = tl.load(positions + b * pos_row)
        slot = row * cache_row + h * cache_head
        tl.store(k_cache + slot + pos * cache_pos + d, k_new)
        tl.store(v_cache + slot + pos * cache_pos + d, v_new)

        # The group's queries [ROWS, D], normed and rotated, rounded to the cache's dtype.
        r = tl.arange(0, ROWS)
        real = (r < GROUP)[:, None]
        g = h * GROUP + r
        q_at = g[:, None] * D + d[None, :]
        q_rot = g[:, None] * D + rot[None, :]
        qx = tl.load(base + q_at, mask=real, other=0.0).to(tl.float32)
        qr = tl.load(base + q_rot, mask=real, other=0.0).to(tl.float32)
        q_inv = tl.rsqrt(tl.sum(qx * qx, axis=1) / D + qk_eps)[:, None]
        qw = tl.load(qk_norm + q_at, mask=real, other=0.0).to(tl.float32)
        qwr = tl.load(qk_norm + q_rot, mask=real, other=0.0).to(tl.float32)
        q = qx * q_inv * qw * c[None, :] + sign[None, :] * qr * q_inv * qwr * s[None, :]
        q_low = q.to(k_cache.dtype.element_ty)
        q = q_low.to(tl.float32)

        # Online softmax, started from the new key (always visible to its own position).
        k_f = k_new.to(tl.float32)
        m = tl.sum(q * k_f[None, :], axis=1) * scale  # [ROWS]
        total = tl.full([ROWS], 1.0, tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32) + v_new.to(tl.float32)[None, :]
        # Only positions before the new one: no later one is visible (the masks are causal), so a row reads
        # its own length, not the longest row's. The mask is not the keys' load predicate: all three loads of
        # a block go out at once; what the mask hides is zeroed after (never-written cache may hold NaN).
        end = tl.minimum(kv_len, pos)
        for start in range(0, end, BLOCK):
            at = start + tl.arange(0, BLOCK)
            inside = at < end
            seen = tl.load(mask + b * mask_row + at * mask_pos, mask=inside, other=0) != 0
            seen = seen & inside
            where = slot + at[:, None] * cache_pos + d[None, :]
            keys = tl.load(k_cache + where, mask=inside[:, None], other=0.0)  # [BLOCK, D]
            values = tl.load(v_cache + where, mask=inside[:, None], other=0.0)
            keys = tl.where(seen[:, None], keys, tl.zeros_like(keys))
            values = tl.where(seen[:, None], values, tl.zeros_like(values))
            if DOT:
                scores = tl.dot(q_low, tl.trans(keys), input_precision=PRECISION) * scale  # [ROWS, BLOCK]
            else:
                scores = tl.sum(q[:, None, :] * keys.to(tl.float32)[None, :, :], axis=2) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_next = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_next)
            p = tl.exp(scores - m_next[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            if DOT:  # the probabilities in the cache's dtype, as the torch path's are
                weighted = tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
            else:
                weighted = tl.sum(p[:, :, None] * values.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + weighted
            m = m_next
        o = acc / total[:, None]
        tl.store(out + b * out_row + q_at, o.to(out.dtype.element_ty), mask=real)


def launch_constants(
    kv_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, crowded: bool = False
) -> dict[str, Any]:
    """The kernel's compile-time arguments, and its warps, for a cache read up to `kv_len` positions: the code
    predictor's 16 keys are one block of scalar products in 2 warps; the talker's longer rows go on the tensor
    cores in tiles of 16 rows (the group's queries padded with zero rows, computed and never stored).

    `crowded`: the launch has more programs (rows x kv heads) than the GPU has SMs. Then the talker's key blocks
    are 16 with 2 warps (144 registers a thread, seven programs an SM): a c64 step's 512 programs are resident at
    once and their loads overlap. Otherwise they are 64 with 8 warps (198 registers, one program an SM): fewer,
    longer programs finish a small launch sooner. bench.micro_kernels, H100, 2026-12-07, a talker layer reading 150
    keys: 64 rows 20.6 us against 40.3, 44 rows 18.6 against 27.3 (32 keys in 4 warps: 15.9; rows 2-43 not timed
    yet), one row 13.7 against 9.2; the code predictor's layer in 2 warps against 4, 5.8 us against 7.2 at 64 rows
    and 4.3 against 4.5 at one. fp32 caches (the CPU tests') take fp32 products there, not tf32."""
    dot = kv_len > 16
    group = heads // kv_heads
    return {
        "HEADS": heads,
        "KV_HEADS": kv_heads,
        "D": head_dim,
        "BLOCK": 64 if dot and not crowded else 16,
        "DOT": dot,
        "ROWS": max(group, 16) if dot else group,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 8 if dot and not crowded else 2,
    }


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device; Triton's interpreter runs on the CPU, which counts as one."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _stride0(t: Tensor) -> int:
    """The row stride of `t`, 0 where one row serves every batch row (broadcast)."""
    return t.stride(0) if t.shape[0] > 1 else 0


def decode_attention(
    qkv: Tensor,
    qk_norm: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    rows: Tensor,
    cache: Tensor,
    mask: Tensor,
    qk_eps: float,
    scale: float,
    heads: int,
    kv_heads: int,
    tuning: Mapping[str, Any] | None = None,
) -> Tensor:
    """`fused_decode_attention`'s body (see there), with `tuning` over `launch_constants` (e.g. BLOCK, num_warps):
    the engine calls the op; bench.micro_kernels times other constants here."""
    B = qkv.shape[0]
    D = cache.shape[-1]
    vectors = (qkv, qk_norm, cos, sin, cache, mask, rows)
    if any(t.stride(-1) != 1 for t in vectors) or not qk_norm.is_contiguous():
        raise ValueError("the fused attention reads each vector as contiguous memory")
    out = qkv.new_empty(B, heads * D)
    crowded = B * kv_heads > _sm_count(cache.device)
    constants = {**launch_constants(mask.shape[-1], heads, kv_heads, D, cache.dtype, crowded), **(tuning or {})}
    if constants["ROWS"] < heads // kv_heads:
        raise ValueError(f"ROWS {constants['ROWS']} would drop query heads: a kv head has {heads // kv_heads}")
    _decode_attention_kernel[(B, kv_heads)](
        qkv,
        qkv.stride(0),
        qk_norm,
        cos,
        sin,
        _stride0(cos),
        positions,
        _stride0(positions),
        rows,
        cache,
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        mask,
        _stride0(mask),
        mask.stride(1),
        out,
        out.stride(0),
        mask.shape[-1],
        qk_eps,
        scale,
        **constants,
    )
    return out


fused_decode_attention: Callable[..., Tensor] | None = None
if triton is not None:
    # An opaque custom op that mutates one tensor. Opaque: torch.compile calls it as it is, and Triton's own
    # launcher runs the kernel with the real sizes (a CUDA graph replays the launch, so that costs nothing
    # there). One tensor: with K and V as two mutated arguments, compiled with a dynamic size (the talker's KV
    # length and row count always are), the layer faulted or wrote astray on an H100 (torch 2.11), traced
    # (`triton_op`) or opaque alike; on the CPU (torch 2.9) inductor's code handed a small op of that kind a
    # copy of the wrong size. With one, the layer matched on the H100 and the op gets the cache itself
    # (bench.fused_layouts --dynamic, 2026-12-07; docs/notes.md).
    @torch.library.custom_op("qtts::decode_attention", mutates_args={"cache"})
    def fused_decode_attention(
        qkv: Tensor,
        qk_norm: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        rows: Tensor,
        cache: Tensor,
        mask: Tensor,
        qk_eps: float,
        scale: float,
        heads: int,
        kv_heads: int,
    ) -> Tensor:
        """Attention output [B, heads x D] for the new position of each row; writes its key and value into
        `cache` [K/V, rows, kv_heads, L, D] at `rows[b]`, `positions[b]`.

        `qkv` [B, (heads + 2 kv_heads) x D]: the fused projection's output, before the q/k norm; `qk_norm`
        [heads + kv_heads, D] the norm weights (q heads, then k heads); `cos`/`sin` [B or 1, D] at the rows'
        positions; `positions` [B or 1]; `mask` [B or 1, L] bool, True where a cache position is visible. One
        row of cos/sin, positions or mask serves every row. `rows` must be distinct (each program reads its own
        row while writing it). The new position is always attended, from registers, and later ones never,
        whatever the mask says of them (the engine's masks are causal): where the torch path would differ (a free
        padding row's position past the mask), that row's output is one nobody reads."""
        return decode_attention(qkv, qk_norm, cos, sin, positions, rows, cache, mask, qk_eps, scale, heads, kv_heads)

    @fused_decode_attention.register_fake
    def _(
        qkv: Tensor,
        qk_norm: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        rows: Tensor,
        cache: Tensor,
        mask: Tensor,
        qk_eps: float,
        scale: float,
        heads: int,
        kv_heads: int,
    ) -> Tensor:
        return qkv.new_empty(qkv.shape[0], heads * cache.shape[-1])
