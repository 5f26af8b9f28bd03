"""Talker prompts for one request, built exactly as upstream `Qwen3TTSForConditionalGeneration.generate`.

Upstream builds the prefill embeddings of a whole batch, left-pads them and hands them to HF
`generate`. The fast engine prefills every request on its own, so this module reproduces one row of
that construction: same chat templates, same processor call, same slices and the same calls into
upstream's embedding / projection modules in the same order (so the result is bit-identical to
upstream's per-row `talker_input_embed` before padding, not merely close).

Layout of a prompt (custom voice shown; `[instruct]` and `[speaker]` are optional):

    [instruct text] <|im_start|>assistant\\n  think/nothink, think_bos, [language], think_eos,
    [speaker], pad | bos  (each codec id added to tts_pad ... tts_bos), then the text part.

The text part depends on the mode: non-streaming puts the whole text (+ tts_eos) over codec pad
and ends with tts_pad + codec bos; streaming puts only the first text token over codec bos and
feeds the rest one token per generated frame ("trailing" text); ICL clone puts reference text +
target text against the reference codes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..types import Mode, SynthesisItem, VoicePrompt

ASSISTANT_TEMPLATE = "<|im_start|>assistant\n{}<|im_end|>\n<|im_start|>assistant\n"
REF_TEMPLATE = "<|im_start|>assistant\n{}<|im_end|>\n"
INSTRUCT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n"


@dataclass
class Prompt:
    """Everything the decode loop needs from a request's text and voice.

    `embeds`: the prefill's talker input embeddings [L, H]. `trailing`: text hiddens added to the
    talker input of frame t while t < T ([T, H]; just `tts_pad` in non-streaming mode), `tts_pad`
    afterwards. `ref_code`: ICL reference codes [frames, 16], to prepend before codec decode.
    """

    embeds: Tensor
    trailing: Tensor
    tts_pad: Tensor
    ref_code: Tensor | None = None


def default_non_streaming(mode: Mode) -> bool:
    """Upstream's wrapper defaults: whole text in the prompt, except for voice clone."""
    return mode is not Mode.VOICE_CLONE


def prompt_for_item(tts: Any, mode: Mode, item: SynthesisItem, non_streaming_mode: bool | None = None) -> Prompt:
    """`build_prompt` for one of the engine's `SynthesisItem`s."""
    return build_prompt(
        tts,
        mode=mode,
        text=item.text,
        language=item.language,
        speaker=item.speaker,
        instruct=item.instruct,
        voice=item.voice,
        ref_text=item.ref_text,
        x_vector_only=item.x_vector_only,
        non_streaming_mode=non_streaming_mode,
    )


@torch.inference_mode()
def build_prompt(
    tts: Any,
    *,
    mode: Mode,
    text: str,
    language: str = "auto",
    speaker: str | None = None,
    instruct: str | None = None,
    voice: VoicePrompt | None = None,
    ref_text: str | None = None,
    x_vector_only: bool = False,
    non_streaming_mode: bool | None = None,
) -> Prompt:
    """One row of upstream's prompt for `tts` (a `qwen_tts.Qwen3TTSModel`).

    Mirrors upstream's wrapper (`generate_custom_voice` / `generate_voice_design` /
    `generate_voice_clone`) and `generate`: instruct is dropped by 0.6B custom-voice checkpoints and
    ignored for clone, the speaker only counts for custom voice, and a dialect speaker
    (eric, dylan) replaces the language id when the language is chinese or auto.
    """
    model = tts.model
    if model.tts_model_type != mode.model_type:
        raise ValueError(f"a {model.tts_model_type} checkpoint cannot serve {mode.value}")
    if non_streaming_mode is None:
        non_streaming_mode = default_non_streaming(mode)
    language = (language or "auto").lower()
    if language not in {str(x).lower() for x in model.get_supported_languages()}:
        raise ValueError(f"unsupported language {language!r}")

    if mode is Mode.CUSTOM_VOICE:
        if not speaker:
            raise ValueError("custom voice needs a speaker")
        if speaker.lower() not in model.config.talker_config.spk_id:
            raise ValueError(f"unsupported speaker {speaker!r}")
        if model.tts_model_size == "0b6":
            instruct = None
    else:
        speaker = None
    if mode is Mode.VOICE_CLONE:
        instruct = None
        if voice is None:
            raise ValueError("voice clone needs a voice prompt")
        if not x_vector_only and not ref_text:
            raise ValueError("ICL voice clone needs ref_text (or x_vector_only)")

    input_id = _tokenize(tts, ASSISTANT_TEMPLATE.format(text))
    instruct_id = _tokenize(tts, INSTRUCT_TEMPLATE.format(instruct)) if instruct else None
    icl = mode is Mode.VOICE_CLONE and not x_vector_only
    ref_id = _tokenize(tts, REF_TEMPLATE.format(ref_text)) if icl else None

    talker = model.talker
    cfg = model.config
    tcfg = cfg.talker_config
    device = talker.device

    def text_hidden(ids: Tensor) -> Tensor:
        return talker.text_projection(talker.get_text_embeddings()(ids))

    def codec(ids: list[int]) -> Tensor:
        return talker.get_input_embeddings()(torch.tensor([ids], device=device, dtype=input_id.dtype))

    if mode is Mode.CUSTOM_VOICE:
        speaker_embed = talker.get_input_embeddings()(
            torch.tensor(tcfg.spk_id[speaker.lower()], device=device, dtype=input_id.dtype)
        )
    elif mode is Mode.VOICE_CLONE:
        speaker_embed = voice.speaker_embedding.to(device).to(talker.dtype)
    else:
        speaker_embed = None

    language_id = None if language == "auto" else tcfg.codec_language_id[language]
    if language in ("chinese", "auto") and speaker and tcfg.spk_is_dialect[speaker.lower()] is not False:
        language_id = tcfg.codec_language_id[tcfg.spk_is_dialect[speaker.lower()]]

    tts_bos, tts_eos, tts_pad = special_text_hiddens(tts)

    if language_id is None:
        think = codec([tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id])
    else:
        think = codec([tcfg.codec_think_id, tcfg.codec_think_bos_id, language_id, tcfg.codec_think_eos_id])
    pad_bos = codec([tcfg.codec_pad_id, tcfg.codec_bos_id])
    parts = [think, pad_bos] if speaker_embed is None else [think, speaker_embed.view(1, 1, -1), pad_bos]
    codec_prefix = torch.cat(parts, dim=1)

    role = text_hidden(input_id[:, :3])
    prefix = torch.cat((tts_pad.expand(-1, codec_prefix.shape[1] - 2, -1), tts_bos), dim=1) + codec_prefix[:, :-1]
    embeds = torch.cat((role, prefix), dim=1)

    # A stored voice's codes come from the host: copied once here, where the prompt is built (off the engine's
    # threads), and kept on the device for the codec, whose streaming decoder primes a clone's state with them.
    ref_code = voice.ref_code.to(device) if icl else None
    if icl:
        icl_embeds, trailing = _icl_part(
            model, input_id[:, 3:-5], ref_id[:, 3:-2], ref_code, tts_pad, tts_eos, non_streaming_mode
        )
        embeds = torch.cat([embeds, icl_embeds], dim=1)
    elif non_streaming_mode:
        body = input_id[:, 3:-5]
        text_part = torch.cat((text_hidden(body), tts_eos), dim=1) + codec([tcfg.codec_pad_id] * (body.shape[1] + 1))
        embeds = torch.cat([embeds, text_part, tts_pad + codec([tcfg.codec_bos_id])], dim=1)
        trailing = tts_pad
    else:
        embeds = torch.cat([embeds, text_hidden(input_id[:, 3:4]) + codec_prefix[:, -1:]], dim=1)
        trailing = torch.cat((text_hidden(input_id[:, 4:-5]), tts_eos), dim=1)

    if instruct_id is not None:
        embeds = torch.cat([text_hidden(instruct_id), embeds], dim=1)
    return Prompt(
        embeds=embeds[0],
        trailing=trailing[0],
        tts_pad=tts_pad.reshape(-1),
        ref_code=ref_code,
    )


