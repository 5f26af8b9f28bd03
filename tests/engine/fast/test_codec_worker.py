"""The codec thread's jobs: whole utterances gathered under load, streaming chunks batched per tick."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from qwen_tts_server.engine.fast.codec_worker import CodecJob, StatefulChunkDecoder, split_into_sizes
from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.sequence import AudioStream, FinishReason, Sequence, SequenceStatus
from qwen_tts_server.engine.fast.stream_codec import StreamingDecoder
from qwen_tts_server.engine.types import Mode, SamplingParams
from qwen_tts_server.errors import EngineFailed

from .test_engine import CUSTOM, GREEDY, custom_items, make_seq, run_to_end

# The stateful decoder carries the codec's causal state across chunks: whole decode up to float32
# rounding. The context decoder re-decodes a bounded left context, so it differs where the codec's
# receptive field reaches further back: the tiny codec keeps that below this (audio RMS ~0.2).
STATEFUL_TOLERANCE = 1e-4
CONTEXT_TOLERANCE = 0.05


def test_the_codec_waits_for_company_only_while_others_run(load_tts, no_collector):
    """Whole utterances are decoded together: while requests are running the codec thread waits (up to
    wait_s) for more to finish; with nothing running it decodes at once. A stream's steady chunks wait
    likewise while more streams run than are in hand; its early chunks never wait."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, codec_wait_s=0.5)
    worker = engine.codec_worker
    first, second, running = (
        CodecJob(make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY), final=True) for item in custom_items()[:3]
    )

    engine.scheduler.running.append(running.seq)
    threading.Timer(0.05, worker._queue.put, args=([second],)).start()
    t0 = time.perf_counter()
    assert worker._gather([first]) == [first, second]
    assert 0.45 < time.perf_counter() - t0 < 1.0  # fewer than GATHER: it waited out the window

    a, b, c = (streaming_job(tts, item) for item in custom_items()[:3])
    t0 = time.perf_counter()
    assert worker._gather([a]) == [a]
    assert time.perf_counter() - t0 < 0.05  # a chunk of a stream not far ahead of real time: no wait

    steady_a, steady_b = (dataclasses.replace(job, patient=True) for job in (a, b))
    t0 = time.perf_counter()
    assert worker._gather([steady_a]) == [steady_a]
    assert time.perf_counter() - t0 < 0.05  # patient, but no other stream runs that could join it

    engine.scheduler.running += [a.seq, b.seq]  # two streams run (and one whole-utterance request)
    threading.Timer(0.05, worker._queue.put, args=([b],)).start()
    t0 = time.perf_counter()
    assert worker._gather([steady_a]) == [steady_a, b]
    assert time.perf_counter() - t0 < 0.3  # waited for company; an urgent chunk joining ended the wait
    threading.Timer(0.05, worker._queue.put, args=([steady_b],)).start()
    t0 = time.perf_counter()
    assert worker._gather([steady_a]) == [steady_a, steady_b]
    assert time.perf_counter() - t0 < 0.3  # every running stream is in hand: none can join

    engine.scheduler.running.append(c.seq)  # three streams: a third could still join
    threading.Timer(0.05, worker._queue.put, args=([steady_b],)).start()
    t0 = time.perf_counter()
    assert worker._gather([steady_a]) == [steady_a, steady_b]
    assert 0.45 < time.perf_counter() - t0 < 1.0  # only patient chunks: it waited out the window
    threading.Timer(0.05, worker._queue.put, args=([steady_a],)).start()
    t0 = time.perf_counter()
    assert worker._gather([steady_a]) == [steady_a, steady_a]
    assert 0.45 < time.perf_counter() - t0 < 1.0  # two chunks of one stream are one stream in hand
    worker.gather_streams = 2  # QTTS_CODEC_GATHER_STREAMS: a batch waits for two streams at most
    threading.Timer(0.05, worker._queue.put, args=([steady_b],)).start()
    t0 = time.perf_counter()
    assert worker._gather([steady_a]) == [steady_a, steady_b]
    assert time.perf_counter() - t0 < 0.3  # a third stream still runs, but two are in hand: no more wait

    engine.scheduler.running.clear()
    t0 = time.perf_counter()
    assert worker._gather([first]) == [first]
    assert time.perf_counter() - t0 < 0.05  # nothing running: no wait

    worker._queue.put(None)
    assert worker._gather([first]) == [first]
    assert worker._queue.get_nowait() is None  # the stop signal is kept for the loop


