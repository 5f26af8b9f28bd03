"""The fast engine's loop: continuous batching of codec frames over a static KV cache.

Each `step()` admits waiting requests into free slots (prefill), then decodes one frame for every
running request at once: code predictor (codebooks 1-15), talker step, codebook-0 sampling. A
request that samples EOS, reaches its frame limit or is cancelled leaves at once, its slot free
for the next step. Finished requests go to a codec thread, which decodes everything that finished
since its last decode as one batch, so decoding never stalls the running streams' steps.

Per-slot state (hidden, pending codebook 0, position, frame counter, repetition mask, trailing
text, sampling options) lives in static tensors indexed by slot, so the frame's tensor work takes
no values back to the host and has fixed shapes for a fixed batch size (CUDA-graph ready). The
host reads one small tensor per step: the new frames and which rows hit EOS.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..types import last_frames
from .model_runner import ModelRunner
from .prompt import Prompt, special_text_hiddens
from .sampler import RowSampling, Sampler, SamplingPlan
from .scheduler import Scheduler
from .sequence import FinishReason, Sequence, SequenceSampling, SequenceStatus

log = logging.getLogger(__name__)


class FastEngine:
    def __init__(
        self,
        tts: Any,
        *,
        max_slots: int = 16,
        max_len: int = 4096,
        max_prefill_tokens: int = 2048,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.tts = tts
        # One extra cache row, never handed to a request: padding rows of a batch-size bucket use it.
        self.scratch = max_slots
        rows = max_slots + 1
        self.runner = ModelRunner(tts, max_slots=rows, max_len=max_len)
        self.sampler = Sampler.for_model(tts)
        self.scheduler = Scheduler(max_slots, max_prefill_tokens)
        self.max_len = max_len
        device, dtype = self.runner.device, self.runner.dtype
        hidden_size = tts.model.talker.config.hidden_size
        vocab = self.runner.vocab_size
        self.eos_id = int(tts.model.config.talker_config.codec_eos_token_id)
        # Per-slot state, allocated once.
        self.hidden = torch.zeros(rows, hidden_size, device=device, dtype=dtype)
        self.code0 = torch.zeros(rows, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, dtype=torch.long, device=device)
        self.frame_index = torch.zeros(rows, dtype=torch.long, device=device)
        self.min_frames = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.trailing = torch.zeros(rows, max_len, hidden_size, device=device, dtype=dtype)
        self.trailing_len = torch.zeros(rows, dtype=torch.long, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self.tts_pad = special_text_hiddens(tts)[2].reshape(-1)  # talker input text once the text ran out
        self.talker_params = RowSampling.make(rows, device=device)
        self.sub_params = RowSampling.make(rows, device=device)
        # Batches are padded to a few fixed sizes, so each size is one CUDA graph (or, eagerly, one
        # set of kernel choices) instead of a new shape every time a request leaves.
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128) if b < max_slots} | {max_slots})
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = FrameGraphs(self) if use_graphs else None
        # Work handed in by other threads.
        self._inbox: queue.SimpleQueue[tuple[str, Sequence]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._codec_thread: threading.Thread | None = None
        self._codec_queue: queue.SimpleQueue[list[Sequence] | None] = queue.SimpleQueue()
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # recent steps' batch sizes; tests read it
        self.on_step: Callable[[int], None] | None = None  # called with each step's batch size (metrics)
        # Host seconds spent in each part of the loop (the eager loop is host-bound, so these say
        # where a step's time goes without adding device syncs); "codec" runs on its own thread.
        self.seconds = {"prefill": 0.0, "frame": 0.0, "codec": 0.0}

    @torch.inference_mode()
    def warm_up(self, sampling: SequenceSampling) -> None:
        """Capture the frame graphs of every bucket for these options (the common case) up front."""
        if self.graphs is None:
            return
        s = sampling
        plans = (
            SamplingPlan.of([s.do_sample], [s.top_k], [s.top_p]),
            SamplingPlan.of([s.subtalker_do_sample], [s.subtalker_top_k], [s.subtalker_top_p]),
        )
        try:
            self.graphs.capture_all(plans)
        except RuntimeError:
            self._drop_graphs()

    def _drop_graphs(self) -> None:
        """A frame that cannot be captured still runs: fall back to eager for good, and say so."""
        log.exception("CUDA graph capture failed; the fast engine continues without graphs")
        self.graphs = None

    # ----- other threads -----
    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request; it is admitted at the start of a coming step."""
        limit = self.max_len - seq.prompt_len - 1
        if limit < 1:
            raise ValueError(f"prompt of {seq.prompt_len} positions leaves no room in max_len {self.max_len}")
        if seq.prompt.trailing.shape[0] > self.max_len:
            raise ValueError(f"text of {seq.prompt.trailing.shape[0]} tokens exceeds max_len {self.max_len}")
        seq.max_frames = min(seq.max_frames, limit)
        self._inbox.put(("submit", seq))
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (client gone): its slot frees at the next step, the others carry on."""
        self._inbox.put(("cancel", seq))
        self._wake.set()

    def start(self) -> None:
        """Run the step loop on its own thread, and codec decode on another so it never stalls a step."""
        self._thread = threading.Thread(target=self._loop, name="qtts-fast-engine", daemon=True)
        self._codec_thread = threading.Thread(target=self._codec_loop, name="qtts-codec", daemon=True)
        self._codec_thread.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still queued or running fail instead of waiting forever."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._codec_thread is not None:
            self._codec_queue.put(None)
            self._codec_thread.join(timeout=60)
            self._codec_thread = None
        self._take_inbox()
        self._fail_all(RuntimeError("the model was unloaded while this request was in progress"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.scheduler.has_work and self._inbox.empty():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # fail the requests in flight, keep the engine alive
                log.exception("fast engine step failed")
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every request queued or running, freeing their slots."""
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.error = exc
            self.scheduler.release(seq)
            self._finish(seq, FinishReason.CANCELLED)

    # ----- the step -----
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit, prefill, and decode one frame for every running request. Returns finished ones."""
        finished = self._take_inbox()
        t0 = time.perf_counter()
        for seq in self.scheduler.admit():
            self._prefill(seq)
        t1 = time.perf_counter()
        running = list(self.scheduler.running)
        if running:
            finished += self._decode_frame(running)
            self.steps += 1
        t2 = time.perf_counter()
        self._deliver(finished)
        t3 = time.perf_counter()
        self.seconds["prefill"] += t1 - t0
        self.seconds["frame"] += t2 - t1
        if self._codec_thread is None:
            self.seconds["codec"] += t3 - t2  # decoded inline; otherwise the codec thread counts it
        return finished

    def _take_inbox(self) -> list[Sequence]:
        cancelled = []
        while not self._inbox.empty():
            kind, seq = self._inbox.get_nowait()
            if kind == "submit":
                self.scheduler.add(seq)
            elif seq.status is not SequenceStatus.FINISHED:
                self.scheduler.release(seq)
                seq.finish_reason = FinishReason.CANCELLED
                cancelled.append(seq)
        return cancelled

    def _prefill(self, seq: Sequence) -> None:
        prompt: Prompt = seq.prompt
        slot = seq.slot
        hidden, logits = self.runner.prefill(slot, prompt.embeds)
        self._set_sampling(slot, seq.sampling)
        trailing = prompt.trailing.reshape(-1, prompt.trailing.shape[-1])
        self.trailing[slot, : trailing.shape[0]] = trailing
        self.trailing_len[slot] = trailing.shape[0]
        self.seen[slot] = False
        slots = torch.tensor([slot], device=self.code0.device)
        zero = torch.zeros(1, dtype=torch.long, device=self.code0.device)
        o = seq.sampling
        plan = SamplingPlan.of([o.do_sample], [o.top_k], [o.top_p])
        self.min_frames[slot] = seq.sampling.min_frames
        code0 = self.sampler.talker(
            logits[None], self.talker_params.select(slots), self.seen[slots], zero, plan, self.min_frames[slots]
        )
        self.seen[slot, code0[0]] = True
        self.hidden[slot] = hidden
        self.code0[slot] = code0[0]
        self.position[slot] = seq.prompt_len
        self.frame_index[slot] = 0

    def _decode_frame(self, running: list[Sequence]) -> list[Sequence]:
        n = len(running)
        self.batch_sizes.append(n)
        if self.on_step is not None:
            self.on_step(n)
        size = next(b for b in self.buckets if b >= n)
        slot_list = [s.slot for s in running] + [self.scratch] * (size - n)
        # Host-side facts about the batch's options let sampling skip work it does not need.
        opts = [s.sampling for s in running]
        plans = (
            SamplingPlan.of([o.do_sample for o in opts], [o.top_k for o in opts], [o.top_p for o in opts]),
            SamplingPlan.of(
                [o.subtalker_do_sample for o in opts],
                [o.subtalker_top_k for o in opts],
                [o.subtalker_top_p for o in opts],
            ),
        )
        frames = eos = None
        if self.graphs is not None:
            try:
                frames, eos = self.graphs.run(slot_list, plans)
            except RuntimeError:
                self._drop_graphs()
        if frames is None or eos is None:
            frames, eos = self.frame(torch.tensor(slot_list, device=self.code0.device), plans)
        # The one host read of the step.
        frames_host = frames[:n].cpu()
        eos_host = eos[:n].cpu().tolist()
        finished = []
        for i, seq in enumerate(running):
            seq.frames.append(frames_host[i])
            if seq.on_frame is not None:
                seq.on_frame(seq, frames_host[i])
            if eos_host[i] or seq.num_frames >= seq.max_frames:
                self.scheduler.release(seq)
                seq.finish_reason = FinishReason.EOS if eos_host[i] else FinishReason.LENGTH
                finished.append(seq)
        return finished

    def frame(self, slots: Tensor, plans: tuple[SamplingPlan, SamplingPlan]) -> tuple[Tensor, Tensor]:
        """All tensor work of one frame for the rows `slots` [B]: no host reads, fixed shapes.

        Completes each row's pending frame (code predictor), runs the talker step and samples the
        next codebook 0, updating the per-slot state in place. Returns the frames [B, 16] and which
        rows just sampled EOS [B]. This is what a CUDA graph captures per batch size.
        """
        talker_plan, sub_plan = plans
        # Padding rows share the scratch slot: restart it so its position stays inside the cache.
        self.position[self.scratch : self.scratch + 1].fill_(0)  # fill_, not `= 0`: no host copy in a graph
        self.frame_index[self.scratch : self.scratch + 1].fill_(0)
        step = self.frame_index[slots]
        sub = self.sub_params.select(slots)

        def sample(codebook: int, logits: Tensor) -> Tensor:
            return self.sampler.code_predictor(logits, sub, step, codebook, plan=sub_plan)

        code0 = self.code0[slots]
        codes, embedded = self.runner.predict_codes(self.hidden[slots], code0, sample)
        frames = torch.cat((code0[:, None], codes), dim=1)
        # Frame k's talker input carries trailing text token k while there is any, then tts_pad.
        text = self.trailing[slots, step.clamp(max=self.max_len - 1)]
        has_text = (step < self.trailing_len[slots])[:, None]
        inputs = embedded + torch.where(has_text, text, self.tts_pad)
        hidden, logits = self.runner.decode(slots, inputs, self.position[slots])
        next_step = step + 1
        next_code0 = self.sampler.talker(
            logits, self.talker_params.select(slots), self.seen[slots], next_step, talker_plan, self.min_frames[slots]
        )
        self.seen.index_put_((slots, next_code0), self._true)
        self.hidden[slots] = hidden
        self.code0[slots] = next_code0
        self.position[slots] += 1
        self.frame_index[slots] = next_step
        return frames, next_code0 == self.eos_id

    def _set_sampling(self, slot: int, s: SequenceSampling) -> None:
        talker = {
            "do_sample": s.do_sample,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "repetition_penalty": s.repetition_penalty,
            "seed": s.seed,
        }
        sub = {
            "do_sample": s.subtalker_do_sample,
            "temperature": s.subtalker_temperature,
            "top_k": s.subtalker_top_k,
            "top_p": s.subtalker_top_p,
            "repetition_penalty": 1.0,
            "seed": s.seed,
        }
        for params, values in ((self.talker_params, talker), (self.sub_params, sub)):
            for name, value in values.items():
                getattr(params, name)[slot] = value

    # ----- results -----
    def _deliver(self, finished: list[Sequence]) -> None:
        """Hand finished requests to the codec thread (or, with no threads running, decode here)."""
        done = [s for s in finished if s.finish_reason is not FinishReason.CANCELLED and s.frames]
        for seq in finished:
            if seq not in done:
                self._finish(seq, seq.finish_reason or FinishReason.CANCELLED)
        if not done:
            return
        if self._codec_thread is not None:
            self._codec_queue.put(done)
        else:
            self._decode_and_finish(done)

    def _codec_loop(self) -> None:
        """Decode whatever has finished since the last decode as one codec batch."""
        while (batch := self._codec_queue.get()) is not None:
            while not self._codec_queue.empty():
                more = self._codec_queue.get_nowait()
                if more is None:
                    self._codec_queue.put(None)  # stop after this batch
                    break
                batch += more
            t0 = time.perf_counter()
            self._decode_and_finish(batch)
            self.seconds["codec"] += time.perf_counter() - t0

    def _decode_and_finish(self, seqs: list[Sequence]) -> None:
        try:
            self._decode_audio(seqs)
        except Exception as exc:
            log.exception("codec decode failed")
            for seq in seqs:
                seq.error = exc
        for seq in seqs:
            self._finish(seq, seq.finish_reason or FinishReason.CANCELLED)

    def _decode_audio(self, seqs: list[Sequence]) -> None:
        batch = []
        for seq in seqs:
            codes = torch.stack(seq.frames)
            ref = seq.prompt.ref_code
            if ref is not None:
                codes = torch.cat((ref.to(codes.device, codes.dtype), codes))
            batch.append({"audio_codes": codes})
        wavs, _ = self.tts.model.speech_tokenizer.decode(batch)
        for seq, wav in zip(seqs, wavs, strict=True):
            samples = np.asarray(wav, dtype=np.float32).reshape(-1)
            seq.audio = last_frames(samples, seq.num_frames)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.on_finish is not None:
            try:
                seq.on_finish(seq)
            except Exception:  # a caller's callback must not take the engine's threads down
                log.exception("on_finish callback failed")


class FrameGraphs:
    """CUDA graphs of `FastEngine.frame`, one per (batch-size bucket, sampling plans), captured lazily.

    A replay launches the whole frame (thousands of small kernels when eager) at once; only the
    slot list is copied in. Outputs live in the graph's memory and are read before the next replay.
    """

    # Sampling plans come from clients' options (top_k, top_p): beyond this many graphs, an unusual
    # plan runs eagerly instead of capturing yet another graph.
    max_graphs = 64

    def __init__(self, engine: FastEngine) -> None:
        self.engine = engine
        self._graphs: dict[tuple[int, SamplingPlan, SamplingPlan], tuple[Any, Tensor, Tensor, Tensor]] = {}
        self._pool: Any = None

    def capture_all(self, plans: tuple[SamplingPlan, SamplingPlan]) -> None:
        """Capture every batch-size bucket for these plans now, not on a request's first step."""
        for size in self.engine.buckets:
            key = (size, *plans)
            if key not in self._graphs:
                self._graphs[key] = self._capture(size, plans)

    def run(
        self, slot_list: list[int], plans: tuple[SamplingPlan, SamplingPlan]
    ) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """Replay the frame graph for this batch; (None, None) when it should run eagerly instead."""
        key = (len(slot_list), *plans)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return None, None
            entry = self._graphs[key] = self._capture(len(slot_list), plans)
        graph, slots, frames, eos = entry
        slots.copy_(torch.tensor(slot_list, dtype=torch.long), non_blocking=True)
        graph.replay()
        return frames, eos

    def _capture(self, size: int, plans: tuple[SamplingPlan, SamplingPlan]) -> tuple[Any, Tensor, Tensor, Tensor]:
        engine = self.engine
        slots = torch.full((size,), engine.scratch, dtype=torch.long, device=engine.code0.device)
        # Warm up on a side stream (allocator and kernel choices), touching only the scratch slot.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                engine.frame(slots, plans)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (prompt building, voice prompts) may use the GPU meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            frames, eos = engine.frame(slots, plans)
        self._pool = graph.pool()
        log.info("captured a frame graph", extra={"batch": size})
        return graph, slots, frames, eos
