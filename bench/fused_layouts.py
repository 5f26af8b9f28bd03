"""Which cache layouts and compiled sizes the fused decode attention (engine/fast/attention_kernel.py) gets
right on a GPU. Each case runs in a process of its own: a fault poisons the process's CUDA context.

A layer's cache [K/V, row, kv head, position, dim] is one tensor, in one of these layouts:
  own    a tensor of its own (how the engine holds each code predictor layer's)
  layer  one layer's view of a [K/V, layer, ...] tensor, strided and at an offset (how it holds the talker's:
         one tensor, so that moving a request's row is one copy)
  far    K and V 2**31 elements apart (4 GiB of bf16 between them), so that the kernel runs its i64 version, as
         the talker's does at the server's default sizes; not in the default --layouts
A compiled case compiles the KV length and/or the row count for any size (`--dynamic`), as the engine does.

Per case, the op through `decode_layer` against the torch path on the same random bf16 inputs at the 1.7B
model's shapes: the output's and the cache's max abs differences (with the output's largest value: a bf16 step
between 4 and 8 is 0.031), the cache vectors the fused layer wrote that the torch path did not, and those it
missed; a case that fails or faults says so. A diagnostic: prints a table and writes JSON; it asserts nothing.
On 2026-12-07 (H100, torch 2.11), while the op took K and V as two tensors: every static case matched; every
dynamic one faulted or wrote stray positions, traced into inductor's code or opaque alike (docs/notes.md).

    python3 -m bench.fused_layouts --shapes talker --rows 2,64 --compiled 1 --dynamic none,kv+rows --out "$OUT"
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.tables import markdown_table

REPO = Path(__file__).resolve().parents[1]

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
# name: (hidden, MLP size, cache positions, keys read, one position for every row)
SHAPES = {"predictor": (1024, 3072, 16, 16, True), "talker": (2048, 6144, 512, 256, False)}
LAYOUTS = ("own", "layer")  # the default --layouts
ALL_LAYOUTS = (*LAYOUTS, "far")  # what --layouts accepts
# K to V in the "far" layout, in elements: past 2**31 - 1, so Triton takes the kernel's offset as an i64 (at the
# server's default sizes the talker's is 28 layers x 65 rows x 8 kv heads x 4,096 positions x 128).
FAR = 2**31
# Which sizes a compiled case compiles for any value (the engine's talker: the mask's KV length at its first
# compile, the rows once a second batch size comes).
DYNAMIC = ("none", "kv", "rows", "kv+rows")


def _cache(values: Tensor, layout: str, far: int = FAR) -> Tensor:
    """A cache holding `values` [K/V, row, ...], laid out as `layout` says (`far`: K to V in elements there)."""
    if layout == "own":
        return values.clone()
    if layout == "far":
        half = values[0]
        cache = values.new_zeros(far + half.numel()).as_strided(values.shape, (far, *half.stride()))
        cache.copy_(values)
        return cache
    layers = values.new_zeros(values.shape[0], 3, *values.shape[1:])
    layers[:, 1] = values
    return layers[:, 1]


def layer_case(shape: str, rows: int, layout: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, Tensor]:
    """`decode_layer`'s arguments for one decode step of `rows` rows at `shape` (slots and fused left out), and
    its cache: the same values for the same arguments, whatever the layout. The code predictor's rows share
    position 7 of 16 keys; the talker's each have their own (the first sees every key it reads)."""
    hidden, inter, length, kv_len, shared = SHAPES[shape]
    gen = torch.Generator(device="cpu").manual_seed(3)

    def rand(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    qkv = rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, hidden, scale=hidden**-0.5)
    attn_args = (1 + rand(hidden, scale=0.1), 1e-6, qkv, None, 1 + rand(HEADS + KV_HEADS, HEAD_DIM, scale=0.1))
    attn_args += (1e-6, HEADS, KV_HEADS)
    out_args = (rand(hidden, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5), None, 1 + rand(hidden, scale=0.1))
    out_args += (1e-6, rand(2 * inter, hidden, scale=hidden**-0.5), rand(hidden, inter, scale=inter**-0.5))
    cache = _cache(rand(2, rows + 3, KV_HEADS, length, HEAD_DIM), layout)
    x = rand(rows, 1, hidden)
    if shared:
        positions = torch.tensor([7], device=device)
        cos, sin = rand(1, HEAD_DIM), rand(1, HEAD_DIM)
        mask = (torch.arange(kv_len, device=device) <= 7)[None, None, None, :]
    else:
        positions = torch.randint(0, kv_len, (rows,), generator=gen).to(device)
        positions[0] = kv_len - 1
        cos, sin = rand(rows, 1, 1, HEAD_DIM), rand(rows, 1, 1, HEAD_DIM)
        mask = (torch.arange(kv_len, device=device)[None, :] <= positions[:, None])[:, None, None, :]
    return (x, cos, sin, mask, positions, cache, HEAD_DIM**-0.5, attn_args, out_args), cache


def written(before: Tensor, after: Tensor) -> set[tuple[int, ...]]:
    """(K/V, row, kv head, position) of every cache vector that changed."""
    return {tuple(at) for at in (after != before).any(dim=-1).nonzero().tolist()}