def test_a_request_the_codec_cannot_decode_fails_alone(load_tts):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    good, bad = (make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY) for item in custom_items()[:2])
    good.frames = [torch.full((16,), 7) for _ in range(3)]
    bad.frames = [torch.full((16,), 10**6) for _ in range(3)]  # no such code: the codec raises
    good.finish_reason = bad.finish_reason = FinishReason.LENGTH
    engine.codec_worker.run([CodecJob(good, 0, 3, final=True), CodecJob(bad, 0, 3, final=True)])
    assert good.error is None and np.asarray(good.audio).size == 3 * 1920
    assert bad.error is not None and bad.status is SequenceStatus.FINISHED
    assert good.status is SequenceStatus.FINISHED and good.finish_reason is FinishReason.LENGTH


class CountingDecoder:
    """Wraps the engine's real chunk decoder, counting its calls and the chunks in each."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[int] = []

    def decode_chunks(self, jobs):
        self.calls.append(len(jobs))
        return self.inner.decode_chunks(jobs)


def streaming_job(tts, item) -> CodecJob:
    job = CodecJob(make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY))
    job.seq.stream = AudioStream(on_audio=lambda *_: None)
    return job


def streaming_seq(tts, item, frames: int, chunks: list, finished: list):
    sampling = SamplingParams(seed=3, max_new_tokens=frames)
    seq = make_seq(tts, Mode.CUSTOM_VOICE, item, sampling, on_finish=finished.append)
    seq.sampling = dataclasses.replace(seq.sampling, min_frames=frames + 1)  # no EOS: runs to its limit
    seq.stream = AudioStream(on_audio=lambda _s, audio: chunks.append(audio))
    return seq


@pytest.mark.parametrize("decoder", ["stateful", "context"])
def test_streamed_chunks_come_early_in_ticks_and_add_up_to_the_whole_audio(load_tts, decoder):
    tts = load_tts(CUSTOM)
    engine = FastEngine(
        tts, max_slots=4, max_len=256, stream_chunk_frames=4, stream_decoder=decoder, pipeline=True
    )  # as on CUDA: a step reads the frame the step before queued
    chunks, finished = [], []
    seq = engine.submit(streaming_seq(tts, custom_items()[0], 23, chunks, finished))
    engine.step()  # prefill, frame 1 queued
    engine.step()  # frame 1 read
    assert chunks == []
    engine.step()  # frame 2 read: the first chunk goes out at once
    assert [len(c) for c in chunks] == [2 * 1920]
    run_to_end(engine, [seq])
    sizes = [len(c) // 1920 for c in chunks]
    assert sum(sizes) == 23 and finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert sizes[:-1] == [2] + [4] * (len(sizes) - 2) and sizes[-1] <= 4  # first, then fixed-size chunks
    whole = engine.codec.decode([torch.stack(seq.frames)])[0]
    streamed = np.concatenate(chunks)
    assert streamed.shape == whole.shape
    tolerance = STATEFUL_TOLERANCE if decoder == "stateful" else CONTEXT_TOLERANCE
    assert np.abs(streamed - whole).max() < tolerance
    assert np.allclose(streamed[: 2 * 1920], whole[: 2 * 1920], atol=1e-5)  # no context yet: exact


@pytest.mark.parametrize("decoder", ["stateful", "context"])
def test_streams_chunks_are_decoded_together_in_two_sizes(load_tts, decoder):
    """A first chunk, then chunks of one size: streams that run together decode in one call per round,
    and only the last chunk of a stream is shorter (padded to a graphed size by the stateful decoder)."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=4, max_len=256, stream_chunk_frames=3, stream_decoder=decoder)
    counter = CountingDecoder(engine.codec_worker.chunks)
    engine.codec_worker.chunks = counter
    outputs = [[] for _ in range(4)]
    finished: list = []
    seqs = [engine.submit(streaming_seq(tts, item, 20, outputs[i], finished)) for i, item in enumerate(custom_items())]
    run_to_end(engine, seqs)
    assert counter.calls == [4] * len(counter.calls) and len(counter.calls) == 7  # 2 + 6 x 3 frames, then the rest
    for out in outputs:
        assert [len(c) // 1920 for c in out] == [2, 3, 3, 3, 3, 3, 3]
    assert all(sum(len(c) for c in out) == 20 * 1920 for out in outputs)


def test_a_chunk_may_wait_only_while_its_stream_is_well_ahead_of_real_time(load_tts):
    """Patient (may wait for company) only with more than PATIENT_LEAD_S + the wait of audio in hand beyond
    the time since the stream's first chunk: never its first chunks, never its last; and a stream that fell
    behind (a loaded server's slow steps) is never made to wait."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, stream_chunk_frames=4)  # chunks of 2, then 4
    handed: list[CodecJob] = []
    put = engine.codec_worker.put
    engine.codec_worker.put = lambda jobs: (handed.extend(jobs), put(jobs))
    seq = engine.submit(streaming_seq(tts, custom_items()[0], 40, [], []))
    run_to_end(engine, [seq])
    patient = [j.patient for j in handed]
    assert [j.end - j.start for j in handed] == [2] + [4] * 9 + [2]
    # 12.5 frames a second: 14 frames (1.12 s) in hand before the first chunk that can be patient
    assert patient[:4] == [False] * 4 and not handed[-1].patient and handed[-1].final
    assert True in patient and patient[patient.index(True) : -1] == [True] * (len(patient) - 1 - patient.index(True))


def test_a_cancelled_stream_gets_no_more_audio_and_frees_its_row(load_tts):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, stream_chunk_frames=2)
    chunks, finished = [], []
    seq = engine.submit(streaming_seq(tts, custom_items()[3], 200, chunks, finished))
    for _ in range(6):
        engine.step()
    heard = len(chunks)
    engine.cancel(seq)
    engine.step()
    assert finished == [seq] and seq.finish_reason is FinishReason.CANCELLED
    assert not engine.scheduler.has_work and len(chunks) == heard


def test_streams_that_end_at_different_times_keep_their_own_audio(load_tts):
    """The GPU tier's case (docs/notes.md: three streams of different lengths), on the CPU: as the shorter
    streams end, the others decode in smaller groups, and a stream's last chunk, padded to a chunk size,
    shares a batch with the others' full chunks. Each stream's audio must still be its own whole decode,
    and the audio its chunks give when decoded without partners."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=4, max_len=256, stream_chunk_frames=4)
    counter = CountingDecoder(engine.codec_worker.chunks)
    engine.codec_worker.chunks = counter
    lengths = (40, 13, 23)  # last chunks: 2 (a full first-size chunk), 3 and 1 (both padded)
    outputs: list[list[np.ndarray]] = [[] for _ in lengths]
    finished: list = []
    seqs = [
        engine.submit(streaming_seq(tts, item, n, outputs[i], finished))
        for i, (item, n) in enumerate(zip(custom_items(), lengths, strict=False))
    ]
    run_to_end(engine, seqs)
    assert sorted(set(counter.calls)) == [1, 2, 3]  # the group shrank as streams ended
    alone = StreamingDecoder(engine.codec.decoder)
    for seq, chunks in zip(seqs, outputs, strict=True):
        codes = torch.stack(seq.frames)
        streamed = np.concatenate(chunks)
        whole = engine.codec.decode([codes])[0]
        assert streamed.shape == whole.shape == (seq.num_frames * 1920,)
        assert np.abs(streamed - whole).max() < STATEFUL_TOLERANCE
        state, start, solo = alone.new_state(), 0, []
        for chunk in chunks:
            frames = len(chunk) // 1920
            solo.append(alone.decode([state], [codes[start : start + frames]])[0])
            start += frames
        assert np.abs(streamed - np.concatenate(solo)).max() < STATEFUL_TOLERANCE


@pytest.mark.parametrize("decoder", ["stateful", "context"])
def test_a_whole_utterance_is_decoded_while_it_runs_with_the_stateful_decoder(load_tts, decoder):
    """With the stateful decoder a whole utterance goes to the codec in the largest chunks while it runs, and
    its audio is those chunks joined: its whole decode. With the context decoder it is decoded in one piece
    once it has ended."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, stream_chunk_frames=4, stream_decoder=decoder)
    handed: list[tuple[int, int, int]] = []  # (frames generated by then, start, end) of each job
    put = engine.codec_worker.put

    def record(jobs: list[CodecJob]) -> None:
        handed.extend((job.seq.num_frames, job.start, job.end) for job in jobs)
        put(jobs)

    engine.codec_worker.put = record
    finished: list = []
    seq = streaming_seq(tts, custom_items()[0], 23, [], finished)
    seq.stream = None  # a whole utterance: the caller wants its audio in one piece
    engine.submit(seq)
    run_to_end(engine, [seq])
    assert finished == [seq] and seq.error is None
    if decoder == "stateful":
        assert handed == [(4, 0, 4), (8, 4, 8), (12, 8, 12), (16, 12, 16), (20, 16, 20), (23, 20, 23)]
    else:
        assert handed == [(23, 0, 23)]
    whole = engine.codec.decode([torch.stack(seq.frames)])[0]
    assert seq.audio.shape == whole.shape == (23 * 1920,)
    assert np.abs(seq.audio - whole).max() < STATEFUL_TOLERANCE


@pytest.mark.parametrize("listened", [True, False])
def test_a_chunk_waiting_for_company_when_its_request_ends_is_still_decoded(load_tts, listened):
    """A patient chunk waits in the codec thread for other streams'; its request may reach its last frame (EOS
    or its limit: finished, not cancelled) meanwhile, and its last chunk then joins the same batch. Both are
    decoded, in order: before, the waiting chunk was dropped as if its request had been cancelled, and the
    listener lost those frames' audio with no error (most 64-stream runs since 2026-12-03 had requests 12
    frames short)."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    heard: list[np.ndarray] = []
    finished: list = []
    seq = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY)
    seq.stream = AudioStream(on_audio=(lambda _s, audio: heard.append(audio)) if listened else None)
    seq.frames = [torch.randint(0, 2048, (16,)) for _ in range(17)]
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.EOS  # as `_collect_frame` leaves it
    engine.codec_worker._finish = lambda s, reason: finished.append(reason)
    engine.codec_worker.run([CodecJob(seq, 0, 12, patient=True), CodecJob(seq, 12, 17, final=True)])  # one batch
    audio = np.concatenate(heard) if listened else seq.audio
    assert finished == [FinishReason.EOS] and seq.error is None and audio.shape == (17 * 1920,)
    whole = engine.codec.decode([torch.stack(seq.frames)])[0]
    assert np.abs(audio - whole).max() < STATEFUL_TOLERANCE


