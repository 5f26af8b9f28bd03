"""bench.gemv_kernel, the candidate projection kernel micro_kernels times against cuBLAS: it must compute what
`F.linear` does before its time means anything. Run in Triton's interpreter on the CPU, in fp32."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def interpreted_checks() -> None:
    """Every row count it takes, blocks smaller than and equal to the matrix, plain and with the norm, the gate
    and the residual, against the separate ops in float64."""
    import torch.nn.functional as F

    from bench.gemv_kernel import gemv

    gen = torch.Generator().manual_seed(0)
    checks = 0
    for rows, k_in, n_out, block_n, block_k in [(1, 512, 64, 16, 256), (2, 1024, 32, 8, 512), (3, 256, 48, 16, 128),
                                                (4, 256, 32, 32, 256)]:  # fmt: skip
        w = torch.randn(n_out, k_in, generator=gen)
        norm = torch.rand(k_in, generator=gen) + 0.5
        residual = torch.randn(rows, n_out, generator=gen)
        variants = {"plain": {}, "norm": {"norm": norm}, "gated": {"gated": True}, "residual": {"residual": residual}}
        variants["norm+residual"] = {"norm": norm, "residual": residual}
        variants["gated+residual"] = {"gated": True, "residual": residual}
        for name, options in variants.items():
            x = 3 * torch.randn(rows, 2 * k_in if options.get("gated") else k_in, generator=gen)
            y = gemv(x, w, block_n=block_n, block_k=block_k, **options)
            inputs = x.double()
            if options.get("gated"):
                inputs = F.silu(inputs[:, :k_in]) * inputs[:, k_in:]
            if "norm" in options:
                inputs = F.rms_norm(inputs, (k_in,), norm.double(), 1e-6)
            expected = inputs @ w.double().T + (residual.double() if "residual" in options else 0)
            assert y.shape == (rows, n_out), name
            torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=2e-4, msg=name)
            checks += 1
    checks += _fused_projection_matches_gemv(gen)
    print(f"gemv: {checks} checks passed")


def _fused_projection_matches_gemv(gen: torch.Generator) -> int:
    """micro_kernels' torch side of each layer projection (uncompiled here) against `gemv` with the options it
    names: the two sides of the GPU comparison compute the same thing from the same tensors."""
    import bench.micro_kernels as micro
    from bench.gemv_kernel import gemv

    compile_ = torch.compile
    torch.compile = lambda fn, **_: fn  # type: ignore[assignment]  # inductor's C++ build is not the point here
    try:
        for proj in ("qkv", "o", "gate_up", "down"):
            w = torch.randn(32, 256, generator=gen) * 0.1
            reference, options, inputs = micro.fused_projection(proj, torch.randn(2, 256, generator=gen), w)
            torch.testing.assert_close(gemv(inputs, w, **options), reference(), rtol=1e-5, atol=1e-5, msg=proj)
    finally:
        torch.compile = compile_
    return 4


def test_gemv_equals_linear_in_the_interpreter() -> None:
    """The checks above in a process of their own: TRITON_INTERPRET must be set before Triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    code = "from tests.bench.test_gemv_kernel import interpreted_checks; interpreted_checks()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gemv: 28 checks passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "options", "message"),
    [
        ((5, 256), (16, 256), {}, "1-4 rows"),
        ((0, 256), (16, 256), {}, "1-4 rows"),
        ((256,), (16, 256), {}, "1-4 rows"),
        ((1, 200), (16, 200), {}, "powers of two that divide"),
        ((1, 256), (20, 256), {}, "powers of two that divide"),
        ((1, 256), (48, 256), {"block_n": 24}, "powers of two"),
        ((2, 256), (16, 256), {"gated": True}, "2K"),
        ((2, 128), (16, 256), {}, "not 128 wide"),
        ((2, 256), (16, 256), {"norm": torch.ones(128)}, "norm is"),
        ((2, 256), (16, 256), {"residual": torch.zeros(1, 16)}, "residual"),
        ((2, 256), (16, 256), {"residual": torch.zeros(16, 2).T}, "contiguous"),
    ],
    ids=["too-many-rows", "no-rows", "one-dim", "k-not-a-multiple", "n-not-a-multiple", "block-not-a-power",
         "gate-one-width", "x-too-narrow", "norm-shape", "residual-shape", "residual-strided"],
)  # fmt: skip
def test_gemv_refuses_what_it_does_not_take_with_what_to_change(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], options: dict, message: str
) -> None:
    from bench.gemv_kernel import gemv

    with pytest.raises(ValueError, match=message):
        gemv(torch.zeros(x_shape), torch.zeros(w_shape), **options)
