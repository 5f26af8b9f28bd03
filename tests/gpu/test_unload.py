"""Memory comes back at unload, and nothing keeps the engine or the model alive.

As the server unloads a model: the model's FastRuntime is closed (FastEngine.stop: threads joined, KV cache,
per-row state and every CUDA graph with its memory pool released), the last references go, and the registry
calls torch.cuda.empty_cache() (registry.release_memory) without a gc.collect(): nothing here may sit in a
reference cycle. So the cycle collector is off while this runs, and weak references must die at once.

A model of its own (loaded beside the shared one) is served twice by a fresh FastRuntime (one whole request,
one streamed), closed each time, then dropped. torch.compile's caches are reset first, so that, as in a server
that loads, serves and unloads a model, this model's own tensors go through compilation (whatever compilation
keeps hold of would then keep the model alive); the second engine reuses what the first compiled.
torch.cuda.memory_allocated() is read before the load, after it, after each engine's warm-up and request,
after each close, and after the model is gone.

Tolerance: 192 MiB for the first engine, 32 MiB more for each later one, 256 MiB in all. What PyTorch
keeps for the process's life (until the last engine goes, `memory.CudaEngines`; the tier's shared engine
stays) is cuBLAS workspaces, one per (thread's cuBLAS handle, stream) pair, 32 MiB each on Hopper: the first
engine brings five streams (step, codec, and the capture streams of the frame and prefill graphs, the codec
and the streaming decoder). A later engine takes the same streams
back (`capture.StreamRegistry`) and its threads the same handles, so it adds none: growth per engine is the
leak to catch (it was 164 MiB per engine on the H200 before streams were reused). Anything that scales
with the engine (its KV cache: about 0.5 GiB for the full-size model here; graph pools: hundreds of MiB) or
the model (GBs) is far beyond it.
The blocks left over are listed by size in the results, so a failure says what is left.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo

from qwen_tts_server.engine.fast.runtime import FastRuntime
from qwen_tts_server.engine.types import Mode, SamplingParams, SynthesisItem

from .support import MAX_LEN, Results, Tier

pytestmark = pytest.mark.gpu

MiB = 2**20
FIRST_ENGINE = 192 * MiB
LATER_ENGINE = 32 * MiB
IN_ALL = 256 * MiB


def allocated(tier: Tier) -> int | None:
    """Bytes in live tensors after handing freed blocks back (what the server's release_memory does)."""
    if not tier.cuda:
        return None
    torch.cuda.synchronize(tier.device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(tier.device)


def held(tier: Tier) -> dict[str, float] | None:
    """Beyond live tensors (reported, not asserted): the allocator's pool after empty_cache, and what the
    whole device has in use (CUDA context, library workspaces, other processes: what nvidia-smi shows)."""
    if not tier.cuda:
        return None
    free, total = torch.cuda.mem_get_info(tier.device)
    return {"reserved_mib": mib(torch.cuda.memory_reserved(tier.device)), "device_used_mib": mib(total - free)}


def live_blocks(tier: Tier) -> collections.Counter[int]:
    """Sizes of the allocator's live blocks (to name what an unload left behind)."""
    if not tier.cuda:
        return collections.Counter()
    blocks = collections.Counter()
    for segment in torch.cuda.memory_snapshot():
        for block in segment.get("blocks", []):
            if block.get("state") == "active_allocated":
                blocks[int(block["size"])] += 1
    return blocks


def left_over(before: collections.Counter[int], after: collections.Counter[int]) -> list[str]:
    extra = after - before
    return [f"{count} x {size / MiB:.2f} MiB" for size, count in sorted(extra.items(), key=lambda kv: -kv[0])][:12]


def referrers(obj: Any) -> list[str]:
    """What still holds `obj` (types only), for the failure message."""
    return sorted({type(r).__name__ for r in gc.get_referrers(obj)})[:12]


async def serve(runtime: FastRuntime) -> tuple[int, int]:
    """One whole request and one streamed one, as the API makes them."""
    item = SynthesisItem(text="Memory comes back at unload, every byte of it.", language="english", speaker="ryan")
    params = SamplingParams(max_new_tokens=24, seed=3)
    (result,) = await runtime.generate(Mode.CUSTOM_VOICE, [item], params)
    chunks = [chunk async for chunk in runtime.stream_audio(Mode.CUSTOM_VOICE, item, params)]
    return result.frames, len(chunks)


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


def test_memory_returned_at_unload(
    tier: Tier, checkpoint: Any, load: Callable[[Path, torch.dtype], Any], results: Results
) -> None:
    if tier.compile:
        torch._dynamo.reset()  # last in the tier (file order): nothing after it relies on the compiled code
    gc.collect()
    base, base_blocks = allocated(tier), live_blocks(tier)
    held_at = {"before_load": held(tier)}
    gc.disable()
    try:
        tts = load(checkpoint.path, tier.dtype)
        loaded, loaded_blocks = allocated(tier), live_blocks(tier)
        held_at["loaded"] = held(tier)
        cycles, alive = [], []
        for _ in range(2):
            sizes = {"max_slots": 8, "max_len": MAX_LEN, "max_prefill_tokens": 2048}
            runtime = FastRuntime(tts, **sizes, compile=tier.compile, fused_attention=tier.fused_attention)
            frames, chunks = asyncio.run(serve(runtime))
            warm = allocated(tier)
            held_at[f"engine_{len(cycles) + 1}_warm"] = held(tier)
            engine = weakref.ref(runtime.engine)
            runtime.close()
            del runtime
            closed = allocated(tier)
            held_at[f"engine_{len(cycles) + 1}_closed"] = held(tier)
            alive.append(None if engine() is None else referrers(engine()))
            cycles.append(
                {
                    "frames": frames,
                    "stream_chunks": chunks,
                    "warm_mib": mib(warm),
                    "engine_mib": mib(None if warm is None else warm - loaded),
                    "left_after_close_mib": mib(None if closed is None else closed - loaded),
                    "engine_freed_without_gc": alive[-1] is None,
                }
            )
        engine_left_blocks = left_over(loaded_blocks, live_blocks(tier))
        model = weakref.ref(tts.model)
        del tts
        unloaded = allocated(tier)
        held_at["unloaded"] = held(tier)
        model_alive = None if model() is None else referrers(model())
    finally:
        gc.enable()
    gc.collect()
    after_gc = allocated(tier)
    results.record(
        "unload",
        base_mib=mib(base),
        model_mib=mib(None if loaded is None else loaded - base),
        engines=cycles,
        left_after_unload_mib=mib(None if unloaded is None else unloaded - base),
        left_after_unload_and_gc_mib=mib(None if after_gc is None else after_gc - base),
        blocks_left_by_engines=engine_left_blocks,
        blocks_left_in_all=left_over(base_blocks, live_blocks(tier)),
        model_freed_without_gc=model_alive is None,
        peak_mib=mib(torch.cuda.max_memory_allocated(tier.device)) if tier.cuda else None,
        reserved_and_device_used=held_at,
    )
    assert all(a is None for a in alive), f"the fast engine outlived its close (held by: {alive})"
    assert model_alive is None, f"the model outlived its unload (held by: {model_alive})"
    if tier.cuda:
        assert loaded is not None and closed is not None and unloaded is not None and base is not None
        for i, cycle in enumerate(cycles, start=1):  # cumulative: engine i's leftovers add to those before
            assert cycle["left_after_close_mib"] <= (FIRST_ENGINE + (i - 1) * LATER_ENGINE) / MiB, (
                f"{i} engines left {cycle['left_after_close_mib']} MiB after close: {engine_left_blocks}"
            )
        assert unloaded - base <= IN_ALL, f"{(unloaded - base) / MiB:.0f} MiB left after unload (see the results)"
