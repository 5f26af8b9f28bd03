"""How a request's decoding options are resolved: the request's own over the checkpoint's generation_config over
upstream's hard defaults."""

from __future__ import annotations

import dataclasses

from qwen_tts_server.engine.fast.runtime import resolve_sampling
from qwen_tts_server.engine.fast.sequence import SequenceSampling
from qwen_tts_server.engine.types import SamplingParams

UPSTREAM = SequenceSampling()


def test_upstream_defaults_fill_what_neither_request_nor_checkpoint_sets() -> None:
    resolved = resolve_sampling(SamplingParams(seed=7), {})
    assert resolved == dataclasses.replace(UPSTREAM, seed=7)
    # Upstream's hard defaults (qwen-tts's generate_* keyword defaults), written out rather than read back
    talker = (resolved.do_sample, resolved.temperature, resolved.top_k, resolved.top_p, resolved.repetition_penalty)
    assert talker == (True, 0.9, 50, 1.0, 1.05)
    predictor = (
        resolved.subtalker_do_sample,
        resolved.subtalker_temperature,
        resolved.subtalker_top_k,
        resolved.subtalker_top_p,
    )
    assert predictor == (True, 0.9, 50, 1.0)


def test_the_checkpoint_overrides_upstream_and_the_request_overrides_both() -> None:
    config = {"temperature": 0.7, "top_k": 30, "subtalker_dosample": False, "subtalker_top_p": 0.8}
    resolved = resolve_sampling(SamplingParams(top_k=12, seed=1), config)
    assert resolved.temperature == 0.7 and resolved.top_k == 12
    # generation_config.json spells the code predictor's switch "subtalker_dosample"
    assert resolved.subtalker_do_sample is False and resolved.subtalker_top_p == 0.8
    assert resolved.do_sample is True and resolved.subtalker_temperature == UPSTREAM.subtalker_temperature
    request = resolve_sampling(SamplingParams(subtalker_do_sample=True, seed=1), config)
    assert request.subtalker_do_sample is True


def test_values_take_the_fields_types_and_a_missing_seed_is_drawn() -> None:
    resolved = resolve_sampling(SamplingParams(), {"top_k": 40.0, "temperature": 1, "do_sample": 1})
    assert type(resolved.top_k) is int and type(resolved.temperature) is float and resolved.do_sample is True
    seeds = {resolve_sampling(SamplingParams(), {}).seed for _ in range(4)}
    assert len(seeds) == 4


def test_the_code_predictor_never_gets_the_repetition_penalty() -> None:
    options = SequenceSampling(repetition_penalty=1.3, subtalker_top_k=20, seed=5)
    assert options.talker_columns()["repetition_penalty"] == 1.3
    assert options.predictor_columns() == {
        "do_sample": True,
        "temperature": 0.9,
        "top_k": 20,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "seed": 5,
    }
