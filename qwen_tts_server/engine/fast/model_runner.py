"""Our own talker and code-predictor forward passes over upstream's weights, with static KV caches.

Upstream runs the talker through HF `generate` with a growing cache per batch, and the code
predictor through another HF `generate` per frame. Here every tensor the hot loop touches is
allocated once: a talker KV cache with one row ("slot") per request, and a small code-predictor
cache reused by every frame. `decode` takes each row's position as a tensor and builds the attention
mask from it, so its work does not depend on tensor values: with a fixed batch size and a fixed
`kv_len` it can be captured in a CUDA graph.

Numerics follow upstream op for op (RMSNorm statistics in fp32, cast back before the weight; q/k
norm before RoPE; SDPA with scale head_dim**-0.5; SiLU-gated MLP). The talker's multimodal RoPE is
ordinary RoPE here: upstream gives all three sections the same position ids for TTS, and then the
interleaved section selection picks between identical cos/sin tables (checked in the tests).

What makes a frame cheap is the number of kernels, not FLOPs (gpu-device.md): the q/k/v and the
gate/up projections run as one matmul each (upstream's weights become views into one fused tensor,
so nothing is copied twice), q and k are normed and rotated together, and decode attention reads
only the first `kv_len` keys of the first B cache rows, in place. With `compile=True` the
elementwise work around the matmuls is fused further by `torch.compile`.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention_kernel
from .attention_kernel import fused_decode_attention
from .compiling import allow_recompiles, mark_dynamic
from .options import FusedAttention

log = logging.getLogger(__name__)

# The code predictor sees [past_hidden, codebook 0] and then feeds back codebooks 1..14;
# the 15th predicted code is never fed back, so a frame spans 2 + 14 = 16 positions.
NUM_CODE_GROUPS = 16
CP_CACHE_LEN = NUM_CODE_GROUPS
MOVE_BYTES = 256 * 1024**2  # the most a compaction copy gathers at once (see ModelRunner.move_rows)

SampleFn = Callable[[int, Tensor], Tensor]  # (codebook 1..15, logits [B, V]) -> codes [B]


@dataclass
class Packed:
    """Prompts packed for one prefill: tokens `x` [T, H], each token's `positions` and `owner` (cache row)
    [T], and the index of each prompt's last token `last` [n]."""

    x: Tensor
    positions: Tensor
    owner: Tensor
    last: Tensor


def to_device(values: Sequence[Any], device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host values (a list, or a list of equal lists) as a tensor on `device` without waiting for the GPU:
    `torch.tensor(..., device=cuda)` copies from pageable memory and synchronizes the stream, stalling the step
    on every kernel queued so far; staged in pinned memory, the copy is queued like a kernel instead."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def rope_tables(rotary_emb: Any, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [length, head_dim] for positions 0..length-1 from an upstream rotary module.

    Uses the module's own `inv_freq` and `attention_scaling` (which already include any static
    rope scaling from the config); computed in fp32 and cast like upstream does per call.
    """
    if getattr(rotary_emb, "rope_type", "default") == "dynamic" or "longrope" in str(rotary_emb.rope_type):
        raise NotImplementedError(f"rope type {rotary_emb.rope_type} depends on sequence length")
    inv_freq = rotary_emb.inv_freq.float()
    positions = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = rotary_emb.attention_scaling
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# Fused weights, keyed by the first module of each group: a second runner over the same model
# (e.g. after a reload of the engine) finds the views already in place.
_FUSED: weakref.WeakKeyDictionary[nn.Module, tuple[Tensor, Tensor | None]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for several projections of the same input.

    The modules' parameters become views into the fused tensor, so upstream's own forward (the
    reference engine) keeps working on the same memory and no weight is held twice.
    """
    first = linears[0]
    if first in _FUSED:
        return _FUSED[first]
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("cannot fuse projections where only some have a bias")
    bias = None if biases[0] is None else torch.cat(biases)  # type: ignore[arg-type]
    start = 0
    for m in linears:
        end = start + m.weight.shape[0]
        m.weight.data = weight[start:end]
        if bias is not None:
            m.bias.data = bias[start:end]
        start = end
    _FUSED[first] = (weight, bias)
    return weight, bias


