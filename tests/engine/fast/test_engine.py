"""The fast engine against the reference runner, and its continuous batching, on tiny checkpoints.

Steps are driven by hand (`engine.step()`), so requests can join and leave at chosen frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwen_tts_server.engine.fast import model_runner
from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.prompt import prompt_for_item
from qwen_tts_server.engine.fast.runtime import FastRuntime, resolve_sampling
from qwen_tts_server.engine.fast.sampler import SamplingPlan
from qwen_tts_server.engine.fast.sequence import FinishReason, Sequence, SequenceStatus
from qwen_tts_server.engine.fast.timing import REQUEST_PHASES
from qwen_tts_server.engine.reference import ReferenceRunner
from qwen_tts_server.engine.registry import LoadedModel, describe
from qwen_tts_server.engine.types import Mode, SamplingParams, SynthesisItem
from qwen_tts_server.engine.voice_prompt import compute_voice_prompt
from qwen_tts_server.errors import EngineFailed, ModelUnavailable

from .helpers import synthetic_voice

CUSTOM = "Qwen3-TTS-12Hz-1.7B-CustomVoice"
DESIGN = "Qwen3-TTS-12Hz-1.7B-VoiceDesign"
BASE = "Qwen3-TTS-12Hz-1.7B-Base"
GREEDY = SamplingParams(do_sample=False, subtalker_do_sample=False, max_new_tokens=30)
LONG = "A rather long sentence that keeps going for a good number of frames before it stops."


@pytest.fixture(scope="module")
def clone_voice(load_tts):
    wav, sr = synthetic_voice()
    return compute_voice_prompt(load_tts(BASE), wav, sr)


def reference_codes(tts: Any, mode: Mode, items: list[SynthesisItem], sampling: SamplingParams) -> list[torch.Tensor]:
    """Codes upstream generates for `items` as one batch (captured at its codec decode)."""
    captured: list[torch.Tensor] = []
    codec = tts.model.speech_tokenizer
    original = codec.decode

    def spy(batch):
        captured.extend(entry["audio_codes"].cpu() for entry in batch)
        return original(batch)

    codec.decode = spy
    try:
        model = LoadedModel(
            name="m", path=Path("."), tts=tts, info=describe("m", tts), memory_bytes=0, device="cpu", dtype="float32"
        )
        ReferenceRunner().run(model, mode, items, sampling)
    finally:
        del codec.decode
    out = []
    for item, codes in zip(items, captured, strict=True):
        ref = item.voice.ref_code if (item.voice is not None and not item.x_vector_only) else None
        out.append(codes[ref.shape[0] :] if ref is not None else codes)
    return out


def make_seq(tts: Any, mode: Mode, item: SynthesisItem, sampling: SamplingParams, **kw: Any) -> Sequence:
    assert sampling.max_new_tokens is not None
    return Sequence(
        prompt=prompt_for_item(tts, mode, item),
        sampling=resolve_sampling(sampling, tts.generate_defaults or {}),
        max_frames=sampling.max_new_tokens,
        **kw,
    )


def run_to_end(engine: FastEngine, seqs: list[Sequence], limit: int = 500) -> None:
    for _ in range(limit):
        if all(s.status is SequenceStatus.FINISHED for s in seqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def codes_of(seq: Sequence) -> torch.Tensor:
    return torch.stack(seq.frames)


def custom_items() -> list[SynthesisItem]:
    return [
        SynthesisItem(text="Hello there, how are you?", language="english", speaker="ryan"),
        SynthesisItem(text="Speak with feeling.", language="english", speaker="vivian", instruct="sad and slow"),
        SynthesisItem(text="A dialect speaker.", language="chinese", speaker="eric"),
        SynthesisItem(text=LONG, language="auto", speaker="serena"),
    ]


def clone_items(voice) -> list[SynthesisItem]:
    return [
        SynthesisItem(text="Cloned in context.", language="english", voice=voice, ref_text="the reference words"),
        SynthesisItem(text="Only the x-vector.", language="english", voice=voice, x_vector_only=True),
        SynthesisItem(text=LONG, language="auto", voice=voice, ref_text="other words", x_vector_only=False),
    ]


@pytest.mark.parametrize("case", ["custom_voice", "voice_design", "voice_clone"])
def test_greedy_codes_equal_the_reference_alone_and_in_a_mixed_batch(load_tts, clone_voice, case):
    if case == "custom_voice":
        tts, mode, items = load_tts(CUSTOM), Mode.CUSTOM_VOICE, custom_items()
    elif case == "voice_design":
        tts, mode = load_tts(DESIGN), Mode.VOICE_DESIGN
        items = [
            SynthesisItem(text=t, language="english", instruct=i)
            for t, i in (("Good morning.", "a cheerful child"), (LONG, "an old man, slow"))
        ]
    else:
        tts, mode, items = load_tts(BASE), Mode.VOICE_CLONE, clone_items(clone_voice)
    expected = [reference_codes(tts, mode, [item], GREEDY)[0] for item in items]
    assert len({len(e) for e in expected}) > 1, "rows should end at different frames"

    engine = FastEngine(tts, max_slots=4, max_len=512)
    alone = [make_seq(tts, mode, item, GREEDY) for item in items]
    for seq in alone:
        engine.submit(seq)
        run_to_end(engine, [seq])
    together = [engine.submit(make_seq(tts, mode, item, GREEDY)) for item in items]
    run_to_end(engine, together)
    for want, one, many in zip(expected, alone, together, strict=True):
        assert torch.equal(codes_of(one), want)
        assert torch.equal(codes_of(many), want)
        assert many.finish_reason is (FinishReason.EOS if len(want) < GREEDY.max_new_tokens else FinishReason.LENGTH)
        assert len(many.audio) == len(want) * 1920


@pytest.mark.parametrize("pipeline", [True, False])
def test_requests_joining_and_leaving_mid_batch_keep_their_codes(load_tts, clone_voice, pipeline):
    tts = load_tts(BASE)
    items = clone_items(clone_voice)
    expected = [reference_codes(tts, Mode.VOICE_CLONE, [item], GREEDY)[0] for item in items]
    engine = FastEngine(tts, max_slots=2, max_len=512, pipeline=pipeline)  # fewer slots than requests: the third waits
    first = engine.submit(make_seq(tts, Mode.VOICE_CLONE, items[2], GREEDY))
    for _ in range(3):
        engine.step()
    second = engine.submit(make_seq(tts, Mode.VOICE_CLONE, items[0], GREEDY))
    third = engine.submit(make_seq(tts, Mode.VOICE_CLONE, items[1], GREEDY))
    engine.step()
    assert third.status is SequenceStatus.WAITING and len(engine.scheduler.running) == 2
    run_to_end(engine, [first, second, third])
    for seq, want in zip((second, third, first), expected, strict=True):
        assert torch.equal(codes_of(seq), want)


def test_seeded_sampling_does_not_depend_on_the_batch(load_tts):
    tts = load_tts(CUSTOM)
    items = custom_items()
    seeded = SamplingParams(seed=1234, max_new_tokens=30)
    engine = FastEngine(tts, max_slots=4, max_len=512)
    alone = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[3], seeded))
    run_to_end(engine, [alone])
    others = [
        engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, it, SamplingParams(seed=i, max_new_tokens=30)))
        for i, it in enumerate(items[:2])
    ]
    engine.step()
    engine.step()
    crowded = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[3], seeded))
    run_to_end(engine, [*others, crowded])
    assert torch.equal(codes_of(alone), codes_of(crowded))
    other_seed = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[3], SamplingParams(seed=99, max_new_tokens=30)))
    run_to_end(engine, [other_seed])
    assert not torch.equal(codes_of(alone)[: other_seed.num_frames], codes_of(other_seed)[: alone.num_frames])


def test_a_short_request_submitted_later_finishes_first(load_tts):
    tts = load_tts(CUSTOM)
    finished: list[str] = []
    engine = FastEngine(tts, max_slots=4, max_len=512)
    long = engine.submit(
        make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[3], GREEDY, on_finish=lambda s: finished.append("long"))
    )
    for _ in range(3):
        engine.step()
    short = engine.submit(
        make_seq(
            tts,
            Mode.CUSTOM_VOICE,
            custom_items()[0],
            SamplingParams(do_sample=False, max_new_tokens=4),
            on_finish=lambda s: finished.append("short"),
        )
    )
    run_to_end(engine, [long, short])
    assert finished == ["short", "long"]
    assert short.num_frames == 4 and long.num_frames > 3 + 4


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_cancelled_request_frees_its_slot_and_the_others_continue_unchanged(load_tts, pipeline):
    tts = load_tts(CUSTOM)
    items = custom_items()
    expected = [reference_codes(tts, Mode.CUSTOM_VOICE, [item], GREEDY)[0] for item in items]
    engine = FastEngine(tts, max_slots=3, max_len=512, pipeline=pipeline)
    seqs = [engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY)) for item in (items[3], items[1], items[0])]
    engine.step()
    engine.step()
    victim = seqs[1]
    slot = victim.slot
    engine.cancel(victim)
    engine.step()
    assert victim.status is SequenceStatus.FINISHED and victim.finish_reason is FinishReason.CANCELLED
    assert victim.audio is None
    newcomer = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[2], GREEDY))
    engine.step()
    # The last running request moved into the freed row (cache and state with it); the newcomer
    # took the row after it. Their codes below are still upstream's.
    assert seqs[2].slot == slot and newcomer.slot == 2
    run_to_end(engine, [seqs[0], seqs[2], newcomer])
    assert torch.equal(codes_of(seqs[0]), expected[3])
    assert torch.equal(codes_of(seqs[2]), expected[0])
    assert torch.equal(codes_of(newcomer), expected[2])


def test_runtime_streams_the_same_frames_it_returns_whole(load_tts):
    tts = load_tts(CUSTOM)
    item = custom_items()[0]
    sampling = SamplingParams(seed=5, max_new_tokens=30)

    async def main():
        runtime = FastRuntime(tts, max_slots=2, max_len=512, max_prefill_tokens=512)
        try:
            streamed = [frame async for frame in runtime.stream(Mode.CUSTOM_VOICE, item, sampling)]
            (whole,) = await runtime.generate(Mode.CUSTOM_VOICE, [item], sampling)
            # A caller that goes away cancels its request and frees the slot: the request is held
            # far past its natural end, so only the cancel can finish it.
            finished = []
            long = dataclasses.replace(sampling, max_new_tokens=400)
            seq = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[3], long, on_finish=finished.append)
            seq.sampling = dataclasses.replace(seq.sampling, min_frames=400)
            runtime.engine.submit(seq)
            while seq.num_frames < 3:
                await asyncio.sleep(0.01)
            runtime.engine.cancel(seq)
            for _ in range(200):
                if finished:
                    break
                await asyncio.sleep(0.01)
            free = runtime.engine.scheduler.free
            assert finished == [seq] and seq.finish_reason is FinishReason.CANCELLED and seq.num_frames < 400
            # And the asyncio path: cancelling the awaiting task cancels its request. Cancelled as soon as it
            # runs (its seed ends it by EOS after some tens of frames, which a fixed sleep could outlast).
            task = asyncio.ensure_future(runtime.generate(Mode.CUSTOM_VOICE, [custom_items()[3]], long))
            while not runtime.engine.scheduler.running:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if not runtime.engine.scheduler.has_work:
                    break
                await asyncio.sleep(0.01)
            assert not runtime.engine.scheduler.has_work
        finally:
            runtime.close()
        return streamed, whole, free

    streamed, whole, free = asyncio.run(main())
    assert len(streamed) == whole.frames and whole.frames >= 2
    assert len(whole.samples) == whole.frames * 1920 and np.isfinite(whole.samples).all()
    assert free == 2


def test_min_frames_holds_eos_back(load_tts):
    """A request with min_frames == max_frames yields exactly that many frames (benchmarks rely on it)."""
    tts = load_tts(CUSTOM)
    item = custom_items()[0]
    natural = make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY)
    engine = FastEngine(tts, max_slots=2, max_len=512)
    run_to_end(engine, [engine.submit(natural)])
    assert natural.finish_reason is FinishReason.EOS
    target = natural.num_frames + 9
    forced = make_seq(tts, Mode.CUSTOM_VOICE, item, dataclasses.replace(GREEDY, max_new_tokens=target))
    forced.sampling = dataclasses.replace(forced.sampling, min_frames=target)
    run_to_end(engine, [engine.submit(forced)])
    assert forced.num_frames == target  # EOS was sampled earlier without min_frames
    assert torch.equal(codes_of(forced)[: natural.num_frames], codes_of(natural))


def test_a_throwaway_frame_under_preserved_rows_changes_nothing(load_tts):
    """Lazily captured graphs warm up with one real frame over the batch's rows, running requests
    included; `preserved_rows` must undo every write of it (state and KV at their positions)."""
    tts = load_tts(CUSTOM)
    items = custom_items()
    expected = [reference_codes(tts, Mode.CUSTOM_VOICE, [item], GREEDY)[0] for item in items[:2]]
    engine = FastEngine(tts, max_slots=4, max_len=512)
    seqs = [engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY)) for item in items[:2]]
    for _ in range(3):
        engine.step()
    plans = (SamplingPlan(), SamplingPlan())
    with engine.preserved_rows(4):
        out = engine.frame(4, engine.kv_buckets[0], plans)
    assert out.shape == (4, 17)
    run_to_end(engine, seqs)
    for seq, codes in zip(seqs, expected, strict=True):
        assert torch.equal(codes_of(seq), codes)


@pytest.mark.parametrize("move_bytes", [model_runner.MOVE_BYTES, 1], ids=["one copy", "a copy per layer"])
@pytest.mark.parametrize("pipeline", [True, False])
def test_requests_leaving_in_any_order_keep_their_codes(load_tts, pipeline, monkeypatch, move_bytes):
    """Rows are compacted whenever a request leaves; four requests of different lengths, one joining
    late, each still produce upstream's codes (rows moved in one copy, or layer by layer as when
    many long rows move at once)."""
    monkeypatch.setattr(model_runner, "MOVE_BYTES", move_bytes)
    tts = load_tts(CUSTOM)
    items = custom_items()
    lengths = (5, 12, 3, 9)
    expected = [
        reference_codes(tts, Mode.CUSTOM_VOICE, [item], dataclasses.replace(GREEDY, max_new_tokens=n + 1))[0]
        for item, n in zip(items, lengths, strict=True)
    ]
    engine = FastEngine(tts, max_slots=3, max_len=512, pipeline=pipeline)
    seqs = []
    for item, n in zip(items, lengths, strict=True):
        seq = make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY)
        seq.max_frames = n
        seqs.append(engine.submit(seq))
    run_to_end(engine, seqs)
    for seq, codes in zip(seqs, expected, strict=True):
        assert torch.equal(codes_of(seq), codes[: seq.num_frames])
        assert seq.num_frames == min(len(codes), seq.max_frames)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_newcomer_joins_the_frame_queued_in_its_admission_step(load_tts, pipeline):
    """A step prefills arrivals and queues a frame for every running row, newcomers included; it reads that
    frame (on the CPU) or the one the previous step queued (pipelined, as on CUDA: the next frame runs while
    the host reads one). Every request still produces upstream's codes."""
    lag = int(pipeline)  # frames queued and not read yet after a step
    tts = load_tts(CUSTOM)
    items = custom_items()[:2]
    expected = [reference_codes(tts, Mode.CUSTOM_VOICE, [item], GREEDY)[0] for item in items]
    engine = FastEngine(tts, max_slots=4, max_len=512, pipeline=pipeline)
    first = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[0], GREEDY))
    engine.step()  # prefill and frame 1
    assert first.status is SequenceStatus.RUNNING and first.num_frames == 1 - lag
    engine.step()
    second = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[1], GREEDY))
    engine.step()  # the second one's prefill, then a frame of two rows
    assert (first.num_frames, second.num_frames) == (3 - lag, 1 - lag) and second.status is SequenceStatus.RUNNING
    engine.step()
    assert (first.num_frames, second.num_frames) == (4 - lag, 2 - lag)
    assert list(engine.batch_sizes) == [1, 1, 2, 2]
    run_to_end(engine, [first, second])
    for seq, codes in zip((first, second), expected, strict=True):
        assert torch.equal(codes_of(seq), codes)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_frame_is_read_after_the_next_one_is_queued(load_tts, pipeline):
    """Pipelined (the default on CUDA), the GPU never waits for the host between frames: when the host reads
    frame j, frame j+1 is already queued. A request that ends in frame j is in frame j+1 too (its row computed
    and ignored), and it gets exactly its own frames. On the CPU a step reads the frame it queued: a frame
    has run by the time it is queued, and reading it later would only delay it."""
    lag = int(pipeline)
    tts = load_tts(CUSTOM)
    item = custom_items()[0]
    engine = FastEngine(tts, max_slots=2, max_len=512, pipeline=pipeline)
    queued_when_read: list[int] = []
    seq = make_seq(
        tts, Mode.CUSTOM_VOICE, item, GREEDY, on_frame=lambda s, f: queued_when_read.append(len(engine.batch_sizes))
    )
    seq.max_frames = 5
    engine.submit(seq)
    run_to_end(engine, [seq])
    assert queued_when_read == [j + lag for j in range(1, 6)]
    assert seq.num_frames == 5 and seq.finish_reason is FinishReason.LENGTH
    expected = reference_codes(tts, Mode.CUSTOM_VOICE, [item], GREEDY)[0]
    assert torch.equal(codes_of(seq), expected[:5])


