"""Sampling: HF-equivalent logits processing per row, and per-row randomness independent of the batch."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_tts_server.engine.fast import sampler as sampler_module
from qwen_tts_server.engine.fast.model_runner import ModelRunner
from qwen_tts_server.engine.fast.prompt import build_prompt
from qwen_tts_server.engine.fast.sampler import (
    PLANS,
    SORT_ROWS_MAX,
    RowSampling,
    Sampler,
    SamplingPlan,
    apply_repetition_penalty,
    choose,
    mark_seen,
    top_candidates,
    top_k_top_p,
)
from qwen_tts_server.engine.types import Mode

from .helpers import Row, greedy, run_rows, sampled

MAX_NEW_TOKENS = 16


def _generate(tts: Any, rows: list[Row], use_plan: bool = True) -> list[torch.Tensor]:
    runner = ModelRunner(tts, max_slots=4, max_len=96)
    return run_rows(runner, Sampler.for_model(tts), rows, max_new_tokens=MAX_NEW_TOKENS, use_plan=use_plan)


@pytest.fixture(scope="module")
def cv(load_tts: Callable[[str], Any]) -> tuple[Any, list[Any]]:
    tts = load_tts("Qwen3-TTS-12Hz-1.7B-CustomVoice")
    prompts = [
        build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="Sampling is fun, isn't it? Let us see.", speaker="ryan"),
        build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="Another row.", speaker="serena"),
        build_prompt(tts, mode=Mode.CUSTOM_VOICE, text="And a third one here.", speaker="sohee"),
    ]
    return tts, prompts


def test_same_seed_same_codes_alone_or_batched(cv: tuple[Any, list[Any]]) -> None:
    tts, prompts = cv
    (alone,) = _generate(tts, [Row(prompts[0], 0, *sampled(1234))])
    assert alone.shape[0] >= 4
    neighbours = [
        Row(prompts[1], 1, *sampled(7, top_p=0.8, temperature=1.3)),
        Row(prompts[0], 3, *sampled(1234), start=3),  # same request, joins late, other slot
        Row(prompts[2], 2, *greedy()),
    ]
    batched = _generate(tts, neighbours)
    assert torch.equal(batched[1], alone)
    # The plan (host facts) only picks a code path: the generic path draws the same codes.
    generic = _generate(tts, [Row(prompts[n % 3], n, *sampled(1234 + n)) for n in range(3)], use_plan=False)
    assert torch.equal(generic[0], alone)

    (again,) = _generate(tts, [Row(prompts[0], 2, *sampled(1234))])
    assert torch.equal(again, alone)
    (other_seed,) = _generate(tts, [Row(prompts[0], 0, *sampled(1235))])
    assert not torch.equal(other_seed[: len(alone)], alone[: len(other_seed)])


def test_top_k_one_is_greedy(cv: tuple[Any, list[Any]]) -> None:
    tts, prompts = cv
    (greedy_codes,) = _generate(tts, [Row(prompts[0], 0, *greedy())])
    (top1,) = _generate(tts, [Row(prompts[0], 0, *sampled(99, top_k=1))])
    assert torch.equal(top1, greedy_codes)


def test_repetition_penalty_matches_hf() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 40) * 3
    history = torch.randint(0, 40, (3, 12))
    penalties = [1.05, 1.5, 0.8]
    seen = torch.zeros(3, 40, dtype=torch.bool)
    for column in history.T:
        mark_seen(seen, column)
    ours = apply_repetition_penalty(scores, seen, torch.tensor(penalties))
    for i, penalty in enumerate(penalties):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history[i : i + 1], scores[i : i + 1].clone())
        assert torch.equal(ours[i], expected[0])


@pytest.mark.parametrize(
    "settings",
    [
        # a row without top-k: the candidate set is the whole vocabulary; top_p 0 keeps only the best
        [(0.9, 50, 1.0), (1.3, 0, 0.8), (0.7, 5, 0.5), (1.0, 300, 0.95), (0.9, 1, 1.0), (2.0, 20, 0.3), (1.0, 0, 0.0)],
        # a top-k over the narrow plan's 64: the whole vocabulary too
        [(0.9, 50, 0.9), (1.3, 300, 0.8), (0.7, 5, 0.5), (1.0, 120, 0.99), (0.5, 2, 0.6)],
        # every row keeps at most 64: top-k and top-p run on the top 64 candidates only
        [(0.9, 50, 0.9), (1.3, 64, 0.8), (0.7, 5, 0.5), (1.0, 12, 1.0), (0.5, 2, 0.6), (1.0, 1, 0.3)],
    ],
)
@pytest.mark.parametrize("vocab", [400, 2048])  # 2048: the narrow plan's chunked sorts (top_candidates)
def test_warpers_match_hf(settings: list[tuple[float, int, float]], vocab: int) -> None:
    """Temperature, top-k and top-p per row equal HF's warpers applied to each row on its own."""
    torch.manual_seed(1)
    scores = torch.randn(len(settings), vocab) * 2
    scores[:, :10] = float("-inf")  # suppressed ids, as the talker has
    temperature, top_k, top_p = ([s[i] for s in settings] for i in range(3))
    params = RowSampling.make(len(settings), temperature=temperature, top_k=top_k, top_p=top_p)
    plan = SamplingPlan.of([True] * len(settings), top_k)
    values, ids = top_k_top_p(scores / params.temperature[:, None], params, plan)
    if 0 in top_k or max(top_k) > 64:  # some row keeps more than 64: the whole vocabulary
        assert plan.candidates == 0 and values.shape[1] == vocab
    else:
        assert plan.candidates == 64 and values.shape[1] == 64
    ours = torch.full_like(scores, float("-inf")).scatter(1, ids, values)
    for i, (t, k, p) in enumerate(settings):
        row = scores[i : i + 1].clone()
        row = TemperatureLogitsWarper(t)(None, row) if t != 1.0 else row
        row = TopKLogitsWarper(k)(None, row) if k else row
        row = TopPLogitsWarper(p)(None, row) if p < 1.0 else row
        assert torch.equal(ours[i], row[0]), i


