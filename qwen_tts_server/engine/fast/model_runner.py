"""Our own talker and code-predictor forward passes over upstream's weights, with static KV caches.

Upstream runs the talker through HF `generate` with a growing cache per batch, and the code
predictor through another HF `generate` per frame. Here every tensor the hot loop touches is
allocated once: a talker KV cache with one row ("slot") per request, and a small code-predictor
cache reused by every frame. `decode` takes each row's slot and position as tensors and builds the
attention mask from them, so its work does not depend on tensor values: with a fixed batch size it
can be captured in a CUDA graph.

Numerics follow upstream op for op (RMSNorm in fp32 then cast back, q/k norm before RoPE, SDPA
with scale head_dim**-0.5, SiLU-gated MLP). The talker's multimodal RoPE is ordinary RoPE here:
upstream gives all three sections the same position ids for TTS, and then the interleaved section
selection picks between identical cos/sin tables (checked numerically in the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# The code predictor sees [past_hidden, codebook 0] and then feeds back codebooks 1..14;
# the 15th predicted code is never fed back, so a frame spans 2 + 14 = 16 positions.
NUM_CODE_GROUPS = 16
CP_CACHE_LEN = NUM_CODE_GROUPS

SampleFn = Callable[[int, Tensor], Tensor]  # (codebook 1..15, logits [B, V]) -> codes [B]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Upstream's Qwen3TTSRMSNorm: statistics in fp32, cast back before the weight."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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


def _qkv(layer: Any, x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-norm, q/k/v projections, per-head q/k RMSNorm and RoPE. Returns [B, heads, S, head_dim]."""
    attn = layer.self_attn
    h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
    B, S, _ = h.shape
    q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, S, -1, head_dim)
    k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, S, -1, head_dim)
    v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, S, -1, head_dim)
    q = rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon).transpose(1, 2)
    k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon).transpose(1, 2)
    v = v.transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q, k, v


def _finish_layer(layer: Any, x: Tensor, attn_out: Tensor) -> Tensor:
    """Output projection + residual, then the gated MLP + residual."""
    B, _, S, _ = attn_out.shape
    o = attn_out.transpose(1, 2).reshape(B, S, -1)
    x = x + F.linear(o, layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias)
    mlp = layer.mlp
    h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
    gate = mlp.act_fn(F.linear(h, mlp.gate_proj.weight))
    return x + F.linear(gate * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)


