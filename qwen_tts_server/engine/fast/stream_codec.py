"""Streaming codec decode: frames to audio chunk by chunk, exactly as one whole decode would.

The 12 Hz decoder is causal end to end, so the audio of frames [a, b) depends only on frames < b.
Re-decoding each chunk with a bounded left context (upstream's `chunked_decode`, 25 frames) is an
approximation, since the receptive field (sliding-window attention over 72 frames, then many
dilated convolutions) is longer, and it redoes the context's work on every chunk. Here the decoder's
causal state is carried from one chunk to the next instead:

* every causal convolution keeps the last `padding` samples of its input (zeros at the start,
  which is exactly upstream's left zero padding; every such convolution has stride 1, so upstream
  adds no right padding);
* every causal transposed convolution keeps the part of its output that overlaps the next input
  frame (upstream trims these `kernel - stride` samples on the right; the next chunk's first
  outputs are the sum of that tail and their own contribution);
* every transformer layer keeps the post-RoPE keys and values of the last `window - 1` positions
  (upstream's sliding window of 72 includes the query itself: key j is seen by query i when
  i - 72 < j <= i) and the stream's absolute position, for RoPE and for how much of the window
  holds real frames.

Streams are decoded together: those whose chunks have the same length run as one batch, each row at
its own position (its own RoPE angles and window mask). A stream's state is one flat tensor on the
decoder's device, so a batch gathers all of its streams' states with one `stack`, and the rows of the
batch's new state become the streams' states without a copy. Nothing in `decode` waits for the
device except the final copy of the audio to the host, and on CUDA a (batch, chunk length) bucket
can be captured as one graph (`capture`), because every input and output of the step is a tensor. The
graphs are captured on a stream of their own (`capture.GraphPool` says why).

Layout (`channels_last`, off by default until measured): cuDNN runs the decoder's bf16 convolutions on
channels-innermost (NHWC) kernels. Given [B, C, T] activations and weights stored time innermost, as upstream's
modules hold them, it converts the input to that layout and the output back (`nchwToNhwc`/`nhwcToNchw`: 19 of the
codec's 154 ms of kernels in a 30-step trace at 64 clients on an H100, 2026-12-07). With `channels_last` every
activation after the transformer stays channels innermost ([B, C, T] views of [B, T, C] memory), the state's
concatenations included, and those convolutions run as 2-D ones over [B, C, 1, T] views with channels-last weights
made once (a copy of the weights): a 3-D convolution would not do, since ATen makes its input time-innermost
first (a copy) and converts it back for NHWC kernels (another).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2CausalConvNet,
    Qwen3TTSTokenizerV2CausalTransConvNet,
    Qwen3TTSTokenizerV2ConvNeXtBlock,
    Qwen3TTSTokenizerV2DecoderDecoderBlock,
    Qwen3TTSTokenizerV2DecoderDecoderResidualUnit,
    Qwen3TTSTokenizerV2DecoderTransformerLayer,
    SnakeBeta,
    apply_rotary_pos_emb,
    repeat_kv,
)
from torch import Tensor, nn

from .capture import GraphPool
from .compiling import allow_recompiles, mark_dynamic
from .options import CodecCompile

# x, exp(alpha) and 1 / (exp(beta) + eps) (both [1, C, 1]) to SnakeBeta's output: `snake`, or it compiled.
SnakeFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# The carried samples, x, SnakeBeta's terms and the time dimension to the carried samples then SnakeBeta of x:
# `snake_after`, or it compiled.
SnakeAfterFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


def snake(x: Tensor, alpha_exp: Tensor, inv_beta: Tensor) -> Tensor:
    """Upstream's `SnakeBeta.forward`, x + 1 / beta * sin(x * alpha)^2, with its terms of the parameters
    (`_snake_terms`) computed once instead of on every call. The same ops in the same order on the same
    tensors: bitwise equal to the module's output."""
    return x + inv_beta * torch.pow(torch.sin(x * alpha_exp), 2)


def snake_after(past: Tensor, x: Tensor, alpha_exp: Tensor, inv_beta: Tensor, time: int) -> Tensor:
    """`past` then `snake(x, ...)` along dimension `time`: a causal convolution's input when SnakeBeta comes
    right before it (each residual unit's first, the decoder's last). Compiled, one kernel writes the activation
    straight behind the carried samples (their few columns may be copied by a small kernel of their own), where
    `snake` then `torch.cat` read and write the whole activation twice (the convolutions' concatenations were 12%
    of the codec's kernel time in a c64 trace, H100, 2026-12-07)."""
    return torch.cat([past, snake(x, alpha_exp, inv_beta)], dim=time)


