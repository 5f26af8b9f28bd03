"""Where GPU memory goes at unload: load a model through the server's Synthesizer (as `serve` does),
warm it the way traffic does (compile, frame graphs, a batch, a stream), unload it, and report CUDA memory
(allocated: live tensors; reserved: the caching allocator's pool; nvidia-smi's used: everything the process
holds, CUDA context and library workspaces included) at each step, then which live CUDA tensors remain and
what holds them, which allocator blocks remain and where they were allocated, and what freeing cuBLAS's
workspaces, `gc.collect()` and `torch._dynamo.reset()` give back. A diagnostic: prints a table and writes
JSON; it asserts nothing.

Fake tensors (what torch.compile traces with, kept in its graphs' node metadata) report a CUDA device and a
storage size but hold no device memory: they are counted apart, never as live CUDA tensors. An earlier
version counted them, and so blamed weight-shaped compile artifacts for memory they do not hold.

    python3 -m bench.unload_probe --models-dir /tmp/models --out "$OUT"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from bench.bench_jobs import gpu_used_mib
from qwen_tts_server.config import Settings
from qwen_tts_server.engine.synthesizer import Synthesizer
from qwen_tts_server.engine.types import Mode, SamplingParams, SynthesisItem

MIB = 1024**2


def smi_used() -> float | None:
    """memory.used of the first GPU as nvidia-smi shows it (everything the process holds), MiB."""
    gpus = gpu_used_mib()
    return float(gpus[0]["used_mib"]) if gpus else None


def snapshot(stage: str) -> dict[str, Any]:
    torch.cuda.synchronize()
    row = {
        "stage": stage,
        "allocated_mib": round(torch.cuda.memory_allocated() / MIB, 1),
        "reserved_mib": round(torch.cuda.memory_reserved() / MIB, 1),
        "smi_used_mib": smi_used(),
    }
    print(f"[probe] {row}", flush=True)
    return row


def _tensor(obj: object) -> torch.Tensor | None:
    """`obj` if it is a tensor; a dead weak proxy among the collector's objects raises on isinstance."""
    try:
        return obj if isinstance(obj, torch.Tensor) else None
    except ReferenceError:
        return None


def _nbytes(obj: object) -> int | None:
    """A real CUDA tensor's storage size; None for anything else: compile's fake tensors (a CUDA device, a
    storage size, no memory) and anything that is not a tensor."""
    tensor = _tensor(obj)
    try:
        if tensor is not None and tensor.is_cuda and not is_fake(tensor):
            return int(tensor.untyped_storage().nbytes())
    except Exception:
        return None
    return None


def fake_tensor_count() -> int:
    """Fake tensors alive (torch.compile's graphs keep them): reported so they are not taken for memory."""
    return sum(1 for obj in gc.get_objects() if (tensor := _tensor(obj)) is not None and is_fake(tensor))


def live_cuda_tensors(limit: int = 15) -> list[dict[str, Any]]:
    """The largest live CUDA tensors and the types of what refers to them."""
    sized = [(n, obj) for obj in gc.get_objects() if (n := _nbytes(obj))]
    sized.sort(key=lambda pair: pair[0], reverse=True)
    found = [obj for _, obj in sized]
    storages = {obj.untyped_storage().data_ptr(): n for n, obj in sized}
    print(
        f"[probe] live CUDA tensors: {len(found)} over {len(storages)} storages, "
        f"{sum(storages.values()) / MIB:.1f} MiB; fake tensors alive: {fake_tensor_count()}",
        flush=True,
    )
    out = []
    for tensor in found[:limit]:
        referrers = collections.Counter(type(r).__name__ for r in gc.get_referrers(tensor))
        owners = []
        for ref in gc.get_referrers(tensor):
            if isinstance(ref, dict):
                owners += [type(o).__name__ for o in gc.get_referrers(ref) if hasattr(o, "__dict__")][:3]
        out.append(
            {
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype),
                "mib": round((_nbytes(tensor) or 0) / MIB, 1),
                "referrers": dict(referrers),
                "owners": owners[:5],
            }
        )
    for row in out:
        print(f"[probe]   {row}", flush=True)
    return out


