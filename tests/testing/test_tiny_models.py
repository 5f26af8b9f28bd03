"""The tiny checkpoints load and run through upstream `qwen_tts` exactly as the real ones would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwen_tts_server.testing.force_eos import force_eos
from qwen_tts_server.testing.tiny_models import (
    CODEC_EOS_ID,
    CODEC_LANGUAGE_ID,
    GENERATION_CONFIG,
    PUBLISHED_MODELS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    SPEAKER_DIALECT,
    SPEAKER_ID,
    TEXT_TOKEN_ID,
    build_tiny_checkpoint,
)

qwen_tts = pytest.importorskip("qwen_tts")

CUSTOM_06 = "Qwen3-TTS-12Hz-0.6B-CustomVoice"
CUSTOM_17 = "Qwen3-TTS-12Hz-1.7B-CustomVoice"
DESIGN_17 = "Qwen3-TTS-12Hz-1.7B-VoiceDesign"
BASE_06 = "Qwen3-TTS-12Hz-0.6B-Base"
BASE_17 = "Qwen3-TTS-12Hz-1.7B-Base"
MODES = ["custom_voice", "voice_design", "clone_icl", "clone_xvector"]
# Three texts of clearly different lengths, for rows that should end at different frames.
TEXTS = ["Hi.", "Hello world, this is a test.", "The quick brown fox jumps over the lazy dog, one two three."]
REF_TEXT = "This is a reference recording."
GREEDY: dict[str, Any] = {"do_sample": False, "subtalker_dosample": False}


def ref_audio(seconds: float = 1.0) -> tuple[np.ndarray, int]:
    """A sine with a little noise: upstream takes (waveform, sample_rate) tuples."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(0).normal(0, 0.02, t.shape)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32), SAMPLE_RATE


