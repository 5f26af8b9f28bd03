"""The fast engine's loop: continuous batching of codec frames over a static KV cache.

Each `step()` admits waiting requests into free rows (one packed prefill for all of them), queues one
frame for every running request at once (code predictor for codebooks 1-15, talker step, codebook-0
sampling), then on CUDA reads the frame the previous step queued: the GPU always has the next frame
queued while the host reads one (readback; on the CPU a step reads its own frame). A request that samples
EOS, reaches its frame limit or is cancelled leaves at once; the last running request moves into its
row, so running requests always hold rows 0..n-1 and a batch is the first rows of every tensor.
Requests hand a codec thread their frames in chunks while they run (on its own low-priority CUDA stream, so
decoding never stalls the running streams' steps; see codec_worker): a streaming request a small first
chunk at once, then chunks doubling up to the largest size; a whole utterance, with the stateful chunk
decoder, the largest chunks, joined into its audio when it ends. The codec thread decodes the chunks queued
since its last call together, and steady chunks wait briefly for other streams' (codec_worker), so that one
batched call serves many streams. With the context chunk decoder a whole utterance is decoded once it has
ended, with the others that ended since the last decode.

Per-row state (hidden, pending codebook 0, position, frame counter, repetition mask, trailing
text, sampling options) lives in static tensors, so the frame's tensor work takes no values back to
the host and has fixed shapes for a fixed (batch bucket, KV length bucket, sampling plans): one CUDA
graph each (frame_graphs), all captured at warm-up. The host reads one small tensor per step: the new
frames and which rows hit EOS. A device fault stops the engine for good (faults): its owner builds a
new one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ...errors import EngineFailed, ModelUnavailable
from ..types import FinishReason
from .capture import engine_stream
from .chunking import StreamChunker, stream_chunk_sizes
from .codec import CodecDecoder
from .codec_worker import ChunkDecoder, CodecJob, CodecWorker, ContextChunkDecoder, StatefulChunkDecoder
from .faults import as_seen_by_client, engine_failed, is_device_fault
from .frame_graphs import FrameGraphs
from .memory import CUDA_ENGINES
from .model_runner import NUM_CODE_GROUPS, ModelRunner, to_device
from .options import (
    CODEC_GATHER_STREAMS,
    COMPILE_CODEC,
    MAX_CONTEXT,
    MAX_PREFILL_TOKENS,
    STREAM_CHUNK_FRAMES,
    STREAM_DECODER,
    STREAM_FIRST_FRAMES,
    CodecCompile,
    FusedAttention,
    StreamDecoder,
)
from .prefill import BucketedPrefill
from .prompt import special_text_hiddens
from .readback import FrameReadback, PendingFrame
from .rows import RowState
from .sampler import Sampler, SamplingPlan, mark_seen
from .scheduler import Scheduler
from .sequence import AudioStream, Sequence, SequenceStatus
from .stream_codec import StreamingDecoder
from .timing import STEP_PARTS, PhaseTimer, RequestPhases
from .trace import StepTrace
from .warmup import warm_up

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
MIN_FRAME_ROWS = 2  # on CUDA: a frame of one request runs as two rows (see FastEngine.__init__)
KV_BUCKET_MIN = 256  # KV read lengths are 256, 512, 1024, ... up to max_len
# The step thread waits on the GPU every step and must get the GIL back at once. Python's default
# switch interval (5 ms) lets a busy thread (prompt building, codec decode, the event loop) hold
# it that long each time: up to +5 ms a step.
GIL_SWITCH_INTERVAL_S = 0.0005


def batch_buckets(max_slots: int, *, min_rows: int = 1) -> list[int]:
    """Batch sizes with their own graphs: BATCH_BUCKETS up to `max_slots`, from `min_rows` on (a smaller
    batch runs padded with free rows) where there are that many rows."""
    sizes = sorted({b for b in BATCH_BUCKETS if b < max_slots} | {max_slots})
    return [b for b in sizes if b >= min(min_rows, max_slots)]


def kv_buckets(max_len: int) -> list[int]:
    """Static KV read lengths: a step attends over the smallest that covers every running row."""
    sizes, k = {max_len}, KV_BUCKET_MIN
    while k < max_len:
        sizes.add(k)
        k *= 2
    return sorted(sizes)


def _on_stream(stream: Any) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def finish_sequence(seq: Sequence, reason: FinishReason, phases: RequestPhases | None = None) -> None:
    """Mark a request finished, count where its time went (`phases`), and tell its owner. A plain function,
    not a method: the codec thread that calls it then holds no reference to the engine."""
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
    if phases is not None and reason is not FinishReason.CANCELLED and seq.error is None:
        phases.record(seq, time.perf_counter())
    if seq.on_finish is not None:
        try:
            seq.on_finish(seq)
        except Exception:  # a caller's callback must not take the engine's threads down
            log.exception("on_finish callback failed")


class FastEngine:
    def __init__(
        self,
        tts: Any,
        *,
        max_slots: int = 16,
        max_len: int = MAX_CONTEXT,
        max_prefill_tokens: int = MAX_PREFILL_TOKENS,
        admit_wait_s: float = 0.0,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        compile_codec: CodecCompile = COMPILE_CODEC,
        fused_attention: FusedAttention = "off",
        codec_batch_frames: int = 1024,
        codec_wait_s: float = 0.0,
        codec_gather_streams: int = CODEC_GATHER_STREAMS,
        stream_chunk_frames: int = STREAM_CHUNK_FRAMES,
        stream_first_frames: int = STREAM_FIRST_FRAMES,
        stream_decoder: StreamDecoder = STREAM_DECODER,
        trace: StepTrace | None = None,
        pipeline: bool | None = None,
    ) -> None:
        self.tts = tts
        self.trace = trace
        self.runner = ModelRunner(tts, max_slots=max_slots, max_len=max_len, compile=compile, fused=fused_attention)
        if self.runner.device.type == "cuda":
            CUDA_ENGINES.add(self)  # before any capture (see CudaEngines)
        self.sampler = Sampler.for_model(tts)
        if compile:
            self.sampler.enable_compile()
        self.scheduler = Scheduler(max_slots, max_prefill_tokens, admit_wait_s)
        self.max_len = max_len
        self.chunker = StreamChunker(stream_chunk_sizes(stream_first_frames, stream_chunk_frames), codec_wait_s)
        self.codec = CodecDecoder(
            tts.model.speech_tokenizer, graphs=cuda_graphs is not False, max_batch_frames=codec_batch_frames
        )
        device, dtype = self.runner.device, self.runner.dtype
        self.device = device
        hidden_size = tts.model.talker.config.hidden_size
        vocab = self.runner.vocab_size
        self.eos_id = int(tts.model.config.talker_config.codec_eos_token_id)
        self.rows = RowState(
            max_slots, max_len=max_len, hidden_size=hidden_size, vocab=vocab, device=device, dtype=dtype
        )
        self.tts_pad = special_text_hiddens(tts)[2].reshape(-1)  # talker input text once the text ran out
        # Batches are padded to a few fixed sizes (padding rows are free rows, computed and
        # ignored), and KV reads to a few fixed lengths: each pair is one CUDA graph.
        cuda = device.type == "cuda"
        # On CUDA a frame runs at least two rows (one request beside a free row): cuBLAS gives the code
        # predictor's one-row output projection a split-K kernel, 12.65 us against 7.88 at two rows, 75 times a
        # frame, and no projection is slower at two rows by more than 0.2 us (bench.micro_kernels, H200,
        # 2026-12-04): ~0.35 ms of one stream's 6.4 ms frame. Streams' codec graphs keep their one-row bucket.
        self.buckets = batch_buckets(max_slots, min_rows=MIN_FRAME_ROWS if cuda else 1)
        self.stream_buckets = batch_buckets(max_slots)
        self.kv_buckets = kv_buckets(max_len)
        use_graphs = cuda if cuda_graphs is None else cuda_graphs
        self.graphs = FrameGraphs(self) if use_graphs else None
        # On CUDA prefill is padded to token buckets, graphed when frames are (see prefill.py).
        self.prefill = BucketedPrefill(self.runner, max_prefill_tokens) if cuda else None
        # Steps run on a high-priority stream, codec decode on a low-priority one: a burst of
        # decoding yields the GPU to the next frame instead of queueing ahead of it.
        self.step_stream = engine_stream(device, self, priority=-1, role="step") if cuda else None
        self.codec_stream = engine_stream(device, self, priority=0, role="codec") if cuda else None
        # Work handed in by other threads.
        self._inbox: queue.SimpleQueue[tuple[str, Sequence]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.stop_timeout_s = 30.0
        self._shutdown = threading.Lock()  # who fails what is left at stop: stop() or a late step thread
        self._loop_exited = False
        self._abandoned = False
        self._thread: threading.Thread | None = None
        self.failure: EngineFailed | None = None  # what a device fault that stopped this engine for good says
        self.on_failure: Callable[[BaseException], None] | None = None  # told once, from the step thread
        self.streaming_decoder = StreamingDecoder(self.codec.decoder) if stream_decoder == "stateful" else None
        if self.streaming_decoder is not None and compile and cuda:
            self.streaming_decoder.enable(compile_codec)  # compiles at warm-up, before its graphs are captured
        chunks: ChunkDecoder = (
            StatefulChunkDecoder(self.streaming_decoder, tuple(self.chunker.sizes))
            if self.streaming_decoder is not None
            else ContextChunkDecoder(self.codec)
        )
        # Nothing the engine owns holds the engine itself (no callbacks bound to it, FrameGraphs holds
        # a weak proxy): with no reference cycle, dropping the last reference frees it, KV cache and
        # graphs included, without waiting for the cycle collector.
        scheduler = self.scheduler
        # A device fault on the codec thread stops the step loop too (its next step raises it).
        self._codec_faults: queue.SimpleQueue[BaseException] = queue.SimpleQueue()
        codec_faults, wake, inbox = self._codec_faults, self._wake, self._inbox

        def device_fault(exc: BaseException) -> None:
            codec_faults.put(exc)
            wake.set()

        def stop(seq: Sequence) -> None:  # `cancel`, for the codec thread: no reference to the engine
            inbox.put(("cancel", seq))
            wake.set()

        self._stop_request = stop

        # Where finished requests' time went (metrics); filled where they finish, on either thread.
        self.request_phases = RequestPhases()
        self._finish = functools.partial(finish_sequence, phases=self.request_phases)
        self.codec_worker = CodecWorker(
            self.codec,
            chunks,
            device=device,
            stream=self.codec_stream,
            wait_s=codec_wait_s,
            gather_streams=codec_gather_streams,
            running=lambda: len(scheduler.running),
            streams=lambda: sum(seq.stream is not None for seq in list(scheduler.running)),
            finish=self._finish,
            stop=stop,
            device_fault=device_fault,
        )
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # recent steps' batch sizes; tests read it
        self.on_step: Callable[[int], None] | None = None  # called with each step's batch size (metrics)
        # Host seconds in the step's parts (see timing); the codec's are `codec_worker.seconds`.
        self.timer = PhaseTimer(STEP_PARTS)
        # Each frame's output goes to the host behind the frame. Pipelined, a step reads the frame the
        # previous step queued, so the GPU never waits for the host; on the CPU a frame has run by the time
        # it is queued, and reading it a step later would only delay every frame by one.
        self.readback = FrameReadback(max_slots, NUM_CODE_GROUPS + 1, device)  # a frame's codes and EOS flag
        self.pipeline = cuda if pipeline is None else pipeline
        self._in_flight: PendingFrame | None = None  # the frame queued last step, not read yet

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds in each part of the loop (see timing): the step thread's host time per part, the
        frames' GPU time, and the codec thread's host time."""
        return {**self.timer.seconds, "gpu_frame": self.readback.gpu_seconds, "codec": self.codec_worker.seconds}

    @property
    def codec_frames(self) -> int:
        """Frames decoded to audio so far, so codec throughput can be read on its own."""
        return self.codec_worker.frames

    @property
    def codec_batches(self) -> dict[str, int]:
        """The streaming decoder's batches so far, the streams' chunks in them and the rows they computed
        (`StreamingDecoder.counts`); none with the context chunk decoder."""
        decoder = self.streaming_decoder
        return dict(decoder.counts) if decoder is not None else {}

    @property
    def cache_bytes(self) -> int:
        """GPU memory this engine allocated for its caches and per-row state."""
        return self.runner.cache_bytes + self.rows.bytes

    def warm_up(self, *, codec: bool = True) -> None:
        """Do now everything a request would otherwise wait for (see warmup). Call before `start()`: the
        compile warm-up writes into rows that no request holds yet. `codec=False` leaves the codec's graphs
        out (benchmarks of the frame alone: they take a minute or more of a 1.7B warm-up)."""
        warm_up(self, codec=codec)

    def drop_graphs(self) -> None:
        """A frame that cannot be captured still runs: fall back to eager for good, and say so."""
        log.exception("CUDA graph capture failed; the fast engine continues without graphs")
        self.graphs = None

    # ----- other threads -----
    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request; it is admitted at the start of a coming step. Raises EngineFailed once a
        device fault has stopped this engine.

        On CUDA an event marks the point of the caller's stream where the prompt's tensors are
        ready; the engine's streams wait on it instead of the host waiting.
        """
        limit = self.max_len - seq.prompt_len - 1
        if limit < 1:
            raise ValueError(f"prompt of {seq.prompt_len} positions leaves no room in max_len {self.max_len}")
        if seq.prompt.trailing.shape[0] > self.max_len:
            raise ValueError(f"text of {seq.prompt.trailing.shape[0]} tokens exceeds max_len {self.max_len}")
        seq.max_frames = min(seq.max_frames, limit)
        if seq.stream is None and seq.decode_audio and self.streaming_decoder is not None:
            seq.stream = AudioStream()  # a whole utterance, decoded while it runs (see AudioStream)
        seq.submitted_at = time.perf_counter()
        if self.device.type == "cuda":
            seq.ready = torch.cuda.Event()
            seq.ready.record(torch.cuda.current_stream(self.device))  # the model's device, not the caller's
        with self._shutdown:
            if self.failure is not None:
                raise EngineFailed(self.failure.message)
            if self._stop.is_set():  # stopped (unloaded): nobody would ever take it from the inbox
                raise ModelUnavailable("the model was unloaded while this request was being prepared; retry")
            self._inbox.put(("submit", seq))
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (client gone, or its audio failed): its row frees at the next step, the others carry
        on."""
        self._stop_request(seq)

    def start(self) -> None:
        """Run the step loop on its own thread, and codec decode on another so it never stalls a step."""
        for stream in (self.step_stream, self.codec_stream):
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(self.device))  # caches and graphs are ready
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # process-wide, and only ever lowered
        self._thread = threading.Thread(target=self._loop, name="qtts-fast-engine", daemon=True)
        self.codec_worker.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still queued or running fail instead of waiting forever.

        If the step thread is still inside a long step after `stop_timeout_s` (a compile, a hung
        GPU), it is left to fail its requests itself when that step ends: two threads must never
        touch the scheduler at once.
        """
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=self.stop_timeout_s)
        self.codec_worker.stop()
        with self._shutdown:
            if thread is not None and not self._loop_exited:
                self._abandoned = True
                log.error("the fast engine's step thread did not stop in time; it fails its requests when it does")
                return
        self._fail_remaining()
        self._release()

    def _release(self) -> None:
        """Let go of the engine's device memory now that no thread runs on it: the frame, codec and
        streaming-decoder graphs (and their memory pools), the KV caches and the per-row state. A
        caller that still holds the engine (a request in flight at an unload) holds a husk. The last
        frame the loop queued may still be running on the step stream: it must finish before the caching
        allocator hands its KV cache and row state to other work."""
        if self.step_stream is not None:
            try:
                self.step_stream.synchronize()
            except RuntimeError:  # a device fault: nothing runs on this GPU any more
                log.exception("waiting for the last frame at release failed")
        self.graphs = None
        self.on_step = None
        for owner in (self.codec, self.streaming_decoder, self.prefill):
            if owner is not None:
                owner.release_graphs()
        self.runner.release()
        self.rows.release()
        if self.device.type == "cuda":
            CUDA_ENGINES.release(self)

    def _fail_remaining(self) -> None:
        self._fail_everything(RuntimeError("the model was unloaded while this request was in progress"))

    def _fail_everything(self, exc: BaseException) -> None:
        """`_fail_all`, and the requests whose cancel is still in the inbox: their callers wait for `on_finish`
        too (a failed chunk cancels a request whose client is still there)."""
        for seq in self._take_inbox():
            seq.error = seq.error or exc
            self._finish(seq, FinishReason.CANCELLED)
        self._fail_all(exc)

    def _loop(self) -> None:
        with _on_stream(self.step_stream):
            while not self._stop.is_set():
                if not self.scheduler.has_work and self._inbox.empty() and self._codec_faults.empty():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as exc:
                    log.exception("fast engine step failed")
                    if is_device_fault(exc):
                        self._fail_for_good(exc)
                        break
                    self._fail_all(exc)  # fail the requests in flight, keep the engine alive
                self._trace_step()
            self._stop_trace()
            with self._shutdown:
                self._loop_exited = True
                if self._abandoned:  # stop() gave up waiting for this thread
                    self._fail_remaining()
                    self._release()

    def _trace_step(self) -> None:
        """Diagnostics never fail requests: a trace that breaks is logged and switched off."""
        if self.trace is None:
            return
        try:
            self.trace.after_step()
        except Exception:
            log.exception("step trace failed; tracing is off for this engine")
            self.trace = None

    def _stop_trace(self) -> None:
        if self.trace is not None:
            try:
                self.trace.close()
            except Exception:
                log.exception("stopping the step trace failed")

    def _fail_for_good(self, exc: BaseException) -> None:
        """A device fault (a CUDA error) can leave the GPU's state corrupt: this engine takes no more work.
        `on_failure` tells the owner, which builds a new engine, then everything queued or running fails with
        a 503 to retry. In that order: the owner hears first (its restart queued on its event loop ahead of
        the requests' answers), so no client that got the 503 finds /ready still green. Once `failure` is set
        (under the lock) no submit gets in, so the inbox drained after holds every request left."""
        failure = engine_failed(exc)  # never raised here, so it holds no traceback (and no frame of ours)
        with self._shutdown:
            self.failure = failure
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:  # e.g. the owner's event loop already closed at shutdown
                log.exception("on_failure callback failed")
        with self._shutdown:
            self._fail_everything(failure)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every request queued or running, freeing their rows (the frame in flight is nobody's now)."""
        self._drop_in_flight()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.error = exc
            self.scheduler.release(seq)
            self._finish(seq, FinishReason.CANCELLED)

    # ----- the step -----
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Queue one frame for every running request, newcomers included, then read the frame queued by
        the previous step (`pipeline`, on CUDA): the GPU runs frame N+1 while the host reads frame N and
        hands out its audio, so it never waits for the host between frames (readback). Without
        `pipeline` a step reads the frame it queued. Returns the requests that finished.

        Pipelined, a request that ends in frame N is in frame N+1 too (the host learns of its end only
        after queueing N+1); that frame's row for it is computed and ignored, like a free row's."""
        if not self._codec_faults.empty():
            raise self._codec_faults.get_nowait()  # the loop stops the engine for good (see _fail_for_good)
        timer = self.timer
        timer.start()
        finished = self._take_inbox()
        chunks: list[CodecJob] = []
        try:
            self._compact()
            timer.lap("admit")
            admitted = self.scheduler.admit()  # into rows n.., queued behind the frame in flight
            if admitted:
                self._admit(admitted, finished)
            timer.lap("prefill")
            running = list(self.scheduler.running)
            launched = self._launch_frame(running, ahead=self._in_flight) if running else None
            timer.lap("launch")
            previous = self._in_flight if self.pipeline else launched
            self._in_flight = launched if self.pipeline else None
            if previous is not None:
                chunks = self._read_frame(previous, finished)
            if self._in_flight is not None and not self._live(self._in_flight):
                self._drop_in_flight()  # everyone in it just left: nobody reads it
        except BaseException as exc:
            # Requests already released this step (cancelled, or finished before the failure) are
            # no longer running, so `_fail_all` will not see them: fail them here.
            for seq in finished:
                seq.error = seq.error or as_seen_by_client(exc)
            self._deliver(finished)
            raise
        self._deliver(finished, chunks)
        timer.lap("deliver")
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

    def _compact(self) -> None:
        """Move requests whose rows changed (someone left) into their new rows: state, text and KV."""
        moves = self.scheduler.compact()
        if not moves:
            return
        src, dst = to_device([[m[1] for m in moves], [m[2] for m in moves]], self.device)  # one copy
        text = max(seq.prompt.trailing.reshape(-1, self.rows.trailing.shape[-1]).shape[0] for seq, _, _ in moves)
        self.rows.move(src, dst, text)
        # The frame in flight is queued before these copies, so they copy what it writes.
        written = self._positions_written([seq for seq, _, _ in moves], self._in_flight)
        self.runner.move_rows(src, dst, min(written, self.max_len))

    def _admit(self, admitted: list[Sequence], finished: list[Sequence]) -> None:
        """Prefill newcomers. If that fails (short of a device fault), only they fail: the prefill writes
        nothing but their rows, so the running requests go on."""
        try:
            self._prefill(admitted)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            log.exception("prefill failed; its requests fail, the running ones go on")
            for seq in admitted:
                seq.error = exc
                self.scheduler.release(seq)
                seq.finish_reason = FinishReason.CANCELLED
                finished.append(seq)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prompts of newly admitted requests, packed into one forward, and their first codebook 0."""
        if self.step_stream is not None:
            for seq in seqs:
                if seq.ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(seq.ready)
        now = time.perf_counter()
        for seq in seqs:
            seq.admitted_at = now
        slots = [seq.slot for seq in seqs]
        span = slice(slots[0], slots[0] + len(slots))
        assert slots == list(range(span.start, span.stop)), "the scheduler admits into the next free rows"
        prefill = self.runner if self.prefill is None else self.prefill
        hidden, logits = prefill.prefill_many(slots, [seq.prompt.embeds for seq in seqs])
        options = [seq.sampling for seq in seqs]
        rows = self.rows
        trailing = [seq.prompt.trailing.reshape(-1, rows.trailing.shape[-1]) for seq in seqs]
        rows.admit(span, options, [seq.prompt_len for seq in seqs], trailing)
        plan = SamplingPlan.of([o.do_sample for o in options], [o.top_k for o in options])
        rows.code0[span] = self.first_code(logits, span, plan)
        rows.hidden[span] = hidden

    def first_code(self, logits: Tensor, span: slice, plan: SamplingPlan) -> Tensor:
        """Codebook 0 of the first frame of the requests just prefilled into rows `span`, from their prompts'
        last logits (see `_code0`)."""
        step = torch.zeros(span.stop - span.start, dtype=torch.long, device=self.device)
        return self._code0(logits, span, step, plan)

    def _code0(self, logits: Tensor, span: slice, step: Tensor, plan: SamplingPlan) -> Tensor:
        """Codebook 0 for rows `span` at frame `step` from the talker's `logits`, marked in the rows'
        repetition masks: a frame's next code (rows 0..n-1) or the first of the requests just prefilled. Both
        pass views of the per-row tables, so the compiled sampler serves both with one graph."""
        rows = self.rows
        params, seen, floor = rows.talker_params.span(span), rows.seen[span], rows.min_frames[span]
        code0 = self.sampler.talker(logits, params, seen, step, plan, floor)
        mark_seen(seen, code0)
        return code0

    def _read_frame(self, frame: PendingFrame, finished: list[Sequence]) -> list[CodecJob]:
        """Read a queued frame for its requests still running (if any) and make their stream chunks."""
        if not self._live(frame):
            self.readback.forget(frame)
            return []
        self.steps += 1
        return self.chunker.chunks(self._collect_frame(frame, finished), time.perf_counter())

    @staticmethod
    def _live(frame: PendingFrame) -> bool:
        """Whether any request of `frame` still wants it (all may have left since it was queued)."""
        return any(seq.status is SequenceStatus.RUNNING for seq in frame.running)

    def _drop_in_flight(self) -> None:
        """Nobody reads the frame in flight (its requests left, or all failed): free its buffer."""
        self.readback.forget(self._in_flight)
        self._in_flight = None

    def _launch_frame(self, running: list[Sequence], ahead: PendingFrame | None) -> PendingFrame:
        """Queue one frame for every running request (rows 0..n-1) and the copy of its output to the host
        right behind it; returns without waiting for either (see `_collect_frame`)."""
        n = len(running)
        self.batch_sizes.append(n)
        if self.on_step is not None:
            self.on_step(n)
        size = next(b for b in self.buckets if b >= n)
        kv_len = next(k for k in self.kv_buckets if k >= self._positions_written(running, ahead) + 1)  # + its own
        # Host-side facts about the batch's options let sampling skip work it does not need.
        opts = [s.sampling for s in running]
        plans = (
            SamplingPlan.of([o.do_sample for o in opts], [o.top_k for o in opts]),
            SamplingPlan.of([o.subtalker_do_sample for o in opts], [o.subtalker_top_k for o in opts]),
        )
        self.readback.begin()
        return self.readback.queue(running, self._run_frame(size, kv_len, plans))

    @staticmethod
    def _positions_written(seqs: list[Sequence], ahead: PendingFrame | None) -> int:
        """KV positions written so far in the rows of `seqs`, the most of any: the prompt's, one per frame
        read, and one by the frame `ahead` (queued, not read yet) for the rows in it. A frame reads these
        and writes the next; `submit`'s frame limit keeps that within max_len even for a request whose last
        frame is in flight."""
        queued = set(ahead.running) if ahead is not None else set()
        return max(seq.prompt_len + seq.num_frames + (seq in queued) for seq in seqs)

    def _collect_frame(self, frame: PendingFrame, finished: list[Sequence]) -> list[Sequence]:
        """The one host read of the step (frames and EOS flags together) for the requests of `frame` still
        running; those that end are released and added to `finished`. Returns the ones that were running."""
        out_host = self.readback.read(frame)
        self.timer.lap("gpu_wait")
        frames_host, eos_host = out_host[:, :-1], out_host[:, -1].tolist()
        now = time.perf_counter()
        running = []
        for i, seq in enumerate(frame.running):
            if seq.status is not SequenceStatus.RUNNING:  # cancelled since the frame was queued
                continue
            running.append(seq)
            seq.frames.append(frames_host[i])
            if seq.first_frame_at is None:
                seq.first_frame_at = now
            if seq.on_frame is not None:
                try:
                    seq.on_frame(seq, frames_host[i])
                except Exception:  # a caller's callback must not take the step down
                    log.exception("on_frame callback failed")
            if eos_host[i] or seq.num_frames >= seq.max_frames:
                seq.last_frame_at = now
                self.scheduler.release(seq)
                seq.finish_reason = FinishReason.EOS if eos_host[i] else FinishReason.LENGTH
                finished.append(seq)
        return running

    def _run_frame(self, size: int, kv_len: int, plans: tuple[SamplingPlan, SamplingPlan]) -> Tensor:
        """The frame through its CUDA graph, or eagerly. If a compiled frame fails, compile is turned
        off and the frame retried; if capture fails, graphs are."""
        if self.graphs is not None:
            try:
                return self.graphs.run(size, kv_len, plans)
            except Exception as exc:
                if is_device_fault(exc):  # the GPU failed, not the graphs or compile: no fallback helps
                    raise
                if not self.runner.compiled:
                    self.drop_graphs()
                    return self.frame(size, kv_len, plans)
                log.exception("a frame failed with torch.compile; continuing without it")
                self.runner.disable_compile()
                self.sampler.disable_compile()
                return self._run_frame(size, kv_len, plans)
        return self.frame(size, kv_len, plans)

    def frame(self, size: int, kv_len: int, plans: tuple[SamplingPlan, SamplingPlan]) -> Tensor:
        """All tensor work of one frame for rows 0..size-1: no host reads, fixed shapes.

        Completes each row's pending frame (code predictor), runs the talker step (reading
        `kv_len` cache positions) and samples the next codebook 0, updating the per-row state in
        place. Rows past the running ones are free rows: they compute garbage nobody reads, and
        their positions are clamped so they never leave the cache. Returns [size, 17]: each row's
        frame (16 codes) and whether it just sampled EOS (1/0), one tensor so the host reads once.
        This is what a CUDA graph captures per bucket.
        """
        talker_plan, sub_plan = plans
        rows = self.rows
        step = rows.frame_index[:size]
        sub = rows.sub_params.span(slice(size))

        def sample(codebook: int, logits: Tensor) -> Tensor:
            return self.sampler.code_predictor(logits, sub, step, codebook, plan=sub_plan)

        code0 = rows.code0[:size]
        codes, embedded = self.runner.predict_codes(rows.hidden[:size], code0, sample)
        frames = torch.cat((code0[:, None], codes), dim=1)
        # Frame k's talker input carries trailing text token k while there is any, then tts_pad.
        text = rows.trailing[rows.ids[:size], step.clamp(max=self.max_len - 1)]
        has_text = (step < rows.trailing_len[:size])[:, None]
        inputs = embedded + torch.where(has_text, text, self.tts_pad)
        position = rows.position[:size]
        hidden, logits = self.runner.decode(inputs, position, kv_len=kv_len)
        next_step = step + 1
        next_code0 = self._code0(logits, slice(size), next_step, talker_plan)
        rows.hidden[:size].copy_(hidden)
        rows.code0[:size].copy_(next_code0)
        position.add_(1).clamp_(max=self.max_len - 1)  # only free and ignored rows ever reach the clamp
        rows.frame_index[:size].copy_(next_step)
        return torch.cat((frames, (next_code0 == self.eos_id)[:, None].long()), dim=1)

    @contextlib.contextmanager
    def preserved_rows(self, size: int) -> Iterator[None]:
        """Run a throwaway frame (graph warm-up, compile) over rows 0..size-1 and undo its writes,
        so running requests are untouched: their state and the KV entries at their positions."""
        state = self.rows.snapshot(size)
        positions = self.rows.position[:size].clone()
        kv = self.runner.read_positions(positions)
        try:
            yield
        finally:
            self.rows.restore(size, state)
            self.runner.write_positions(positions, kv)

    # ----- results -----
    def _deliver(self, finished: list[Sequence], chunks: list[CodecJob] | None = None) -> None:
        """Hand streaming chunks and finished requests to the codec thread (or, with no threads
        running, decode here); requests with nothing to decode finish at once."""
        jobs = list(chunks or [])
        for seq in finished:
            ended = seq.finish_reason is not FinishReason.CANCELLED and seq.frames
            if ended and seq.stream is not None:
                jobs.append(self.chunker.last(seq))
            elif ended and seq.decode_audio:
                jobs.append(CodecJob(seq, 0, seq.num_frames, final=True))
            else:
                self._finish(seq, seq.finish_reason or FinishReason.CANCELLED)
        self.codec_worker.put(jobs)