class LayerWeights:
    """One decoder layer's tensors in the shapes the fused forward wants.

    `attn_in` / `layer_out` take them as plain arguments (tensors and ints), so a compiled version
    sees every layer of a model as the same inputs with other values, not as new code to compile.
    """

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        if "SiLU" not in type(mlp.act_fn).__name__:  # nn.SiLU or transformers' SiLUActivation
            raise NotImplementedError(f"MLP activation {type(mlp.act_fn).__name__}")
        qkv, qkv_bias = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        heads = attn.q_proj.weight.shape[0] // attn.head_dim
        kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        # q heads then k heads, each with its own norm weight: one norm call for both.
        qk_norm = torch.cat((attn.q_norm.weight.expand(heads, -1), attn.k_norm.weight.expand(kv_heads, -1)))
        qk_eps = float(attn.q_norm.variance_epsilon)
        if float(attn.k_norm.variance_epsilon) != qk_eps:
            raise NotImplementedError("q_norm and k_norm with different eps")
        eps = float(layer.input_layernorm.variance_epsilon)
        self.head_dim = int(attn.head_dim)
        self.heads, self.kv_heads = heads, kv_heads
        self.attn_args = (layer.input_layernorm.weight, eps, qkv, qkv_bias, qk_norm, qk_eps, heads, kv_heads)
        gate_up, _ = fuse_linears([mlp.gate_proj, mlp.up_proj])
        post_eps = float(layer.post_attention_layernorm.variance_epsilon)
        self.out_args = (attn.o_proj.weight, attn.o_proj.bias, layer.post_attention_layernorm.weight, post_eps)
        self.out_args += (gate_up, mlp.down_proj.weight)


