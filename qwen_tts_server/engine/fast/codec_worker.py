"""The codec thread: frames to audio, off the step thread, batched across requests.

The step thread hands over jobs; this thread decodes them on its own low-priority CUDA stream, so a
burst of decoding yields the GPU to the next frame instead of stalling the running streams. Two
kinds of job share each batch:

- whole: a finished request that wants its utterance in one piece (decoded with everything else
  that finished since the last decode; under load it waits up to `wait_s` for company, since the
  codec is several times more efficient eight rows at a time than one). Only with the context chunk
  decoder: with the stateful one a whole utterance is a stream nobody listens to (`AudioStream`),
  decoded in chunks while it runs and joined at its end, so its codec work never lands all at once
  at its end, and the codec needs no graphs of its own for whole utterances;
- chunk: frames [start, end) of a request decoded in chunks (`AudioStream`). A chunk is urgent (decoded
  at once) unless its stream is well ahead of real time or nobody listens to it yet (`patient`, see
  chunking); a stream's last chunk is always urgent. Patient chunks wait up to `wait_s` for other streams' while more
  streams run than are in hand: streams start at different steps, so each step hands over only the
  few whose chunk just filled (~5 of 64), and small groups cost the codec several times more GPU
  time per stream than large ones (one stream's 12-frame chunk ~3.6 ms, sixteen streams' ~15 ms in
  `bench_stream_codec` on an H200), time taken from the frames that share the GPU.

A job marked `final` finishes its request after its audio is delivered, so a stream's last chunk
always reaches the caller before `on_finish`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..types import SAMPLES_PER_FRAME, FinishReason, last_frames
from .codec import CodecDecoder
from .faults import as_seen_by_client, is_device_fault
from .options import CODEC_GATHER_STREAMS
from .sequence import Sequence
from .stream_codec import StreamingDecoder

log = logging.getLogger(__name__)

GATHER = 8  # finished requests a whole-utterance decode waits for (at most wait_s) under load


@dataclass(eq=False)
class CodecJob:
    seq: Sequence
    start: int = 0  # first frame of this job's audio
    end: int = 0  # one past its last frame
    final: bool = False  # the request has ended: finish it once this job's audio is delivered
    patient: bool = False  # a steady chunk of a stream well ahead of real time: may wait for company

    @property
    def is_chunk(self) -> bool:
        return self.seq.stream is not None


class ChunkDecoder(Protocol):
    """Decodes streaming chunks: each job's frames [start, end) to (end - start) frames of audio."""

    def decode_chunks(self, jobs: list[CodecJob]) -> list[np.ndarray]: ...


class ContextChunkDecoder:
    """Re-decodes each chunk after up to `context` frames that came before it (the reference codes
    for an ICL clone's first chunks) and keeps only the chunk's own audio. Stateless, and it shares
    the whole-utterance decoder's CUDA graphs; the price is decoding the context again each chunk,
    and a small difference from whole decode where the decoder's receptive field reaches further
    back than the context."""

    def __init__(self, codec: CodecDecoder, context: int = 25) -> None:
        self.codec = codec
        self.context = context

    def decode_chunks(self, jobs: list[CodecJob]) -> list[np.ndarray]:
        codes = [self._codes(job) for job in jobs]
        audio = self.codec.decode(codes)
        return [last_frames(samples, job.end - job.start) for samples, job in zip(audio, jobs, strict=True)]

    def _codes(self, job: CodecJob) -> torch.Tensor:
        first = max(0, job.start - self.context)
        codes = torch.stack(job.seq.frames[first : job.end])
        ref = job.seq.prompt.ref_code
        missing = self.context - (job.start - first)
        if ref is not None and missing > 0:
            codes = torch.cat((ref[-missing:].to(codes.device, codes.dtype), codes))
        return codes


