"""Request and response bodies of the synthesis endpoints.

Every per-item field takes a value or a list: a list makes the request a batch, scalars are
broadcast to every item, and all lists must have the same length. `expand_items` turns a request
into per-item values and reports the first problem with the field (and index) to fix.
"""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..audio.codec_io import AudioFormat
from ..config import Settings
from ..engine.languages import KNOWN_LANGUAGES, LANGUAGE_ALIASES, normalize_language
from ..engine.types import FRAME_RATE_HZ, SamplingParams
from ..errors import InvalidRequest
from .validation import ReferenceText, RepetitionPenalty, Seed, SpeechText, Temperature, TopK, TopP

OptionalText = SpeechText | None


class SamplingFields(BaseModel):
    """Decoding options and bounds, the same on every synthesis route (native and OpenAI)."""

    do_sample: bool | None = Field(
        None, description="false: greedy decoding of every codebook (deterministic); default: sample."
    )
    # Bounds and why: api/validation.py (checked in the dtype the sampler uses; NaN/inf refused).
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    max_new_tokens: int | None = Field(None, ge=1, description="Upper bound on codec frames (12.5 per second).")
    max_duration_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Upper bound on audio seconds per item."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Give up (cancel the work) when the request takes longer than this.",
    )

    def sampling(self, settings: Settings) -> SamplingParams:
        limit = int(settings.max_audio_seconds * FRAME_RATE_HZ)
        frames = self.max_new_tokens
        if frames is not None and frames > limit:
            raise InvalidRequest(
                f"max_new_tokens {frames} is over this server's limit of {limit} frames "
                f"({settings.max_audio_seconds:g} s of audio)",
                field="max_new_tokens",
            )
        if self.max_duration_s is not None:
            if self.max_duration_s > settings.max_audio_seconds:
                raise InvalidRequest(
                    f"max_duration_s {self.max_duration_s:g} is over this server's limit of "
                    f"{settings.max_audio_seconds:g} s",
                    field="max_duration_s",
                )
            by_duration = max(1, int(self.max_duration_s * FRAME_RATE_HZ))
            frames = by_duration if frames is None else min(frames, by_duration)
        return SamplingParams(
            do_sample=self.do_sample,
            # Greedy means greedy for the code predictor too, so do_sample=false is deterministic.
            subtalker_do_sample=False if self.do_sample is False else None,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=frames,
            seed=self.seed,
        )


class SynthesisOptions(SamplingFields):
    """Fields shared by the three native synthesis endpoints.

    Unknown fields are accepted and ignored (clients of the earlier service send some), and each is
    named in the response's `warnings` (`ignored_fields`), so a typo is seen rather than silent."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: SpeechText | None = Field(None, description="Checkpoint name; default depends on the endpoint.")
    language: SpeechText | list[SpeechText] = Field(
        "auto", description="Name (english) or ISO code (en, zh, ja, ko, de, fr, ru, pt, es, it), or auto."
    )
    custom_id: SpeechText | list[OptionalText] | None = Field(None, description="Echoed back on each item.")
    response_format: AudioFormat = "wav"
    return_audio_inline: bool | None = Field(
        None,
        description="Also return each item's audio as base64 (items[].audio_base64); default: the server's "
        "QTTS_INLINE_AUDIO_DEFAULT (false unless set).",
    )
    stream: bool = Field(
        False,
        description="Return the audio itself, chunked as it is generated (one item; wav, pcm, mp3, opus or aac).",
    )

    def ignored_fields(self) -> list[str]:
        """A warning for each unknown field of the request (at most MAX_FIELD_WARNINGS of them)."""
        names = list(self.model_extra or ())
        out = [f"unknown field {_quoted(name)} ignored" for name in names[:MAX_FIELD_WARNINGS]]
        if len(names) > MAX_FIELD_WARNINGS:
            out.append(f"and {len(names) - MAX_FIELD_WARNINGS} more unknown fields ignored")
        return out


MAX_FIELD_WARNINGS = 20


def _quoted(name: str) -> str:
    """A client's field name, bounded, printable and encodable, for a warning."""
    name = name if len(name) <= 64 else name[:64] + "..."
    return repr(name.encode("utf-8", "backslashreplace").decode("utf-8"))


class CustomVoiceRequest(SynthesisOptions):
    text: SpeechText | list[SpeechText]
    speaker: SpeechText | list[SpeechText] = Field(
        description="A built-in speaker, e.g. vivian, ryan (see GET /api/v1/models)."
    )
    instruct: SpeechText | list[OptionalText] | None = Field(None, description="Style instruction (1.7B only).")

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"example": {"text": ["Hello there.", "Second line."], "speaker": "vivian"}},
    )


