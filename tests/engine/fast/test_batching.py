"""Rows sharing `decode` / `predict_codes` calls (different slots, positions and join times) decode
exactly as each row alone.

The tiny checkpoints' EOS "clock" heads attend uniformly over every position a row may see, so any
leak of another slot's KV, of stale KV from a previous user of the slot, or of a wrong position
would shift where rows stop, besides changing codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from qwen_tts_server.engine.fast.model_runner import ModelRunner
from qwen_tts_server.engine.fast.prompt import Prompt, build_prompt
from qwen_tts_server.engine.fast.sampler import Sampler
from qwen_tts_server.engine.types import Mode, VoicePrompt

from .helpers import Row, greedy, run_rows

MAX_NEW_TOKENS = 30


def _prompts(name: str, tts: Any, voice: VoicePrompt) -> list[Prompt]:
    if name == "custom_voice":
        return [
            build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="Good morning to you all.", speaker="ryan"),
            build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="Hi.", speaker="vivian", instruct="Very slowly."),
            build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="你好，世界", language="chinese", speaker="dylan"),
        ]
    ref = "A reference line."
    return [
        build_prompt(
            tts, mode=Mode.VOICE_CLONE, text="Streaming text, fed one token per frame.", voice=voice, ref_text=ref
        ),
        build_prompt(tts, mode=Mode.VOICE_CLONE, text="Only the x-vector.", voice=voice, x_vector_only=True),
        build_prompt(tts, mode=Mode.VOICE_CLONE, text="Short.", voice=voice, ref_text=ref, non_streaming_mode=True),
    ]


MODELS = {"custom_voice": "Qwen3-TTS-12Hz-1.7B-CustomVoice", "voice_clone": "Qwen3-TTS-12Hz-0.6B-Base"}


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_rows_equal_solo_rows(name: str, load_tts: Callable[[str], Any], voice: VoicePrompt) -> None:
    tts = load_tts(MODELS[name])
    sampler = Sampler.for_model(tts)
    prompts = _prompts(name, tts, voice)
    assert len({p.embeds.shape[0] for p in prompts}) == 3  # three different positions at every step

    solo_rows = []
    for prompt in prompts:
        row = Row(prompt, slot=0, talker=greedy()[0], sub=greedy()[1])
        run_rows(
            ModelRunner(tts, max_slots=1, max_len=96), sampler, [row], max_new_tokens=MAX_NEW_TOKENS, exact_kv=True
        )
        solo_rows.append(row)

    # One runner for everything: rows join at ticks 0, 2 and 5 in slots 3, 0, 2 (slot 1 unused).
    runner = ModelRunner(tts, max_slots=4, max_len=96)
    rows = [Row(p, slot, *greedy(), start=start) for p, slot, start in zip(prompts, (3, 0, 2), (0, 2, 5), strict=True)]
    run_rows(runner, sampler, rows, max_new_tokens=MAX_NEW_TOKENS)
    lengths = [len(r.frames) for r in rows]
    assert len(set(lengths)) > 1, lengths  # rows leave the batch at different times
    worst = 0.0
    for solo, row in zip(solo_rows, rows, strict=True):
        assert torch.equal(torch.stack(row.frames), torch.stack(solo.frames))
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(row.logits, solo.logits, strict=True)))
    assert worst < 1e-4  # observed ~1e-6: batched matmuls and the masked full-cache read round differently

    # Reusing the slots (stale KV beyond each new prompt) changes nothing either.
    again = [Row(p, slot, *greedy(), start=start) for p, slot, start in zip(prompts, (0, 2, 3), (1, 0, 0), strict=True)]
    run_rows(runner, sampler, again, max_new_tokens=MAX_NEW_TOKENS)
    for solo, row in zip(solo_rows, again, strict=True):
        assert torch.equal(torch.stack(row.frames), torch.stack(solo.frames))


def test_decode_with_padding_rows(load_tts: Callable[[str], Any]) -> None:
    """A fixed-size batch padded with a dummy slot (as a CUDA graph would be) leaves real rows alone."""
    tts = load_tts("Qwen3-TTS-12Hz-1.7B-CustomVoice")
    runner = ModelRunner(tts, max_slots=3, max_len=64)
    prompt = build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="Padding check.", speaker="aiden")
    hidden, _ = runner.prefill(1, prompt.embeds)
    L = prompt.embeds.shape[0]
    x = hidden[None] * 0.5
    solo_h, solo_logits = runner.decode(x, torch.tensor([L]), slots=torch.tensor([1]))
    dummy = 2  # rows 1 and 2 of the padded batch both write the dummy slot
    padded_h, padded_logits = runner.decode(
        torch.cat([x, torch.randn(2, x.shape[1])]), torch.tensor([L, 0, 0]), slots=torch.tensor([1, dummy, dummy])
    )
    assert (padded_logits[0] - solo_logits[0]).abs().max().item() < 1e-5
    assert padded_logits[0].argmax() == solo_logits[0].argmax()