@dataclass(frozen=True)
class Activations:
    """How a step computes SnakeBeta: alone, and before a convolution's carried samples (`snake_after`); eager
    (`EAGER`) or compiled (`StreamingDecoder.enable("snake")`)."""

    snake: SnakeFn
    snake_after: SnakeAfterFn


EAGER = Activations(snake, snake_after)


@torch.no_grad()
def _snake_terms(decoder: nn.Module) -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """Each SnakeBeta's exp(alpha) and 1 / (exp(beta) + eps), [1, C, 1] in its parameters' dtype and device,
    computed as its forward computes them: four tiny kernels per module and call that `snake` skips (the
    decoder's weights do not change once it serves)."""
    terms: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    for module in decoder.modules():
        if isinstance(module, SnakeBeta):
            alpha = torch.exp(module.alpha.unsqueeze(0).unsqueeze(-1))
            beta = torch.exp(module.beta.unsqueeze(0).unsqueeze(-1))
            terms[module] = (alpha, 1.0 / (beta + module.no_div_by_zero))
    return terms


@dataclass
class DecoderState:
    """One stream's causal state: every carried tensor packed in `flat` ([state_size], the decoder's
    dtype and device), the absolute position of its next frame as a 0-d long tensor on the device
    (so no host value enters the step), and the same count on the host."""

    flat: Tensor
    position: Tensor
    frames: int = 0


@dataclass(frozen=True)
class _Slot:
    """Where one carried tensor lives in a stream's flat state: `shape` as it is read ([C, P] for a
    convolution's samples), stored with its last two dimensions swapped when `time_major` (channels
    innermost, as a channels-last decoder's activations are)."""

    offset: int
    shape: tuple[int, ...]
    time_major: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class _StateIO:
    """Views of a batch's old and new states, per module (or (layer, "k"/"v") for the caches)."""

    def __init__(self, slots: dict[Any, _Slot], old: Tensor, new: Tensor) -> None:
        self.slots = slots
        self.old = old
        self.new = new

    def _view(self, flat: Tensor, key: Any) -> Tensor:
        slot = self.slots[key]
        # A column range of a [B, S] tensor: its last dim is contiguous, so this is a view, not a copy.
        columns = flat[:, slot.offset : slot.offset + slot.size]
        if slot.time_major:
            return columns.view(flat.shape[0], *slot.shape[:-2], slot.shape[-1], slot.shape[-2]).mT
        return columns.view(flat.shape[0], *slot.shape)

    def read(self, key: Any) -> Tensor:
        return self._view(self.old, key)

    def write(self, key: Any, value: Tensor) -> None:
        self._view(self.new, key).copy_(value)


def _after_transformer(decoder: nn.Module) -> set[nn.Module]:
    """The modules that run on the transformer's output (the upsampling and decoder stacks): what
    `channels_last` keeps channels innermost."""
    return {module for stack in (decoder.upsample, decoder.decoder) for module in stack.modules()}


