"""The warm-up's fallbacks: each part that fails leaves the engine serving, without that part.

On a GPU these paths run only when a capture or a compile breaks, which no test on the lent GPU can force. Here
a real engine (tiny checkpoint, CPU) meets a failing part in its place: a frame-graph set, a prefill-graph set,
a streaming decoder's capture, the compile warm-up. Where the engine still serves, a request runs to its end."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_tts_server.engine.fast import warmup
from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.types import FinishReason, Mode

from .test_engine import CUSTOM, GREEDY, custom_items, make_seq, run_to_end


class Graphs:
    """In place of FrameGraphs: a capture that fails (RuntimeError, as a failed CUDA graph capture raises) or
    succeeds without capturing anything."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.pool = object()

    def capture_all(self) -> None:
        if self.fails:
            raise RuntimeError("CUDA graph capture failed")

    def __len__(self) -> int:
        return 0


class Prefill:
    """In place of BucketedPrefill: its capture fails; `released` says whether the warm-up let its graphs go."""

    released = False

    def capture_all(self, pool: object) -> None:
        raise ValueError("prefill capture failed")

    def release_graphs(self) -> None:
        self.released = True

    def __len__(self) -> int:
        return 0


def assert_serves(engine: FastEngine, tts: Any) -> None:
    seq = engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, custom_items()[0], GREEDY))
    run_to_end(engine, [seq])
    assert seq.error is None and seq.frames and seq.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)


def test_frame_graphs_that_cannot_be_captured_leave_the_engine_eager(load_tts):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, cuda_graphs=False)
    engine.graphs = Graphs(fails=True)
    engine.warm_up(codec=False)
    assert engine.graphs is None
    assert_serves(engine, tts)


def test_prefill_graphs_that_cannot_be_captured_are_let_go_and_the_frame_graphs_kept(load_tts):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, cuda_graphs=False)
    graphs, prefill = Graphs(fails=False), Prefill()
    engine.graphs, engine.prefill = graphs, prefill
    engine.warm_up(codec=False)
    assert prefill.released and engine.graphs is graphs and engine.prefill is prefill


def test_a_compile_warm_up_that_fails_turns_compile_off(load_tts, monkeypatch):
    tts = load_tts(CUSTOM)
    engine = FastEngine(tts, max_slots=2, max_len=256, compile=True, cuda_graphs=False)
    assert engine.runner.compiled and engine.sampler.compiled

    def fails(*_args: object) -> None:
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(warmup, "_compile_everything", fails)
    engine.warm_up(codec=False)
    assert not engine.runner.compiled and not engine.sampler.compiled
    assert_serves(engine, tts)


@pytest.mark.parametrize("what", ["step", "snake"])
def test_a_compiled_streaming_decoder_that_cannot_be_captured_is_captured_again_uncompiled(load_tts, monkeypatch, what):
    """The first capture runs compiled (the whole step, or SnakeBeta alone) and fails; the decoder's graphs are let
    go, compile is turned off, and the capture runs again, for every (rows, chunk size) the streams produce."""
    engine = FastEngine(load_tts(CUSTOM), max_slots=2, max_len=256, cuda_graphs=False)
    decoder = engine.streaming_decoder
    assert decoder is not None and decoder.compiles == "off"  # on the CPU, compile or not
    decoder.enable(what)
    engine.codec.use_graphs = True  # as on CUDA, where the streaming decoder is graphed
    captures: list[tuple[str, list[int], list[int]]] = []
    released: list[str] = []

    def capture_all(rows: list[int], frames: list[int]) -> None:
        captures.append((decoder.compiles, rows, frames))
        if decoder.compiles != "off":
            raise RuntimeError("capture of the compiled decoder failed")

    monkeypatch.setattr(decoder, "capture_all", capture_all)
    monkeypatch.setattr(decoder, "release_graphs", lambda: released.append(decoder.compiles))
    warmup._capture_stream_decoder(engine, decoder)
    expected = (engine.stream_buckets, engine.chunker.sizes)
    assert captures == [(what, *expected), ("off", *expected)]
    assert released == [what] and decoder.compiles == "off"


@pytest.mark.parametrize(("kind", "expected"), [("stateful", ["streaming"]), ("context", ["whole"])])
def test_the_whole_decode_graphs_are_captured_only_for_the_context_decoder(load_tts, monkeypatch, kind, expected):
    """With the stateful decoder whole utterances decode through the streaming decoder's graphs, so the warm-up
    captures only those (the whole-decode graphs took 82 of a 1.7B load's 197 s on an H100); with the context
    decoder, chunks and whole utterances both use the whole-decode graphs."""
    engine = FastEngine(load_tts(CUSTOM), max_slots=2, max_len=256, cuda_graphs=False, stream_decoder=kind)
    engine.codec.use_graphs = True  # as on CUDA
    captured: list[str] = []
    monkeypatch.setattr(engine.codec, "warm_up", lambda: captured.append("whole"))
    if engine.streaming_decoder is not None:
        monkeypatch.setattr(engine.streaming_decoder, "capture_all", lambda *_: captured.append("streaming"))
    warmup._warm_up_codec(engine)
    assert captured == expected