class VoiceDesignRequest(SynthesisOptions):
    text: SpeechText | list[SpeechText]
    instruct: SpeechText | list[SpeechText] = Field(description="A description of the voice to create.")

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"example": {"text": "Hello there.", "instruct": "A warm, low female voice."}},
    )


class VoiceCloneRequest(SynthesisOptions):
    text: SpeechText | list[SpeechText]
    # ReferenceText: a 27 M character base64 value is checked by the resolver, off the event loop.
    ref_audio: ReferenceText | list[ReferenceText | None] | None = Field(
        None,
        description="A file_id from /api/v1/files/upload, an http(s) URL, base64 audio, an allowed path, or "
        "voice:NAME (a stored voice). Required unless voice is sent.",
    )
    voice: SpeechText | list[OptionalText] | None = Field(
        None,
        description="A stored voice (name or id, see /api/v1/voices) instead of ref_audio: its model, prompt "
        "and transcript are used.",
    )
    ref_text: SpeechText | list[OptionalText] | None = Field(None, description="Transcript of ref_audio (ICL mode).")
    x_vector_only: bool | list[bool] = Field(
        False,
        validation_alias=AliasChoices("x_vector_only", "x_vector_only_mode"),
        description="Clone from the speaker embedding alone; ref_text is then optional.",
    )

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        json_schema_extra={
            "example": {"text": "Hello there.", "ref_audio": "file-0123abcd...", "ref_text": "What the clip says."}
        },
    )


# ----- responses -----
class AudioItem(BaseModel):
    index: int
    custom_id: str | None = None
    file_id: str
    url: str
    format: str
    media_type: str
    sample_rate: int
    duration_s: float
    frames: int
    finish_reason: str = Field(
        description="eos: the model ended the speech; length: cut at the frame limit (max_new_tokens, "
        "max_duration_s or the server's cap)."
    )
    audio_base64: str | None = None


class Timing(BaseModel):
    total_ms: float
    model_ms: float = Field(
        description="Loading the model (0 when already loaded) and preparing the voice (clone prompts)."
    )
    generate_ms: float = Field(description="Queue wait plus generation.")
    encode_ms: float


class SynthesisResponse(BaseModel):
    model: str
    items: list[AudioItem]
    timing: Timing
    performance: float = Field(description="Seconds the request took (timing.total_ms / 1000).")
    warnings: list[str] | None = Field(
        None, description="What the server ignored or decided for the request, e.g. unknown fields."
    )


# ----- expanding a request into items -----
def batch_size(fields: dict[str, object], settings: Settings) -> int:
    """The number of items: the common length of all list fields (1 when all are scalars)."""
    lengths = {name: len(value) for name, value in fields.items() if isinstance(value, list)}
    if not lengths:
        return 1
    distinct = set(lengths.values())
    if len(distinct) > 1:
        described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise InvalidRequest(
            f"list fields must have the same length ({described}); send one value to apply it to every item",
            field=next(iter(lengths)),
        )
    n = distinct.pop()
    if n == 0:
        raise InvalidRequest("empty list: send at least one item", field=next(iter(lengths)))
    if n > settings.max_items_per_request:
        raise InvalidRequest(
            f"batch of {n} items is over this server's limit of {settings.max_items_per_request} per request; "
            "split it into several requests",
            field=next(iter(lengths)),
        )
    return n


def spread(value: object, n: int) -> list:
    return list(value) if isinstance(value, list) else [value] * n


def field_name(name: str, value: object, index: int) -> str:
    return f"{name}[{index}]" if isinstance(value, list) else name


def check_texts(name: str, value: object, n: int, limit: int, *, required: bool = True) -> list[str | None]:
    """Strip each text; empty, whitespace-only or over-long texts are errors naming the item."""
    out: list[str | None] = []
    for i, text in enumerate(spread(value, n)):
        where = field_name(name, value, i)
        if text is None or not str(text).strip():
            if required:
                raise InvalidRequest(f"{name} is empty: send the words to speak", field=where)
            out.append(None)
            continue
        text = str(text).strip()
        if len(text) > limit:
            raise InvalidRequest(
                f"{name} has {len(text)} characters, over this server's limit of {limit}; split it into several items",
                field=where,
            )
        out.append(text)
    return out


def check_languages(value: object, n: int) -> list[str]:
    out = []
    for i, lang in enumerate(spread(value, n)):
        normalized = normalize_language(lang)
        if normalized is None:
            codes = ", ".join(sorted(k for k in LANGUAGE_ALIASES if len(k) == 2))
            raise InvalidRequest(
                f"unknown language '{lang}': use auto, a name ({', '.join(KNOWN_LANGUAGES[1:])}) or a code ({codes})",
                field=field_name("language", value, i),
            )
        out.append(normalized)
    return out


def custom_ids(value: object, n: int) -> list[str | None]:
    return [None if v is None else str(v) for v in spread(value, n)]