@pytest.fixture(scope="module")
def load(tiny_models_dir: Path) -> Callable[[str], Any]:
    """Upstream's `Qwen3TTSModel.from_pretrained`, once per model for this module."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = qwen_tts.Qwen3TTSModel.from_pretrained(
                str(tiny_models_dir / name), dtype=torch.float32, device_map="cpu"
            )
        return cache[name]

    return get


def synthesize(load: Callable[[str], Any], mode: str, texts: list[str], **kwargs: Any) -> list[np.ndarray]:
    """Run one mode on the model that serves it; return the waveforms (24 kHz is asserted here)."""
    if mode == "custom_voice":
        wavs, sr = load(CUSTOM_17).generate_custom_voice(
            texts, speaker="ryan", language="english", instruct="Speak happily.", **kwargs
        )
    elif mode == "voice_design":
        wavs, sr = load(DESIGN_17).generate_voice_design(
            texts, instruct="A deep, calm voice.", language="english", **kwargs
        )
    elif mode == "clone_icl":
        wavs, sr = load(BASE_17).generate_voice_clone(
            texts, language="english", ref_audio=ref_audio(), ref_text=REF_TEXT, **kwargs
        )
    else:
        wavs, sr = load(BASE_17).generate_voice_clone(
            texts, language="english", ref_audio=ref_audio(), x_vector_only_mode=True, **kwargs
        )
    assert sr == SAMPLE_RATE
    for wav in wavs:
        assert wav.dtype == np.float32 and np.isfinite(wav).all() and np.abs(wav).max() <= 1.0
    return wavs


def frames(wavs: list[np.ndarray], mode: str) -> list[int]:
    """Whole frames; ICL output may carry one sample more (see test_icl_cut_arithmetic)."""
    spare = (0, 1) if mode == "clone_icl" else (0,)
    assert all(len(w) % SAMPLES_PER_FRAME in spare for w in wavs), [len(w) for w in wavs]
    return [len(w) // SAMPLES_PER_FRAME for w in wavs]


def test_layout_matches_the_published_repos(tiny_models_dir: Path) -> None:
    assert sorted(p.name for p in tiny_models_dir.iterdir()) == sorted(PUBLISHED_MODELS)
    for name, kind in PUBLISHED_MODELS.items():
        root = tiny_models_dir / name
        assert sorted(p.name for p in root.iterdir()) == [
            "config.json", "generation_config.json", "merges.txt", "model.safetensors",
            "preprocessor_config.json", "speech_tokenizer", "tokenizer_config.json", "vocab.json",
        ]  # fmt: skip
        assert sorted(p.name for p in (root / "speech_tokenizer").iterdir()) == [
            "config.json", "configuration.json", "model.safetensors", "preprocessor_config.json",
        ]  # fmt: skip
        config = json.loads((root / "config.json").read_text())
        assert config["model_type"] == "qwen3_tts"
        assert (config["tts_model_type"], config["tts_model_size"]) == kind
        assert "model_type" not in config["speaker_encoder_config"]
        talker = config["talker_config"]
        assert talker["codec_language_id"] == CODEC_LANGUAGE_ID
        assert talker["spk_id"] == (SPEAKER_ID if kind.tts_model_type == "custom_voice" else {})
        assert config["tts_pad_token_id"] == TEXT_TOKEN_ID["<tts_pad>"] == 151671
        assert config["im_start_token_id"] == 151644 and config["tts_eos_token_id"] == 151673
        assert json.loads((root / "generation_config.json").read_text()) == GENERATION_CONFIG


@pytest.mark.parametrize("name", list(PUBLISHED_MODELS))
def test_loads_through_upstream(load: Callable[[str], Any], name: str) -> None:
    tts = load(name)
    kind = PUBLISHED_MODELS[name]
    assert type(tts.model).__name__ == "Qwen3TTSForConditionalGeneration"
    assert (tts.model.tts_model_type, tts.model.tts_model_size) == kind
    custom = kind.tts_model_type == "custom_voice"
    assert tts.get_supported_speakers() == (sorted(SPEAKER_ID) if custom else [])
    assert tts.get_supported_languages() == sorted(["auto", *(k for k in CODEC_LANGUAGE_ID if "dialect" not in k)])
    assert tts.model.config.talker_config.spk_is_dialect == (SPEAKER_DIALECT if custom else {})
    assert (tts.model.speaker_encoder is not None) == (kind.tts_model_type == "base")
    assert tts.generate_defaults == GENERATION_CONFIG
    assert tts.model.speech_tokenizer.get_output_sample_rate() == SAMPLE_RATE
    assert tts.model.dtype == torch.float32


@pytest.mark.parametrize("text", ["Hello world.", " leading space", "trailing space ", "你好，世界。", "a\nb", "x"])
def test_prompt_template_has_3_tokens_before_and_5_after_the_text(load: Callable[[str], Any], text: str) -> None:
    """Upstream slices the prompt `[:3]` / `[3:-5]` (and the ICL ref text `[3:-2]`)."""
    tts = load(BASE_17)
    tok = tts.processor.tokenizer
    ids = tts._tokenize_texts([tts._build_assistant_text(text)])[0][0].tolist()
    text_ids = tok(text)["input_ids"]
    assert ids[3:-5] == text_ids
    assert tok.convert_ids_to_tokens(ids[:3] + ids[-5:]) == [
        "<|im_start|>", "assistant", "Ċ", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ",
    ]  # fmt: skip
    ref_ids = tts._tokenize_texts([tts._build_ref_text(text)])[0][0].tolist()
    assert ref_ids[3:-2] == text_ids


def test_processor_uses_the_fixed_regex_like_the_real_checkpoints(
    load: Callable[[str], Any], tiny_models_dir: Path
) -> None:
    """Upstream loads the processor with `fix_mistral_regex=True`; transformers 4.57.3 then swaps the
    Qwen2 pre-tokenizer regex for one that splits on case changes, because the vocabulary is over 100k
    and config.json says 4.57.3. A tokenizer loaded any other way splits text differently."""
    from transformers import AutoTokenizer

    tts = load(BASE_17)
    fixed = tts.processor.tokenizer
    assert fixed.fix_mistral_regex is True
    pre = fixed.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [piece for piece, _ in pre("iPhone")] == ["i", "Phone"]
    assert fixed.tokenize("iPhone") == ["i", "Ph", "one"]
    assert fixed("iPhone")["input_ids"] == [72, 444, 342]

    plain = AutoTokenizer.from_pretrained(tiny_models_dir / BASE_17)
    assert [piece for piece, _ in plain.backend_tokenizer.pre_tokenizer.pre_tokenize_str("iPhone")] == ["iPhone"]
    assert plain("iPhone")["input_ids"] == [483, 342]


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_tiny_checkpoint(tmp_path / "a", BASE_06, seed=3)
    again = build_tiny_checkpoint(tmp_path / "b", BASE_06, seed=3)
    other = build_tiny_checkpoint(tmp_path / "c", BASE_06, seed=4)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.joinpath("a").iterdir()) == [BASE_06]  # no leftovers


@pytest.mark.parametrize("mode", MODES)
def test_force_eos_gives_exact_lengths(load: Callable[[str], Any], mode: str) -> None:
    texts = ["a b c", "d e f", "g h i"]
    tts = load(BASE_17 if mode.startswith("clone") else CUSTOM_17 if mode == "custom_voice" else DESIGN_17)
    torch.manual_seed(0)
    with force_eos(tts, [3, 6, 9]):
        wavs = synthesize(load, mode, texts)
    # ICL: upstream decodes ref codes + new codes, then drops int(ref_len / total * samples)
    # samples. For a 1 s reference (13 codes) and 3, 6 or 9 new frames that float product is exact,
    # so the cut leaves exactly frames * 1920 samples (with 10 new frames it would leave one more).
    assert [len(w) for w in wavs] == [3 * SAMPLES_PER_FRAME, 6 * SAMPLES_PER_FRAME, 9 * SAMPLES_PER_FRAME]


def test_icl_cut_arithmetic() -> None:
    """The ICL output length is total * 1920 - int(ref / total * total * 1920): usually n * 1920,
    but float rounding can leave one sample more (13 ref codes + 10 new frames)."""

    def icl_samples(ref_len: int, new: int) -> int:
        total = ref_len + new
        return total * SAMPLES_PER_FRAME - int(ref_len / max(total, 1) * (total * SAMPLES_PER_FRAME))

    assert [icl_samples(13, n) - n * SAMPLES_PER_FRAME for n in (3, 6, 9, 10)] == [0, 0, 0, 1]


def test_icl_with_ten_frames_keeps_one_extra_sample(load: Callable[[str], Any]) -> None:
    tts = load(BASE_17)
    prompt = tts.create_voice_clone_prompt(ref_audio=ref_audio(), ref_text=REF_TEXT)
    assert prompt[0].ref_code.shape == (13, 16)
    assert int(prompt[0].ref_code[:, 0].max()) < 1024  # tiny encoder: first codebook stays low
    with force_eos(tts, [10]):
        wavs, _ = tts.generate_voice_clone("a b c", language="english", voice_clone_prompt=prompt)
    assert len(wavs[0]) == 10 * SAMPLES_PER_FRAME + 1


def test_force_eos_hook_leaves_earlier_rows_alone(load: Callable[[str], Any]) -> None:
    tts = load(CUSTOM_06)
    head = tts.model.talker.codec_head
    hidden = torch.randn(2, 4, head.in_features, generator=torch.Generator().manual_seed(0))
    plain_prefill = head(hidden)
    with force_eos(tts, [1, 0], block_early_eos=False) as state:
        prefill, step = head(hidden), head(hidden[:, -1:])
        assert state.calls == 2
    assert torch.equal(prefill[0], plain_prefill[0])  # row 0 is due at call 1: untouched at call 0
    assert prefill[1, -1, CODEC_EOS_ID] == 1e4 and prefill[1, -1].topk(2).values[1] == -1e4
    assert torch.equal(prefill[1, :-1], plain_prefill[1, :-1])
    assert step[0, -1, CODEC_EOS_ID] == 1e4 and step[1, -1, CODEC_EOS_ID] == 1e4
    with force_eos(tts, [1, 5]):  # default: only EOS is masked until the step
        prefill = head(hidden)
    masked = plain_prefill.clone()
    masked[:, -1, CODEC_EOS_ID] = -1e4
    assert torch.equal(prefill, masked)
    assert torch.equal(head(hidden), plain_prefill)  # the hook is gone
    with force_eos(tts, [1, 2, 3]), pytest.raises(ValueError, match="batch of 2"):
        head(hidden)


@pytest.mark.parametrize("mode", MODES)
def test_weights_alone_stop_rows_at_different_frames(load: Callable[[str], Any], mode: str) -> None:
    torch.manual_seed(0)
    greedy = frames(synthesize(load, mode, TEXTS, **GREEDY), mode)
    torch.manual_seed(1)
    sampled = frames(synthesize(load, mode, TEXTS), mode)
    for lengths in (greedy, sampled):
        assert all(2 <= n < 60 for n in lengths), lengths
        assert lengths[0] < lengths[1] < lengths[2], lengths  # longer text, longer audio
    # Sampling stops a little later than greedy as a rule (EOS must outweigh ~50 candidates).
    assert all(-2 <= s - g <= 6 for g, s in zip(greedy, sampled, strict=True)), (greedy, sampled)


def test_weights_alone_are_reproducible(load: Callable[[str], Any]) -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(synthesize(load, "voice_design", TEXTS[:2]))
    assert [len(w) for w in runs[0]] == [len(w) for w in runs[1]]
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    rms = [float(np.sqrt(np.mean(w**2))) for w in runs[0]]
    assert all(0.02 < r < 0.5 for r in rms), rms  # audible, not clipped


def test_small_model_ignores_instruct_and_is_still_short(load: Callable[[str], Any]) -> None:
    """0.6B drops `instruct` (upstream tests tts_model_size in "0b6"), so its prompt is shorter."""
    tts06, tts17 = load(CUSTOM_06), load(CUSTOM_17)
    kwargs: dict[str, Any] = {"speaker": "vivian", "language": "chinese", "instruct": "Speak very slowly.", **GREEDY}
    (w06,), _ = tts06.generate_custom_voice("你好，世界。", **kwargs)
    (w17,), _ = tts17.generate_custom_voice("你好，世界。", **kwargs)
    assert 2 <= len(w06) // SAMPLES_PER_FRAME < len(w17) // SAMPLES_PER_FRAME < 40


def test_bfloat16_still_stops(tiny_models_dir: Path) -> None:
    tts = qwen_tts.Qwen3TTSModel.from_pretrained(
        str(tiny_models_dir / CUSTOM_06), dtype=torch.bfloat16, device_map="cpu"
    )
    torch.manual_seed(0)
    wavs, sr = tts.generate_custom_voice(TEXTS, speaker="dylan", language="auto")
    assert sr == SAMPLE_RATE
    assert all(2 <= len(w) // SAMPLES_PER_FRAME < 60 for w in wavs), [len(w) for w in wavs]


def test_max_new_tokens_without_eos_gives_one_frame_less(load: Callable[[str], Any]) -> None:
    """Upstream samples codebook 0 of a frame on one talker call and its other 15 codebooks on the
    next; the last token sampled under `max_new_tokens` never gets them, so N tokens make N-1 frames
    (an engine wanting at most N frames passes N + 1)."""
    tts = load(CUSTOM_17)
    with force_eos(tts, [50, 50]):
        wavs, _ = tts.generate_custom_voice(["Long.", "Longer text."], speaker="ryan", max_new_tokens=5)
    assert [len(w) for w in wavs] == [4 * SAMPLES_PER_FRAME] * 2
