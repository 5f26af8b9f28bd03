"""The reference runner: synthesis through upstream `qwen-tts` generate, one padded batch at a time.

It is the correctness oracle for the fast engine and a selectable fallback (QTTS_ENGINE=reference). A batch runs
every row until the longest ends; upstream cuts each row at its own first EOS, so every item
still gets its exact length. Everything here is blocking and runs on the engine's GPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registry import LoadedModel
from .types import SAMPLES_PER_FRAME, FinishReason, Mode, SamplingParams, SynthesisItem, SynthesisResult, last_frames


@dataclass(frozen=True)
class ReferenceRunner:
    def run(
        self, model: LoadedModel, mode: Mode, items: list[SynthesisItem], sampling: SamplingParams
    ) -> list[SynthesisResult]:
        import torch

        tts = model.tts
        kwargs = sampling.generate_kwargs()
        if sampling.max_new_tokens is not None:
            # Upstream completes frame N's residual codebooks on talker call N+1, so a row that never
            # emits EOS returns max_new_tokens - 1 frames; ask for one more to allow N whole frames.
            kwargs["max_new_tokens"] = sampling.max_new_tokens + 1
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        texts = [it.text for it in items]
        languages = [it.language for it in items]
        if mode is Mode.CUSTOM_VOICE:
            wavs, sample_rate = tts.generate_custom_voice(
                text=texts,
                speaker=[it.speaker for it in items],
                language=languages,
                instruct=[it.instruct or "" for it in items],
                **kwargs,
            )
        elif mode is Mode.VOICE_DESIGN:
            wavs, sample_rate = tts.generate_voice_design(
                text=texts, instruct=[it.instruct or "" for it in items], language=languages, **kwargs
            )
        else:
            wavs, sample_rate = tts.generate_voice_clone(
                text=texts, language=languages, voice_clone_prompt=[_prompt_item(it) for it in items], **kwargs
            )
        results = []
        for wav in wavs:
            samples = np.asarray(wav, dtype=np.float32).reshape(-1)
            frames = int(round(len(samples) / SAMPLES_PER_FRAME))
            samples = last_frames(samples, frames)
            cut = sampling.max_new_tokens is not None and frames >= sampling.max_new_tokens
            reason = FinishReason.LENGTH if cut else FinishReason.EOS
            results.append(SynthesisResult(samples, int(sample_rate), frames, finish_reason=reason))
        return results


def _prompt_item(item: SynthesisItem):  # -> qwen_tts VoiceClonePromptItem
    from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

    assert item.voice is not None, "voice clone items carry a resolved voice prompt"
    return VoiceClonePromptItem(
        ref_code=None if item.x_vector_only else item.voice.ref_code,
        ref_spk_embedding=item.voice.speaker_embedding,
        x_vector_only_mode=item.x_vector_only,
        icl_mode=not item.x_vector_only,
        ref_text=None if item.x_vector_only else item.ref_text,
    )
