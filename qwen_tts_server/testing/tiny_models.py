"""Tiny random Qwen3-TTS-12Hz checkpoints in the published on-disk layout, for tests.

No real weights can be downloaded where this project is tested, so every test that touches a model
uses these: ~11M random parameters each, loaded by upstream's own `Qwen3TTSModel.from_pretrained`
(the files, config keys, special ids, speaker and language tables are the published ones), fast
enough on a 2-core CPU (~0.4 s to load, ~10-30 ms a frame).

What differs from a real checkpoint, on purpose:

* Sizes: talker hidden 64, 2 layers; code predictor hidden 32, 1 layer; a tiny Mimi encoder and
  codec decoder. 0.6B and 1.7B twins have the same tiny sizes; only `tts_model_size` differs.
  As published, model weights are bf16 on disk (~22 MB, mostly the 151936-row text embedding) and
  speech-tokenizer weights fp32.
* Text tokenizer: a byte-level BPE trained here (~650 merges on a built-in corpus) padded with
  unreachable `<unusedN>` entries to the published base size 151643, so the 33 special tokens sit at
  their published ids (`<|im_start|>` 151644, `<tts_pad>` 151671, ...) and the text embedding has the
  published 151936 rows. The size also matters for behaviour: transformers 4.57.3 only applies
  upstream's `fix_mistral_regex=True` to vocabularies over 100k, so these tiny tokenizers split text
  exactly as the real processor does ("iPhone" -> "i", "Phone").
* Audio: the codec decoder is re-initialised (Kaiming) and its last conv scaled so decoded audio has
  an RMS of about 0.2, instead of the ~1e-9 a plain random init gives.
* Greedy margins: `codec_head` and the code predictor heads are scaled up so the top two logits are
  rarely within float noise of each other; a greedy fast path can then match upstream token for token.
* EOS, weights only (`frames_per_token`): random weights almost never emit EOS, so decoding would run
  to `max_new_tokens` (8192). A few talker channels are dedicated to a "clock" instead:

  - channel F is +1 on the codec embeddings of codes 1024-2047 (and codec BOS); channel K is a small
    constant on every codec frame (the 15 code-predictor embeddings) and pushes `codec_head` logits
    of codes 0-1023 far down, so generated frames always use codes 1024-2047. The tiny speech
    tokenizer's first codebook never produces those codes, so ICL reference frames are not counted;
  - channel T is set, through a dedicated text-embedding dimension and `text_projection` unit, on
    every ordinary text token (`<tts_pad>`, `<tts_text_bos>`, `<tts_text_eod>` excluded), scaled so
    that a frame that also carries text (streaming mode) nets zero;
  - two heads of talker layer 0 have zero queries, so they attend uniformly over the whole prefix;
    their value is F - T, so channel CLK holds the running balance "frames generated so far minus
    `frames_per_token` x text tokens in the prompt" divided by the length. The EOS row of `codec_head`
    reads only CLK: EOS is very unlikely while the balance is negative and near certain a few frames
    after it turns positive. No layer, embedding or speaker vector writes these channels otherwise.

  Result (greedy; sampled rows end within a few frames of it, reproducibly for a torch seed): a
  prompt that holds the whole text (custom voice and voice design, non-streaming by default) stops
  after about 1.2 x `frames_per_token` x its text tokens (3 role tokens + text + instruct); a
  streaming prompt (voice clone's default) feeds one target-text token per frame, those frames net
  zero, so it runs one frame per remaining text token plus the same rule for the text tokens inside
  the prompt (role, ICL reference text). With the default 0.5, test sentences give 3-25 frames and
  rows with different texts end at different frames; a 100-token text gives ~60 frames without
  streaming and ~100 with it. `frames_per_token=None` keeps plain random weights.
  Since two heads average over every position they may attend to, an engine that lets padding or
  stale KV-cache slots through changes these lengths: a sharp check for a fast decode path.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qwen_tts_server.engine.types import SAMPLES_PER_FRAME


class PublishedModel(NamedTuple):
    tts_model_type: str
    tts_model_size: str


PUBLISHED_MODELS: dict[str, PublishedModel] = {
    "Qwen3-TTS-12Hz-0.6B-CustomVoice": PublishedModel("custom_voice", "0b6"),
    "Qwen3-TTS-12Hz-1.7B-CustomVoice": PublishedModel("custom_voice", "1b7"),
    "Qwen3-TTS-12Hz-1.7B-VoiceDesign": PublishedModel("voice_design", "1b7"),
    "Qwen3-TTS-12Hz-0.6B-Base": PublishedModel("base", "0b6"),
    "Qwen3-TTS-12Hz-1.7B-Base": PublishedModel("base", "1b7"),
}

# Tables of the published config.json (talker_config).
CODEC_LANGUAGE_ID: dict[str, int] = {
    "chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
    "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069,
    "beijing_dialect": 2074, "sichuan_dialect": 2062,
}  # fmt: skip
SPEAKER_ID: dict[str, int] = {
    "serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
    "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878,
}  # fmt: skip
SPEAKER_DIALECT: dict[str, str | bool] = {
    name: {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}.get(name, False) for name in SPEAKER_ID
}
CODEC_VOCAB_SIZE = 3072
CODEC_PAD_ID = 2148
CODEC_BOS_ID = 2149
CODEC_EOS_ID = 2150
CODEC_THINK_ID = 2154
CODEC_NOTHINK_ID = 2155
CODEC_THINK_BOS_ID = 2156
CODEC_THINK_EOS_ID = 2157
NUM_CODE_GROUPS = 16
SAMPLE_RATE = 24000

# The Qwen3-TTS text tokenizer's added tokens, in id order from TEXT_BASE_VOCAB_SIZE.
TEXT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
)  # fmt: skip
_NOT_SPECIAL = frozenset(TEXT_SPECIAL_TOKENS[14:26])  # tool/fim/think tokens: added, but not "special"
TEXT_BASE_VOCAB_SIZE = 151643
TEXT_VOCAB_SIZE = 151936
TEXT_TOKEN_ID: dict[str, int] = {t: TEXT_BASE_VOCAB_SIZE + i for i, t in enumerate(TEXT_SPECIAL_TOKENS)}
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

GENERATION_CONFIG: dict[str, Any] = {
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 50,
    "subtalker_dosample": True,
    "subtalker_temperature": 0.9,
    "subtalker_top_p": 1.0,
    "subtalker_top_k": 50,
    "max_new_tokens": 8192,
}
DEFAULT_FRAMES_PER_TOKEN = 0.5

# Training text for the tiny BPE: the prompt template's words, common words, and every language
# upstream supports, so typical test sentences take about one token a word.
_CORPUS = """\
assistant user system assistant user
Hello world, this is a tiny test model. Hello there! Hi. Good morning, good evening, good night.
The quick brown fox jumps over the lazy dog. iPhone, YouTube, OpenAI, Qwen, GitHub, PyTorch.
One two three four five six seven eight nine ten eleven twelve twenty thirty hundred thousand.
It was a bright cold day in April, and the clocks were striking thirteen. I think you are right.
We will speak slowly and calmly, with a warm, deep, happy, sad, angry, excited or whispering voice.
Please read this sentence aloud: the weather today is sunny, and tomorrow it may rain again.
What time is it? Where are you going? How much does it cost? Thank you very much, see you soon.
A young woman with a clear, bright voice; an old man who speaks in a low and gentle tone.
This is a reference recording for voice cloning. Testing, testing, one, two, three.
0 1 2 3 4 5 6 7 8 9 10 42 100 2024 2025 3.14 50% $5 #1 @home e-mail.
你好，世界。今天天气很好。我们一起去公园散步吧。谢谢你！
こんにちは、世界。今日はいい天気ですね。ありがとうございます。
안녕하세요, 세계. 오늘 날씨가 좋네요. 감사합니다.
Hallo Welt. Guten Morgen, wie geht es dir? Danke schön.
Bonjour le monde. Comment allez-vous ? Merci beaucoup.
Hola mundo. ¿Cómo estás? Muchas gracias.
Ciao mondo. Come stai? Grazie mille.
Olá mundo. Como você está? Muito obrigado.
Привет, мир. Как дела? Большое спасибо.
"""


class _Channels(NamedTuple):
    frame: int  # F: +1 on generated frames (codes 1024-2047 and codec BOS)
    text: int  # T: set on ordinary text tokens
    const: int  # K: small constant on every codec frame; keeps generated codes in 1024-2047
    clock: int  # CLK: layer-0 uniform-attention average of F - T; the only input of the EOS logit


# Clock constants (tiny hyper-parameters above; see the module docstring).
_FRAME_LEVEL = 1.0
_CONST_LEVEL = 0.25
_CLOCK_SCALE = 0.05
_EOS_GAIN = 40.0
_LOW_CODE_PENALTY = 8.0
_TEXT_UNIT_INPUT = 4.0
_LOGIT_SCALE = 4.0
_AUDIO_RMS = 0.2


def _train_tokenizer_files() -> dict[str, bytes]:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    for i in range(len(vocab), TEXT_BASE_VOCAB_SIZE):
        vocab[f"<unused{i}>"] = i
    added = {
        str(TEXT_TOKEN_ID[t]): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t not in _NOT_SPECIAL,
        }
        for t in TEXT_SPECIAL_TOKENS
    }  # fmt: skip
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in TEXT_SPECIAL_TOKENS[1:] if t not in _NOT_SPECIAL],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
        "tokenizer_config.json": (json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n").encode(),
    }


@functools.cache
def tokenizer_files() -> dict[str, bytes]:
    """vocab.json, merges.txt and tokenizer_config.json of the tiny text tokenizer (trained once per
    process, deterministic, shared by every checkpoint)."""
    return _train_tokenizer_files()


def _talker_config(kind: PublishedModel) -> dict[str, Any]:
    custom = kind.tts_model_type == "custom_voice"
    return {
        "vocab_size": CODEC_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": {"interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default", "type": "default"},
        "attention_bias": False,
        "use_cache": True,
        "num_code_groups": NUM_CODE_GROUPS,
        "text_vocab_size": TEXT_VOCAB_SIZE,
        "text_hidden_size": 48,
        "position_id_per_seconds": 13,
        "codec_pad_id": CODEC_PAD_ID,
        "codec_bos_id": CODEC_BOS_ID,
        "codec_eos_token_id": CODEC_EOS_ID,
        "codec_think_id": CODEC_THINK_ID,
        "codec_nothink_id": CODEC_NOTHINK_ID,
        "codec_think_bos_id": CODEC_THINK_BOS_ID,
        "codec_think_eos_id": CODEC_THINK_EOS_ID,
        "codec_language_id": dict(CODEC_LANGUAGE_ID),
        # Must be dicts even when empty: upstream calls .keys() / indexes them unconditionally.
        "spk_id": dict(SPEAKER_ID) if custom else {},
        "spk_is_dialect": dict(SPEAKER_DIALECT) if custom else {},
        "code_predictor_config": {
            "vocab_size": 2048,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000,
            "rope_scaling": None,
            "num_code_groups": NUM_CODE_GROUPS,
            "use_cache": True,
        },
    }


def model_config(name: str) -> dict[str, Any]:
    """The config.json written for `name`."""
    kind = PUBLISHED_MODELS[name]
    vocab = json.loads(tokenizer_files()["vocab.json"])
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_type": kind.tts_model_type,
        # Must be set: upstream tests `tts_model_size in "0b6"` to drop instruct on 0.6B models.
        "tts_model_size": kind.tts_model_size,
        "assistant_token_id": vocab["assistant"],
        "im_start_token_id": TEXT_TOKEN_ID["<|im_start|>"],
        "im_end_token_id": TEXT_TOKEN_ID["<|im_end|>"],
        "tts_pad_token_id": TEXT_TOKEN_ID["<tts_pad>"],
        "tts_bos_token_id": TEXT_TOKEN_ID["<tts_text_bos>"],
        "tts_eos_token_id": TEXT_TOKEN_ID["<tts_text_eod>"],
        # No model_type here: Qwen3TTSSpeakerEncoderConfig takes no extra kwargs and would not reload.
        "speaker_encoder_config": {
            "mel_dim": 128,
            "enc_dim": 64,  # must equal the talker hidden size: the x-vector goes into the prompt
            "enc_channels": [32, 32, 32, 32, 96],
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 16,
            "enc_res2net_scale": 4,
            "enc_se_channels": 16,
            "sample_rate": SAMPLE_RATE,
        },
        "talker_config": _talker_config(kind),
        "torch_dtype": "bfloat16",
        # transformers 4.57.3 swaps in the fixed pre-tokenizer regex (fix_mistral_regex=True) only
        # for configs claiming this version (or none): the real checkpoints say 4.57.3.
        "transformers_version": "4.57.3",
    }


def speech_tokenizer_config() -> dict[str, Any]:
    """speech_tokenizer/config.json: the published keys at tiny sizes (12.5 Hz, 16 codebooks of 2048)."""
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_valid_num_quantizers": NUM_CODE_GROUPS,
        "input_sample_rate": SAMPLE_RATE,
        "output_sample_rate": SAMPLE_RATE,
        "decode_upsample_rate": SAMPLES_PER_FRAME,
        "encode_downsample_rate": SAMPLES_PER_FRAME,
        "encoder_config": {
            "_frame_rate": 12.5,
            "sampling_rate": SAMPLE_RATE,
            "audio_channels": 1,
            "hidden_size": 32,
            "num_filters": 4,
            "num_residual_layers": 1,
            "upsampling_ratios": [8, 6, 5, 4],
            "kernel_size": 7,
            "last_kernel_size": 3,
            "residual_kernel_size": 3,
            "dilation_growth_rate": 2,
            "use_causal_conv": True,
            "pad_mode": "constant",
            "compress": 2,
            "codebook_size": 2048,
            "codebook_dim": 16,
            "vector_quantization_hidden_dimension": 16,
            "num_quantizers": NUM_CODE_GROUPS,
            "num_semantic_quantizers": 1,
            "upsample_groups": 32,
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "hidden_act": "gelu",
            "max_position_embeddings": 8000,
            "sliding_window": 250,
            "use_cache": False,
            "use_streaming": False,
            "rope_theta": 10000.0,
            "norm_eps": 1e-5,
            "layer_scale_initial_scale": 0.01,
        },
        "decoder_config": {
            "codebook_size": 2048,
            "codebook_dim": 16,
            "semantic_codebook_size": 4096,
            "vector_quantization_hidden_dimension": 16,
            "num_quantizers": NUM_CODE_GROUPS,
            "num_semantic_quantizers": 1,
            "latent_dim": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "hidden_act": "silu",
            "attention_bias": False,
            "sliding_window": 72,
            "max_position_embeddings": 8000,
            "rope_theta": 10000,
            "rms_norm_eps": 1e-5,
            "layer_scale_initial_scale": 0.01,
            "decoder_dim": 32,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
            "attention_dropout": 0.0,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.57.3",
    }


SPEECH_TOKENIZER_PREPROCESSOR = {
    "chunk_length_s": None,
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "overlap": None,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": SAMPLE_RATE,
}
PREPROCESSOR = {"processor_class": "Qwen3TTSProcessor", "padding_side": "left"}
SPEECH_TOKENIZER_CONFIGURATION = {"framework": "pytorch", "task": "feature-extraction"}


@torch.no_grad()
def _widen_logits(model: torch.nn.Module) -> None:
    """Scale the codebook heads so greedy argmaxes have margins far above float noise."""
    talker = model.talker
    talker.codec_head.weight[:2048] *= _LOGIT_SCALE
    for head in talker.code_predictor.lm_head:
        head.weight *= _LOGIT_SCALE


@torch.no_grad()
def _install_eos_clock(model: torch.nn.Module, frames_per_token: float) -> None:
    """Make EOS follow "frames so far vs. text tokens in the prompt"; see the module docstring."""
    if frames_per_token <= 0:
        raise ValueError(f"frames_per_token must be positive, got {frames_per_token}")
    talker = model.talker
    hidden = talker.config.hidden_size
    ch = _Channels(frame=hidden - 1, text=hidden - 2, const=hidden - 3, clock=hidden - 4)
    own = list(ch)
    eos = talker.config.codec_eos_token_id
    bos = talker.config.codec_bos_id

    # Nothing but the pieces below may write the four channels.
    codec_emb = talker.model.codec_embedding.weight
    codec_emb[:, own] = 0
    codec_emb[1024:2048, ch.frame] = _FRAME_LEVEL
    codec_emb[bos, ch.frame] = _FRAME_LEVEL
    codec_emb[bos, ch.const] = _CONST_LEVEL
    for emb in talker.code_predictor.model.codec_embedding:
        emb.weight[:, own] = 0
        emb.weight[:, ch.const] = _CONST_LEVEL / (NUM_CODE_GROUPS - 1)
    if model.speaker_encoder is not None:
        model.speaker_encoder.fc.weight[own] = 0
        model.speaker_encoder.fc.bias[own] = 0
    for layer in talker.model.layers:
        layer.self_attn.o_proj.weight[own] = 0
        layer.mlp.down_proj.weight[own] = 0

    # Text flag: one text-embedding dim -> one text_projection unit -> channel T.
    text_emb = talker.model.text_embedding.weight
    flag = text_emb.shape[1] - 1
    text_emb[:, flag] = 1.0
    for token in ("<tts_pad>", "<tts_text_bos>", "<tts_text_eod>"):
        text_emb[TEXT_TOKEN_ID[token], flag] = 0.0
    fc1, fc2 = talker.text_projection.linear_fc1, talker.text_projection.linear_fc2
    unit = fc1.weight.shape[0] - 1
    fc1.weight[:, flag] = 0
    fc1.weight[unit] = 0
    fc1.weight[unit, flag] = _TEXT_UNIT_INPUT
    fc1.bias[unit] = 0
    fc2.weight[:, unit] = 0
    fc2.weight[own] = 0
    fc2.bias[own] = 0
    # T = FRAME_LEVEL / frames_per_token, read back with weight frames_per_token: a streaming frame
    # carrying text nets exactly zero; a text-only position outweighs ~1.2 x frames_per_token frames.
    text_level = _FRAME_LEVEL / frames_per_token
    fc2.weight[ch.text, unit] = text_level / torch.nn.functional.silu(torch.tensor(_TEXT_UNIT_INPUT))

    # Layer 0, heads 0-1 (KV head 0): zero queries -> uniform attention; value dim 0 = F - T.
    attn = talker.model.layers[0].self_attn
    head_dim = talker.config.head_dim
    attn.q_proj.weight[: 2 * head_dim] = 0
    attn.v_proj.weight[0] = 0
    attn.v_proj.weight[0, ch.frame] = 1.0
    attn.v_proj.weight[0, ch.text] = -frames_per_token
    attn.o_proj.weight[ch.clock, 0] = _CLOCK_SCALE

    head = talker.codec_head.weight
    head[:, own] = 0
    head[:1024, ch.const] = -_LOW_CODE_PENALTY
    head[eos] = 0
    head[eos, ch.clock] = _EOS_GAIN


@torch.no_grad()
def _shape_speech_tokenizer(st: torch.nn.Module, *, keep_icl_codes_low: bool) -> None:
    """Random codebooks (zeros by default: every code would sound the same), audible decoder output,
    and, for the EOS clock, a first encoder codebook that only yields codes 0-1023."""
    for name, tensor in list(st.named_buffers()) + list(st.named_parameters()):
        if name.endswith(("embed_sum", "embedding_sum")):
            tensor.normal_()
    if keep_icl_codes_low:
        codebook = st.encoder.quantizer.semantic_residual_vector_quantizer.layers[0].codebook
        codebook.embed_sum[1024:] = 1e3
        codebook._embed = None
    decoder = st.decoder
    for module in decoder.modules():
        if isinstance(module, torch.nn.Conv1d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
        elif isinstance(module, torch.nn.ConvTranspose1d):
            fan_in = module.weight.shape[0] * module.weight.shape[2] / module.stride[0]
            torch.nn.init.normal_(module.weight, std=fan_in**-0.5)
        else:
            continue
        if module.bias is not None:
            module.bias.zero_()
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2048, (1, NUM_CODE_GROUPS, 12), generator=gen)
    last = decoder.decoder[-1].conv
    probe: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, _i, out: probe.append(out))
    try:
        decoder(codes)
    finally:
        handle.remove()
    last.weight *= _AUDIO_RMS / float(probe[0].pow(2).mean().sqrt())


def _safetensors_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> bytes:
    from safetensors.torch import save

    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
        for k, v in module.state_dict().items()
    }
    return save(state, metadata={"format": "pt"})


@functools.cache
def _speech_tokenizer_weights(seed: int, keep_icl_codes_low: bool) -> bytes:
    """The same for all five checkpoints of one build, so made once per process."""
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        st = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**speech_tokenizer_config()))
        _shape_speech_tokenizer(st, keep_icl_codes_low=keep_icl_codes_low)
    return _safetensors_bytes(st)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_checkpoint(
    out_dir: Path,
    name: str,
    *,
    seed: int = 0,
    frames_per_token: float | None = DEFAULT_FRAMES_PER_TOKEN,
) -> Path:
    """Write `<out_dir>/<name>/` (a published model name) and return it.

    Deterministic for a given seed and library versions; the caller's torch RNG is left untouched.
    The directory is assembled beside the target and renamed into place, so a server scanning
    `out_dir` never sees half a checkpoint. `frames_per_token` tunes the weights-only EOS (module
    docstring); None keeps plain random weights, which practically never stop.
    """
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    if name not in PUBLISHED_MODELS:
        raise ValueError(f"unknown model {name!r}; published: {sorted(PUBLISHED_MODELS)}")
    out_dir = Path(out_dir)
    config = model_config(name)
    st_config = speech_tokenizer_config()
    target = out_dir / name
    work = out_dir / f".{name}.building-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    (work / "speech_tokenizer").mkdir(parents=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**config))
            _widen_logits(model)
            if frames_per_token is not None:
                _install_eos_clock(model, frames_per_token)
            # bf16 on disk like the published talker checkpoints (half the size); load in any dtype.
            (work / "model.safetensors").write_bytes(_safetensors_bytes(model, torch.bfloat16))
        del model
        st_weights = _speech_tokenizer_weights(seed + 1, frames_per_token is not None)
        (work / "speech_tokenizer" / "model.safetensors").write_bytes(st_weights)
        _write_json(work / "config.json", config)
        _write_json(work / "generation_config.json", GENERATION_CONFIG)
        _write_json(work / "preprocessor_config.json", PREPROCESSOR)
        for file_name, data in tokenizer_files().items():
            (work / file_name).write_bytes(data)
        _write_json(work / "speech_tokenizer" / "config.json", st_config)
        _write_json(work / "speech_tokenizer" / "configuration.json", SPEECH_TOKENIZER_CONFIGURATION)
        _write_json(work / "speech_tokenizer" / "preprocessor_config.json", SPEECH_TOKENIZER_PREPROCESSOR)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target


def build_all(
    models_dir: Path,
    names: Iterable[str] = tuple(PUBLISHED_MODELS),
    *,
    seed: int = 0,
    frames_per_token: float | None = DEFAULT_FRAMES_PER_TOKEN,
) -> list[Path]:
    """Build every named checkpoint under `models_dir` (all five published ones by default)."""
    return [build_tiny_checkpoint(models_dir, n, seed=seed, frames_per_token=frames_per_token) for n in names]