def test_a_cancelled_or_failed_requests_chunks_are_not_decoded(load_tts):
    """Chunks still in hand when their request was cancelled (client gone) are dropped; so are a request's chunks
    in the rounds after one of its chunks failed to decode. Its last job still finishes it, with its error."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    worker, decoded, finished = engine.codec_worker, [], []
    decode_chunks = worker.chunks.decode_chunks

    def failing_first(jobs: list[CodecJob]) -> list[np.ndarray]:
        decoded.extend((job.seq.id, job.start) for job in jobs)
        if any(job.start == 0 and job.seq is failed for job in jobs):
            raise ValueError("bad codes")
        return decode_chunks(jobs)

    worker.chunks.decode_chunks = failing_first
    worker._finish = lambda s, reason: finished.append((s.id, reason))
    cancelled, failed = (make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY) for item in custom_items()[:2])
    for seq in (cancelled, failed):
        seq.stream = AudioStream()
        seq.frames = [torch.randint(0, 2048, (16,)) for _ in range(17)]
    cancelled.finish_reason = FinishReason.CANCELLED
    failed.finish_reason = FinishReason.EOS
    worker.run([CodecJob(cancelled, 0, 12), CodecJob(failed, 0, 12), CodecJob(failed, 12, 17, final=True)])
    assert decoded == [(failed.id, 0)]  # the cancelled one never; the failed one's last chunk not after its error
    assert finished == [(failed.id, FinishReason.EOS)] and isinstance(failed.error, ValueError)
    assert failed.audio is None


def two_streams_one_failing(load_tts, error: Exception) -> tuple[FastEngine, Sequence, Sequence, list]:
    """An engine running two 60-frame streams, the first of which fails every chunk decode with `error`;
    returns the engine, both requests and the list their `on_finish` fills."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, stream_chunk_frames=4)
    decode_chunks = engine.codec_worker.chunks.decode_chunks
    finished: list = []
    bad, other = (streaming_seq(tts, item, 60, [], finished) for item in custom_items()[:2])

    def failing(jobs: list[CodecJob]) -> list[np.ndarray]:
        if any(job.seq is bad for job in jobs):
            raise error
        return decode_chunks(jobs)

    engine.codec_worker.chunks.decode_chunks = failing
    return engine, bad, other, finished


