"""Codec decode in padded, bucketed batches equals upstream's decode of each utterance."""

from __future__ import annotations

import numpy as np
import torch

from qwen_tts_server.engine.fast.codec import CHUNK_FRAMES, CodecDecoder, codec_batches

CUSTOM = "Qwen3-TTS-12Hz-1.7B-CustomVoice"


def test_padded_batches_decode_like_upstream_one_by_one(load_tts) -> None:
    tokenizer = load_tts(CUSTOM).model.speech_tokenizer
    generator = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 2048, (n, 16), generator=generator) for n in (7, 40, 33, 1)]
    ours = CodecDecoder(tokenizer, graphs=False, max_batch_frames=96).decode(codes)
    for c, wav in zip(codes, ours, strict=True):
        (alone,), _ = tokenizer.decode([{"audio_codes": c}])
        assert wav.dtype == np.float32 and wav.shape == (c.shape[0] * 1920,) == alone.shape
        # Causal decoder: padding changes nothing but fp32 rounding (convolutions of other lengths).
        np.testing.assert_allclose(wav, alone, atol=1e-4)


def test_long_utterances_take_upstreams_chunked_path(load_tts) -> None:
    tokenizer = load_tts(CUSTOM).model.speech_tokenizer
    codes = [torch.randint(0, 2048, (CHUNK_FRAMES + 5, 16)), torch.randint(0, 2048, (3, 16))]
    ours = CodecDecoder(tokenizer, graphs=False).decode(codes)
    wavs, _ = tokenizer.decode([{"audio_codes": c} for c in codes])
    for wav, theirs in zip(ours, wavs, strict=True):
        np.testing.assert_allclose(wav, theirs, atol=1e-5)


def test_codec_batches_group_similar_lengths_under_the_frame_cap() -> None:
    lengths = [100, 10, 95, 12, 400, 11]
    groups = codec_batches(lengths, max_frames=200)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 200
    assert [1, 5, 3] in groups and [2, 0] in groups and [4] in groups  # 400 goes alone