class StatefulChunkDecoder:
    """Carries each stream's decoder state from chunk to chunk (stream_codec): exactly the audio of
    a whole decode, and no context decoded twice. An ICL clone's state is primed once with the
    reference codes (their audio discarded), as whole decode puts them in front."""

    def __init__(self, decoder: StreamingDecoder, sizes: tuple[int, ...] = ()) -> None:
        self.decoder = decoder
        self.sizes = sorted(sizes)  # chunk lengths with captured graphs

    def decode_chunks(self, jobs: list[CodecJob]) -> list[np.ndarray]:
        states = [self._state(job.seq) for job in jobs]
        codes = [self._codes(job) for job in jobs]
        audio = self.decoder.decode(states, codes)
        return [samples[: (job.end - job.start) * SAMPLES_PER_FRAME] for samples, job in zip(audio, jobs, strict=True)]

    def _codes(self, job: CodecJob) -> torch.Tensor:
        """A stream's last chunk is padded to a graphed length: the decoder is causal, so the padding
        changes none of the chunk's samples (they are cut off after), and the state is not used again."""
        codes = torch.stack(job.seq.frames[job.start : job.end])
        size = next((n for n in self.sizes if n >= len(codes)), len(codes))
        if job.final and size > len(codes):
            codes = torch.cat((codes, codes.new_zeros(size - len(codes), codes.shape[1])))
        return codes

    def _state(self, seq: Sequence) -> Any:
        stream = seq.stream
        assert stream is not None
        if stream.state is None:
            state = self.decoder.new_state()
            ref = seq.prompt.ref_code
            if ref is not None:
                self._prime(state, ref.to(self.decoder.device, torch.long))  # one copy at most, not one a piece
            stream.state = state  # only once primed: a priming that fails is not half kept
        return stream.state

    def _prime(self, state: Any, codes: torch.Tensor) -> None:
        """Run a clone's reference codes through its new state, their audio discarded, in chunk sizes with
        captured graphs: at the reference's own length the decode would run eagerly, and cuDNN's benchmark
        mode would time every new length, while every stream's chunks wait behind it."""
        sizes = split_into_sizes(len(codes), self.sizes)
        self.decoder.prime(state, list(codes.split(sizes)) if sizes else [])


def split_into_sizes(frames: int, sizes: list[int]) -> list[int]:
    """`frames` as a sum of `sizes` (the chunk sizes with captured graphs), largest first, with what none of
    them fits (less than the smallest) last."""
    pieces: list[int] = []
    for size in sorted(sizes, reverse=True):
        count, frames = divmod(frames, size)
        pieces += [size] * count
    return pieces + ([frames] if frames else [])


