"""Greedy decoding through our prompt + ModelRunner + Sampler equals upstream `generate`, token for token.

Upstream runs through its own wrapper (`generate_custom_voice` etc., batch of one); spies on
`model.generate` / `talker.generate` and a hook on `codec_head` capture its codes, its prefill
embeddings and its talker logits. With the cache read at exactly the live length our logits are
bit-identical to upstream's on CPU; reading the whole static cache under a mask changes the
attention's rounding (~1e-6 here) but not a single code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

from qwen_tts_server.engine.fast.model_runner import ModelRunner, rope_tables
from qwen_tts_server.engine.fast.prompt import build_prompt, prompt_for_item
from qwen_tts_server.engine.fast.sampler import Sampler
from qwen_tts_server.engine.types import Mode, SynthesisItem, VoicePrompt

from .helpers import Row, greedy, run_rows, run_upstream

MAX_NEW_TOKENS = 24
GREEDY = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=MAX_NEW_TOKENS)
TEXT = "Hello there, how are you today?"
REF_TEXT = "This is the reference."
# Longer than the reference codes (with REF_TEXT), so streaming ICL leaves trailing text to feed.
LONG_TEXT = "Clone this voice, please: it is a rather nice one, and this sentence goes on for a while."


@dataclass
class Case:
    model: str
    mode: Mode
    args: dict[str, Any]  # build_prompt kwargs; voice is filled in from the fixture
    upstream: Callable[[Any, VoicePrompt], Any]  # (tts, voice) -> wrapper call result


def _clone_item(voice: VoicePrompt, icl: bool) -> VoiceClonePromptItem:
    return VoiceClonePromptItem(
        ref_code=voice.ref_code if icl else None,
        ref_spk_embedding=voice.speaker_embedding,
        x_vector_only_mode=not icl,
        icl_mode=icl,
        ref_text=REF_TEXT if icl else None,
    )


CASES = {
    "custom_voice": Case(
        "Qwen3-TTS-12Hz-1.7B-CustomVoice",
        Mode.CUSTOM_VOICE,
        dict(text=TEXT, language="english", speaker="ryan"),
        lambda tts, v: tts.generate_custom_voice(text=TEXT, language="english", speaker="ryan", **GREEDY),
    ),
    "custom_voice_instruct": Case(
        "Qwen3-TTS-12Hz-1.7B-CustomVoice",
        Mode.CUSTOM_VOICE,
        dict(text=TEXT, language="english", speaker="vivian", instruct="Speak happily and fast."),
        lambda tts, v: tts.generate_custom_voice(
            text=TEXT, language="english", speaker="vivian", instruct="Speak happily and fast.", **GREEDY
        ),
    ),
    "custom_voice_dialect": Case(
        "Qwen3-TTS-12Hz-1.7B-CustomVoice",
        Mode.CUSTOM_VOICE,
        dict(text="你好，今天天气怎么样？", language="chinese", speaker="eric"),
        lambda tts, v: tts.generate_custom_voice(
            text="你好，今天天气怎么样？", language="chinese", speaker="eric", **GREEDY
        ),
    ),
    "custom_voice_streaming_text": Case(
        "Qwen3-TTS-12Hz-1.7B-CustomVoice",
        Mode.CUSTOM_VOICE,
        dict(text=TEXT, language="auto", speaker="dylan", non_streaming_mode=False),
        lambda tts, v: tts.generate_custom_voice(
            text=TEXT, language="auto", speaker="dylan", non_streaming_mode=False, **GREEDY
        ),
    ),
    "voice_design": Case(
        "Qwen3-TTS-12Hz-1.7B-VoiceDesign",
        Mode.VOICE_DESIGN,
        dict(text="A short test sentence.", language="auto", instruct="A deep, calm voice."),
        lambda tts, v: tts.generate_voice_design(
            text="A short test sentence.", language="auto", instruct="A deep, calm voice.", **GREEDY
        ),
    ),
    "clone_icl": Case(
        "Qwen3-TTS-12Hz-0.6B-Base",
        Mode.VOICE_CLONE,
        dict(text=LONG_TEXT, language="english", ref_text=REF_TEXT),
        lambda tts, v: tts.generate_voice_clone(
            text=LONG_TEXT, language="english", voice_clone_prompt=[_clone_item(v, icl=True)], **GREEDY
        ),
    ),
    "clone_icl_non_streaming": Case(
        "Qwen3-TTS-12Hz-0.6B-Base",
        Mode.VOICE_CLONE,
        dict(text=TEXT, language="english", ref_text=REF_TEXT, non_streaming_mode=True),
        lambda tts, v: tts.generate_voice_clone(
            text=TEXT,
            language="english",
            voice_clone_prompt=[_clone_item(v, icl=True)],
            non_streaming_mode=True,
            **GREEDY,
        ),
    ),
    "clone_x_vector": Case(
        "Qwen3-TTS-12Hz-0.6B-Base",
        Mode.VOICE_CLONE,
        dict(text=TEXT, language="english", x_vector_only=True),
        lambda tts, v: tts.generate_voice_clone(
            text=TEXT, language="english", voice_clone_prompt=[_clone_item(v, icl=False)], **GREEDY
        ),
    ),
}


def _run_ours(tts: Any, prompt: Any, *, exact_kv: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    runner = ModelRunner(tts, max_slots=2, max_len=128)
    talker, sub = greedy()
    row = Row(prompt=prompt, slot=1, talker=talker, sub=sub)
    (codes,) = run_rows(runner, Sampler.for_model(tts), [row], max_new_tokens=MAX_NEW_TOKENS, exact_kv=exact_kv)
    return codes, row.logits


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_codes_match_upstream(name: str, load_tts: Callable[[str], Any], voice: VoicePrompt) -> None:
    case = CASES[name]
    tts = load_tts(case.model)
    up = run_upstream(tts, lambda: case.upstream(tts, voice))
    args = dict(case.args, voice=voice) if case.mode is Mode.VOICE_CLONE else case.args
    prompt = build_prompt(tts, mode=case.mode, **args)

    if name == "clone_icl":
        assert prompt.trailing.shape[0] > 1  # the text outran the reference codes
    # The prompt is upstream's, bit for bit.
    assert torch.equal(prompt.embeds, up.embeds[0])
    assert torch.equal(prompt.trailing, up.trailing[0])
    assert torch.equal(prompt.tts_pad, up.tts_pad.reshape(-1))

    # Codes are upstream's token for token; logits agree to fp32 rounding (fused q/k/v and gate/up
    # matmuls and the grouped-query attention sum in another order than upstream's modules).
    codes, logits = _run_ours(tts, prompt, exact_kv=True)
    assert torch.equal(codes, up.codes)
    assert len(logits) == len(up.logits)
    assert max((a - b).abs().max().item() for a, b in zip(logits, up.logits, strict=True)) < 1e-4

    masked_codes, masked_logits = _run_ours(tts, prompt, exact_kv=False)
    assert torch.equal(masked_codes, up.codes)
    assert max((a - b).abs().max().item() for a, b in zip(masked_logits, up.logits, strict=True)) < 1e-4


def test_parity_cases_end_on_eos(load_tts: Callable[[str], Any]) -> None:
    """The parity cases stop on EOS (the tiny checkpoints' weights-only EOS), not at the
    max_new_tokens cut, so EOS handling and min_new_tokens are part of what is compared."""
    for name in ("custom_voice", "voice_design"):
        case = CASES[name]
        tts = load_tts(case.model)
        codes, _ = _run_ours(tts, build_prompt(tts, mode=case.mode, **case.args), exact_kv=True)
        assert 2 <= codes.shape[0] < MAX_NEW_TOKENS - 1


def test_max_new_tokens_gives_one_frame_less(load_tts: Callable[[str], Any]) -> None:
    """Upstream samples max_new_tokens codebook-0 tokens but predicts codebooks 1-15 one call late."""
    tts = load_tts("Qwen3-TTS-12Hz-1.7B-CustomVoice")
    kwargs = dict(GREEDY, max_new_tokens=5)
    up = run_upstream(tts, lambda: tts.generate_custom_voice(text=TEXT, language="english", speaker="ryan", **kwargs))
    prompt = build_prompt(tts, mode=Mode.CUSTOM_VOICE, **CASES["custom_voice"].args)
    runner = ModelRunner(tts, max_slots=1, max_len=64)
    talker, sub = greedy()
    (codes,) = run_rows(runner, Sampler.for_model(tts), [Row(prompt, 0, talker, sub)], max_new_tokens=5)
    assert up.codes.shape[0] == codes.shape[0] == 4
    assert torch.equal(codes, up.codes)


def test_prompt_rules(load_tts: Callable[[str], Any], voice: VoicePrompt) -> None:
    """0.6B custom voice drops instruct; SynthesisItem maps onto build_prompt; bad inputs are refused."""
    small = load_tts("Qwen3-TTS-12Hz-0.6B-CustomVoice")
    plain = build_prompt(small, mode=Mode.CUSTOM_VOICE, text=TEXT, speaker="ryan")
    with_instruct = build_prompt(small, mode=Mode.CUSTOM_VOICE, text=TEXT, speaker="ryan", instruct="Whisper.")
    assert torch.equal(plain.embeds, with_instruct.embeds)

    base = load_tts("Qwen3-TTS-12Hz-0.6B-Base")
    item = SynthesisItem(text=TEXT, language="english", voice=voice, ref_text=REF_TEXT)
    from_item = prompt_for_item(base, Mode.VOICE_CLONE, item)
    direct = build_prompt(base, mode=Mode.VOICE_CLONE, text=TEXT, language="english", voice=voice, ref_text=REF_TEXT)
    assert torch.equal(from_item.embeds, direct.embeds)
    assert from_item.ref_code is voice.ref_code
    assert build_prompt(base, mode=Mode.VOICE_CLONE, text=TEXT, voice=voice, x_vector_only=True).ref_code is None

    with pytest.raises(ValueError):
        build_prompt(base, mode=Mode.CUSTOM_VOICE, text=TEXT, speaker="ryan")  # wrong checkpoint kind
    with pytest.raises(ValueError):
        build_prompt(base, mode=Mode.VOICE_CLONE, text=TEXT, voice=voice)  # ICL without ref_text
    with pytest.raises(ValueError):
        build_prompt(small, mode=Mode.CUSTOM_VOICE, text=TEXT, speaker="nobody")
    with pytest.raises(ValueError):
        build_prompt(small, mode=Mode.CUSTOM_VOICE, text=TEXT, speaker="ryan", language="klingon")


@pytest.mark.parametrize("interleaved", [True, False])
def test_mrope_with_equal_positions_is_plain_rope(load_tts: Callable[[str], Any], interleaved: bool) -> None:
    """Upstream's multimodal RoPE, fed the same position on all three sections (as TTS always does),
    equals ordinary RoPE from our tables, for the interleaved layout the checkpoints use and the
    sectioned one."""
    from qwen_tts.core.models.modeling_qwen3_tts import apply_multimodal_rotary_pos_emb

    talker = load_tts("Qwen3-TTS-12Hz-1.7B-CustomVoice").model.talker
    rotary = talker.model.rotary_emb
    section = talker.config.rope_scaling["mrope_section"]
    positions = torch.tensor([0, 1, 2, 7, 31, 200, 1000])
    q, k = torch.randn(2, 1, 4, len(positions), talker.config.head_dim).unbind(0)
    cos, sin = rotary(q, positions.view(1, 1, -1).expand(3, 1, -1))
    q_up, k_up = apply_multimodal_rotary_pos_emb(q, k, cos, sin, section, interleaved)

    our_cos, our_sin = rope_tables(rotary, 1001, torch.float32)
    c, s = our_cos[positions], our_sin[positions]
    assert torch.equal(c, cos[0, 0]) and torch.equal(s, sin[0, 0])

    def rot(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s

    assert torch.equal(rot(q), q_up) and torch.equal(rot(k), k_up)
    # ...and distinct positions per section would not be plain RoPE: the check has teeth.
    skewed = torch.stack([positions, positions + 1, positions + 2]).view(3, 1, -1)
    q_skew, _ = apply_multimodal_rotary_pos_emb(q, k, *rotary(q, skewed), section, interleaved)
    assert not torch.allclose(q_skew, q_up)