def test_finished_requests_count_where_their_time_went_and_cancelled_ones_do_not(load_tts):
    """`request_phases` (for /metrics) sums each finished request's time from its prompt to its finish in five phases;
    a cancelled request is not counted."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=512)
    kept = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY)
    kept.max_frames = 4
    gone = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[1], GREEDY)
    engine.submit(kept), engine.submit(gone)
    engine.step()
    engine.cancel(gone)
    run_to_end(engine, [kept, gone])
    count, seconds = engine.request_phases.snapshot()
    assert count == 1 and set(seconds) == set(REQUEST_PHASES)
    assert kept.arrived_at <= kept.submitted_at <= kept.admitted_at <= kept.first_frame_at < kept.last_frame_at
    assert seconds["frames"] == pytest.approx(kept.last_frame_at - kept.first_frame_at)
    assert seconds["queue"] == pytest.approx(kept.admitted_at - kept.submitted_at) and seconds["tail"] >= 0
    assert seconds["prompt"] == pytest.approx(kept.submitted_at - kept.arrived_at)


def test_a_runtime_request_counts_building_its_prompt_as_its_first_phase(load_tts, monkeypatch):
    """Through the runtime (as the server submits), `prompt` is from before the prompt is built to submit:
    here the real prompt building is held 50 ms longer, and the phase shows it."""
    from qwen_tts_server.engine.fast import runtime as runtime_module

    tts = load_tts(CUSTOM)
    build = runtime_module.prompt_for_item

    def slow_build(*args, **kwargs):
        time.sleep(0.05)
        return build(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "prompt_for_item", slow_build)
    runtime = FastRuntime(tts, max_slots=2, max_len=512, max_prefill_tokens=512)
    try:
        sampling = SamplingParams(seed=5, max_new_tokens=4)
        asyncio.run(runtime.generate(Mode.CUSTOM_VOICE, [custom_items()[0]], sampling))
        count, seconds = runtime.engine.request_phases.snapshot()
    finally:
        runtime.close()
    assert count == 1 and seconds["prompt"] >= 0.05


def test_a_request_whose_audio_fails_to_decode_is_not_counted_as_finished(load_tts, monkeypatch):
    """A request with all its frames whose decode fails (here: injected into the real engine's streaming
    decoder, which whole utterances go through) ends with an error: `request_phases` counts only requests
    that got their audio."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=512)
    seq = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY)
    seq.max_frames = 3

    def broken(states, codes):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(engine.streaming_decoder, "decode", broken)
    engine.submit(seq)
    run_to_end(engine, [seq])
    assert seq.last_frame_at is not None and isinstance(seq.error, RuntimeError)
    assert engine.request_phases.snapshot()[0] == 0


