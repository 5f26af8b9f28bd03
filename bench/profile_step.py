"""Where a fast-engine step's time goes, and how close its logits are to upstream's in bf16.

Builds a full-size random model (as bench_engines does), fills B rows, times the parts of an
eager decode step with CUDA syncs between them, times whole steps with CUDA graphs (with and
without torch.compile), prints torch.profiler's top ops for the largest B, checks that graph
replay gives the same codes as eager, and compares our prefill logits with upstream's talker
forward on the same prompt (teacher-forced, so the difference is numerics only).

    python -m bench.profile_step --size 1.7B --batches 1,8,64 --compile both   # on the GPU
    python -m bench.profile_step --size 1.7B --batches 1,64 --compile on --kernels-only  # kernels per frame
    python -m bench.profile_step --size tiny --batches 1,2 --device cpu          # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
import typing
from typing import Any

import torch

from qwen_tts_server.engine.fast.engine import MIN_FRAME_ROWS, FastEngine
from qwen_tts_server.engine.fast.options import FusedAttention
from qwen_tts_server.engine.fast.prompt import prompt_for_item
from qwen_tts_server.engine.fast.runtime import resolve_sampling
from qwen_tts_server.engine.fast.sequence import Sequence
from qwen_tts_server.engine.types import Mode, SamplingParams

from .bench_engines import build_model, make_request


def server_rows(batch: int) -> int:
    """Rows for an engine that runs `batch` requests as a server does: a server has many rows, so on CUDA one
    request's frame runs as MIN_FRAME_ROWS rows (the rest free); an engine of one row could not."""
    return max(batch, MIN_FRAME_ROWS)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frames_only_request(tts: Any, index: int, frames: int, text_frames: int | None = None) -> Sequence:
    """Request `index` of exactly `frames` frames (no EOS before), its text as long as `text_frames` frames'
    speech (default `frames`), its audio not decoded: the frame alone, a whole utterance's chunks would be
    decoded inside the step."""
    request = make_request(index, text_frames or frames)
    defaults = resolve_sampling(SamplingParams(seed=index), tts.generate_defaults)
    sampling = dataclasses.replace(defaults, min_frames=frames)
    seq = Sequence(prompt_for_item(tts, Mode.CUSTOM_VOICE, request.item), sampling, max_frames=frames)
    seq.decode_audio = False
    return seq


def fill(engine: FastEngine, tts: Any, batch: int, frames: int) -> list[Sequence]:
    seqs = [engine.submit(frames_only_request(tts, i, frames)) for i in range(batch)]
    engine.step()  # admits and prefills everyone, queues the first frame
    return seqs


def time_parts(engine: FastEngine, steps: int) -> dict[str, float]:
    """Mean ms per step of each part, with a device sync after every part."""
    device = engine.runner.device
    totals = {"predict_codes": 0.0, "decode": 0.0, "sample_talker": 0.0, "step_total": 0.0}
    runner, sampler = engine.runner, engine.sampler
    n = len(engine.scheduler.running)  # running requests hold rows 0..n-1
    with torch.inference_mode():
        for _ in range(steps):
            step = engine.rows.frame_index[:n].clone()
            sub = engine.rows.sub_params.span(slice(n))
            sync_device(device)
            t0 = time.perf_counter()
            codes, embedded = runner.predict_codes(
                engine.rows.hidden[:n].clone(),
                engine.rows.code0[:n].clone(),
                lambda cb, lg, sub=sub, step=step: sampler.code_predictor(lg, sub, step, cb),
            )
            sync_device(device)
            t1 = time.perf_counter()
            kv_len = next(k for k in engine.kv_buckets if k > int(engine.rows.position[:n].max()))
            with engine.preserved_rows(n):  # the real step below writes the same positions
                hidden, logits = runner.decode(embedded, engine.rows.position[:n].clone(), kv_len=kv_len)
            sync_device(device)
            t2 = time.perf_counter()
            sampler.talker(logits, engine.rows.talker_params.span(slice(n)), engine.rows.seen[:n], step + 1)
            sync_device(device)
            t3 = time.perf_counter()
            engine.step()
            sync_device(device)
            t4 = time.perf_counter()
            totals["predict_codes"] += (t1 - t0) * 1000
            totals["decode"] += (t2 - t1) * 1000
            totals["sample_talker"] += (t3 - t2) * 1000
            totals["step_total"] += (t4 - t3) * 1000
    return {k: round(v / steps, 2) for k, v in totals.items()}