@pytest.mark.parametrize("rows", [1, SORT_ROWS_MAX, 64])  # up to SORT_ROWS_MAX: two sorts of chunks
@pytest.mark.parametrize("vocab", [2048, 3072, 4096, 400])
def test_top_candidates_are_topk_in_chunks(vocab: int, rows: int) -> None:
    """The narrow plan's candidates (for a few rows two sorts of chunks, for the compiled sampler) are exactly
    topk's: the same scores in the same order, each with its own id (which of two equal scores comes first is
    free)."""
    torch.manual_seed(vocab)
    scores = torch.randn(rows, vocab) * 3
    scores[:, :100] = float("-inf")  # suppressed ids, as the talker has
    scores[:3, 500:700] = 1.5  # ties across the cut
    values, ids = top_candidates(scores, 64)
    expected, _ = scores.topk(64, dim=-1)
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(1, ids), values)
    assert all(len(set(row.tolist())) == 64 for row in ids)


def test_gumbel_draws_follow_the_distribution() -> None:
    """Many seeds at once: token frequencies match softmax(logits / T); draws are per-row pure."""
    rows = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]).expand(rows, -1)
    params = RowSampling.make(rows, temperature=0.8, top_k=0, seed=list(range(rows)))
    tokens = choose(logits, params, torch.zeros(rows, dtype=torch.long), codebook=3)
    freq = torch.bincount(tokens, minlength=6).float() / rows
    expected = torch.softmax(logits[0] / 0.8, dim=-1)
    assert (freq - expected).abs().max().item() < 0.015
    assert freq[5] == 0
    # A row's draw does not depend on its neighbours or its index in the batch.
    picked = [0, 17, 4242]
    sub = choose(logits[: len(picked)], params.select(torch.tensor(picked)), torch.zeros(3, dtype=torch.long), 3)
    assert torch.equal(sub, tokens[picked])
    # Other counters give other draws.
    later = choose(logits, params, torch.ones(rows, dtype=torch.long), codebook=3)
    assert (later != tokens).float().mean() > 0.3


def test_talker_rules() -> None:
    """Suppressed ids never win; EOS is blocked for the first min_new_tokens frames only."""
    sampler = Sampler(3072, eos_id=2150)
    logits = torch.zeros(4, 3072)
    logits[:, 3000] = 100.0  # suppressed (>= 2048, not EOS)
    logits[:, 2150] = 50.0  # EOS
    logits[:, 7] = 10.0
    params = RowSampling.make(
        4, do_sample=[False, False, False, True], temperature=0.9, top_k=50, repetition_penalty=1.0, seed=5
    )
    seen = torch.zeros(4, 3072, dtype=torch.bool)
    tokens = sampler.talker(logits, params, seen, torch.tensor([0, 1, 2, 2]))
    assert tokens.tolist() == [7, 7, 2150, 2150]


def test_sampling_plan() -> None:
    """A batch's plan is one of the closed set PLANS, whatever its rows ask: narrow only when every
    sampling row keeps at most 64 candidates (greedy rows ask for nothing)."""
    narrow, wide = SamplingPlan(64), SamplingPlan(0)
    assert PLANS == (narrow, wide)
    assert SamplingPlan.of([False, False], [0, 7]) == narrow  # greedy rows: no sort is needed
    assert SamplingPlan.of([True, False], [50, 0]) == narrow
    assert SamplingPlan.of([True, True], [64, 1]) == narrow
    assert SamplingPlan.of([True, False], [65, 50]) == wide
    assert SamplingPlan.of([False, True], [50, 0]) == wide  # a sampling row without top-k
    for do_sample, top_k in itertools.product(itertools.product([False, True], repeat=2), [(0, 3), (50, 300)]):
        assert SamplingPlan.of(list(do_sample), list(top_k)) in PLANS


def test_a_draw_of_the_largest_hash_stays_below_one() -> None:
    """The noise must stay in (0, 1): a draw of exactly 1.0 made +inf Gumbel noise, NaN scores,
    and a token outside the candidates (seen about once in 16,000 frames)."""
    keys, ids = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)
    for extreme in (0xFFFFFFFF, 0):
        with mock.patch.object(sampler_module, "_mix32", lambda h, v=extreme: torch.full_like(h, v)):
            noise = sampler_module.uniform_noise(keys, ids)
        assert ((noise > 0) & (noise < 1)).all()
