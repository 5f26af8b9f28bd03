"""The fused decode-attention kernel (attention_kernel.py) against the torch path it replaces, run in Triton's
interpreter on the CPU (the GPU tier runs it compiled, in CUDA graphs, against upstream)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import triton

from qwen_tts_server.engine.fast import attention_kernel
from qwen_tts_server.engine.fast.model_runner import decode_layer

from .test_model_runner import _layer_args, _mask

REPO = Path(__file__).resolve().parents[3]
HEAD_DIM, KV_HEADS = 16, 2


def test_the_kernel_takes_power_of_two_groups_head_sizes_16_to_128_and_small_tiles_on_cuda_only() -> None:
    cuda = torch.device("cuda")
    assert attention_kernel.supported(cuda, 16, 8, 128)
    assert not attention_kernel.supported(torch.device("cpu"), 16, 8, 128)
    assert not attention_kernel.supported(cuda, 12, 4, 128)  # three query heads per kv head
    assert not attention_kernel.supported(cuda, 16, 8, 96)
    assert not attention_kernel.supported(cuda, 16, 8, 8)  # tl.dot's products need 16 or more
    assert not attention_kernel.supported(cuda, 8, 8, 512)  # tiles that would spill
    assert not attention_kernel.supported(cuda, 16, 6, 128)  # heads not a multiple of kv heads


@pytest.mark.parametrize(
    ("kv_len", "crowded"), [(16, False), (512, False), (512, True)], ids=["predictor", "talker", "talker-crowded"]
)
def test_the_kernel_compiles_for_hopper_with_the_scalars_torch_compile_passes(kv_len: int, crowded: bool) -> None:
    """Compiled for an H100 here, without one (Triton's own ptxas), at the 1.7B model's shapes: with its float
    arguments as fp64, which is how inductor passes them to a traced user kernel (the first GPU run failed so:
    the softmax's running sum turned fp64 inside its loop), and as fp32, how Triton's own launcher does (the op
    is opaque now); and with the K-to-V offset as i64, what Triton makes of the talker's at the server's default
    sizes (28 layers x 65 rows x 8 heads x 4,096 positions x 128 is past 2**31). The talker's launch constants
    for a launch of more programs than SMs (`crowded`) as well."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = attention_kernel._decode_attention_kernel
    constants = attention_kernel.launch_constants(kv_len, 16, 8, 128, torch.bfloat16, crowded)
    options = {"num_warps": constants.pop("num_warps")}
    pointers = {"positions": "*i64", "rows": "*i64", "mask": "*i1"}
    for floats, offset in (("fp64", "i32"), ("fp32", "i32"), ("fp32", "i64")):
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name in ("qk_eps", "scale"):
                signature[name] = floats
            elif name in ("qkv", "qk_norm", "cos", "sin", "k_cache", "out", *pointers):
                signature[name] = pointers.get(name, "*bf16")
            else:
                signature[name] = offset if name == "kv_offset" else "i32"
        fixed = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
        source = ASTSource(kernel, signature, fixed)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert ".target sm_90" in compiled.asm["ptx"]
        assert _spilled_bytes(compiled.asm["ptx"]) == 0  # a spill would put local-memory round trips in the loop


def _spilled_bytes(ptx: str) -> int:
    """Bytes ptxas spills to local memory for this PTX (`ptxas -v`, the one Triton ships)."""
    target = re.search(r"\.target (\S+)", ptx)
    assert target is not None
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        command = [str(ptxas), "-v", "--gpu-name", target.group(1), "k.ptx", "-o", "k.cubin"]
        report = subprocess.run(command, cwd=tmp, capture_output=True, text=True, check=True).stderr
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert spills, report
    return sum(int(n) for n in spills)


def test_fused_layer_equals_the_torch_layer_in_the_interpreter() -> None:
    """The checks below, in a process of their own: TRITON_INTERPRET must be set before Triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    code = "from tests.engine.fast.test_attention_kernel import interpreted_checks; interpreted_checks()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("6 checks passed"), done.stdout[-2000:]


def _interpreter_reads_scalar_arguments() -> None:
    """Triton's interpreter turns a scalar argument into a one-element array and `range(0, n, step)` in the
    kernel calls int() on it, which numpy 2 refuses for arrays that are not 0-d: read its one element."""
    import triton.runtime.interpreter as interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor: type) -> None:
        patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = patched


def _interpreter_multiplies_bf16() -> None:
    """Triton's interpreter keeps bf16 as its uint16 bits and `tl.dot` multiplies those as integers: widen
    bf16 operands to fp32 first (exact: bf16 is fp32's upper half), as the GPU's tensor cores do."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def widened(handle):  # noqa: ANN001, ANN202 - the interpreter's TensorHandle
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched(self, a, b, *rest):  # noqa: ANN001, ANN202
        return dot(self, widened(a), widened(b), *rest)

    interpreter.InterpreterBuilder.create_dot = patched


def _interpreter_rounds_to_bf16() -> None:
    """Triton's interpreter truncates fp32 to bf16; the GPU (and torch) round to nearest even: do that."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    convert = interpreter._convert_float

    def rounded(data, from_dtype, to_dtype, rounding_mode):  # noqa: ANN001, ANN202
        if from_dtype != tl.float32 or to_dtype != tl.bfloat16:
            return convert(data, from_dtype, to_dtype, rounding_mode)
        bits = np.asarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)

    interpreter._convert_float = rounded


def _inputs(dtype: torch.dtype, positions: list[int], length: int, kv_len: int, shared: bool, stale=None):
    """A layer's weights and one decode step's inputs for len(positions) rows (`shared`: one position, cos/sin
    and mask for every row, as the code predictor has), a cache of `length` positions read up to `kv_len`."""
    torch.manual_seed(1)

    def to(t: torch.Tensor) -> torch.Tensor:  # bf16 values in every dtype: the fp32 run is the bf16 run's exact
        return t.to(torch.bfloat16).to(dtype)

    attn_args, out_args = (tuple(to(a) if isinstance(a, torch.Tensor) else a for a in args) for args in _layer_args())
    cache = to(torch.randn(2, 6, KV_HEADS, length, HEAD_DIM))  # [K/V, row, kv head, position, D]
    if stale is not None:  # keys and values no row may see: past each cache row's position (the first rows')
        for row in range(cache.shape[1]):
            after = positions[min(row, len(positions) - 1)] + 1
            cache[:, row, :, after:] = stale
    B = 3 if shared else len(positions)
    x = to(torch.randn(B, 1, attn_args[0].shape[0]))
    at = torch.tensor(positions)
    rope = 1 if shared else B
    cos, sin = to(torch.randn(rope, 1, 1, HEAD_DIM)), to(torch.randn(rope, 1, 1, HEAD_DIM))
    return x, cos, sin, _mask(at + 1, kv_len), at, cache, 0.25, attn_args, out_args


def _layer(fused: bool, dtype: torch.dtype, *case, slots: torch.Tensor | None = None, stale=None):
    """decode_layer on `_inputs(dtype, *case)`: its output and the cache it wrote."""
    args = _inputs(dtype, *case, stale=stale)
    out = decode_layer(*args, slots, fused)
    return out, args[5]


# (positions, cache length, keys read, shared): the code predictor's one block of 16; the talker's rows, several
# blocks of 16 with the last key read visible and a cache longer than what is read; one row.
CASES = [([7], 16, 16, True), ([5, 71, 40], 96, 72, False), ([0, 33, 63], 64, 64, False), ([50], 64, 64, False)]


def _attention(fused: bool, dtype: torch.dtype, *case) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention alone (the op, or the torch path it replaces): its output [B, heads x D] and the keys
    written, for `_inputs(dtype, *case)`."""
    from qwen_tts_server.engine.fast.model_runner import decode_attention, qkv_projection, split_heads

    x, cos, sin, mask, at, cache, scale, attn_args, _ = _inputs(dtype, *case)
    norm, eps, weight, bias, qk_norm, qk_eps, heads, kv_heads = attn_args
    qkv = qkv_projection(x, norm, eps, weight, bias)
    B = x.shape[0]
    rows = torch.arange(B)
    if fused:
        args = (cos.view(-1, HEAD_DIM), sin.view(-1, HEAD_DIM), at, rows, cache, mask.view(len(mask), -1))
        out = attention_kernel.fused_decode_attention(qkv[:, 0], qk_norm, *args, qk_eps, scale, heads, kv_heads)
    else:
        q, k, v = split_heads(qkv, cos, sin, qk_norm, qk_eps, heads, kv_heads)
        cache[0, rows, :, at] = k[:, :, 0]
        cache[1, rows, :, at] = v[:, :, 0]
        keys, values = cache[:, :B, :, : mask.shape[-1]]
        out = decode_attention(q, keys, values, mask, scale).reshape(B, -1)
    return out.float(), cache[0, rows, :, at].float()


def _against_reference(positions: list[int], kv_len: int, mask: torch.Tensor, tuning: dict | None = None) -> None:
    """The op (fp32) against a float64 reference of what it documents: each row attends the mask's positions
    before its own and its new key, whatever the mask says past that; cache positions a row may not see hold NaN,
    and so does the row's own slot until the kernel writes it. For masks the engine never builds (holes below a
    row's position) and rows it does have (a free row whose position is at or past the keys read). `tuning`: other
    launch constants (`decode_attention`), as bench.micro_kernels tries."""
    from qwen_tts_server.engine.fast.model_runner import decode_attention, split_heads

    heads, B, length = 2 * KV_HEADS, len(positions), kv_len + 32
    torch.manual_seed(2)
    qkv = torch.randn(B, (heads + 2 * KV_HEADS) * HEAD_DIM)
    qk_norm, cos, sin = 1 + 0.1 * torch.randn(heads + KV_HEADS, HEAD_DIM), *torch.randn(2, B, HEAD_DIM)
    cache = torch.randn(2, B, KV_HEADS, length, HEAD_DIM)
    at, rows = torch.tensor(positions), torch.arange(B)
    q, k, v = split_heads(qkv[:, None].double(), cos[:, None, None].double(), sin[:, None, None].double(),
                          qk_norm.double(), 1e-6, heads, KV_HEADS)  # fmt: skip
    keys, values = cache.double().clone()
    keys[rows, :, at], values[rows, :, at] = k[:, :, 0], v[:, :, 0]
    seen = torch.zeros(B, length, dtype=torch.bool)
    seen[:, :kv_len] = mask
    seen &= torch.arange(length)[None, :] < at[:, None]
    seen[rows, at] = True
    cache.masked_fill_(~seen[None, :, None, :, None], float("nan"))
    expected = decode_attention(q, keys, values, seen[:, None, None, :], 0.25).reshape(B, -1)
    got = attention_kernel.decode_attention(qkv, qk_norm, cos, sin, at, rows, cache, mask, 1e-6, 0.25, heads, KV_HEADS,
                                            tuning)  # fmt: skip
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def interpreted_checks() -> None:
    """Run under TRITON_INTERPRET=1 (see the test above); raises on the first failure."""
    _interpreter_reads_scalar_arguments()
    _interpreter_multiplies_bf16()
    _interpreter_rounds_to_bf16()
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        for case in CASES:  # fp32: the torch path's numbers, caches included
            for got, expected in zip(*(_layer(f, torch.float32, *case) for f in (True, False)), strict=True):
                close(got, expected)
        talker = CASES[1]
        slots = torch.tensor([4, 1, 5])  # gathered rows: each reads and writes its own slot
        fused, plain = (_layer(f, torch.float32, *talker, slots=slots) for f in (True, False))
        for got, expected in zip(fused, plain, strict=True):
            close(got, expected)
        for stale in (1e4, float("nan")):  # keys no row may see change nothing, nor does never-written cache
            close(_layer(True, torch.float32, *talker, stale=stale)[0], _layer(True, torch.float32, *talker)[0])
        for kv_len in (16, 128):  # one block of scalar products; blocks on `tl.dot`
            holes = torch.zeros(3, kv_len, dtype=torch.bool)
            holes[:, ::3] = True
            _against_reference([kv_len - 1, 10, 5], kv_len, holes)
            free = [3, kv_len + 20, kv_len]  # free rows keep a position that may be past every key read
            _against_reference(free, kv_len, torch.arange(kv_len)[None, :] <= torch.tensor(free)[:, None])
        # The talker's other key blocks: 64 (the launch constants of a launch with fewer programs than SMs; the
        # interpreter's CPU counts as one SM, so the checks above ran the other's 16), 32 that bench.micro_kernels
        # times, and its scalar products over long rows.
        scalar = {"DOT": False, "ROWS": 2, "BLOCK": 32}  # ROWS: the group, 2 query heads a kv head here
        for tuning in ({"BLOCK": 64}, {"BLOCK": 32}, scalar):
            _against_reference([127, 10, 40], 128, torch.ones(3, 128, dtype=torch.bool), tuning)
        # bf16: the attention and the keys written within two bf16 steps of the fp32 result at its largest value
        # (the torch path's own bf16 is within ~1.1; the talker's blocks on `tl.dot`, bf16 probabilities, included)
        for case in CASES:
            exact = _attention(False, torch.float32, *case)
            for got, e in zip(_attention(True, torch.bfloat16, *case), exact, strict=True):
                assert (got - e).abs().max() <= 2**-7 * e.abs().max(), (case, (got - e).abs().max(), e.abs().max())
    print("6 checks passed")


def _zero_args(B: int) -> tuple:
    """`decode_attention`'s arguments for B rows of zeros, 2 query heads a kv head, a 32-position cache."""
    heads, L = 2 * KV_HEADS, 32
    qkv = torch.zeros(B, (heads + 2 * KV_HEADS) * HEAD_DIM)
    qk_norm, cos, sin = torch.ones(heads + KV_HEADS, HEAD_DIM), torch.ones(B, HEAD_DIM), torch.zeros(B, HEAD_DIM)
    cache, mask = torch.zeros(2, B, KV_HEADS, L, HEAD_DIM), torch.ones(B, L, dtype=torch.bool)
    at, rows = torch.zeros(B, dtype=torch.long), torch.arange(B)
    return (qkv, qk_norm, cos, sin, at, rows, cache, mask, 1e-6, 0.25, heads, KV_HEADS)


def test_a_tuning_with_fewer_query_rows_than_a_group_is_refused() -> None:
    """bench.micro_kernels' tunings may set ROWS: fewer than a kv head's query heads would drop some silently."""
    with pytest.raises(ValueError, match="would drop query heads"):
        attention_kernel.decode_attention(*_zero_args(1), {"DOT": False, "ROWS": 1})


def test_a_launch_of_more_programs_than_sms_takes_the_crowded_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program per (row, kv head): 2 rows x 2 kv heads fit a 4-SM device, 3 rows do not. The launch itself is
    not reached (the spy stops it): the interpreter check runs both sets of constants."""

    class Launched(Exception):
        pass

    crowded: list[bool] = []

    def spy(*args: object) -> dict:
        crowded.append(bool(args[-1]))
        raise Launched

    monkeypatch.setattr(attention_kernel, "_sm_count", lambda device: 4)
    monkeypatch.setattr(attention_kernel, "launch_constants", spy)
    for B in (2, 3):
        with pytest.raises(Launched):
            attention_kernel.decode_attention(*_zero_args(B))
    assert crowded == [False, True]