@torch.inference_mode()
def special_text_hiddens(tts: Any) -> tuple[Tensor, Tensor, Tensor]:
    """tts_bos, tts_eos and tts_pad through the text embedding and projection, each [1, 1, H].

    Computed as one 3-token batch, as upstream does: a 1-row projection can round differently.
    """
    model = tts.model
    talker, cfg = model.talker, model.config
    ids = torch.tensor([[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=talker.device)
    bos, eos, pad = talker.text_projection(talker.get_text_embeddings()(ids)).chunk(3, dim=1)
    return bos, eos, pad


def _icl_part(
    model: Any,
    text_id: Tensor,
    ref_id: Tensor,
    ref_code: Tensor,
    tts_pad: Tensor,
    tts_eos: Tensor,
    non_streaming_mode: bool,
) -> tuple[Tensor, Tensor]:
    """Upstream's `generate_icl_prompt`: (ref text + text + tts_eos) against (codec bos + ref codes)."""
    talker = model.talker
    tcfg = model.config.talker_config
    text_embed = talker.text_projection(talker.get_text_embeddings()(torch.cat([ref_id, text_id], dim=-1)))
    text_embed = torch.cat([text_embed, tts_eos], dim=1)
    frames = [talker.get_input_embeddings()(ref_code[:, :1])]
    frames += [talker.code_predictor.get_input_embeddings()[i - 1](ref_code[:, i : i + 1]) for i in range(1, 16)]
    codec_embed = torch.cat(frames, dim=1).sum(1).unsqueeze(0)
    bos = torch.tensor([[tcfg.codec_bos_id]], device=talker.device, dtype=text_id.dtype)
    codec_embed = torch.cat([talker.get_input_embeddings()(bos), codec_embed], dim=1)
    text_lens, codec_lens = text_embed.shape[1], codec_embed.shape[1]
    if non_streaming_mode:
        pad = torch.tensor([[tcfg.codec_pad_id] * text_lens], device=talker.device, dtype=text_id.dtype)
        icl = text_embed + talker.get_input_embeddings()(pad)
        return torch.cat([icl, codec_embed + tts_pad], dim=1), tts_pad
    if text_lens > codec_lens:
        return text_embed[:, :codec_lens] + codec_embed, text_embed[:, codec_lens:]
    text_embed = torch.cat([text_embed] + [tts_pad] * (codec_lens - text_lens), dim=1)
    return text_embed + codec_embed, tts_pad


# A fast tokenizer sets its padding state on every call, and two threads doing so at once make the Rust
# side raise "Already borrowed" (a 500: prompts are built on worker threads, several at a time). Tokenizing
# takes well under a millisecond, so one lock for all models costs nothing.
_TOKENIZE_LOCK = threading.Lock()


def _tokenize(tts: Any, text: str) -> Tensor:
    """Upstream's `_tokenize_texts` for one string: [1, n] token ids on the model's device."""
    with _TOKENIZE_LOCK:
        ids = tts.processor(text=text, return_tensors="pt", padding=True)["input_ids"]
    ids = ids.to(tts.device)
    return ids.unsqueeze(0) if ids.dim() == 1 else ids