def _layout(decoder: nn.Module, channels_last: bool = False) -> tuple[dict[Any, _Slot], int]:
    """Every carried tensor of the decoder and its place in a flat state (with `channels_last`, the samples of
    the convolutions after the transformer stored channels innermost); checks that the module is the
    architecture this file replays (stride-1 causal convolutions, unpadded transposed ones, sliding-window
    attention)."""
    slots: dict[Any, _Slot] = {}
    offset = 0
    innermost = _after_transformer(decoder) if channels_last else set()

    def add(key: Any, shape: tuple[int, ...], time_major: bool = False) -> None:
        nonlocal offset
        slots[key] = _Slot(offset, shape, time_major)
        offset += math.prod(shape)

    for module in decoder.modules():
        if isinstance(module, Qwen3TTSTokenizerV2CausalConvNet):
            if module.stride != 1:
                raise ValueError("streaming decode assumes stride-1 causal convolutions (no right padding)")
            if module.padding > 0:
                add(module, (module.conv.in_channels, module.padding), module in innermost)
        elif isinstance(module, Qwen3TTSTokenizerV2CausalTransConvNet):
            conv = module.conv
            if conv.padding[0] != 0 or conv.output_padding[0] != 0 or module.left_pad != 0:
                raise ValueError("streaming decode assumes unpadded transposed convolutions")
            if module.right_pad != conv.kernel_size[0] - conv.stride[0]:
                raise ValueError("streaming decode assumes a right trim of kernel - stride")
            if module.right_pad > 0:
                add(module, (conv.out_channels, module.right_pad), module in innermost)
    *_, last_act, last_conv = decoder.decoder
    if not (isinstance(last_act, SnakeBeta) and isinstance(last_conv, Qwen3TTSTokenizerV2CausalConvNet)):
        raise ValueError("streaming decode assumes the decoder ends with SnakeBeta, then a causal convolution")
    transformer = decoder.pre_transformer
    config = transformer.config
    if config.sliding_window is None:
        raise ValueError("streaming decode needs the transformer's sliding window (bounded state)")
    past = int(config.sliding_window) - 1
    for layer in transformer.layers[: config.num_hidden_layers]:
        if layer.attention_type != "sliding_attention":
            raise ValueError(f"unexpected attention type {layer.attention_type!r}")
        attn = layer.self_attn
        shape = (config.num_key_value_heads, past, attn.head_dim)
        add((layer, "k"), shape)
        add((layer, "v"), shape)
    return slots, offset