@pytest.mark.parametrize("listened", [True, False])
def test_a_request_whose_chunk_failed_stops_at_once_and_frees_its_row(load_tts, listened):
    """A chunk that fails to decode leaves a hole in its request's audio. The request then stops at the next
    step with that error: its caller hears of it at once and its row frees, the other request goes on. Before,
    it ran on to its last frame (60 here), every later chunk dropped, and only then failed."""
    engine, bad, good, finished = two_streams_one_failing(load_tts, ValueError("bad codes"))
    if not listened:
        bad.stream = AudioStream()  # a whole utterance, decoded in chunks while it runs
    for seq in (bad, good):
        engine.submit(seq)
    run_to_end(engine, [bad])
    assert finished == [bad] and isinstance(bad.error, ValueError) and bad.finish_reason is FinishReason.CANCELLED
    assert bad.num_frames < 12 and bad not in engine.scheduler.running  # stopped within a few frames of the error
    run_to_end(engine, [good])
    assert finished == [bad, good] and good.error is None and good.num_frames == 60


def test_a_device_fault_in_a_chunk_still_finishes_every_request_it_touched(load_tts):
    """A CUDA error while decoding a chunk stops the engine for good; the requests of that chunk batch have
    their cancel in the inbox by then (a failed chunk stops its request). Both still finish, with the 503 to
    retry: before, the inbox was drained and dropped, and their callers waited for ever."""
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    engine, bad, other, finished = two_streams_one_failing(load_tts, fault)
    for seq in (bad, other):
        engine.submit(seq)
    with pytest.raises(RuntimeError, match="CUDA error"):
        run_to_end(engine, [bad, other])
    assert not engine._inbox.empty()  # the cancels the failed chunk queued
    engine._fail_for_good(fault)  # as `_loop` does
    assert sorted(s.id for s in finished) == sorted(s.id for s in (bad, other))
    assert all(isinstance(s.error, EngineFailed) for s in (bad, other)), [s.error for s in (bad, other)]