def profile(engine: FastEngine, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if engine.runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync_device(engine.runner.device)
    key = "self_cuda_time_total" if engine.runner.device.type == "cuda" else "self_cpu_time_total"
    by_device = prof.key_averages().table(sort_by=key, row_limit=rows)
    by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"--- by {key}\n{by_device}\n--- by self_cpu_time_total\n{by_cpu}"


def fused_layers(engine: FastEngine) -> dict[str, bool]:
    """Which decode layers of `engine` run the fused attention kernel (what QTTS_FUSED_ATTENTION got here)."""
    return {"talker": engine.runner.fused_attention, "predictor": engine.runner.cp_fused_attention}


def kernel_profile(
    tts: Any, batch: int, steps: int, *, compile: bool, rows: int, fused: FusedAttention = "off"
) -> dict[str, Any]:
    """Device kernels per step of a warmed-up engine run eagerly (a CUDA graph replays the same kernels):
    how many, how much device time, and the kernels that take most of it. A frame's cost at small batch
    is the number of kernels, so this is the count to bring down."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = FastEngine(
        tts, max_slots=server_rows(batch), max_len=512, cuda_graphs=False, compile=compile, fused_attention=fused
    )
    engine.warm_up(codec=False)
    fill(engine, tts, batch, steps + 10)
    for _ in range(3):
        engine.step()
    sync_device(engine.runner.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync_device(engine.runner.device)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    return {
        "batch": batch,
        "compile": engine.runner.compiled,
        "fused_attention": fused_layers(engine),
        "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1),
        "kernel_ms_per_step": round(total_us / steps / 1000, 3),
        "top": [
            {"name": e.key[:90], "per_step": e.count / steps, "us_per_step": round(e.self_device_time_total / steps, 1)}
            for e in top
        ],
    }


def prefill_parity(tts: Any) -> dict[str, float]:
    """Our prefill logits vs upstream's talker forward on the same prompt embeddings."""
    engine = FastEngine(tts, max_slots=1, max_len=512)
    prompt = prompt_for_item(tts, Mode.CUSTOM_VOICE, make_request(0, 100).item)
    with torch.inference_mode():
        _, ours = engine.runner.prefill(0, prompt.embeds)
        talker = tts.model.talker
        embeds = prompt.embeds[None]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = talker.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        theirs = talker.codec_head(out.last_hidden_state[:, -1])[0]
    diff = (ours.float() - theirs.float()).abs()
    return {
        "max_abs_diff": round(float(diff.max()), 5),
        "mean_abs_diff": round(float(diff.mean()), 5),
        "logit_std": round(float(theirs.float().std()), 5),
        "argmax_equal": bool(ours.argmax() == theirs.argmax()),
        "top5_overlap": len(set(ours.topk(5).indices.tolist()) & set(theirs.topk(5).indices.tolist())),
    }


def graph_parity(tts: Any, batch: int, frames: int, compile: bool) -> dict[str, Any]:
    """The same seeded requests through CUDA-graph replay and eager: codes must be identical."""
    codes = {}
    timing = {}
    for graphs in (False, True):
        engine = FastEngine(tts, max_slots=batch, max_len=256, cuda_graphs=graphs, compile=compile)
        engine.warm_up()
        seqs = fill(engine, tts, batch, frames)
        sync_device(engine.runner.device)
        t0 = time.perf_counter()
        while any(s.finish_reason is None for s in seqs):
            engine.step()
        sync_device(engine.runner.device)
        timing["graphs" if graphs else "eager"] = round(1000 * (time.perf_counter() - t0) / (frames - 1), 2)
        codes[graphs] = [torch.stack(s.frames) for s in seqs]
    equal = all(torch.equal(a, b) for a, b in zip(codes[False], codes[True], strict=True))
    return {"batch": batch, "frames": frames, "compile": compile, "identical": equal, "ms_per_step": timing}


def graph_steps(
    tts: Any, batch: int, steps: int, *, compile: bool, max_len: int, fused: FusedAttention = "off"
) -> dict[str, Any]:
    """Steady-state ms per step with CUDA graphs captured at warm-up (as a server runs); `fused`: which decode
    layers run their attention as one Triton kernel (QTTS_FUSED_ATTENTION)."""
    engine = FastEngine(tts, max_slots=server_rows(batch), max_len=max_len, compile=compile, fused_attention=fused)
    t0 = time.perf_counter()
    engine.warm_up(codec=False)  # the requests take their frames (`fill`): the codec never runs
    warm_s = time.perf_counter() - t0
    fill(engine, tts, batch, steps + 20)
    for _ in range(3):
        engine.step()
    sync_device(engine.runner.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync_device(engine.runner.device)
    ms = 1000 * (time.perf_counter() - t0) / steps
    return {
        "batch": batch,
        "compile": engine.runner.compiled,
        "graphs": len(engine.graphs or ()),
        "fused_attention": fused_layers(engine),
        "warm_up_s": round(warm_s, 1),
        "ms_per_step": round(ms, 2),
        "x_real_time_per_stream": round(80 / ms, 2),
        "audio_s_per_s": round(batch * 0.08 / (ms / 1000), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile for graphs")
    parser.add_argument("--max-len", type=int, default=1024, help="KV length of the graph-timing engines")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernel count per step (CUDA)")
    parser.add_argument("--graphs-only", action="store_true", help="only ms per step with CUDA graphs (CUDA)")
    parser.add_argument(
        "--fused-attention",
        default="off",
        type=lambda s: s.split(","),
        help="QTTS_FUSED_ATTENTION for the kernels-only and graphs-only engines: off, predictor or all, or several "
        "(comma-separated: one model build for all, each measured in turn)",
    )
    args = parser.parse_args()
    if not set(args.fused_attention) <= set(typing.get_args(FusedAttention)):
        parser.error(f"--fused-attention: off, predictor or all, not {args.fused_attention}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tts = build_model(args.size, device=device, dtype=dtype)
    batches = [int(b) for b in args.batches.split(",")]
    compile = args.compile != "off"
    if args.kernels_only:
        for fused, batch in itertools.product(args.fused_attention, batches):
            result = kernel_profile(tts, batch, args.steps, compile=compile, rows=args.rows, fused=fused)
            print(json.dumps({"kernel_profile": result}), flush=True)
        return
    if args.graphs_only:
        for fused, batch in itertools.product(args.fused_attention, batches):
            steps = graph_steps(tts, batch, 3 * args.steps, compile=compile, max_len=args.max_len, fused=fused)
            print(json.dumps({"graph_steps": steps}), flush=True)
        return
    print(json.dumps({"prefill_parity": prefill_parity(tts)}), flush=True)
    if device.type == "cuda":
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        for compile in compiles:
            print(json.dumps({"graph_parity": graph_parity(tts, 8, 24, compile)}), flush=True)
            for batch in batches:
                steps = graph_steps(tts, batch, 3 * args.steps, compile=compile, max_len=args.max_len)
                print(json.dumps({"graph_steps": steps}), flush=True)
    frames = 3 * args.steps + 10
    for batch in batches:
        engine = FastEngine(tts, max_slots=batch, max_len=256, cuda_graphs=False)
        fill(engine, tts, batch, frames)
        for _ in range(3):
            engine.step()  # warm
        print(json.dumps({"batch": batch, "ms": time_parts(engine, args.steps)}), flush=True)
        if batch == batches[-1]:
            print(profile(engine, args.steps, args.rows), flush=True)


if __name__ == "__main__":
    main()
