"""Streaming codec decode, chunk by chunk with carried state, equals upstream's decode of the whole
code sequence: for any split into chunks, for streams batched at different positions, after ICL
priming, and past the transformer's attention window."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2DecoderDecoderResidualUnit,
    SnakeBeta,
)
from torch import Tensor, nn

from qwen_tts_server.engine.fast.options import CodecCompile
from qwen_tts_server.engine.fast.stream_codec import Activations, StreamingDecoder, snake, snake_after

from .test_engine_release import has_cpp_compiler

CUSTOM = "Qwen3-TTS-12Hz-0.6B-CustomVoice"
SPF = 1920  # samples per codec frame
ATOL = 1e-4
BOTH_LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["time-innermost", "channels-last"])


def _assert_close_at_scale(have: torch.Tensor, want: torch.Tensor) -> None:
    """A compiled decoder step against the eager one: fused kernels sum in another order, so float32 rounding of
    the state's largest values (up to ~30) carries into elements that convolutions and their cancellations made
    small. Those differ by ~1e-5 of the largest value (AMD EPYC, 2026-12-07: 2.5e-4 at an element of 1.25 where
    the state's largest was 28), where a wrong activation or a misplaced sample differs by a whole part of it."""
    scale = want.abs().max().item()
    torch.testing.assert_close(have, want, rtol=1e-4, atol=max(ATOL, 2e-5 * scale))


@pytest.fixture(scope="module")
def decoder(load_tts: Callable[[str], Any]) -> nn.Module:
    return load_tts(CUSTOM).model.speech_tokenizer.model.decoder


@pytest.fixture(scope="module")
def sharp_decoder(decoder: nn.Module) -> nn.Module:
    """The tiny decoder with its transformer made to matter: the tiny checkpoint's LayerScale of 0.01
    leaves attention so faint that a window off by one moves the audio by only ~1e-4, under the
    tolerance. With full-scale residual branches and sharp attention it moves it by ~1e-2."""
    sharp = copy.deepcopy(decoder)
    with torch.no_grad():
        for layer in sharp.pre_transformer.layers:
            layer.self_attn_layer_scale.scale.fill_(1.0)
            layer.mlp_layer_scale.scale.fill_(1.0)
            layer.self_attn.q_proj.weight.mul_(30.0)
    return sharp


@pytest.fixture(scope="module")
def snaky_decoder(decoder: nn.Module) -> nn.Module:
    """The tiny decoder with random SnakeBeta parameters: the tiny checkpoint's are all zero (alpha = beta = 1
    after exp, the same for every module), under which a SnakeBeta given another module's terms goes unseen."""
    snaky = copy.deepcopy(decoder)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in snaky.modules():
            if isinstance(module, SnakeBeta):
                module.alpha.copy_(torch.randn(module.alpha.shape, generator=gen) * 0.5)
                module.beta.copy_(torch.randn(module.beta.shape, generator=gen) * 0.5)
    return snaky


def random_codes(frames: int, seed: int) -> Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


def whole_decode(decoder: nn.Module, codes: Tensor) -> np.ndarray:
    with torch.inference_mode():
        return decoder(codes.T[None])[0, 0].numpy()


def stream(streaming: StreamingDecoder, codes: Tensor, split: list[int]) -> np.ndarray:
    """Decode one stream chunk by chunk; the concatenated audio."""
    assert sum(split) == codes.shape[0]
    state = streaming.new_state()
    parts, start = [], 0
    for n in split:
        (wav,) = streaming.decode([state], [codes[start : start + n]])
        assert wav.dtype == np.float32 and wav.shape == (n * SPF,)
        parts.append(wav)
        start += n
    assert state.frames == codes.shape[0] and int(state.position) == codes.shape[0]
    return np.concatenate(parts)


@BOTH_LAYOUTS
@pytest.mark.parametrize(
    "split",
    [[69], [1, 3, 8, 25, 25, 7], [2, 12, 12, 12, 12, 12, 7], [1] * 20 + [49], [4, 25, 25, 15]],
)
def test_any_split_equals_the_whole_decode(
    decoder: nn.Module, sharp_decoder: nn.Module, split: list[int], channels_last: bool
) -> None:
    codes = random_codes(sum(split), seed=1)
    for module in (decoder, sharp_decoder):
        ours = stream(StreamingDecoder(module, channels_last=channels_last), codes, split)
        np.testing.assert_allclose(ours, whole_decode(module, codes), atol=ATOL, rtol=0)


def _layout_copies(streaming: StreamingDecoder, codes: Tensor) -> dict[str, int]:
    """Over a stream of three chunks: the convolutions run in 2-D form (channels-last's), and the inputs or weights
    that ATen copied into another layout before convolving (`aten::contiguous` under `aten::_convolution`; the
    backend's own work below that, e.g. the CPU's im2col, is not layout), in 2-D convolutions and in all. On CUDA
    with bf16 cuDNN's NHWC kernels convert once more whatever comes in another layout."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        stream(streaming, codes, [2, 12, 5])
    counts = {"2d": 0, "2d_copies": 0, "copies": 0}
    for event in prof.events():
        if event.name == "aten::_convolution":
            copies = sum(child.name == "aten::contiguous" for child in event.cpu_children)
            two_d = len(event.input_shapes[0]) == 4
            counts["2d"] += two_d
            counts["2d_copies"] += copies if two_d else 0
            counts["copies"] += copies
    return counts


def test_channels_last_converts_nothing_for_the_convolutions(decoder: nn.Module) -> None:
    """With `channels_last` the convolutions after the transformer run in 2-D form and none copies its input or
    weight into another layout (the state's concatenations keep channels innermost, the weights are stored so);
    given its weights time-innermost instead, they do (the count sees copies); without it, more convolutions copy
    (the transformer's output comes channels innermost, and a 3-D convolution makes its input time-innermost
    first)."""
    codes = random_codes(19, seed=4)
    fast = _layout_copies(StreamingDecoder(decoder, channels_last=True), codes)
    assert fast["2d"] > 0 and fast["2d_copies"] == 0, fast
    time_innermost = StreamingDecoder(decoder, channels_last=True)
    time_innermost._weights = {conv: weight.contiguous() for conv, weight in time_innermost._weights.items()}
    assert _layout_copies(time_innermost, codes)["2d_copies"] > 0
    plain = _layout_copies(StreamingDecoder(decoder), codes)
    assert plain["2d"] == 0 and plain["copies"] > fast["copies"], (plain, fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_precomputed_snake_is_upstreams_snakebeta_bit_for_bit(snaky_decoder: nn.Module, dtype: torch.dtype) -> None:
    """`snake` over the terms computed once does what each SnakeBeta's forward does on every call, bit for
    bit, in fp32 and in bf16 (where any other rounding of the terms, or another order of the ops, shows)."""
    module = copy.deepcopy(snaky_decoder).to(dtype)
    streaming = StreamingDecoder(module)
    snakes = [m for m in module.modules() if isinstance(m, SnakeBeta)]
    assert len(snakes) == len(streaming._snake_terms) > 0
    gen = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for m in snakes:
            x = (torch.randn(2, m.in_features, 37, generator=gen) * 3).to(dtype)
            alpha_exp, inv_beta = streaming._snake_terms[m]
            assert alpha_exp.shape == inv_beta.shape == (1, m.in_features, 1) and inv_beta.dtype == dtype
            assert torch.equal(snake(x, alpha_exp, inv_beta), m(x))


def test_every_snakebeta_gets_its_own_terms(snaky_decoder: nn.Module) -> None:
    """With SnakeBeta parameters that differ from module to module, streamed audio still equals the whole decode.
    In float64: the random activations amplify float32 rounding to ~2e-3."""
    module = copy.deepcopy(snaky_decoder).double()
    codes = random_codes(30, seed=3)
    ours = stream(StreamingDecoder(module), codes, [2, 12, 12, 4])
    np.testing.assert_allclose(ours, whole_decode(module, codes), atol=ATOL, rtol=0)


def test_long_stream_beyond_the_attention_window(sharp_decoder: nn.Module) -> None:
    """200 frames in chunks of 12: the sliding window (72) fills, then slides; RoPE positions grow."""
    codes = random_codes(200, seed=2)
    ours = stream(StreamingDecoder(sharp_decoder), codes, [12] * 16 + [8])
    np.testing.assert_allclose(ours, whole_decode(sharp_decoder, codes), atol=ATOL, rtol=0)


@BOTH_LAYOUTS
def test_streams_at_different_positions_decode_together(sharp_decoder: nn.Module, channels_last: bool) -> None:
    """Three streams, started at different times, share batches once their chunk lengths agree; each
    stream's audio equals its own whole decode."""
    streaming = StreamingDecoder(sharp_decoder, channels_last=channels_last)
    codes = [random_codes(n, seed=10 + i) for i, n in enumerate((110, 97, 51))]
    states = [streaming.new_state() for _ in codes]
    audio: list[list[np.ndarray]] = [[] for _ in codes]
    done = [0, 0, 0]

    def step(chunks: dict[int, int]) -> None:
        idx = list(chunks)
        wavs = streaming.decode([states[i] for i in idx], [codes[i][done[i] : done[i] + chunks[i]] for i in idx])
        for i, wav in zip(idx, wavs, strict=True):
            audio[i].append(wav)
            done[i] += chunks[i]

    step({0: 2})
    step({0: 12, 1: 2})  # different lengths: two groups in one call
    step({0: 12, 1: 12, 2: 1})
    for _ in range(3):
        step({0: 25, 1: 25, 2: 12})  # streams 0 and 1 in one batch at positions 26.. and 14..
    step({0: 9, 1: 8, 2: 8})  # 1 and 2 batched at positions 89 and 37
    step({2: 6})
    assert done == [110, 97, 51]
    for c, parts in zip(codes, audio, strict=True):
        np.testing.assert_allclose(np.concatenate(parts), whole_decode(sharp_decoder, c), atol=ATOL, rtol=0)


def test_icl_priming_with_reference_codes(sharp_decoder: nn.Module) -> None:
    """Voice cloning decodes reference + generated codes and drops the reference's audio: prime the
    stream with the reference (audio discarded), then stream the generated codes."""
    streaming = StreamingDecoder(sharp_decoder)
    ref, generated = random_codes(40, seed=20), random_codes(60, seed=21)
    state = streaming.new_state()
    streaming.decode([state], [ref])
    parts, start = [], 0
    for n in (2, 12, 12, 25, 9):
        parts.append(streaming.decode([state], [generated[start : start + n]])[0])
        start += n
    whole = whole_decode(sharp_decoder, torch.cat([ref, generated]))
    np.testing.assert_allclose(np.concatenate(parts), whole[ref.shape[0] * SPF :], atol=ATOL, rtol=0)


def test_a_decode_that_fails_leaves_every_state_as_it_was(sharp_decoder: nn.Module, monkeypatch) -> None:
    """Two streams with chunks of different lengths decode as two groups; the second group fails (e.g. out of
    memory). The first group's stream keeps its old state, so its chunk, decoded again, gives the audio it
    would have given."""
    streaming = StreamingDecoder(sharp_decoder)
    first, second = streaming.new_state(), streaming.new_state()
    codes = [random_codes(4, seed=20), random_codes(2, seed=21)]
    want = stream(StreamingDecoder(sharp_decoder), codes[0], [4])
    group = streaming._decode_group
    calls: list[int] = []

    def second_fails(states, chunk):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return group(states, chunk)

    monkeypatch.setattr(streaming, "_decode_group", second_fails)
    before = (first.flat, first.position, first.frames)
    with pytest.raises(RuntimeError, match="out of memory"):
        streaming.decode([first, second], codes)
    assert calls == [0, 1] and second.frames == 0
    assert first.flat is before[0] and first.position is before[1] and first.frames == before[2]
    monkeypatch.undo()
    np.testing.assert_allclose(streaming.decode([first], [codes[0]])[0], want, atol=ATOL, rtol=0)


class EagerGraph:
    """In place of a captured (rows, frames) graph on the CPU: the same step, run eagerly, for at most `rows`
    streams (a replay pads to its rows), counting the streams of each replay."""

    def __init__(self, streaming: StreamingDecoder, rows: int) -> None:
        self.streaming, self.rows, self.replays = streaming, rows, []

    def run(self, states: list, codes: Tensor) -> Tensor:
        assert len(states) <= self.rows, "more streams than the graph has rows"
        self.replays.append(len(states))
        flat, position = torch.stack([s.flat for s in states]), torch.stack([s.position for s in states])
        wav, new_flat, new_position = self.streaming.step(flat, position, codes)
        StreamingDecoder._adopt(states, new_flat, new_position, codes.shape[-1])
        return wav[:, 0]


def test_more_streams_than_the_largest_graph_has_rows_run_as_several_replays(sharp_decoder: nn.Module) -> None:
    """Streams that just ended (their last chunk padded to the chunk size) beside the ones now in their rows can
    outnumber the engine's rows: they replay the largest graph several times instead of running eagerly."""
    streaming = StreamingDecoder(sharp_decoder)
    graph = EagerGraph(streaming, rows=2)
    streaming._graphs[2, 4] = graph  # type: ignore[assignment]
    codes = [random_codes(4, seed=30 + i) for i in range(5)]
    audio = streaming.decode([streaming.new_state() for _ in codes], codes)
    assert graph.replays == [2, 2, 1]
    for chunk, wav in zip(codes, audio, strict=True):
        np.testing.assert_allclose(wav, stream(StreamingDecoder(sharp_decoder), chunk, [4]), atol=ATOL, rtol=0)
    # What metrics count: three replays of 5 streams, each computing the graph's 2 rows (the last one padding).
    assert streaming.counts == {"batches": 3, "streams": 5, "rows": 6}
    streaming.decode([streaming.new_state() for _ in range(2)], [random_codes(3, seed=40 + i) for i in range(2)])
    assert streaming.counts == {"batches": 4, "streams": 7, "rows": 8}  # no graph of 3 frames: one eager batch


def test_empty_chunks_and_bad_shapes(decoder: nn.Module) -> None:
    streaming = StreamingDecoder(decoder)
    state = streaming.new_state()
    (wav,) = streaming.decode([state], [torch.zeros(0, 16, dtype=torch.long)])
    assert wav.shape == (0,) and state.frames == 0
    with pytest.raises(ValueError):
        streaming.decode([state], [torch.zeros(3, 8, dtype=torch.long)])
    with pytest.raises(ValueError):
        streaming.decode([state, state], [random_codes(2, 0), random_codes(2, 1)])


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """TF32 (cuDNN's default for fp32 convolutions) rounds differently at different lengths, far
    above the tolerance: off for the test. (pytest's monkeypatch cannot undo these attributes.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@BOTH_LAYOUTS
@pytest.mark.parametrize("compile_codec", ["off", "snake"])
def test_cuda_eager_and_graphs_equal_the_whole_decode(
    sharp_decoder: nn.Module, no_tf32: None, channels_last: bool, compile_codec: CodecCompile
) -> None:
    """On the GPU (fp32), eager and graphed: streams batched at different positions, graphs fed fewer
    streams than their rows, each stream equal to its own whole decode. With `snake` (the server's default) the
    graphs hold Triton's SnakeBeta and its joins behind the carried samples (`snake_after`); only graphs run
    compiled code, so that case runs graphed only."""
    cuda = copy.deepcopy(sharp_decoder).cuda()
    codes = [random_codes(n, seed=30 + i) for i, n in enumerate((74, 74, 62))]
    with torch.inference_mode():
        wholes = [cuda(c.T[None].cuda())[0, 0].cpu().numpy() for c in codes]
    plan = [{0: 2, 1: 2}, {0: 12, 1: 12, 2: 2}] + [{0: 12, 1: 12, 2: 12}] * 5  # stream 2 starts later
    for graphs in (False, True) if compile_codec == "off" else (True,):
        streaming = StreamingDecoder(cuda, channels_last=channels_last)
        streaming.enable(compile_codec)
        if graphs:
            streaming.capture(4, 2)
            streaming.capture(4, 12)
            assert streaming.compiles == compile_codec and len(streaming) == 2
        states = [streaming.new_state() for _ in codes]
        audio: list[list[np.ndarray]] = [[] for _ in codes]
        done = [0, 0, 0]
        for chunks in plan:
            idx = list(chunks)
            chunk_codes = [codes[i][done[i] : done[i] + chunks[i]].cuda() for i in idx]
            for i, wav in zip(idx, streaming.decode([states[i] for i in idx], chunk_codes), strict=True):
                audio[i].append(wav)
                done[i] += chunks[i]
        assert done == [74, 74, 62]
        for parts, whole in zip(audio, wholes, strict=True):
            np.testing.assert_allclose(np.concatenate(parts), whole, atol=ATOL, rtol=0)


@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_step_computes_what_the_step_does_with_one_compile_for_every_batch(decoder):
    """`forward` with compile on (what capture records on CUDA) against `step`: batches of several
    streams at other chunk lengths and batch sizes reuse the first compile (dims dynamic from the start).
    One compile takes ~40 s on a 2-core CPU."""
    from torch._dynamo.utils import counters

    streaming = StreamingDecoder(decoder)
    streaming.enable("step")
    before = counters["frames"]["total"]
    with torch.inference_mode():
        for rows, frames in ((2, 2), (3, 4), (3, 4)):  # the last as a graph's capture repeats its warm-up
            flat = torch.randn(rows, streaming.state_size, generator=torch.Generator().manual_seed(rows)) * 0.1
            position = torch.arange(rows) * 5
            codes = torch.randint(0, 2048, (rows, 16, frames), generator=torch.Generator().manual_seed(rows))
            expected = streaming.step(flat, position, codes)
            out = torch.full_like(flat, float("nan"))  # a graph's shared state buffer: every element written
            got = streaming.forward(flat.clone(), position.clone(), codes.clone(), out)
            assert got[1].data_ptr() == out.data_ptr()
            for want, have in zip(expected, got, strict=True):
                _assert_close_at_scale(have, want)
    assert counters["frames"]["total"] - before == 1


@pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
@BOTH_LAYOUTS
def test_the_fused_snake_computes_what_snake_does_and_only_where_graphs_are_captured(
    decoder, snaky_decoder, channels_last
):
    """In float32, the fused SnakeBeta against `snake` for every module of the random-SnakeBeta decoder (one
    kernel rounds where five did: a few ulp), alone and behind carried samples (`snake_after`), and `forward` with
    them (what capture records on CUDA) against `step` on the tiny checkpoint's decoder (where random SnakeBeta
    parameters would amplify those ulp to ~1e-3 of the audio), in either layout. What the first step compiles
    serves every module, batch and chunk after it; `decode` without a graph (an eager group) runs `snake` and
    never compiles. ~20 s a layout on a 2-core CPU."""
    from torch._dynamo.utils import counters

    snaky = StreamingDecoder(snaky_decoder)
    snaky.enable("snake")
    streaming = StreamingDecoder(decoder, channels_last=channels_last)
    streaming.enable("snake")
    fused = snaky._fused
    assert fused is not None
    gen = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for module, (alpha_exp, inv_beta) in snaky._snake_terms.items():
            x = torch.randn(2, module.in_features, 100, generator=gen) * 3
            past = torch.randn(2, module.in_features, 6, generator=gen)
            torch.testing.assert_close(fused.snake(x, alpha_exp, inv_beta), snake(x, alpha_exp, inv_beta))
            got = fused.snake_after(past, x, alpha_exp, inv_beta, -1)
            torch.testing.assert_close(got, snake_after(past, x, alpha_exp, inv_beta, -1))
            assert torch.equal(got[..., :6], past)
        units = [m for m in decoder.modules() if isinstance(m, Qwen3TTSTokenizerV2DecoderDecoderResidualUnit)]
        compiled = streaming._fused
        assert compiled is not None
        before = counters["frames"]["total"]
        for rows, frames in ((2, 2), (3, 4)):
            flat = torch.randn(rows, streaming.state_size, generator=gen) * 0.1
            position = torch.arange(rows) * 5
            codes = torch.randint(0, 2048, (rows, 16, frames), generator=gen)
            expected = streaming.step(flat, position, codes)
            calls = {"snake": 0, "snake_after": 0}

            def counted(name, calls=calls):
                def call(*args):
                    calls[name] += 1
                    return getattr(compiled, name)(*args)

                return call

            streaming._fused = Activations(counted("snake"), counted("snake_after"))
            got = streaming.forward(flat, position, codes)
            streaming._fused = compiled
            # Every SnakeBeta of the step ran fused; each residual unit's first and the decoder's last behind
            # their convolution's carried samples.
            assert calls == {"snake": len(streaming._snake_terms) - len(units) - 1, "snake_after": len(units) + 1}
            for want, have in zip(expected, got, strict=True):
                _assert_close_at_scale(have, want)
            if rows == 2:
                compiles = counters["frames"]["total"]
        assert compiles > before
    streaming.decode([streaming.new_state()], [random_codes(2, seed=8)])
    assert counters["frames"]["total"] == compiles  # other batches, chunks and eager groups: no compile
    if channels_last:  # the compiled join keeps channels innermost: the 2-D convolution reads it as NHWC
        unit = units[0]
        channels = unit.conv1.conv.in_channels
        past, x = (torch.randn(2, n, channels, generator=gen).mT for n in (6, 40))
        with torch.inference_mode():
            joined = streaming._join(past, x, True, compiled, unit.act1)
        assert joined.shape == (2, channels, 46) and joined.stride(1) == 1
        assert joined.unsqueeze(2).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("before", ["off", "snake", "step"])
@pytest.mark.parametrize(
    ("what", "snake_fused", "step_compiled"), [("off", False, False), ("snake", True, False), ("step", False, True)]
)
def test_enable_compiles_what_the_option_names(decoder, before, what, snake_fused, step_compiled):
    """The server's `compile_codec` reaches the decoder through `enable`: each value turns on its own part, and
    only it, whatever was on before."""
    streaming = StreamingDecoder(decoder)
    streaming.enable(before)
    streaming.enable(what)
    assert streaming.compiles == what
    assert (streaming._fused is not None, streaming._compiled is not None) == (snake_fused, step_compiled)
