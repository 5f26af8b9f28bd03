"""Test helpers: a plain-Python continuous-batching loop over ModelRunner + Sampler, and upstream capture.

`run_rows` is the reference shape of the engine's hot loop: rows join at different ticks, each
keeps its own slot, position and frame counter, and every tick runs one batched talker-sample /
code-predictor / decode step over the rows still active. It syncs to the host (EOS checks) freely:
it is a test driver, not the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qwen_tts_server.engine.fast.model_runner import ModelRunner
from qwen_tts_server.engine.fast.prompt import Prompt
from qwen_tts_server.engine.fast.sampler import GENERIC_PLAN, RowSampling, Sampler, SamplingPlan
from qwen_tts_server.engine.fast.sequence import SequenceSampling

# Upstream's defaults (generation_config of the checkpoints); rows override some of them.
TALKER_DEFAULTS = SequenceSampling().talker_columns()
SUB_DEFAULTS = SequenceSampling().predictor_columns()


@dataclass
class Row:
    """One request in the loop: options as host values (like a request's). `start`: prefill tick."""

    prompt: Prompt
    slot: int
    talker: dict[str, Any]  # overrides of TALKER_DEFAULTS
    sub: dict[str, Any]  # overrides of SUB_DEFAULTS
    start: int = 0
    frames: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)  # talker logits: prefill, then one per decode
    done: bool = False


def batch_options(options: Sequence[dict[str, Any]], *, use_plan: bool = True) -> tuple[RowSampling, SamplingPlan]:
    """Per-row option dicts -> the batch's tensors and (from the same host values) its plan."""
    columns = {name: [o[name] for o in options] for name in options[0]}
    plan = SamplingPlan.of(columns["do_sample"], columns["top_k"]) if use_plan else GENERIC_PLAN
    return RowSampling.make(len(options), **columns), plan


def run_rows(
    runner: ModelRunner,
    sampler: Sampler,
    rows: Sequence[Row],
    *,
    max_new_tokens: int,
    exact_kv: bool = False,
    use_plan: bool = True,
) -> list[Tensor]:
    """Generate every row until its EOS or `max_new_tokens`; returns codes [frames, 16] per row.

    Frame counting follows upstream: HF generate samples `max_new_tokens` codebook-0 tokens, but
    the code predictor only runs for a token in the next talker call, so at most
    `max_new_tokens - 1` frames come out, and a row's EOS (never before frame `min_new_tokens`)
    ends it without a frame. `exact_kv` reads exactly positions 0..max(position) of the cache
    (bit-identical to upstream's growing cache on CPU); otherwise the whole static cache, masked.
    `use_plan` False samples through the generic path (no host facts about the options).
    """
    V = runner.vocab_size
    seen = torch.zeros(runner.max_slots, V, dtype=torch.bool, device=runner.device)
    hidden: dict[int, Tensor] = {}
    logits: dict[int, Tensor] = {}
    step = {id(r): 0 for r in rows}
    tick = 0
    while not all(r.done for r in rows):
        for r in rows:
            if r.start == tick:
                h, lg = runner.prefill(r.slot, r.prompt.embeds)
                hidden[id(r)], logits[id(r)] = h, lg
                r.logits.append(lg)
        active = [r for r in rows if r.start <= tick and not r.done]
        tick += 1
        if not active:
            continue
        slots = torch.tensor([r.slot for r in active], device=runner.device)
        steps = torch.tensor([step[id(r)] for r in active], device=runner.device)
        talker, talker_plan = batch_options([TALKER_DEFAULTS | r.talker for r in active], use_plan=use_plan)
        code0 = sampler.talker(torch.stack([logits[id(r)] for r in active]), talker, seen[slots], steps, talker_plan)
        seen[slots, code0] = True
        for r, c, s in zip(active, code0.tolist(), steps.tolist(), strict=True):
            r.done = c == sampler.eos_id or s == max_new_tokens - 1
        keep = [i for i, r in enumerate(active) if not r.done]
        if not keep:
            continue
        active = [active[i] for i in keep]
        slots, steps, code0 = slots[keep], steps[keep], code0[keep]
        sub, sub_plan = batch_options([SUB_DEFAULTS | r.sub for r in active], use_plan=use_plan)

        def sample(codebook: int, lg: Tensor, sub: RowSampling = sub, plan: SamplingPlan = sub_plan) -> Tensor:
            return sampler.code_predictor(lg, sub, steps, codebook, plan)  # noqa: B023 (called right away)

        past = torch.stack([hidden[id(r)] for r in active])
        rest, embeds = runner.predict_codes(past, code0, sample)
        text = []
        for i, r in enumerate(active):
            r.frames.append(torch.cat([code0[i : i + 1], rest[i]]))
            t, p = step[id(r)], r.prompt  # frame t's input carries trailing text t, then tts_pad
            text.append(p.trailing[t] if t < p.trailing.shape[0] else p.tts_pad)
        positions = torch.tensor([r.prompt.embeds.shape[0] + step[id(r)] for r in active], device=runner.device)
        kv_len = int(positions.max()) + 1 if exact_kv else None
        h, lg = runner.decode(embeds + torch.stack(text), positions, slots=slots, kv_len=kv_len)
        for i, r in enumerate(active):
            hidden[id(r)], logits[id(r)] = h[i], lg[i]
            r.logits.append(lg[i])
            step[id(r)] += 1
    return [torch.stack(r.frames) if r.frames else torch.zeros(0, 16, dtype=torch.long) for r in rows]