def test_a_failed_prefill_fails_only_its_own_requests(load_tts):
    """A step's prefill that raises (here: injected into the real engine's runner) fails the requests it was
    admitting; the one already running keeps its row and produces upstream's codes."""
    tts = load_tts(CUSTOM)
    items = custom_items()[:2]
    expected = reference_codes(tts, Mode.CUSTOM_VOICE, [items[0]], GREEDY)[0]
    engine = FastEngine(tts, max_slots=4, max_len=512)
    running = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[0], GREEDY))
    engine.step()
    engine.step()
    real_prefill = engine.runner.prefill_many

    def broken(*_args, **_kwargs):
        raise RuntimeError("a prompt the model cannot take")

    engine.runner.prefill_many = broken
    newcomer = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, items[1], GREEDY))
    finished = engine.step()
    engine.runner.prefill_many = real_prefill
    assert finished == [newcomer] and "cannot take" in str(newcomer.error)
    assert newcomer.finish_reason is FinishReason.CANCELLED and newcomer.status is SequenceStatus.FINISHED
    run_to_end(engine, [running])
    assert running.error is None and torch.equal(codes_of(running), expected)


def test_a_device_fault_in_a_step_reports_the_503_to_every_request_it_ends(load_tts):
    """Requests that leave in the step a device fault breaks (here one cancelled just before it) get the same
    `engine_failed` error (a 503 to retry) as the running ones, never the raw CUDA error."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    leaving = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY))
    staying = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[1], GREEDY))
    engine.step()

    def fault(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.runner.decode = fault
    engine.cancel(leaving)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()  # the engine's loop then fails `staying` with engine_failed too (_fail_for_good)
    assert staying.status is SequenceStatus.RUNNING
    assert isinstance(leaving.error, EngineFailed) and "retry" in str(leaving.error)
    assert leaving.status is SequenceStatus.FINISHED


def test_the_owner_hears_of_a_device_fault_before_any_request_fails(load_tts):
    """The owner's `on_failure` (which marks the model failed, so /ready goes red) runs before the first failed
    request's `on_finish` (its 503): a client never sees the 503 while /ready still says ready."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    told: list[str] = []
    engine.on_failure = lambda exc: told.append(f"owner: {exc}")
    seqs = [make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY) for item in custom_items()[:2]]
    for seq in seqs:
        seq.on_finish = lambda s: told.append(f"request: {type(s.error).__name__}")

    def fault(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.runner.decode = fault
    engine.start()
    for seq in seqs:
        engine.submit(seq)
    deadline = time.monotonic() + 30
    while len(told) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert told == ["owner: CUDA error: an illegal memory access was encountered"] + ["request: EngineFailed"] * 2


def test_a_failing_frame_callback_does_not_stop_the_request(load_tts):
    tts = load_tts(CUSTOM)
    expected = reference_codes(tts, Mode.CUSTOM_VOICE, custom_items()[:1], GREEDY)[0]

    def broken(_seq, _frame):
        raise RuntimeError("client went away badly")

    engine = FastEngine(tts, max_slots=2, max_len=256)
    seq = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY, on_frame=broken))
    run_to_end(engine, [seq])
    assert seq.error is None and torch.equal(codes_of(seq), expected)


