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
    print(f"gemv: {checks} checks passed")


def test_gemv_equals_linear_in_the_interpreter() -> None:
    """The checks above in a process of their own: TRITON_INTERPRET must be set before Triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    code = "from tests.bench.test_gemv_kernel import interpreted_checks; interpreted_checks()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gemv: 24 checks passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize(
    ("rows", "k_in", "n_out", "message"),
    [(5, 256, 16, "<= 4 rows"), (1, 200, 16, "multiples"), (1, 256, 20, "multiples")],
    ids=["too-many-rows", "k-not-a-multiple", "n-not-a-multiple"],
)
def test_gemv_refuses_shapes_its_blocks_do_not_cover(rows: int, k_in: int, n_out: int, message: str) -> None:
    from bench.gemv_kernel import gemv

    with pytest.raises(ValueError, match=message):
        gemv(torch.zeros(rows, k_in), torch.zeros(n_out, k_in), block_n=16, block_k=256)


def test_gemv_refuses_a_norm_or_residual_of_another_shape_and_a_gate_of_one_width() -> None:
    from bench.gemv_kernel import gemv

    x, w = torch.zeros(2, 256), torch.zeros(16, 256)
    with pytest.raises(ValueError, match="norm is"):
        gemv(x, w, norm=torch.ones(128))
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="multiples"):  # gated wants [gate, up]: 512 wide
        gemv(x, w, gated=True)