class CodecWorker:
    def __init__(
        self,
        whole: CodecDecoder,
        chunks: ChunkDecoder,
        *,
        device: torch.device,
        stream: Any,
        wait_s: float,
        gather_streams: int = CODEC_GATHER_STREAMS,
        running: Callable[[], int],
        streams: Callable[[], int],
        finish: Callable[[Sequence, FinishReason], None],
        stop: Callable[[Sequence], None] | None = None,
        device_fault: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.whole = whole
        self.chunks = chunks
        self.device = device
        self.stream = stream  # a CUDA stream, or None
        self.wait_s = wait_s
        self.gather_streams = gather_streams  # streams whose patient chunks a chunk decode waits for, at most wait_s
        self._running = running  # how many requests are running (read across threads: a hint)
        self._streams = streams  # how many of them are decoded in chunks (streams, and whole utterances so decoded)
        self._finish = finish
        self._stop = stop  # stops a running request whose audio failed (the engine's cancel)
        self._device_fault = device_fault  # told of a CUDA error here, so the engine stops and is rebuilt
        self._queue: queue.SimpleQueue[list[CodecJob] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.seconds = 0.0  # host seconds spent decoding
        self.frames = 0  # frames decoded (whole and chunks)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qtts-codec", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def put(self, jobs: list[CodecJob]) -> None:
        """Queue jobs for the codec thread, or, with no thread running, decode them here."""
        if not jobs:
            return
        if self._thread is not None:
            self._queue.put(jobs)
        else:
            self.run(jobs)

    def _loop(self) -> None:
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            while (jobs := self._queue.get()) is not None:
                jobs = self._gather(jobs)
                t0 = time.perf_counter()
                self.run(jobs)
                self.seconds += time.perf_counter() - t0

    def _gather(self, jobs: list[CodecJob]) -> list[CodecJob]:
        """Add whatever else is queued; wait for more only while no job in hand is urgent and others
        that could join are still running (see the module docstring)."""
        deadline = time.perf_counter() + self.wait_s
        while True:
            left = deadline - time.perf_counter()
            wait = left > 0 and self._may_wait(jobs)
            try:
                more = self._queue.get(timeout=left) if wait else self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if more is None:
                self._queue.put(None)  # stop after this batch
                return jobs
            jobs += more

    def _may_wait(self, jobs: list[CodecJob]) -> bool:
        """Whole utterances wait for up to GATHER of them while anything runs; steady chunks for up to
        `gather_streams` streams while more streams run than are in hand; any other chunk is urgent."""
        chunks = [j for j in jobs if j.is_chunk]
        if not all(j.patient for j in chunks):
            return False
        streams = len({j.seq.id for j in chunks})
        if chunks and self._streams() <= streams:
            return False
        return self._running() > 0 and len(jobs) - len(chunks) < GATHER and streams < self.gather_streams

    def run(self, jobs: list[CodecJob]) -> None:
        """Decode every job (a failing batch is retried job by job, so one bad request fails only
        itself), deliver chunks, then finish the requests that ended."""
        for job in jobs:
            if job.seq.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(job.seq.ready)  # the reference codes
        whole = [j for j in jobs if not j.is_chunk]
        self._guarded(self._decode_whole, whole)
        for part in _rounds([j for j in jobs if j.is_chunk]):  # a stream's chunks in order, one per call
            # Checked each round: a request whose chunk failed in the round before gets no more audio.
            self._guarded(self._decode_chunks, [j for j in part if not _abandoned(j.seq)])
        for job in jobs:
            if job.final:
                if job.seq.stream is not None:
                    job.seq.stream.state = None  # its decoder caches (views of a batch's buffers): not needed again
                self._finish(job.seq, job.seq.finish_reason or FinishReason.CANCELLED)
            elif job.seq.error is not None and self._stop is not None:
                # Its audio has a hole now: stop it, so its caller hears of the error at once and its row
                # frees, instead of both waiting for frames that will never be heard (its last frame).
                self._stop(job.seq)

    def _guarded(self, decode: Callable[[list[CodecJob]], None], jobs: list[CodecJob]) -> None:
        if not jobs:
            return
        try:
            decode(jobs)
            return
        except Exception as exc:
            log.exception("codec decode failed" + ("; retrying its requests one by one" if len(jobs) > 1 else ""))
            fault = is_device_fault(exc)
            if fault and self._device_fault is not None:
                self._device_fault(exc)
            if len(jobs) == 1 or fault:  # the GPU failed: one by one would fail the same way
                for job in jobs:
                    job.seq.error = as_seen_by_client(exc)
                return
        for job in jobs:
            try:
                decode([job])
            except Exception as exc:
                job.seq.error = as_seen_by_client(exc)

    def _decode_whole(self, jobs: list[CodecJob]) -> None:
        batch = []
        for job in jobs:
            codes = torch.stack(job.seq.frames)
            ref = job.seq.prompt.ref_code
            if ref is not None:  # ICL clones decode after the reference's codes, then drop that part
                codes = torch.cat((ref.to(codes.device, codes.dtype), codes))
            batch.append(codes)
        for job, samples in zip(jobs, self.whole.decode(batch), strict=True):
            job.seq.audio = last_frames(samples, job.seq.num_frames)
        self.frames += sum(job.seq.num_frames for job in jobs)

    def _decode_chunks(self, jobs: list[CodecJob]) -> None:
        nonempty = [j for j in jobs if j.end > j.start]
        audio = self.chunks.decode_chunks(nonempty) if nonempty else []
        self.frames += sum(j.end - j.start for j in nonempty)
        for job, samples in zip(nonempty, audio, strict=True):
            _deliver_chunk(job.seq, samples)
        for job in jobs:
            stream = job.seq.stream
            if job.final and stream is not None and not stream.listened:
                job.seq.audio = np.concatenate(stream.parts) if stream.parts else np.zeros(0, np.float32)
                stream.parts = []


def _abandoned(seq: Sequence) -> bool:
    """Whether nobody will take a request's audio any more: cancelled (client gone) or failed. A request that
    ended with its frames (EOS, its limit) is finished too, but its chunks still in hand are its audio."""
    return seq.finish_reason is FinishReason.CANCELLED or seq.error is not None


def _deliver_chunk(seq: Sequence, samples: np.ndarray) -> None:
    """A chunk's audio to its listener, or, where nobody listens, to the parts of the request's audio."""
    stream = seq.stream
    assert stream is not None
    if stream.on_audio is None:
        stream.parts.append(samples)
        return
    try:
        stream.on_audio(seq, samples)
    except Exception:  # a caller's callback must not take the codec thread down
        log.exception("on_audio callback failed")


def _rounds(jobs: list[CodecJob]) -> list[list[CodecJob]]:
    """Split jobs into calls in which each request appears at most once, keeping each one's order."""
    rounds: list[list[CodecJob]] = []
    depth: dict[int, int] = {}
    for job in jobs:
        i = depth.get(job.seq.id, 0)
        depth[job.seq.id] = i + 1
        if i == len(rounds):
            rounds.append([])
        rounds[i].append(job)
    return rounds
