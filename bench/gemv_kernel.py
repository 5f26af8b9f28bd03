"""A candidate projection kernel for a few rows, to time against cuBLAS (`bench.micro_kernels --parts gemv`).

Why: at one stream a frame's ~450 projections take ~3.6 of its ~5.3 ms, each near cuBLAS's 4-14 us at the 1.7B
shapes, where reading the weights alone would take 1.2-7.5 us at 3.35 TB/s (docs/benchmarks.md): about half the
memory rate. cuBLAS tiles for many rows and splits K at one row (a memset and a reduce kernel more). This is the
plain alternative for 1-16 rows: each program owns `BLOCK_N` outputs of every row and streams their weight rows
once, in `BLOCK_K` slices, with fp32 sums; no split, no second kernel. If it wins at the engine's shapes, the norm
before a projection (a per-row scale of the sums) and the SiLU gate before the down projection could be folded
into its loads, two to three kernels fewer a layer; if not, cuBLAS stays.

Not used by the engine. `y = gemv(x, w)` is `F.linear(x, w)` for x [M, K], w [N, K] (row-major, contiguous).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every test machine has it
    triton = None

MAX_ROWS = 4  # the product tile is BLOCK_M x BLOCK_N x BLOCK_K fp32 values in registers

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x,
        w,
        y,
        M,
        N,
        K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        rows = m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            weights = tl.load(w + n[:, None] * K + k[None, :]).to(tl.float32)  # [BLOCK_N, BLOCK_K]
            inputs = tl.load(x + m[:, None] * K + k[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
            acc += tl.sum(inputs[:, None, :] * weights[None, :, :], axis=2)
        tl.store(y + m[:, None] * N + n[None, :], acc.to(y.dtype.element_ty), mask=rows[:, None])


def gemv(x: Tensor, w: Tensor, *, block_n: int = 16, block_k: int = 256, num_warps: int = 4) -> Tensor:
    """x [M, K] @ w[N, K].T for M <= MAX_ROWS, with `block_n` outputs a program and `block_k` inputs a slice."""
    M, K = x.shape
    N = w.shape[0]
    if triton is None:
        raise RuntimeError("gemv needs Triton")
    if M > MAX_ROWS or w.shape[1] != K or N % block_n or K % block_k:
        shapes = f"{tuple(x.shape)} {tuple(w.shape)}"
        raise ValueError(f"gemv takes <= {MAX_ROWS} rows and N, K multiples of its blocks, not {shapes}")
    if not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("gemv reads contiguous rows")
    y = x.new_empty(M, N)
    constants: dict[str, Any] = {"K": K, "BLOCK_M": max(triton.next_power_of_2(M), 1), "BLOCK_N": block_n}
    _gemv_kernel[(N // block_n,)](x, w, y, M, N, **constants, BLOCK_K=block_k, num_warps=num_warps)
    return y