class StreamingDecoder:
    """Exact chunked decode of the 12 Hz codec decoder (upstream `Qwen3TTSTokenizerV2Decoder`),
    carrying its causal state across chunks. Reuses the module's weights and submodules; only the
    forward, which threads the state, is ours.

    `decode(states, codes)` returns, for any split of a stream's codes into chunks, audio equal (up
    to float rounding) to the matching samples of `decoder(whole_codes)`. `channels_last`: the layout
    (module docstring); the same audio, to float rounding.
    """

    def __init__(
        self, decoder: nn.Module, capture_stream: torch.cuda.Stream | None = None, *, channels_last: bool = False
    ) -> None:
        self.decoder = decoder
        param = next(decoder.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.samples_per_frame = int(decoder.total_upsample)
        self.num_quantizers = int(decoder.config.num_quantizers)
        self.past = int(decoder.pre_transformer.config.sliding_window) - 1
        self.slots, self.state_size = _layout(decoder, channels_last)
        self._weights = _channels_last_weights(decoder) if channels_last else {}
        self._snake_terms = _snake_terms(decoder)
        self.compiles: CodecCompile = "off"  # see `enable`
        self._fused: Activations | None = None  # SnakeBeta compiled (`enable("snake")`)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = GraphPool(self.device, "StreamingDecoder", stream=capture_stream)
        self._compiled: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
        # The graphs' state buffers, [rows, state_size] in and out, shared: every graph works in the first rows
        # of the same two (one replay at a time, its outputs copied out at once). A state is ~1.5-2.6 MB a row
        # in bf16: two buffers per graph, 44 graphs at up to 128 rows, would hold 5-9 GB.
        self._state_in: Tensor | None = None
        self._state_out: Tensor | None = None
        # Batches run (a graph replay or an eager batch), the streams' chunks they decoded and the rows they
        # computed (a graph's padding rows included): the codec's batch size under load, for metrics.
        self.counts = {"batches": 0, "streams": 0, "rows": 0}

    def enable(self, what: CodecCompile) -> None:
        """What torch.compile fuses in the graphs captured from now on (`compiles`), in place of what was:

        * "step": the whole `step`. Its elementwise work (SnakeBeta's five passes over every activation, the
          carried state's concatenations, residual adds) fuses into a few kernels. The batch and chunk-length
          dimensions are dynamic from the first call, so one compile serves every batch of several streams and
          one every single stream (torch specializes a dimension of 1, so a first chunk of one frame,
          `QTTS_STREAM_FIRST_CHUNK_FRAMES=1`, adds its own).
        * "snake": each SnakeBeta alone (29 a step, on the decoder's largest activations), one kernel instead of
          `snake`'s five elementwise passes, each of which reads and writes the whole activation; where a
          causal convolution follows (13 of them), the same kernel writes behind its carried samples
          (`snake_after`), so no concatenation copies the activation again. Two small functions (dynamic
          shapes: one kernel for every module's channels and chunk length, another for batches of one row),
          not the whole step. It rounds once where the five passes round five times: close to upstream, not
          bitwise.
        * "off": nothing.

        Only captured graphs run compiled code: it compiles while they are captured, and groups without a graph
        run `step` uncompiled, SnakeBeta too, so that no request ever waits for a compile."""
        if what != "off":  # each engine's decoder is another `self`: the shared code compiles again per engine
            allow_recompiles()
        self._compiled = torch.compile(self.step) if what == "step" else None
        self._fused = None
        if what == "snake":
            self._fused = Activations(torch.compile(snake, dynamic=True), torch.compile(snake_after, dynamic=True))
        self.compiles = what

    def forward(
        self, flat: Tensor, position: Tensor, codes: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`step`, compiled or with SnakeBeta fused when enabled: what `capture` records."""
        if self._compiled is None:
            return self.step(flat, position, codes, out, self._fused or EAGER)
        for tensor, dims in ((flat, (0,)), (position, (0,)), (codes, (0, 2)), (out, (0,))):
            if tensor is not None:  # strict: a dimension specialized after all fails the capture (it falls back)
                mark_dynamic(tensor, *dims, strict=True)
        return self._compiled(flat, position, codes, out)

    def __len__(self) -> int:
        """Captured graphs."""
        return len(self._graphs)

    # ------------------------------------------------------------------ public API

    @torch.inference_mode()
    def new_state(self) -> DecoderState:
        """A stream before its first frame: zero history, as upstream's causal zero padding."""
        return DecoderState(
            flat=torch.zeros(self.state_size, dtype=self.dtype, device=self.device),
            position=torch.zeros((), dtype=torch.long, device=self.device),
        )

    def decode(self, states: list[DecoderState], codes: list[Tensor]) -> list[np.ndarray]:
        """Each stream's next chunk ([T_i, 16] codes) to its T_i x 1920 float32 samples, updating
        each state in place, or, if it raises, none. Streams with equal T_i run as one batch; each stream may
        appear once."""
        if len(states) != len(codes):
            raise ValueError("one code chunk per state")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a stream can decode only one chunk per call")
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(codes):
            if c.dim() != 2 or c.shape[1] != self.num_quantizers:
                raise ValueError(f"codes must be [T, {self.num_quantizers}], got {tuple(c.shape)}")
            groups.setdefault(int(c.shape[0]), []).append(i)
        out = [np.zeros(0, dtype=np.float32) for _ in codes]
        pending: list[tuple[list[int], Tensor]] = []
        before = [(s.flat, s.position, s.frames) for s in states]
        try:
            with torch.inference_mode():
                for frames, idx in groups.items():
                    if frames > 0:
                        wav = self._decode_group([states[i] for i in idx], [codes[i] for i in idx])
                        pending.append((idx, wav))
            for idx, wav in pending:  # every group is queued before the first wait
                audio = wav.float().cpu().numpy()
                for row, i in enumerate(idx):
                    out[i] = audio[row]
        except BaseException:
            # All or nothing: a group decoded before the failure must not keep its new state, or decoding its
            # chunk again (the codec thread retries a failed batch stream by stream) would start past it. The
            # old states are intact: a decode adopts new tensors, never writes into the old ones.
            for state, (flat, position, frames) in zip(states, before, strict=True):
                state.flat, state.position, state.frames = flat, position, frames
            raise
        return out

    @torch.inference_mode()
    def prime(self, state: DecoderState, pieces: list[Tensor]) -> None:
        """Run codes ([T, 16] each, in order) through `state`, their audio discarded: a voice clone's reference,
        which its decoder must have seen, as whole decode puts it in front. Unlike `decode`, nothing is copied to
        the host, so the codec thread does not wait for the GPU after each piece. A state that fails halfway is
        the caller's to drop (it belongs to no stream yet)."""
        for codes in pieces:
            self._decode_group([state], [codes])

    def release_graphs(self) -> None:
        """Drop every captured graph and its memory pool (the engine stopped)."""
        self._graphs.clear()
        self._pool.release()
        self._state_in = self._state_out = None

    @torch.inference_mode()
    def capture(self, rows: int, frames: int) -> None:
        """Capture the step for `rows` streams (or fewer: spare rows are computed and ignored) with
        chunks of `frames` frames as one CUDA graph; `decode` then replays it for such groups."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA decoder")
        if (rows, frames) not in self._graphs:
            self._graphs[rows, frames] = _Graph(self, rows, frames, *self._state_buffers(rows))

    def capture_all(self, rows: list[int], frames: list[int]) -> None:
        """`capture` for every (rows, frames) pair, the largest row count's buffers made first."""
        self._state_buffers(max(rows))
        for t in frames:
            for r in rows:
                self.capture(r, t)

    def _state_buffers(self, rows: int) -> tuple[Tensor, Tensor]:
        """The shared state buffers, made (or remade larger: graphs captured before keep the old ones) to
        hold `rows` rows."""
        if self._state_in is None or self._state_in.shape[0] < rows:
            shape = (rows, self.state_size)
            self._state_in = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._state_out = torch.zeros(shape, dtype=self.dtype, device=self.device)
        assert self._state_out is not None
        return self._state_in, self._state_out

    # ------------------------------------------------------------------ batching

    def _decode_group(self, states: list[DecoderState], codes: list[Tensor]) -> Tensor:
        """One batch of streams with equal chunk lengths; returns their audio [n, T x 1920] on the device.
        More streams than the largest graph of their length has rows (streams that just ended, their last
        chunk padded to this length, beside the ones now in their rows) run as several replays, not eagerly."""
        frames = int(codes[0].shape[0])
        rows = max((r for r, t in self._graphs if t == frames), default=len(states))
        if len(states) > rows:
            parts = range(0, len(states), rows)
            return torch.cat([self._decode_group(states[i : i + rows], codes[i : i + rows]) for i in parts])
        batch = torch.stack(codes).transpose(1, 2)  # [n, 16, T]
        graph = self._graph_for(len(states), frames)
        self._count(len(states), graph.rows if graph is not None else len(states))
        if graph is not None:
            return graph.run(states, batch)
        flat = torch.stack([s.flat for s in states])
        position = torch.stack([s.position for s in states])
        # Uncompiled, SnakeBeta too: a shape no graph has (an ICL reference's frames) must never compile on a request.
        wav, new_flat, new_position = self.step(flat, position, batch.to(self.device, non_blocking=True))
        self._adopt(states, new_flat, new_position, frames)
        return wav[:, 0]

    def _count(self, streams: int, rows: int) -> None:
        self.counts["batches"] += 1
        self.counts["streams"] += streams
        self.counts["rows"] += rows

    def _graph_for(self, rows: int, frames: int) -> _Graph | None:
        fits = [r for r, t in self._graphs if t == frames and r >= rows]
        return self._graphs[min(fits), frames] if fits else None

    @staticmethod
    def _adopt(states: list[DecoderState], flat: Tensor, position: Tensor, frames: int) -> None:
        """The batch's new state rows become the streams' states (views: no copy)."""
        for row, state in enumerate(states):
            state.flat = flat[row]
            state.position = position[row]
            state.frames += frames

    # ------------------------------------------------------------------ the stateful forward

    def step(
        self, flat: Tensor, position: Tensor, codes: Tensor, out: Tensor | None = None, acts: Activations = EAGER
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder forward over one chunk: states [B, S] and positions [B] in, codes [B, 16, T];
        returns audio [B, 1, T x 1920] (clamped as upstream), the new states (written into `out` when
        given, every element of it) and positions. Pure function of tensors (no host values), so it
        can be captured in a CUDA graph. `acts` computes every SnakeBeta (eager, or fused)."""
        dec = self.decoder
        io = _StateIO(self.slots, flat, torch.empty_like(flat) if out is None else out)
        hidden = dec.quantizer.decode(codes)
        hidden = self._conv(dec.pre_conv, hidden, io).transpose(1, 2)
        hidden = self._transformer(hidden, position, io).permute(0, 2, 1)
        for blocks in dec.upsample:
            for block in blocks:
                hidden = self._run(block, hidden, io, acts)
        for block in dec.decoder[:-2]:
            hidden = self._run(block, hidden, io, acts)
        hidden = self._conv(dec.decoder[-1], hidden, io, acts, act=dec.decoder[-2])  # SnakeBeta, then the conv
        return hidden.clamp(min=-1, max=1), io.new, position + codes.shape[-1]

    def _run(self, module: nn.Module, x: Tensor, io: _StateIO, acts: Activations) -> Tensor:
        """Upstream's module forward, with the causal ones swapped for their stateful versions and SnakeBeta
        for `acts` over its precomputed terms."""
        if isinstance(module, Qwen3TTSTokenizerV2CausalConvNet):
            return self._conv(module, x, io)
        if isinstance(module, Qwen3TTSTokenizerV2CausalTransConvNet):
            return self._trans_conv(module, x, io)
        if isinstance(module, Qwen3TTSTokenizerV2ConvNeXtBlock):
            return self._convnext(module, x, io)
        if isinstance(module, Qwen3TTSTokenizerV2DecoderDecoderResidualUnit):
            return self._residual_unit(module, x, io, acts)
        if isinstance(module, Qwen3TTSTokenizerV2DecoderDecoderBlock):
            for sub in module.block:
                x = self._run(sub, x, io, acts)
            return x
        if isinstance(module, SnakeBeta):
            return acts.snake(x, *self._snake_terms[module])
        raise TypeError(f"no streaming forward for {type(module).__name__}")

    def _conv(
        self,
        module: Qwen3TTSTokenizerV2CausalConvNet,
        x: Tensor,
        io: _StateIO,
        acts: Activations = EAGER,
        act: SnakeBeta | None = None,
    ) -> Tensor:
        """Causal conv: the carried last `padding` input samples stand in for the left zero padding. `act`: a
        SnakeBeta to run on `x` first (with `acts.snake_after` where there are carried samples)."""
        conv = module.conv
        weight = self._weights.get(conv)  # channels-last, 4-D
        if module.padding > 0:
            x = self._join(io.read(module), x, weight is not None, acts, act)
            io.write(module, x[..., -module.padding :])
        elif act is not None:
            x = acts.snake(x, *self._snake_terms[act])
        if weight is None:
            return F.conv1d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        stride, padding, dilation = (1, conv.stride[0]), (0, conv.padding[0]), (1, conv.dilation[0])
        return F.conv2d(x.unsqueeze(2), weight, conv.bias, stride, padding, dilation, conv.groups).squeeze(2)

    def _join(self, past: Tensor, x: Tensor, channels_last: bool, acts: Activations, act: SnakeBeta | None) -> Tensor:
        """`past` [B, C, P] then `x` [B, C, T] (SnakeBeta of it with `act`) along time, channels innermost if asked:
        `torch.cat` of [B, C, T] tensors returns time innermost whatever its inputs are, so channels-last ones
        are joined as [B, T, C]."""
        if act is None:
            return torch.cat([past.mT, x.mT], dim=1).mT if channels_last else torch.cat([past, x], dim=-1)
        terms = self._snake_terms[act]
        if channels_last:
            return acts.snake_after(past.mT, x.mT, *(t.mT for t in terms), 1).mT
        return acts.snake_after(past, x, *terms, -1)

    def _trans_conv(self, module: Qwen3TTSTokenizerV2CausalTransConvNet, x: Tensor, io: _StateIO) -> Tensor:
        """Causal transposed conv: upstream trims the last kernel - stride samples, which are exactly
        the part the next input frame also writes to. Carry them (without bias) into the next chunk."""
        conv = module.conv
        weight = self._weights.get(conv)  # channels-last, 4-D
        if weight is None:
            out = F.conv_transpose1d(
                x, conv.weight, None, stride=conv.stride, groups=conv.groups, dilation=conv.dilation
            )
        else:
            stride, dilation = (1, conv.stride[0]), (1, conv.dilation[0])
            out = F.conv_transpose2d(
                x.unsqueeze(2), weight, None, stride=stride, groups=conv.groups, dilation=dilation
            ).squeeze(2)
        emitted = x.shape[-1] * conv.stride[0]
        tail = module.right_pad
        if tail > 0:
            out[..., :tail] += io.read(module)
            io.write(module, out[..., emitted:])
        out = out[..., :emitted]
        if conv.bias is not None:
            out = out + conv.bias[:, None]
        return out

    def _convnext(self, block: Qwen3TTSTokenizerV2ConvNeXtBlock, x: Tensor, io: _StateIO) -> Tensor:
        h = self._conv(block.dwconv, x, io).permute(0, 2, 1)
        h = block.pwconv2(block.act(block.pwconv1(block.norm(h))))
        return x + (block.gamma * h).permute(0, 2, 1)

    def _residual_unit(
        self, unit: Qwen3TTSTokenizerV2DecoderDecoderResidualUnit, x: Tensor, io: _StateIO, acts: Activations
    ) -> Tensor:
        h = self._conv(unit.conv1, x, io, acts, act=unit.act1)
        return x + self._conv(unit.conv2, h, io, acts, act=unit.act2)

    # ------------------------------------------------------------------ transformer

    def _transformer(self, x: Tensor, position: Tensor, io: _StateIO) -> Tensor:
        """Upstream's pre-transformer (input/output projections, final norm) over one chunk, each row at
        its own absolute positions, attending to its carried window."""
        model = self.decoder.pre_transformer
        hidden = model.input_proj(x)
        frames = hidden.shape[1]
        positions = position[:, None] + torch.arange(frames, device=hidden.device)
        cos, sin = model.rotary_emb(hidden, positions)
        mask = self._window_mask(position, frames)
        for layer in model.layers[: model.config.num_hidden_layers]:
            hidden = self._layer(layer, hidden, cos, sin, mask, io)
        return model.output_proj(model.norm(hidden))

    def _window_mask(self, position: Tensor, frames: int) -> Tensor:
        """[B, 1, T, past + T] boolean: query i (cache index past + i) sees cache indices
        i..past + i, i.e. itself and the `past` = window - 1 positions before it, except cached
        slots from before the stream's start (cache index < past - position)."""
        keys = torch.arange(self.past + frames, device=position.device)
        queries = torch.arange(frames, device=position.device)[:, None]
        band = (keys >= queries) & (keys <= queries + self.past)  # [T, past + T]
        filled = keys[None, :] >= (self.past - position)[:, None]  # [B, past + T]
        return (band[None] & filled[:, None])[:, None]

    def _layer(
        self,
        layer: Qwen3TTSTokenizerV2DecoderTransformerLayer,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        io: _StateIO,
    ) -> Tensor:
        """Upstream's layer (pre-norm attention and MLP, each with LayerScale on the residual branch)."""
        h = self._attention(layer, layer.input_layernorm(x), cos, sin, mask, io)
        x = x + layer.self_attn_layer_scale(h)
        return x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))

    def _attention(
        self,
        layer: Qwen3TTSTokenizerV2DecoderTransformerLayer,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        io: _StateIO,
    ) -> Tensor:
        attn = layer.self_attn
        batch, frames, _ = x.shape
        shape = (batch, frames, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # keys are cached post-RoPE, at absolute positions
        k = torch.cat([io.read((layer, "k")), k], dim=2)
        v = torch.cat([io.read((layer, "v")), v], dim=2)
        if self.past > 0:
            io.write((layer, "k"), k[:, :, -self.past :])
            io.write((layer, "v"), v[:, :, -self.past :])
        groups = attn.num_key_value_groups
        out = F.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=attn.scaling
        )
        return attn.o_proj(out.transpose(1, 2).reshape(batch, frames, -1))


def _channels_last_weights(decoder: nn.Module) -> dict[nn.Module, Tensor]:
    """Every upsampling and decoder convolution's weight ([out, in, k], a transposed one's [in, out, k]) as a
    [.., .., 1, k] channels-last copy: what its 2-D form runs with, in the layout cuDNN's NHWC kernels read."""
    return {
        module: module.weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last)
        for module in _after_transformer(decoder)
        if isinstance(module, nn.Conv1d | nn.ConvTranspose1d)
    }


