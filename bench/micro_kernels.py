"""Microbenchmarks of the kernel choices the step profile points at (CUDA), at the 1.7B shapes.

`bench.profile_step --kernels-only` shows where a frame's kernels go: decode attention through cuDNN's
flash kernel (one query row, 6 us a call at one row, 20 us at 64), split-K matmuls that add a memset
and a reduce kernel to every down projection at one row, and top-k for the narrow sampling plan (19 us
a codebook). This times alternatives for each, every variant replayed in a CUDA graph of `--calls`
calls (as the engine runs them), and checks that each attention variant agrees with SDPA's math. `fused`
times the fused decode attention (engine/fast/attention_kernel.py) alone at the shapes a c64 server step runs,
with the K and V bytes it reads as a rate, to tell the talker's calls from the code predictor's (a trace names
them alike). (A Triton projection for one stream's rows was timed here against cuBLAS and lost at two rows at
every shape, 1.2-2.3x its time: docs/benchmarks.md, seventeenth pass; removed after 8be1fed.)

    python -m bench.micro_kernels --out "$OUT"       # on the GPU; prints JSON lines
    python -m bench.micro_kernels --parts fused
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
TALKER = {"hidden": 2048, "inter": 6144, "vocab": 3072}
PREDICTOR = {"hidden": 1024, "inter": 3072, "vocab": 2048}


def graph_us(fn: Callable[[], Any], calls: int) -> float:
    """Mean device microseconds per call of `fn`, replayed `calls` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(1000 * start.elapsed_time(end) / (5 * calls), 2)


