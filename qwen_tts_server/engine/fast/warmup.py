"""The fast engine's warm-up: everything a request would otherwise wait for, done at load.

Compile every sampling plan, capture the codec's and the streaming decoder's graphs, the frame graph of every
(batch bucket, KV bucket, plan pair) and the prefill graphs. With plans a closed set (`PLANS`), no client's
options can make a step compile or capture later. Each part that fails falls back (eager, no compile) and says
so in the log, unless the device itself failed.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

import torch

from .faults import device_works, is_device_fault
from .sampler import PLANS, SORT_ROWS_MAX, SamplingPlan
from .stream_codec import StreamingDecoder

if TYPE_CHECKING:
    from .engine import FastEngine

log = logging.getLogger(__name__)


@torch.inference_mode()
def warm_up(engine: FastEngine, *, codec: bool = True) -> None:
    """Compile, then capture (see the module doc), logging each part's time. `codec=False`: see
    `FastEngine.warm_up`."""
    t0 = time.perf_counter()
    if engine.runner.compiled:
        log.info("fast engine warm-up: compiling the frame, prefill and sampling plans")
        try:
            _compile_everything(engine, [(plan, plan) for plan in PLANS])
        except Exception:
            log.exception("torch.compile failed; the fast engine continues without it")
            engine.runner.disable_compile()
            engine.sampler.disable_compile()
        log.info(f"fast engine warm-up: compiled in {time.perf_counter() - t0:.1f} s")
    if codec:
        _warm_up_codec(engine)
    if engine.graphs is not None:
        try:
            engine.graphs.capture_all()
        except RuntimeError:
            engine.drop_graphs()
    if engine.prefill is not None and engine.graphs is not None:
        try:
            engine.prefill.capture_all(engine.graphs.pool)  # writes into row 0: no request holds it yet
        except Exception as exc:
            if is_device_fault(exc) and not device_works(engine.device):
                raise
            log.exception("prefill graph capture failed; prefill runs eagerly")
            engine.prefill.release_graphs()
    log.info(
        f"fast engine warm-up done in {time.perf_counter() - t0:.1f} s",
        extra={
            "frame_graphs": len(engine.graphs or ()),
            "prefill_graphs": len(engine.prefill or ()),
            "compiled": engine.runner.compiled,
        },
    )


def _warm_up_codec(engine: FastEngine) -> None:
    """Capture the streaming decoder's graphs, or, with the context chunk decoder, the whole-decode graphs
    that it and whole utterances use (either is most of a 1.7B load's warm-up). With the stateful decoder
    whole utterances decode through it too (see codec_worker): the whole-decode graphs would go unused."""
    t0 = time.perf_counter()
    decoder = engine.streaming_decoder
    if decoder is None:
        try:
            engine.codec.warm_up()
        except RuntimeError:
            log.exception("codec graph capture failed; codec decode continues without graphs")
            engine.codec.use_graphs = False
        log.info(f"fast engine warm-up: {len(engine.codec)} codec graphs captured in {time.perf_counter() - t0:.1f} s")
        return
    _capture_stream_decoder(engine, decoder)
    seconds = time.perf_counter() - t0
    log.info(f"fast engine warm-up: {len(decoder)} streaming decoder graphs captured in {seconds:.1f} s")


def _capture_stream_decoder(engine: FastEngine, decoder: StreamingDecoder) -> None:
    """On CUDA, graph the streaming decoder for every chunk size a stream produces, at every batch
    bucket from one row (`stream_buckets`). A group of streams is padded to the next captured row
    count, so coarse buckets waste the codec's GPU time: under a closed loop of 64 streams each step's
    group of ~5 steady chunks ran as 16 rows (1, 4, 16, 64 were the buckets), about three rows computed
    for each one used, on the GPU the frames need."""
    if not engine.codec.use_graphs:
        return
    if _try_capture(engine, decoder) or decoder.compiles == "off":
        return
    # Outside the except block: its traceback no longer holds the failed capture's graph and pool.
    decoder.release_graphs()
    decoder.enable("off")
    torch.cuda.empty_cache()
    _try_capture(engine, decoder)


def _try_capture(engine: FastEngine, decoder: StreamingDecoder) -> bool:
    try:
        decoder.capture_all(engine.stream_buckets, engine.chunker.sizes)
        return True
    except Exception as exc:
        if is_device_fault(exc) and not device_works(engine.device):
            raise
        if decoder.compiles != "off":
            log.exception("the compiled streaming decoder failed; capturing it again without torch.compile")
        else:
            log.exception("streaming decoder graph capture failed; chunks without a graph decode eagerly")
        return False


def _compile_everything(engine: FastEngine, variants: list[tuple[SamplingPlan, SamplingPlan]]) -> None:
    """Run every compiled path once per sampling variant, so that no request ever waits for a compile
    and graph capture never compiles. A function's first compile is for its first batch size, the
    second for any size (a batch of one row is always a compile of its own), every KV length but
    `max_len` (marked dynamic before its first compile, see `ModelRunner.decode`; the whole cache is a
    contiguous slice, compiled apart) and every packed prefill length (dynamic from the second call on).
    So: frames at the two smallest batch buckets (1 and 2; on CUDA 2 and 4) and at the first above
    SORT_ROWS_MAX (the sampler's top-k branches on the batch size), each at the first and the last KV
    bucket, and prefill of one prompt and of two, with codebook 0 sampled as `_prefill` does
    (`first_code`). Prefill writes KV into rows 0-1: warm_up runs before any request is admitted."""
    width = engine.rows.hidden.shape[-1]
    kv_lens = sorted({engine.kv_buckets[0], engine.kv_buckets[-1]})
    above = [b for b in engine.buckets if b > SORT_ROWS_MAX][:1]
    sizes = sorted({*engine.buckets[:2], *above})
    for plans in variants:
        with engine.preserved_rows(engine.buckets[-1]):
            for size, kv_len in itertools.product(sizes, kv_lens):
                engine.frame(size, kv_len, plans)
        for lengths in ([7], [9, 5][: engine.scheduler.max_slots]):
            prompts = [torch.zeros(n, width, device=engine.device, dtype=engine.rows.hidden.dtype) for n in lengths]
            _, logits = engine.runner.prefill_many(list(range(len(prompts))), prompts)
            engine.first_code(logits, slice(0, len(prompts)), plans[0])