def _frame_text(frame: dict[str, Any]) -> str:
    return f"{Path(str(frame.get('filename', '?'))).name}:{frame.get('line', '?')} {frame.get('name', '?')}"


def live_blocks(limit: int = 12) -> list[dict[str, Any]]:
    """The allocator's live blocks grouped by where they were allocated (needs the memory history that
    `main` records): memory nothing in Python refers to (cuBLAS workspaces, graph pools) shows up here
    while `live_cuda_tensors` cannot see it."""
    groups: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                frames = [_frame_text(f) for f in block.get("frames", []) if "/torch/" not in str(f.get("filename"))]
                groups[tuple(frames[:4])].append(int(block["size"]))
    rows = sorted(groups.items(), key=lambda kv: sum(kv[1]), reverse=True)
    out = [{"mib": round(sum(sizes) / MIB, 1), "blocks": len(sizes), "where": list(where)} for where, sizes in rows]
    for row in out[:limit]:
        print(f"[probe]   block group {row}", flush=True)
    return out[:limit]


def clear_cublas_workspaces() -> bool:
    """Free the workspaces cuBLAS keeps per (thread's handle, stream) pair for the process's life (a
    private PyTorch call: there is no public one). Returns whether this PyTorch has it."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        return False
    clear()
    return True


async def warm(synthesizer: Synthesizer, name: str) -> None:
    model = await synthesizer.model_for(name, Mode.CUSTOM_VOICE)
    texts = ["A first sentence to warm up.", "Another one, a little longer than the first one."]
    for batch in (1, 8, 32):
        items = [SynthesisItem(text=texts[i % 2], language="english", speaker="vivian") for i in range(batch)]
        await synthesizer.synthesize(model, Mode.CUSTOM_VOICE, items, SamplingParams(max_new_tokens=24, seed=batch))
    stream_item = SynthesisItem(text=texts[1], language="english", speaker="vivian")
    async for _chunk in synthesizer.stream(model, Mode.CUSTOM_VOICE, stream_item, SamplingParams(max_new_tokens=24)):
        pass


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(models_dir=Path(args.models_dir), download_source="none", device="cuda", log_json=False)
    engine = Synthesizer(settings)
    rows = [snapshot("before load")]
    report: dict[str, Any] = {"model": args.model, "torch": torch.__version__, "rows": rows}
    for cycle in (1, 2):
        started = time.perf_counter()
        await warm(engine, args.model)
        rows.append(snapshot(f"cycle {cycle}: loaded and warmed ({time.perf_counter() - started:.1f} s)"))
        await engine.unload(args.model)
        rows.append(snapshot(f"cycle {cycle}: after unload"))
    report["live_after_unload"] = live_cuda_tensors()
    report["blocks_after_unload"] = live_blocks()
    if clear_cublas_workspaces():
        rows.append(snapshot("after clearing cuBLAS workspaces"))
        report["blocks_after_clearing_cublas"] = live_blocks()
    gc.collect()
    rows.append(snapshot("after gc.collect()"))
    torch.cuda.empty_cache()
    rows.append(snapshot("after gc.collect() + empty_cache()"))
    report["live_after_gc"] = live_cuda_tensors()
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    rows.append(snapshot("after torch._dynamo.reset() + gc + empty_cache()"))
    report["live_after_dynamo_reset"] = live_cuda_tensors()
    engine.close()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--model", default="Qwen3-TTS-12Hz-1.7B-CustomVoice")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("unload_probe needs CUDA", file=sys.stderr)
        return 2
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")  # live_blocks' sites
    report = asyncio.run(probe(args))
    print("\n| stage | allocated MiB | reserved MiB | nvidia-smi used MiB |\n|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['stage']} | {row['allocated_mib']} | {row['reserved_mib']} | {row['smi_used_mib']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y-%m-%d')}-{torch.cuda.get_device_name().replace(' ', '-')}-unload-probe.json"
    path.write_text(json.dumps(report, indent=1, default=str))  # shapes of compile-time tensors are SymInts
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