def attention_variants() -> dict[str, Callable[..., Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HEAD_DIM**-0.5)

    def efficient(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return sdpa(q, k, v, mask)

    def manual(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * HEAD_DIM**-0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
        return torch.matmul(probs, v)

    def broadcast(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        scores = (q[:, :, :, None, :].float() * k[:, :, None, :, :].float()).sum(-1) * HEAD_DIM**-0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (probs[..., None] * v[:, :, None, :, :].float()).sum(-2).to(q.dtype)

    return {
        "sdpa_default": sdpa,
        "sdpa_efficient": efficient,
        "manual_compiled": torch.compile(manual, dynamic=False),
        "broadcast_compiled": torch.compile(broadcast, dynamic=False),
    }


def bench_attention(calls: int) -> list[dict[str, Any]]:
    """Decode attention, grouped as the engine does: q [B, kv_heads, heads/kv_heads, hd] against one cache slice."""
    rows = []
    variants = attention_variants()
    for name, batch, length in [
        ("predictor", 1, 16),
        ("predictor", 64, 16),
        ("talker", 1, 512),
        ("talker", 64, 512),
        ("talker", 1, 2048),
        ("talker", 64, 2048),
    ]:
        g = HEADS // KV_HEADS
        q = torch.randn(batch, KV_HEADS, g, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        used = torch.randint(1, length + 1, (batch,), device="cuda")
        mask = (torch.arange(length, device="cuda")[None, :] < used[:, None])[:, None, None, :]
        reference = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=HEAD_DIM**-0.5
        )
        row: dict[str, Any] = {"shape": name, "batch": batch, "kv_len": length}
        for variant, fn in variants.items():
            try:
                error = float((fn(q, k, v, mask).float() - reference).abs().max())
                us = graph_us(lambda fn=fn, args=(q, k, v, mask): fn(*args), calls)
                row[variant] = {"us": us, "max_abs_err": round(error, 4)}
            except Exception as exc:  # a backend that refuses the shape says so in the table
                row[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        rows.append(row)
    return rows


def projection_shapes() -> list[tuple[str, str, int, int]]:
    """(model, projection, inputs, outputs) of each decoder layer's four projections, talker and predictor."""
    shapes = []
    for model, dims in (("talker", TALKER), ("predictor", PREDICTOR)):
        h, inter = dims["hidden"], dims["inter"]
        qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        shapes += [(model, "qkv", h, qkv), (model, "o", HEADS * HEAD_DIM, h)]
        shapes += [(model, "gate_up", h, 2 * inter), (model, "down", inter, h)]
    return shapes


def bench_linear(calls: int) -> list[dict[str, Any]]:
    """One-row and 64-row projections of both models under cuBLAS settings that change split-K."""
    rows = []
    shapes = projection_shapes()
    settings = {
        "default": {},
        "no_reduced_precision_reduction": {"reduced": False},
        "cublas_not_lt": {"library": "cublas"},
    }
    for model, proj, k_in, n_out in shapes:
        for batch in (1, 2, 64):
            x = torch.randn(batch, k_in, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) * 0.02
            row: dict[str, Any] = {"model": model, "proj": proj, "batch": batch}
            for name, setting in settings.items():
                matmul = torch.backends.cuda.matmul
                before = (matmul.allow_bf16_reduced_precision_reduction, torch.backends.cuda.preferred_blas_library())
                try:
                    if "reduced" in setting:
                        matmul.allow_bf16_reduced_precision_reduction = setting["reduced"]
                    if "library" in setting:
                        torch.backends.cuda.preferred_blas_library(setting["library"])
                    row[name] = graph_us(lambda x=x, w=w: F.linear(x, w), calls)
                finally:
                    matmul.allow_bf16_reduced_precision_reduction = before[0]
                    torch.backends.cuda.preferred_blas_library(before[1])
            rows.append(row)
    return rows


def bench_top_k(calls: int) -> list[dict[str, Any]]:
    """The narrow plan's top-64 of a row's logits, and full sorts that could replace it."""
    rows = []
    for vocab in (PREDICTOR["vocab"], TALKER["vocab"]):
        for batch in (1, 64):
            x = torch.randn(batch, vocab, device="cuda")
            row: dict[str, Any] = {"vocab": vocab, "batch": batch}
            row["topk_64"] = graph_us(lambda x=x: x.topk(64, dim=-1), calls)
            row["sort_full"] = graph_us(lambda x=x: x.sort(dim=-1, descending=True), calls)
            row["topk_64_compiled"] = graph_us(torch.compile(lambda x=x: x.topk(64, dim=-1)), calls)
            rows.append(row)
    return rows


def fused_case(batch: int, cache_len: int, read: int, layers: int, slots: int, shared: bool) -> tuple[tuple, int]:
    """The fused op's arguments for `batch` rows each reading `read` earlier positions of one layer's cache: a
    layer's view of a [K/V, layers, slots, kv heads, cache_len, D] tensor, as the engine holds the talker's
    (`layers` 1: a tensor of its own, as each code predictor layer's); `shared`: one position, mask and RoPE row
    for every row, as the code predictor's. Past 2**31 elements from K to V the kernel runs its i64 version, as
    at the server's default sizes. Also the K and V bytes a call reads."""
    dev, bf16 = "cuda", torch.bfloat16
    stacked = torch.empty(2, layers, slots, KV_HEADS, cache_len, HEAD_DIM, device=dev, dtype=bf16)
    stacked.normal_()
    cache = stacked[:, layers - 1]
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=bf16)
    qk_norm = torch.ones(HEADS + KV_HEADS, HEAD_DIM, device=dev, dtype=bf16)
    n = 1 if shared else batch
    cos, sin = torch.ones(n, HEAD_DIM, device=dev, dtype=bf16), torch.zeros(n, HEAD_DIM, device=dev, dtype=bf16)
    positions = torch.full((n,), read, device=dev)
    mask = (torch.arange(cache_len, device=dev) <= read)[None, :].expand(n, -1).contiguous()
    rows = torch.arange(batch, device=dev)
    args = (qkv, qk_norm, cos, sin, positions, rows, cache, mask, 1e-6, HEAD_DIM**-0.5, HEADS, KV_HEADS)
    return args, 2 * batch * KV_HEADS * read * HEAD_DIM * 2


# Launch constants tried beside the engine's (`launch_constants`: 64 keys and 8 warps for a launch of at most a
# program an SM, 16 and 2 beyond, chosen from this run, H100, 2026-12-07), per shape: a smaller key block and fewer
# warps take fewer registers a program (ptxas for sm_90: 198 at 64 keys and 8 warps, 1 program an SM; 118 at 16 and
# 4, 4 an SM), so more of a step's 512 programs run at once. Both of the engine's talker sets are listed, so each
# batch times the one it does not use. The last two talker rows take the group's 2 queries as scalar products (no
# padding to tl.dot's 16 rows; 212 registers at 32 keys and 4 warps, 148 at 16 and 2).
SCALAR = {"DOT": False, "ROWS": HEADS // KV_HEADS}
FUSED_TUNINGS = {
    "talker": [{"BLOCK": 64, "num_warps": 8}, {"BLOCK": 16, "num_warps": 2}, {"BLOCK": 32, "num_warps": 4},
               {"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 8},
               {**SCALAR, "BLOCK": 32, "num_warps": 4}, {**SCALAR, "BLOCK": 16, "num_warps": 2}],
    "predictor": [{"num_warps": 4}, {"num_warps": 1}],
}  # fmt: skip
# Rows timed: one stream, a c64 run's mean batch (44) and its most; for the talker also 2 (one stream's frame,
# `MIN_FRAME_ROWS`) and 16 and 24, either side of where its launch outgrows an H100's 132 SMs (8 kv heads a row).
FUSED_BATCHES = {"talker": (1, 2, 16, 24, 44, 64), "predictor": (1, 44, 64)}


def bench_fused(calls: int) -> list[dict[str, Any]]:
    """The fused decode attention alone: the code predictor's layer (16 positions, rows sharing one) and the
    talker's (each row its own position, all at the same one, in a layer's view of a 512- or 4,096-position
    cache of 28 layers and 65 slots) at FUSED_BATCHES' rows; with the engine's launch
    constants (`tuning` "default") and each of FUSED_TUNINGS, with its largest difference from the default's
    output (another key block sums in another order: rounding, not a bug, if small)."""
    from qwen_tts_server.engine.fast.attention_kernel import decode_attention, fused_decode_attention

    if fused_decode_attention is None:
        return [{"error": "no Triton"}]
    rows = []
    cases = [("predictor", 16, 15, 1, 65)]
    cases += [("talker", 512, 150, 28, 65), ("talker", 4096, 150, 28, 65), ("talker", 4096, 1000, 28, 65)]
    for name, cache_len, read, layers, slots in cases:
        for batch in FUSED_BATCHES[name]:
            args, nbytes = fused_case(batch, cache_len, read, layers, slots, shared=name == "predictor")
            default = fused_decode_attention(*args)
            for tuning in [{}, *FUSED_TUNINGS[name]]:
                us = graph_us(lambda args=args, tuning=tuning: decode_attention(*args, tuning=tuning), calls)
                row = {"shape": name, "batch": batch, "cache_len": cache_len, "read": read}
                row |= {"tuning": tuning or "default", "us": us, "kv_gb_per_s": round(nbytes / us / 1e3, 1)}
                row["max_abs_vs_default"] = (decode_attention(*args, tuning=tuning) - default).abs().max().item()
                rows.append(row)
            del args, default
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parts_help = "which of attention, linear, top_k, fused"
    parser.add_argument("--parts", default="attention,linear,top_k", help=parts_help)
    parser.add_argument("--out", type=Path, default=None, help="folder for micro-kernels.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    parts = {
        "attention": bench_attention,
        "linear": bench_linear,
        "top_k": bench_top_k,
        "fused": bench_fused,
    }
    for name in args.parts.split(","):
        fn = parts[name]
        results[name] = fn(args.calls)
        for row in results[name]:
            print(json.dumps({name: row}), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "micro-kernels.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
