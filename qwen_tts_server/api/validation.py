"""Value types of request fields, checked the way the engine uses them; shared by the native API
(`/api/v1`) and the OpenAI-compatible one (`/v1`).

Numbers are checked in the dtype the sampler computes with, not only as the JSON double they
arrive as: `temperature: 1e-45` is a positive double, but in float32 it is the smallest subnormal
(1.4e-45) and `logits / temperature` overflows to +-inf, so every positive logit ties at +inf and
argmax never reaches EOS (a short text ran to the 300 s cap); 1e-300 and 5e-324 round to 0.0 and
give inf and NaN. NaN and Infinity (Python's JSON parser takes both literals) are refused too.

Text fields are checked by `text.checks` (what no speech can come from and what breaks the pipeline).

Each type's error message is written without the field's name: the API's error handler puts the
field (and list index) in front of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from ..text.checks import check_reference_text, check_text

__all__ = [
    "REPETITION_PENALTY_RANGE",
    "SEED_RANGE",
    "TEMPERATURE_RANGE",
    "TOP_K_RANGE",
    "TOP_P_RANGE",
    "ReferenceText",
    "RepetitionPenalty",
    "Seed",
    "SpeechText",
    "Temperature",
    "TopK",
    "TopP",
    "bounded_float",
    "bounded_int",
    "whole_number",
]

# ----------------------------------------------------------------------------------- numbers
# temperature: the sampler divides float32 logits by it (fast engine: a float32 [B] tensor; the
# reference engine: HF's TemperatureLogitsWarper on float32 scores). float32 tops out at 3.4e38, so
# logits / T stays finite while T > |logit| / 3.4e38; talker logits are O(10) and, even at a
# pessimistic 1e4 (times 5 for the largest repetition penalty), T >= 1e-3 leaves 30 orders of
# magnitude of headroom and is a normal float32 (no subnormal that a flush-to-zero kernel reads as
# 0). Nothing is lost below it: the Gumbel noise of our sampler spans at most 19.5 nats
# (-log(-log(u)) for u in [2**-24, 1 - 2**-24]), so at T = 1e-3 any two logits 0.02 apart are
# already decided without randomness: the draw is greedy. Greedy is asked for with do_sample: false.
TEMPERATURE_RANGE = (1e-3, 5.0)
# top_p: kept in float64 and compared as 1 - top_p against float32 cumulative probabilities. Tiny
# values are harmless (HF and our sampler always keep the top token) but meaningless: below
# 1/3072 (the codebook) only the top token can ever be kept, and below 2**-24 the threshold
# 1 - top_p is 1.0 in float32. 1e-3 is the round bound above 1/3072; 1 keeps everything.
TOP_P_RANGE = (1e-3, 1.0)
# repetition_penalty: float32; divides positive and multiplies negative logits of codes already
# generated. A penalty p and 1/p are equally strong in opposite directions, so the range mirrors
# the upper bound 5: 1/5 to 5. (Arithmetic alone would allow far smaller values, but a penalty
# far below 1 multiplies the logits of codes already spoken so that EOS, never among them, cannot
# win and the item runs to its length cap, the symptom of the temperature bug.)
REPETITION_PENALTY_RANGE = (0.2, 5.0)
# top_k: int64 in the sampler; 3072 is the talker's codebook (larger keeps every code anyway).
TOP_K_RANGE = (1, 3072)
# seed: int64 in the sampler (the counter-based noise hashes both 32-bit halves).
SEED_RANGE = (0, 2**63 - 1)


def _as_float32(value: float) -> float:
    """`value` as the float32 the sampler will hold (inf when it overflows)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _shown(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def bounded_float(
    low: float, high: float, *, too_small: str = "", hint: str = "", float32: bool = True
) -> Callable[[float], float]:
    """A validator: `low <= value <= high` as sent and, with `float32`, as rounded to float32."""
    wanted = f"send a number from {low:g} to {high:g}{hint}"

    def check(value: float) -> float:
        if not math.isfinite(value):
            reason = "must be a finite number"
        elif value <= 0 < low:
            reason = "must be greater than 0"
        elif value < low:
            reason = f"must be at least {low:g}" + (f" ({too_small})" if too_small else "")
        elif value > high:
            reason = f"must be at most {high:g}"
        elif float32 and not low <= _as_float32(value) <= high:  # a bound that rounding crosses
            reason = f"is {_shown(_as_float32(value))} in float32, outside {low:g} to {high:g}"
        else:
            return value
        raise PydanticCustomError("value_out_of_range", f"{reason}, got {_shown(value)}: {wanted}")

    return check


def _int_advice(low: int, high: int, note: str) -> str:
    return f"send a whole number from {low} to {high}{note}"


def whole_number(low: int, high: int, *, note: str = "") -> Callable[[object], object]:
    """A validator run before int parsing: a whole float (1e3) becomes an int; NaN, inf or 1.5 are
    refused with the same advice as a value out of range."""

    def check(value: object) -> object:
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                advice = _int_advice(low, high, note)
                raise PydanticCustomError(
                    "value_out_of_range", f"must be a whole number, got {_shown(value)}: {advice}"
                )
            return int(value)
        return value  # ints, and strings and the rest for pydantic's own int parsing

    return check


def bounded_int(low: int, high: int, *, note: str = "") -> Callable[[int], int]:
    """A validator: `low <= value <= high`."""

    def check(value: int) -> int:
        if low <= value <= high:
            return value
        reason = f"must be at least {low}" if value < low else f"must be at most {high}"
        shown = str(value) if abs(value) < 10**30 else f"{value:.3e}"
        raise PydanticCustomError("value_out_of_range", f"{reason}, got {shown}: {_int_advice(low, high, note)}")

    return check


def _schema(kind: str, low: float, high: float, description: str) -> WithJsonSchema:
    return WithJsonSchema({"type": kind, "minimum": low, "maximum": high, "description": description})


Temperature = Annotated[
    float,
    AfterValidator(
        bounded_float(
            *TEMPERATURE_RANGE,
            too_small="logits divided by less overflow float32",
            hint="; for deterministic output send do_sample: false",
        )
    ),
    _schema("number", *TEMPERATURE_RANGE, "Sampling temperature; for greedy decoding send do_sample: false."),
]
TopP = Annotated[
    float,
    AfterValidator(
        bounded_float(
            *TOP_P_RANGE,
            too_small="below it only the most likely code is ever kept",
            hint="; for deterministic output send do_sample: false",
            float32=False,  # float64 in the sampler
        )
    ),
    _schema("number", *TOP_P_RANGE, "Nucleus sampling: keep the most likely codes up to this probability mass."),
]
RepetitionPenalty = Annotated[
    float,
    AfterValidator(
        bounded_float(
            *REPETITION_PENALTY_RANGE,
            too_small="below it codes already spoken outweigh the end of speech",
            hint="; 1 means no penalty",
        )
    ),
    _schema("number", *REPETITION_PENALTY_RANGE, "Penalty on codes already generated; 1 means none."),
]
_TOP_K_NOTE = f" ({TOP_K_RANGE[1]} keeps every code)"
TopK = Annotated[
    int,
    BeforeValidator(whole_number(*TOP_K_RANGE, note=_TOP_K_NOTE)),
    AfterValidator(bounded_int(*TOP_K_RANGE, note=_TOP_K_NOTE)),
    _schema("integer", *TOP_K_RANGE, "Keep only the k most likely codes."),
]
Seed = Annotated[
    int,
    BeforeValidator(whole_number(*SEED_RANGE)),
    AfterValidator(bounded_int(*SEED_RANGE)),
    _schema("integer", *SEED_RANGE, "Fixes the random draws of sampling (a 64-bit signed integer, not negative)."),
]

# -------------------------------------------------------------------------------------- text
# The rules themselves live in `text.checks` (the reference-audio resolver needs them too).
SpeechText = Annotated[str, AfterValidator(check_text)]
"""A string the tokenizer, the logs and the JSON responses can all take (see `text.checks.check_text`)."""

ReferenceText = Annotated[str, AfterValidator(check_reference_text)]
"""A reference (`ref_audio`): a `SpeechText` whose long values are checked later, off the event loop."""