class ModelRunner:
    """Talker prefill / batched decode and the per-frame code predictor of one loaded model.

    `tts` is a `qwen_tts.Qwen3TTSModel`. Weights stay upstream's tensors (nothing is copied);
    caches live on the model's device in its dtype. Slots are rows of the talker cache: the
    caller assigns them to requests and keeps each request's position (the prompt length after
    prefill, +1 per decoded frame).
    """

    def __init__(self, tts: Any, *, max_slots: int, max_len: int) -> None:
        talker = tts.model.talker
        self.talker = talker
        self.code_predictor = talker.code_predictor
        cfg = talker.config
        param = talker.codec_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.max_slots, self.max_len = max_slots, max_len
        self.vocab_size = cfg.vocab_size

        self.layers = list(talker.model.layers)
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        kv_heads = cfg.num_key_value_heads
        shape = (max_slots, kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.cos, self.sin = rope_tables(talker.model.rotary_emb, max_len, self.dtype)
        self.key_positions = torch.arange(max_len, device=self.device)

        cp = self.code_predictor
        self.cp_layers = list(cp.model.layers)
        self.cp_head_dim = self.cp_layers[0].self_attn.head_dim
        self.cp_scaling = self.cp_layers[0].self_attn.scaling
        cp_shape = (max_slots, cp.config.num_key_value_heads, CP_CACHE_LEN, self.cp_head_dim)
        self.cp_k_cache = [torch.zeros(cp_shape, device=self.device, dtype=self.dtype) for _ in self.cp_layers]
        self.cp_v_cache = [torch.zeros(cp_shape, device=self.device, dtype=self.dtype) for _ in self.cp_layers]
        self.cp_cos, self.cp_sin = rope_tables(cp.model.rotary_emb, CP_CACHE_LEN, self.dtype)

    # ---------------------------------------------------------------- talker

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Run the prompt `embeds` [L, H] at positions 0..L-1 into `slot`.

        Returns the last position's hidden state [H] (the code predictor's `past_hidden` for
        frame 0) and its codec_head logits [V] (codebook 0 of frame 0).
        """
        L = embeds.shape[0]
        if L > self.max_len:
            raise ValueError(f"prompt of {L} positions exceeds max_len {self.max_len}")
        x = embeds[None]
        cos, sin = self.cos[:L], self.sin[:L]
        for i, layer in enumerate(self.layers):
            q, k, v = _qkv(layer, x, cos, sin, self.head_dim)
            self.k_cache[i][slot, :, :L] = k[0]
            self.v_cache[i][slot, :, :L] = v[0]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            x = _finish_layer(layer, x, o)
        # The head runs over every position, as upstream's does: a one-row matmul may round
        # differently (gemv vs gemm), and this keeps prefill logits bit-identical on CPU.
        hidden = self._talker_norm(x[0])
        return hidden[-1], F.linear(hidden, self.talker.codec_head.weight)[-1]

    @torch.inference_mode()
    def decode(
        self, slots: Tensor, inputs: Tensor, positions: Tensor, *, kv_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """One talker step for B rows: `inputs` [B, H] at `positions` [B] in cache rows `slots` [B].

        Writes each row's K/V at (slot, position) and attends over that slot's positions
        0..position. `kv_len` (a static bound > every position, e.g. a CUDA-graph bucket) limits
        how much of the cache is read; default all of it. Returns hidden [B, H], logits [B, V].
        """
        kv_len = self.max_len if kv_len is None else kv_len
        x = inputs[:, None, :]
        cos = self.cos[positions][:, None, None, :]
        sin = self.sin[positions][:, None, None, :]
        mask = (self.key_positions[None, :kv_len] <= positions[:, None])[:, None, None, :]
        for i, layer in enumerate(self.layers):
            q, k, v = _qkv(layer, x, cos, sin, self.head_dim)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache[slots, :, positions] = k[:, :, 0]
            v_cache[slots, :, positions] = v[:, :, 0]
            keys, values = k_cache[slots, :, :kv_len], v_cache[slots, :, :kv_len]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            x = _finish_layer(layer, x, o)
        hidden = self._talker_norm(x[:, 0])
        return hidden, F.linear(hidden, self.talker.codec_head.weight)

    def _talker_norm(self, x: Tensor) -> Tensor:
        norm = self.talker.model.norm
        return rms_norm(x, norm.weight, norm.variance_epsilon)

    # ---------------------------------------------------------------- code predictor

    @torch.inference_mode()
    def predict_codes(self, past_hidden: Tensor, code0: Tensor, sample: SampleFn) -> tuple[Tensor, Tensor]:
        """Codebooks 1..15 of one frame for B rows, given the talker hidden that predicted `code0`.

        As upstream: prefill [past_hidden, talker embedding of code0] (through
        small_to_mtp_projection) at positions 0-1; codebook j (1..15) comes from lm_head[j-1], and
        for j >= 2 the step's input is codec_embedding[j-2] of codebook j-1 (at position j).
        `sample(j, logits)` picks codebook j.
        Returns codes [B, 15] and the next talker input [B, H]: the sum of the frame's 16 code
        embeddings (the caller adds the trailing text hidden or tts_pad).
        """
        if past_hidden.shape[0] > self.max_slots:
            raise ValueError(f"{past_hidden.shape[0]} rows exceed the code predictor cache ({self.max_slots})")
        cp = self.code_predictor
        embed0 = self.talker.get_input_embeddings()(code0)
        x = cp.small_to_mtp_projection(torch.stack((past_hidden, embed0), dim=1))
        codes = []
        for j in range(NUM_CODE_GROUPS - 1):
            if j > 0:
                x = cp.small_to_mtp_projection(cp.model.codec_embedding[j - 1](codes[-1])[:, None])
            hidden = self._cp_forward(x, start=0 if j == 0 else j + 1)
            codes.append(sample(j + 1, F.linear(hidden, cp.lm_head[j].weight)[:, -1]))
        frame = [embed0] + [cp.model.codec_embedding[j](codes[j]) for j in range(NUM_CODE_GROUPS - 1)]
        return torch.stack(codes, dim=1), torch.stack(frame, dim=1).sum(1)

    def _cp_forward(self, x: Tensor, start: int) -> Tensor:
        """Code predictor layers over `x` [B, S, h] at positions start..start+S-1 (static ints).

        Rows are batch rows, not slots: the cache holds one frame and every frame overwrites it.
        Returns the final-normed hidden states [B, S, h] (the head runs over all of them, as
        upstream's does, so prefill logits round exactly like upstream's).
        """
        B, S, _ = x.shape
        end = start + S
        cos, sin = self.cp_cos[start:end], self.cp_sin[start:end]
        for i, layer in enumerate(self.cp_layers):
            q, k, v = _qkv(layer, x, cos, sin, self.cp_head_dim)
            self.cp_k_cache[i][:B, :, start:end] = k
            self.cp_v_cache[i][:B, :, start:end] = v
            keys, values = self.cp_k_cache[i][:B, :, :end], self.cp_v_cache[i][:B, :, :end]
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=S > 1, scale=self.cp_scaling, enable_gqa=True)
            x = _finish_layer(layer, x, o)
        norm = self.code_predictor.model.norm
        return rms_norm(x, norm.weight, norm.variance_epsilon)
