"""Bucketed prefill (fast/prefill.py): prompts padded to a token bucket compute what they compute unpadded,
write the same K/V for their own tokens, and the padding lands only after the last prompt, in its row. On
CUDA each bucket is a captured graph of this same padded computation (tests/gpu compares graph and eager)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qwen_tts_server.engine.fast.model_runner import ModelRunner
from qwen_tts_server.engine.fast.prefill import BucketedPrefill
from qwen_tts_server.engine.fast.prompt import build_prompt
from qwen_tts_server.engine.types import Mode

CUSTOM = "Qwen3-TTS-12Hz-1.7B-CustomVoice"


def prompts(tts: Any) -> list[torch.Tensor]:
    texts = [("A first request.", "ryan"), ("And a second, somewhat longer one.", "vivian")]
    return [build_prompt(tts, mode=Mode.CUSTOM_VOICE, text=t, speaker=s).embeds for t, s in texts]


def kv_rows(runner: ModelRunner, row: int, upto: int) -> torch.Tensor:
    return runner.kv[:, :, row, :, :upto].clone()


def test_padded_prefill_equals_unpadded_for_one_and_several_prompts(load_tts: Callable[[str], Any]) -> None:
    tts = load_tts(CUSTOM)
    embeds = prompts(tts)
    for slots, chosen in (([1], embeds[:1]), ([2, 0], embeds)):
        plain = ModelRunner(tts, max_slots=3, max_len=256)
        hidden, logits = plain.prefill_many(slots, chosen)
        padded = ModelRunner(tts, max_slots=3, max_len=256)
        bucketed = BucketedPrefill(padded, max_tokens=2048)
        total = sum(e.shape[0] for e in chosen)
        assert bucketed.buckets[0] == 64 and total < 64  # padded to 64 tokens
        hidden_p, logits_p = bucketed.prefill_many(slots, chosen)
        torch.testing.assert_close(hidden_p, hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_p, logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits_p.argmax(-1), logits.argmax(-1))
        for slot, e in zip(slots, chosen, strict=True):  # each prompt's own K/V, row by row
            torch.testing.assert_close(kv_rows(padded, slot, e.shape[0]), kv_rows(plain, slot, e.shape[0]))
        # The padding went after the last prompt, in its row; rows no prompt owns are untouched.
        last, length = slots[-1], chosen[-1].shape[0]
        assert padded.kv[:, :, last, :, length : length + 64 - total].abs().sum() > 0
        assert padded.kv[:, :, last, :, length + 64 - total :].abs().sum() == 0
        free = ({0, 1, 2} - set(slots)).pop()
        assert padded.kv[:, :, free].abs().sum() == 0


def test_prompts_whose_padding_would_leave_the_cache_run_unpadded(load_tts: Callable[[str], Any]) -> None:
    tts = load_tts(CUSTOM)
    (embeds,) = prompts(tts)[:1]
    runner = ModelRunner(tts, max_slots=2, max_len=embeds.shape[0] + 3)  # no room for 64 - L padding tokens
    bucketed = BucketedPrefill(runner, max_tokens=2048)
    hidden, _ = bucketed.prefill_many([0], [embeds])
    plain_hidden, _ = ModelRunner(tts, max_slots=2, max_len=embeds.shape[0] + 3).prefill_many([0], [embeds])
    assert torch.equal(hidden, plain_hidden)
    assert runner.kv[:, :, 0, :, embeds.shape[0] :].abs().sum() == 0  # nothing written past the prompt