def greedy() -> tuple[dict[str, Any], dict[str, Any]]:
    """Upstream's greedy settings: do_sample=False, subtalker_dosample=False (penalty stays 1.05)."""
    return {"do_sample": False}, {"do_sample": False}


def sampled(seed: int, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upstream's default sampling for talker and code predictor, with a seed and overrides."""
    return {"seed": seed} | overrides, {"seed": seed} | {
        k: v for k, v in overrides.items() if k != "repetition_penalty"
    }


@dataclass
class UpstreamRun:
    codes: Tensor  # [frames, 16], cut at EOS as upstream returns it
    embeds: Tensor  # talker inputs_embeds [1, L, H] given to HF generate
    trailing: Tensor  # [1, T, H]
    tts_pad: Tensor
    logits: list[Tensor]  # codec_head logits of the last position, one per talker call
    seconds: float


def run_upstream(tts: Any, call: Callable[[], Any]) -> UpstreamRun:
    """Run one upstream wrapper call (batch of one) and capture its codes, prompt and logits."""
    model = tts.model
    seen: dict[str, Any] = {}
    logits: list[Tensor] = []
    generate, talker_generate = model.generate, model.talker.generate

    def spy_generate(*args: Any, **kwargs: Any) -> Any:
        seen["codes"] = (out := generate(*args, **kwargs))[0]
        return out

    def spy_talker_generate(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return talker_generate(*args, **kwargs)

    hook = model.talker.codec_head.register_forward_hook(lambda m, i, o: logits.append(o[0, -1].clone()))
    model.generate, model.talker.generate = spy_generate, spy_talker_generate
    try:
        t0 = time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
    finally:
        del model.generate, model.talker.generate
        hook.remove()
    return UpstreamRun(
        codes=seen["codes"][0],
        embeds=seen["inputs_embeds"],
        trailing=seen["trailing_text_hidden"],
        tts_pad=seen["tts_pad_embed"],
        logits=logits,
        seconds=seconds,
    )


def synthetic_voice(seconds: float = 1.5, sr: int = 24000) -> tuple[np.ndarray, int]:
    """A deterministic voiced-ish waveform: two harmonics with a slow vibrato plus a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 10 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = 0.3 * np.sin(phase) + 0.1 * np.sin(2 * phase) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return wav.astype(np.float32), sr