def test_a_request_that_takes_its_frames_is_not_decoded_to_audio(load_tts):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    seq = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY)
    seq.decode_audio = False
    run_to_end(engine, [engine.submit(seq)])
    assert seq.frames and seq.audio is None and seq.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
    assert engine.codec_frames == 0


def test_a_step_thread_that_outlives_stop_fails_its_requests_itself(load_tts):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    engine.stop_timeout_s = 0.05
    step, in_step = engine.step, threading.Event()

    def slow_step():
        in_step.set()
        time.sleep(0.5)  # longer than stop() waits
        return step()

    engine.step = slow_step
    finished = threading.Event()
    seq = make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY, on_finish=lambda _s: finished.set())
    engine.start()
    engine.submit(seq)
    assert in_step.wait(5)
    engine.stop()  # returns before the step ends; the request is not failed from this thread
    assert not finished.is_set()
    assert finished.wait(5)  # the step thread failed it once its step ended
    assert "unloaded" in str(seq.error) and seq.finish_reason is FinishReason.CANCELLED


def test_a_request_submitted_after_stop_is_refused_not_left_queued(load_tts):
    """An unload stops the engine while another request is still building its prompt: its submit must
    fail (503, retry) rather than wait in an inbox no thread reads any more."""
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256)
    engine.start()
    engine.stop()
    with pytest.raises(ModelUnavailable, match="unloaded"):
        engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY))