def mark_dynamic_case(args: tuple, dynamic: str) -> None:
    """Have torch.compile take `args`' KV length and/or row count as any size, as `dynamic` says (strictly: a
    compile that specializes one of them raises, so a dynamic case is one)."""
    from qwen_tts_server.engine.fast.compiling import mark_dynamic

    x, cos, sin, mask, positions = args[:5]
    if "kv" in dynamic:
        mark_dynamic(mask, 3, strict=True)
    if "rows" in dynamic:
        for tensor in (x, cos, sin, mask, positions):
            mark_dynamic(tensor, 0, strict=True)


def compare(
    shape: str,
    rows: int,
    layout: str,
    compiled: bool,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    dynamic: str = "none",
) -> dict[str, Any]:
    """The fused layer against the torch layer on one case, in this process (CUDA; or the CPU under Triton's
    interpreter, as the tests run it). `dynamic` (of DYNAMIC) applies to a compiled case."""
    from qwen_tts_server.engine.fast.model_runner import decode_layer

    layer = torch.compile(decode_layer) if compiled else decode_layer
    runs = {}
    with torch.inference_mode():
        for fused in (False, True):
            args, cache = layer_case(shape, rows, layout, torch.device(device), dtype)
            if compiled:
                mark_dynamic_case(args, dynamic)
            before = cache.to("cpu", copy=True)  # out of reach of a stray write (and a copy on the CPU too)
            out = layer(*args, None, fused)
            after = cache.to("cpu", copy=True)
            runs[fused] = (out.float().cpu(), after.float(), written(before, after))
    (expected, torch_cache, torch_wrote), (got, fused_cache, fused_wrote) = runs[False], runs[True]
    return {
        "out_max_abs": float((got - expected).abs().max()),
        "out_max": float(expected.abs().max()),
        "cache_max_abs": float((fused_cache - torch_cache).abs().max()),
        "torch_writes": len(torch_wrote),  # K and V of each row's kv heads: 2 x rows x KV_HEADS, none into a copy
        "stray_writes": len(fused_wrote - torch_wrote),
        "missed_writes": len(torch_wrote - fused_wrote),
    }


def run_case(
    shape: str, rows: int, layout: str, compiled: bool, timeout_s: float, dynamic: str = "none"
) -> dict[str, Any]:
    """`compare` in a process of its own (run from the repository, wherever this one runs); a failure, a fault
    or a time-out becomes the row's `error`."""
    case = {"shape": shape, "rows": rows, "layout": layout, "compiled": compiled, "dynamic": dynamic}
    command = [sys.executable, "-m", "bench.fused_layouts", "--one", json.dumps(case)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**case, "seconds": timeout_s, "error": f"timed out after {timeout_s:.0f} s"}
    case["seconds"] = round(time.perf_counter() - t0, 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        try:
            return {**case, **json.loads(lines[-1])}
        except json.JSONDecodeError:
            pass
    errors = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines()
    return {**case, "error": f"exit status {done.returncode}: {(errors or ['no output'])[-1][:300]}"}


def table(results: list[dict[str, Any]]) -> str:
    head = ["shape", "rows", "layout", "compiled", "dynamic", "out max abs", "out max"]
    head += ["cache max abs", "stray writes", "missed writes", "error"]
    keys = ["shape", "rows", "layout", "compiled", "dynamic", "out_max_abs", "out_max"]
    keys += ["cache_max_abs", "stray_writes", "missed_writes", "error"]
    return markdown_table(head, ([r.get(k, "-") for k in keys] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="predictor,talker")
    parser.add_argument("--rows", default="2,64")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--compiled", default="0,1", help="0: eager, 1: torch.compile; comma-separated")
    parser.add_argument("--dynamic", default="none", help=f"compiled cases: comma-separated of {list(DYNAMIC)}")
    parser.add_argument("--timeout-s", type=float, default=120, help="per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case as JSON: run it here (run_case's child)
    args = parser.parse_args()
    if args.one:
        case = json.loads(args.one)
        result = compare(case["shape"], case["rows"], case["layout"], case["compiled"], dynamic=case["dynamic"])
        print(json.dumps(result), flush=True)
        return
    if not torch.cuda.is_available():
        sys.exit("fused_layouts needs CUDA")
    shapes, layouts = args.shapes.split(","), args.layouts.split(",")
    if not set(shapes) <= set(SHAPES) or not set(layouts) <= set(ALL_LAYOUTS):
        parser.error(f"--shapes of {sorted(SHAPES)}, --layouts of {list(ALL_LAYOUTS)}")
    if not set(args.compiled.split(",")) <= {"0", "1"}:
        parser.error(f"--compiled: 0 or 1, or both (0,1), not {args.compiled}")
    if not set(args.dynamic.split(",")) <= set(DYNAMIC):
        parser.error(f"--dynamic: comma-separated of {list(DYNAMIC)}, not {args.dynamic}")
    compiled = [c == "1" for c in args.compiled.split(",")]
    grid = itertools.product(shapes, [int(n) for n in args.rows.split(",")], layouts, compiled)
    cases = [(*case, dynamic) for case in grid for dynamic in (args.dynamic.split(",") if case[3] else ["none"])]
    results = []
    for *case, dynamic in cases:
        results.append(run_case(*case, timeout_s=args.timeout_s, dynamic=dynamic))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    card = torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = args.out / f"{stamp}-{card.replace(' ', '-')}-fused-layouts.json"
    path.write_text(json.dumps({"card": card, "torch": torch.__version__, "cases": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