class _Graph:
    """One captured (rows, frames) step: static state, position and code inputs and outputs."""

    def __init__(self, owner: StreamingDecoder, rows: int, frames: int, state_in: Tensor, state_out: Tensor) -> None:
        device = owner.device
        self.rows, self.frames = rows, frames
        self.flat, self.new_flat = state_in[:rows], state_out[:rows]
        self.position = torch.zeros(rows, dtype=torch.long, device=device)
        self.codes = torch.zeros(rows, owner.num_quantizers, frames, dtype=torch.long, device=device)
        self.graph, (self.wav, _, self.new_position) = owner._pool.capture(
            lambda: owner.forward(self.flat, self.position, self.codes, out=self.new_flat)
        )

    def run(self, states: list[DecoderState], codes: Tensor) -> Tensor:
        """Replay for len(states) <= rows streams; returns their audio [n, T x 1920], copied out of
        the graph's buffers (the next replay overwrites them), and adopts their new states."""
        n = len(states)
        torch.stack([s.flat for s in states], out=self.flat[:n])
        torch.stack([s.position for s in states], out=self.position[:n])
        self.codes[:n].copy_(codes, non_blocking=True)
        self.graph.replay()
        StreamingDecoder._adopt(states, self.new_flat[:n].clone(), self.new_position[:n].clone(), self.frames)
        return self.wav[:n, 0].clone()