def test_prompt_tokenization_never_runs_on_two_threads_at_once(load_tts):
    """Prompts are built on worker threads, several at a time, and a Rust fast tokenizer may not be used
    by two threads at once: one that sets its padding state while another encodes raises 'Already
    borrowed' (seen as a 500 under concurrent first requests). The real processor, wrapped to record how
    many threads are inside it, is driven from 8 threads released together."""
    import types

    from qwen_tts_server.engine.fast.prompt import _tokenize

    tts = load_tts(CUSTOM)
    inside, most = [0], [0]
    count = threading.Lock()

    def processor(**kwargs):
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.002)  # widen the window a race needs
            return tts.processor(**kwargs)
        finally:
            with count:
                inside[0] -= 1

    wrapped = types.SimpleNamespace(processor=processor, device=tts.device)
    start = threading.Barrier(8)
    results = []

    def work() -> None:
        start.wait()
        for _ in range(5):
            results.append(_tokenize(wrapped, "The same words on every thread."))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = _tokenize(tts, "The same words on every thread.")
    assert len(results) == 40 and all(torch.equal(r, expected) for r in results)
    assert most[0] == 1


def test_batch_buckets_start_where_asked_and_always_hold_the_largest_batch() -> None:
    """On CUDA frames start at two rows (one request beside a free row: a faster projection than at one row);
    an engine with a single row keeps it; streams' codec graphs start at one."""
    from qwen_tts_server.engine.fast.engine import MIN_FRAME_ROWS, batch_buckets

    assert batch_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert batch_buckets(128, min_rows=MIN_FRAME_ROWS) == [2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert batch_buckets(12, min_rows=2) == [2, 4, 8, 12]
    assert batch_buckets(1, min_rows=2) == [1]