def test_a_length_is_split_into_the_graphed_chunk_sizes_largest_first():
    assert split_into_sizes(37, [2, 4, 8, 12]) == [12, 12, 12, 1]
    assert split_into_sizes(31, [12, 2, 8, 4]) == [12, 12, 4, 2, 1]
    assert split_into_sizes(24, [2, 4, 8, 12]) == [12, 12]
    assert split_into_sizes(5, []) == [5]
    assert split_into_sizes(0, [2, 4]) == []


def test_a_clones_state_primed_in_chunk_sizes_decodes_as_one_primed_at_once(load_tts):
    """A voice clone's stream starts from its reference codes run through the decoder (their audio dropped).
    Primed in graphed chunk sizes, its chunks decode as after one priming at the reference's own length."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    reference, chunk = torch.randint(0, 2048, (37, 16)), torch.randint(0, 2048, (12, 16))
    seq = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY)
    seq.prompt = dataclasses.replace(seq.prompt, ref_code=reference)
    seq.stream, seq.frames = AudioStream(), list(chunk)
    decoder = engine.streaming_decoder
    calls: list[int] = []
    group = decoder._decode_group
    decoder._decode_group = lambda states, codes: (calls.append(len(codes[0])), group(states, codes))[1]
    decoder.decode = lambda *_: pytest.fail("priming copied the reference's audio to the host")
    primed = StatefulChunkDecoder(decoder, (2, 4, 8, 12))._state(seq)
    assert calls == [12, 12, 12, 1]  # the reference in graphed sizes (and one frame left), none of it to the host
    del decoder.decode  # the instance's stand-in: the class's own again
    ours = StatefulChunkDecoder(decoder, (2, 4, 8, 12)).decode_chunks([CodecJob(seq, 0, 12)])[0]
    assert seq.stream.state is primed and calls == [12, 12, 12, 1, 12]  # primed once, then the chunk
    alone = StreamingDecoder(engine.codec.decoder)
    state = alone.new_state()
    alone.decode([state], [reference])
    np.testing.assert_allclose(ours, alone.decode([state], [chunk])[0], atol=STATEFUL_TOLERANCE, rtol=0)
