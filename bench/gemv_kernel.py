"""A candidate projection kernel for a few rows, to time against cuBLAS (`bench.micro_kernels --parts gemv`).

Why: at one stream a frame's ~450 projections take ~3.6 of its ~5.3 ms, each near cuBLAS's 4-14 us at the 1.7B
shapes, where reading the weights alone would take 1.2-7.5 us at 3.35 TB/s (docs/benchmarks.md): about half the
memory rate. cuBLAS tiles for many rows and splits K at one row (a memset and a reduce kernel more). This is the
plain alternative for 1-4 rows: each program owns `BLOCK_N` outputs of every row and streams their weight rows
once, in `BLOCK_K` slices, with fp32 sums; no split, no second kernel. What sits beside a projection in a decoder
layer can ride along, so a layer would be five kernels (norm and q/k/v, attention, output and residual, norm and
gate/up, gate and down and residual) where it is eight or nine now:

* `norm`: RMSNorm before the projection. rms_norm(x) * g @ W.T is ((x * g) @ W.T) / rms(x): each row's sum of
  squares is taken in the same loop and its scale applied to the sums at the end.
* `gated`: the SiLU gate before the down projection: x is [M, 2K] (gate, then up) and the product reads
  silu(gate) * up.
* `residual`: added to the output (the residual stream).

They round differently from the separate ops (the normed input is never rounded to bf16): close, not bitwise.
Not used by the engine. `gemv(x, w)` is `F.linear(x, w)` for x [M, K], w [N, K] (row-major, contiguous).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every test machine has it
    triton = None

# The product tile is BLOCK_M x BLOCK_N x BLOCK_K fp32 values in registers: ptxas for sm_90 gives 31-96 registers
# a thread at 1-2 rows for micro_kernels' tunings; at 3-4 rows the larger tiles (32 x 256, 16 x 512) would take
# ~256 and may spill (not timed: a one-stream frame runs as two rows).
MAX_ROWS = 4

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x,
        w,
        y,
        norm,
        residual,
        M,
        N,
        eps,
        K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NORM: tl.constexpr,
        GATED: tl.constexpr,
        RESIDUAL: tl.constexpr,
    ):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        rows = m < M
        x_row = 2 * K if GATED else K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            weights = tl.load(w + n[:, None] * K + k[None, :]).to(tl.float32)  # [BLOCK_N, BLOCK_K]
            at = x + m[:, None] * x_row + k[None, :]
            inputs = tl.load(at, mask=rows[:, None], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
            if GATED:
                up = tl.load(at + K, mask=rows[:, None], other=0.0).to(tl.float32)
                inputs = inputs * tl.sigmoid(inputs) * up
            if NORM:
                squares += tl.sum(inputs * inputs, axis=1)
                inputs = inputs * tl.load(norm + k).to(tl.float32)[None, :]
            acc += tl.sum(inputs[:, None, :] * weights[None, :, :], axis=2)
        if NORM:
            acc = acc * tl.rsqrt(squares / K + eps)[:, None]
        out = m[:, None] * N + n[None, :]
        if RESIDUAL:
            acc += tl.load(residual + out, mask=rows[:, None], other=0.0).to(tl.float32)
        tl.store(y + out, acc.to(y.dtype.element_ty), mask=rows[:, None])


def check_arguments(
    x: Tensor, w: Tensor, norm: Tensor | None, gated: bool, residual: Tensor | None, block_n: int, block_k: int
) -> None:
    """What `gemv` takes, each refusal a ValueError that says what to change."""
    if x.dim() != 2 or w.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv takes x [1-{MAX_ROWS} rows, K] and w [N, K], not {tuple(x.shape)}, {tuple(w.shape)}")
    (M, width), (N, K) = x.shape, w.shape
    if width != (2 * K if gated else K):
        raise ValueError(f"x is [M, {'2K (gate, then up)' if gated else 'K'}] for w [N, K={K}], not {width} wide")
    if any(b < 1 or b & (b - 1) for b in (block_n, block_k)) or N % block_n or K % block_k:
        raise ValueError(f"blocks are powers of two that divide N={N} and K={K}, not {block_n} and {block_k}")
    if (norm is not None and norm.shape != (K,)) or (residual is not None and residual.shape != (M, N)):
        raise ValueError(f"gemv's norm is [{K}] and its residual [{M}, {N}]")
    tensors = [t for t in (x, w, norm, residual) if t is not None]
    if any(t.device != x.device for t in tensors) or not all(t.is_contiguous() for t in tensors):
        raise ValueError("gemv reads contiguous tensors on one device")


def gemv(
    x: Tensor,
    w: Tensor,
    *,
    norm: Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    residual: Tensor | None = None,
    block_n: int = 16,
    block_k: int = 256,
    num_warps: int = 4,
) -> Tensor:
    """x [M, K] @ w[N, K].T for M <= MAX_ROWS, with `block_n` outputs a program and `block_k` inputs a slice;
    `norm` [K] (RMSNorm's weight, `eps`) before it, `gated` (x is [M, 2K]: silu(gate) * up), `residual` [M, N]
    added after it (see the module's docstring)."""
    if triton is None:
        raise RuntimeError("gemv needs Triton")
    check_arguments(x, w, norm, gated, residual, block_n, block_k)
    M, N, K = x.shape[0], w.shape[0], w.shape[1]
    y = x.new_empty(M, N)
    flags: dict[str, Any] = {"NORM": norm is not None, "GATED": gated, "RESIDUAL": residual is not None}
    blocks: dict[str, Any] = {"BLOCK_M": triton.next_power_of_2(M), "BLOCK_N": block_n, "BLOCK_K": block_k}
    unused = x  # a pointer the kernel never reads where a flag is off
    args = (x, w, y, unused if norm is None else norm, unused if residual is None else residual, M, N, eps)
    _gemv_kernel[(N // block_n,)](*args, K=K, **blocks, **flags, num_warps=num_warps)
    return y