def attn_in(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    norm: Tensor,
    eps: float,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    qk_norm: Tensor,
    qk_eps: float,
    heads: int,
    kv_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-norm, fused q/k/v projection, q/k RMSNorm and RoPE. Returns q, k, v as [B, heads, S, head_dim].

    `cos`/`sin` broadcast against [B, heads, S, head_dim] ([S, hd] or [B, 1, S, hd]).
    """
    qkv = qkv_projection(x, norm, eps, qkv_weight, qkv_bias)
    return split_heads(qkv, cos, sin, qk_norm, qk_eps, heads, kv_heads)


def qkv_projection(x: Tensor, norm: Tensor, eps: float, qkv_weight: Tensor, qkv_bias: Tensor | None) -> Tensor:
    """Pre-norm and the fused q/k/v projection: [B, S, (heads + 2 kv_heads) x head_dim]."""
    return F.linear(F.rms_norm(x, (x.shape[-1],), norm, eps), qkv_weight, qkv_bias)


def split_heads(
    qkv: Tensor, cos: Tensor, sin: Tensor, qk_norm: Tensor, qk_eps: float, heads: int, kv_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, heads, S, head_dim] of the fused projection's output, q and k normed and rotated."""
    B, S, _ = qkv.shape
    head_dim = qk_norm.shape[-1]
    qk, v = qkv.view(B, S, heads + 2 * kv_heads, head_dim).split((heads + kv_heads, kv_heads), dim=2)
    qk = (F.rms_norm(qk, (head_dim,), eps=qk_eps) * qk_norm).transpose(1, 2)
    half = head_dim // 2
    qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
    q, k = qk.split((heads, kv_heads), dim=1)
    return q, k, v.transpose(1, 2)


def layer_out(
    x: Tensor,
    attn: Tensor,
    o_weight: Tensor,
    o_bias: Tensor | None,
    norm: Tensor,
    eps: float,
    gate_up: Tensor,
    down: Tensor,
) -> Tensor:
    """Output projection + residual, then the SiLU-gated MLP + residual. `attn` is [B, heads, S, hd]."""
    B, _, S, _ = attn.shape
    x = x + F.linear(attn.transpose(1, 2).reshape(B, S, -1), o_weight, o_bias)
    h = F.rms_norm(x, (x.shape[-1],), norm, eps)
    gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query position per row against `keys` [B, kv_heads, L, hd], for grouped-query heads.

    The q heads that share a kv head become that head's query "positions", so keys are never
    repeated. Written as two matmuls around a masked fp32 softmax, not SDPA: SDPA's CUDA kernels
    (cuDNN flash, memory-efficient) tile for many query rows and took 2-4x longer for these shapes
    on an H200 (bench.micro_kernels); compiled, this is two matmuls and one fused softmax kernel.
    `q` [B, heads, 1, hd]; `mask` [B or 1, 1, 1, L] bool, True where a key is visible.
    """
    B, heads, _, hd = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(B, kv_heads, heads // kv_heads, hd)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, values).reshape(B, heads, 1, hd)


def decode_layer(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    positions: Tensor,
    cache: Tensor,
    scale: float,
    attn_args: tuple[Any, ...],
    out_args: tuple[Any, ...],
    slots: Tensor | None = None,
    fused: bool = False,
) -> Tensor:
    """One decoder layer for one new position per row `x` [B, 1, h]: projections, the K/V write into the
    layer's `cache` [K/V, row, kv head, position, D] at `positions` ([B], or [1] for all rows), attention over
    the cache positions `mask` covers, MLP. One cache tensor a layer: the fused op must mutate a single tensor
    (see attention_kernel).

    Row b lives in cache row b (keys read in place), or in `slots[b]` when given (gathered). One
    function, so that compiled the cache write fuses into the RoPE kernel and the mask into the
    softmax: a layer is a dozen kernels, not the ~16 of separate calls. `fused` (CUDA, where
    `attention_kernel.supported`): the q/k norm, RoPE, cache write and attention are one Triton kernel.

    How many cache positions it reads is the mask's last dimension, not an int argument: compiled, a
    tensor dimension can be marked dynamic before the first call (`ModelRunner.decode`), an int cannot.
    """
    B = x.shape[0]
    norm, eps, qkv_weight, qkv_bias, qk_norm, qk_eps, heads, kv_heads = attn_args
    rows = torch.arange(B, device=x.device) if slots is None else slots
    qkv = qkv_projection(x, norm, eps, qkv_weight, qkv_bias)
    if fused:
        hd = qk_norm.shape[-1]
        args = (cos.view(-1, hd), sin.view(-1, hd), positions, rows, cache, mask.view(mask.shape[0], -1))
        attn = fused_decode_attention(qkv[:, 0], qk_norm, *args, qk_eps, scale, heads, kv_heads)
        return layer_out(x, attn.view(B, 1, heads, hd).transpose(1, 2), *out_args)
    q, k, v = split_heads(qkv, cos, sin, qk_norm, qk_eps, heads, kv_heads)
    # Two writes into the input itself (index 0 is K, 1 is V), as when K and V were tensors of their own.
    keys_half = torch.zeros(1, dtype=torch.long, device=x.device)
    cache[keys_half, rows, :, positions] = k[:, :, 0]
    cache[keys_half + 1, rows, :, positions] = v[:, :, 0]
    kv_len = mask.shape[-1]
    read = cache[:, :B, :, :kv_len] if slots is None else cache[:, slots, :, :kv_len]
    return layer_out(x, decode_attention(q, read[0], read[1], mask, scale), *out_args)


def cp_decode_step(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    position: Tensor,
    caches: Sequence[Tensor],
    scale: float,
    layers: Sequence[tuple[tuple[Any, ...], tuple[Any, ...]]],
    norm: Tensor,
    eps: float,
    head: Tensor,
    fused: bool = False,
) -> Tensor:
    """One codebook of the code predictor for B rows at one position `x` [B, 1, h]: every layer (`layers` holds
    each one's `attn_args`, `out_args`), the final norm and that codebook's `head`. Returns fp32 logits [B, V],
    a new contiguous tensor (the layout the compiled sampler takes without a copy).

    One function, not one call per layer: compiled, each layer's residual add fuses into the next layer's
    norm and the last one into the final norm, and the fp32 cast into the head's output: 70 kernels fewer a
    frame, 0.13 ms (H100, 2026-12-06). A function of its own, apart from `decode_layer`, because torch.compile keeps
    which dimensions are dynamic per code object: through one function, the talker's and the code
    predictor's layers (hidden 2048 and 1024) would make every weight size symbolic for both."""
    for (attn_args, out_args), cache in zip(layers, caches, strict=True):
        x = decode_layer(x, cos, sin, mask, position, cache, scale, attn_args, out_args, fused=fused)
    hidden = F.rms_norm(x[:, 0], (x.shape[-1],), norm, eps)
    return F.linear(hidden, head).float()


def frame_embedding(embed0: Tensor, codes: Tensor, tables: Sequence[Tensor]) -> Tensor:
    """The sum of a frame's 16 code embeddings [B, h] (the talker's next input, before its text part):
    `embed0` (codebook 0's, from the talker's table) and codebooks 1..15 `codes` [B, 15] looked up in
    `tables` (the code predictor's). Stacked and summed as upstream does; compiled, one kernel, not 17."""
    parts = [embed0] + [F.embedding(codes[:, j], table) for j, table in enumerate(tables)]
    return torch.stack(parts, dim=1).sum(1)


class ModelRunner:
    """Talker prefill / batched decode and the per-frame code predictor of one loaded model.

    `tts` is a `qwen_tts.Qwen3TTSModel`. Weights stay upstream's tensors (q/k/v and gate/up are
    re-laid out as views of fused tensors, nothing is copied twice); caches live on the model's
    device in its dtype. Slots are rows of the talker cache: the caller assigns them to requests
    and keeps each request's position (the prompt length after prefill, +1 per decoded frame).
    """

    def __init__(
        self, tts: Any, *, max_slots: int, max_len: int, compile: bool = False, fused: FusedAttention = "off"
    ) -> None:
        talker = tts.model.talker
        self.talker = talker
        self.code_predictor = talker.code_predictor
        cfg = talker.config
        param = talker.codec_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.max_slots, self.max_len = max_slots, max_len
        self.vocab_size = cfg.vocab_size

        self.layers = [LayerWeights(layer) for layer in talker.model.layers]
        self.head_dim = self.layers[0].head_dim
        self.scaling = talker.model.layers[0].self_attn.scaling
        # One tensor [K/V, layer, row, head, position, dim] with a view [K/V, row, ...] per layer: moving a
        # request's row (compaction) is one copy, not one per layer and K/V (56 for 1.7B, on the step thread).
        shape = (2, len(self.layers), max_slots, cfg.num_key_value_heads, max_len, self.head_dim)
        self.kv = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.caches = list(self.kv.unbind(1))
        self.cos, self.sin = rope_tables(talker.model.rotary_emb, max_len, self.dtype)
        self.key_positions = torch.arange(max_len, device=self.device)
        self.rows = torch.arange(max_slots, device=self.device)
        self.norm = talker.model.norm

        cp = self.code_predictor
        self.cp_layers = [LayerWeights(layer) for layer in cp.model.layers]
        self.cp_step_layers = [(w.attn_args, w.out_args) for w in self.cp_layers]  # as cp_decode_step takes them
        self.cp_tables = [table.weight for table in cp.model.codec_embedding]  # codebooks 1..15's embeddings
        self.cp_head_dim = self.cp_layers[0].head_dim
        self.cp_scaling = cp.model.layers[0].self_attn.scaling
        cp_shape = (2, max_slots, cp.config.num_key_value_heads, CP_CACHE_LEN, self.cp_head_dim)
        self.cp_caches = [torch.zeros(cp_shape, device=self.device, dtype=self.dtype) for _ in self.cp_layers]
        self.cp_cos, self.cp_sin = rope_tables(cp.model.rotary_emb, CP_CACHE_LEN, self.dtype)
        self.cp_norm = cp.model.norm

        # The code predictor's positions: cache index and the keys each position sees. Tensors of their own,
        # not views into one: inductor copies an input that arrives less aligned than when it was compiled.
        cp_keys = torch.arange(CP_CACHE_LEN, device=self.device)
        self.cp_positions = [torch.full((1,), p, device=self.device) for p in range(CP_CACHE_LEN)]
        self.cp_masks = [(cp_keys <= p)[None, None, None, :].clone() for p in range(CP_CACHE_LEN)]

        # Decode layers whose attention is one Triton kernel (`fused`, where it takes the shapes; see
        # attention_kernel): the code predictor's read 16 keys, one block; the talker's each row's own length, in
        # blocks of 16 or 64 keys on the tensor cores (`attention_kernel.launch_constants`).
        fits = fused != "off" and self._fits_kernel(self.cp_layers[0])
        self.cp_fused_attention = fits
        self.fused_attention = fits and fused == "all" and self._fits_kernel(self.layers[0])
        if fused != "off" and not fits and self.device.type == "cuda":  # elsewhere the torch path is the rule
            log.warning("fused attention (%s) needs Triton and shapes it takes: the torch path runs", fused)

        self.attn_in: Callable[..., tuple[Tensor, Tensor, Tensor]] = attn_in
        self.layer_out: Callable[..., Tensor] = layer_out
        self.decode_layer: Callable[..., Tensor] = decode_layer
        self.cp_decode_step: Callable[..., Tensor] = cp_decode_step
        self.frame_embedding: Callable[..., Tensor] = frame_embedding
        if compile:
            self.enable_compile()

    def _fits_kernel(self, layer: LayerWeights) -> bool:
        return attention_kernel.supported(self.device, layer.heads, layer.kv_heads, layer.head_dim)

    def enable_compile(self) -> None:
        """Fuse the elementwise work around the matmuls with `torch.compile` (CUDA; compiles on first use).

        Shapes differ between talker and code predictor, prefill and decode, and batch buckets; the
        first recompile marks the batch dimension (and the packed prefill's length) dynamic, so a handful
        of compiles serve them all. A batch of one row is always a compile of its own (torch.compile
        specialises sizes 1). The talker's KV length is marked dynamic before the first compile (`decode`),
        but reading the whole cache (`kv_len == max_len`) is a contiguous slice, which compiles apart: the
        warm-up runs the first and the last KV bucket (`warmup._compile_everything`). The talker's and
        the code predictor's decode steps are compiled apart (`cp_decode_step`): their weights differ in
        shape. (Prefill's `attn_in` / `layer_out` are still shared by both models.)
        """
        allow_recompiles()
        self.attn_in = torch.compile(attn_in)
        self.layer_out = torch.compile(layer_out)
        self.decode_layer = torch.compile(decode_layer)
        self.cp_decode_step = torch.compile(cp_decode_step)
        self.frame_embedding = torch.compile(frame_embedding)

    def disable_compile(self) -> None:
        self.attn_in, self.layer_out = attn_in, layer_out
        self.decode_layer, self.cp_decode_step = decode_layer, cp_decode_step
        self.frame_embedding = frame_embedding

    @property
    def compiled(self) -> bool:
        return self.attn_in is not attn_in

    # ---------------------------------------------------------------- talker

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Run one prompt `embeds` [L, H] at positions 0..L-1 into `slot`; see `prefill_many`."""
        hidden, logits = self.prefill_many([slot], [embeds])
        return hidden[0], logits[0]

    @torch.inference_mode()
    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Run several prompts (each [L_i, H], at positions 0..L_i-1) into their slots in one pass.

        The prompts are packed end to end into one sequence; attention is causal within each
        prompt only, so one forward serves a whole burst of admissions (one step's stall instead
        of one per request). Returns each prompt's last hidden state [n, H] (the code predictor's
        `past_hidden` for frame 0) and its codec_head logits [n, V] (codebook 0 of frame 0).
        """
        packed = self.pack(slots, prompts)
        hidden, logits = self.prefill_packed(packed.x, packed.positions, packed.owner, single=len(prompts) == 1)
        return hidden[packed.last], logits[packed.last]

    def pack(self, slots: Sequence[int], prompts: Sequence[Tensor], pad_to: int | None = None) -> Packed:
        """Prompts end to end as one sequence, with each token's cache row and position. `pad_to` adds
        padding tokens after the last prompt, in its row at the positions after it (written there and
        never read: a row's decode writes each position before it attends to it)."""
        lengths = [int(p.shape[0]) for p in prompts]
        if max(lengths) > self.max_len:
            raise ValueError(f"prompt of {max(lengths)} positions exceeds max_len {self.max_len}")
        pad = 0 if pad_to is None else pad_to - sum(lengths)
        if not self.padding_fits(lengths, pad):
            raise ValueError(f"cannot pad {sum(lengths)} prompt tokens to {pad_to} within max_len {self.max_len}")
        x = torch.cat([*prompts, prompts[-1].new_zeros(pad, prompts[-1].shape[-1])])
        positions = [p for n in lengths[:-1] for p in range(n)] + list(range(lengths[-1] + pad))
        owner = [s for s, n in zip(slots, lengths, strict=True) for _ in range(n)] + [slots[-1]] * pad
        ends = list(itertools.accumulate(lengths))
        return Packed(
            x=x,
            positions=to_device(positions, self.device),
            owner=to_device(owner, self.device),
            last=to_device([e - 1 for e in ends], self.device),
        )

    def padding_fits(self, lengths: Sequence[int], pad: int) -> bool:
        """Whether `pad` padding tokens fit after the last prompt, in its row (see `pack`)."""
        return pad >= 0 and lengths[-1] + pad <= self.max_len

    @torch.inference_mode()
    def prefill_packed(self, x: Tensor, positions: Tensor, owner: Tensor, *, single: bool) -> tuple[Tensor, Tensor]:
        """The talker over packed prompts `x` [T, H] (see `pack`): writes every token's K/V at (owner,
        position) and returns the final-normed hidden states [T, H] and codec_head logits [T, V] of every
        token. `single`: one prompt (padding after it included), so plain causal attention; otherwise
        each token attends to the earlier tokens of its own row only."""
        T = x.shape[0]
        cos, sin = self.cos[positions], self.sin[positions]
        if single:
            mask, causal = None, True
        else:
            index = torch.arange(T, device=self.device)
            mask, causal = (owner[:, None] == owner[None, :]) & (index[None, :] <= index[:, None]), False
        x = x[None]
        for i, w in enumerate(self.layers):
            q, k, v = self.attn_in(x, cos, sin, *w.attn_args)
            self.caches[i][0, owner, :, positions] = k[0].transpose(0, 1)
            self.caches[i][1, owner, :, positions] = v[0].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling, enable_gqa=True
            )
            x = self.layer_out(x, o, *w.out_args)
        # The head runs over every position, as upstream's does: a one-row matmul may round
        # differently (gemv vs gemm), and this keeps prefill logits bit-identical on CPU.
        hidden = self._talker_norm(x[0])
        return hidden, F.linear(hidden, self.talker.codec_head.weight)

    @torch.inference_mode()
    def decode(
        self, inputs: Tensor, positions: Tensor, *, slots: Tensor | None = None, kv_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """One talker step for B rows: `inputs` [B, H] at `positions` [B].

        Row b lives in cache row b (the engine keeps running requests in rows 0..B-1, so keys are
        read in place), or in `slots[b]` when given (gathered). Writes each row's K/V at its
        position and attends over positions 0..position. `kv_len` (a static bound > every real
        row's position, e.g. a CUDA-graph bucket) limits how much of the cache is read; default all
        of it. Returns hidden [B, H] and logits [B, V].
        """
        kv_len = self.max_len if kv_len is None else kv_len
        x = inputs[:, None, :]
        cos = self.cos[positions][:, None, None, :]
        sin = self.sin[positions][:, None, None, :]
        mask = (self.key_positions[None, :kv_len] <= positions[:, None])[:, None, None, :]
        if self.compiled:
            mark_dynamic(mask, 3)  # one compile for every KV bucket but `max_len` (see enable_compile)
        for w, cache in zip(self.layers, self.caches, strict=True):
            args = (positions, cache, self.scaling, w.attn_args, w.out_args, slots, self.fused_attention)
            x = self.decode_layer(x, cos, sin, mask, *args)
        hidden = self._talker_norm(x[:, 0])
        return hidden, F.linear(hidden, self.talker.codec_head.weight)

    def move_rows(self, src: Tensor, dst: Tensor, length: int) -> None:
        """Copy cache rows `src` to rows `dst` (positions 0..length-1) of every layer: a request changed rows.
        The right side is gathered first, so overlapping moves are safe. Layers go in groups whose gathered
        copy stays under MOVE_BYTES (all layers of many long rows at once would need gigabytes): one copy
        for the usual move, a few when many long rows move at once."""
        per_layer = 2 * src.numel() * self.kv[0, 0, 0, :, :length].numel() * self.kv.element_size()
        group = max(1, MOVE_BYTES // max(per_layer, 1))
        for first in range(0, self.kv.shape[1], group):
            layers = slice(first, first + group)
            self.kv[:, layers, dst, :, :length] = self.kv[:, layers, src, :, :length]

    @property
    def cache_bytes(self) -> int:
        """Memory of the talker's KV cache and the code predictor's."""
        tensors = [self.kv, *self.cp_caches]
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        """Let go of the caches (the engine stopped): their memory is free once no graph holds it."""
        self.kv = self.kv.new_empty(0)
        self.caches, self.cp_caches = [], []

    def read_positions(self, positions: Tensor) -> list[Tensor]:
        """Rows 0..B-1's K/V at `positions` [B] (what one decode step would overwrite)."""
        rows = self.rows[: positions.shape[0]]
        return [cache[:, rows, :, positions].clone() for cache in self.caches]

    def write_positions(self, positions: Tensor, saved: list[Tensor]) -> None:
        rows = self.rows[: positions.shape[0]]
        for cache, values in zip(self.caches, saved, strict=True):
            cache[:, rows, :, positions] = values

    def _talker_norm(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.norm.weight, self.norm.variance_epsilon)

    # ---------------------------------------------------------------- code predictor

    @torch.inference_mode()
    def predict_codes(self, past_hidden: Tensor, code0: Tensor, sample: SampleFn) -> tuple[Tensor, Tensor]:
        """Codebooks 1..15 of one frame for B rows, given the talker hidden that predicted `code0`.

        As upstream: prefill [past_hidden, talker embedding of code0] (through
        small_to_mtp_projection) at positions 0-1; codebook j (1..15) comes from lm_head[j-1], and
        for j >= 2 the step's input is codec_embedding[j-2] of codebook j-1 (at position j).
        `sample(j, logits)` picks codebook j from logits [B, V].
        Returns codes [B, 15] and the next talker input [B, H]: the sum of the frame's 16 code
        embeddings (the caller adds the trailing text hidden or tts_pad).
        """
        if past_hidden.shape[0] > self.max_slots:
            raise ValueError(f"{past_hidden.shape[0]} rows exceed the code predictor cache ({self.max_slots})")
        cp = self.code_predictor
        embed0 = self.talker.get_input_embeddings()(code0)
        codes = [sample(1, self._cp_prefill(cp.small_to_mtp_projection(torch.stack((past_hidden, embed0), dim=1))))]
        for j in range(1, NUM_CODE_GROUPS - 1):
            x = cp.small_to_mtp_projection(cp.model.codec_embedding[j - 1](codes[-1])[:, None])
            codes.append(sample(j + 1, self._cp_step(x, position=j + 1, head=cp.lm_head[j].weight)))
        stacked = torch.stack(codes, dim=1)
        return stacked, self.frame_embedding(embed0, stacked, self.cp_tables)

    def _cp_prefill(self, x: Tensor) -> Tensor:
        """The code predictor over its first two positions `x` [B, 2, h] (written to its cache rows 0..B-1):
        codebook 1's logits [B, V] from the last position. The head runs over both positions, as upstream's
        does, so the logits round exactly like upstream's (a one-row matmul may not)."""
        B, S, _ = x.shape
        cos, sin = self.cp_cos[:S], self.cp_sin[:S]
        for w, cache in zip(self.cp_layers, self.cp_caches, strict=True):
            q, k, v = self.attn_in(x, cos, sin, *w.attn_args)
            cache[0, :B, :, :S] = k
            cache[1, :B, :, :S] = v
            keys, values = cache[0, :B, :, :S], cache[1, :B, :, :S]
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.cp_scaling, enable_gqa=True)
            x = self.layer_out(x, o, *w.out_args)
        hidden = F.rms_norm(x, (x.shape[-1],), self.cp_norm.weight, self.cp_norm.variance_epsilon)
        return F.linear(hidden, self.code_predictor.lm_head[0].weight)[:, -1]

    def _cp_step(self, x: Tensor, position: int, head: Tensor) -> Tensor:
        """One later codebook: `x` [B, 1, h] at `position` (2..15) over the cache positions before it (a later
        position's stale keys from the previous frame are masked out); fp32 logits [B, V] of `head`.
        Rows are batch rows, not slots: the cache holds one frame and every frame overwrites it."""
        cos, sin = self.cp_cos[position : position + 1], self.cp_sin[position : position + 1]
        args = (self.cp_masks[position], self.cp_positions[position], self.cp_caches, self.cp_scaling)
        args += (self.cp_step_layers,)
        norm = (self.cp_norm.weight, self.cp_norm.variance_epsilon)
        return self.cp_decode_step(x, cos, sin, *args, *norm, head, self.cp_fused_attention)
