"""Per-row sampling with HF `generate`'s semantics as upstream configures it, without host syncs.

Talker (codebook 0), in HF's order: repetition penalty over the row's previously generated
codebook-0 tokens, suppression of ids vocab-1024..vocab-1 except EOS, EOS masked until
`min_new_tokens` frames, then (sampling rows only) temperature, top-k, top-p. Greedy rows take the
argmax of the processed logits, as HF does when `do_sample=False` (warpers are skipped).
Code predictor (codebooks 1..15): only temperature / top-k / top-p, with the subtalker options.

Every option is a [B] tensor, so rows with different settings share one call. Randomness comes
from a counter-based hash of (seed, frame, codebook, vocab id), turned into Gumbel noise: a row's
draws depend only on its own seed and counters, never on which rows share the batch, and nothing
reads a value back to the host (CUDA-graph capturable). The draws are not torch's RNG stream, so
sampled output differs from upstream's under the same `torch.manual_seed` (greedy output does not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_NEG_INF = float("-inf")
# Each option's dtype, the one copy: `RowSampling.make` builds its columns with them, `RowState` its tables.
COLUMN_DTYPES = {
    "do_sample": torch.bool,
    "temperature": torch.float32,
    "top_k": torch.int64,
    "top_p": torch.float64,  # HF forms 1 - top_p in double before comparing in float32
    "repetition_penalty": torch.float32,
    "seed": torch.int64,
}
_PER_ROW = tuple(COLUMN_DTYPES)


@dataclass
class RowSampling:
    """Decoding options per row, each a [B] tensor on the model's device.

    `top_k` 0 and `top_p` 1.0 disable those filters; `repetition_penalty` 1.0 disables it (talker
    only). `seed` is any int64; with the row's frame counter it fixes the row's draws. Temperatures
    of sampling rows must be > 0 (HF refuses 0 too). The tensors may be edited in place (e.g. a
    per-slot table); nothing here caches facts about their values.
    """

    do_sample: Tensor  # bool
    temperature: Tensor  # float32
    top_k: Tensor  # int64
    top_p: Tensor  # float64
    repetition_penalty: Tensor  # float32
    seed: Tensor  # int64

    @classmethod
    def make(
        cls,
        rows: int,
        *,
        do_sample: bool | Sequence[bool] = True,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        repetition_penalty: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] = 0,
        device: torch.device | str = "cpu",
    ) -> RowSampling:
        """Build from scalars (same for every row) or per-row sequences. The defaults sample with no filter
        (a table's first values); a request's options, upstream's defaults included, are `SequenceSampling`'s."""

        def col(value: Any, dtype: torch.dtype) -> Tensor:
            values = list(value) if isinstance(value, Sequence) else [value] * rows
            if len(values) != rows:
                raise ValueError(f"expected {rows} values, got {len(values)}")
            return torch.tensor(values, dtype=dtype, device=device)

        given = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        given.update(repetition_penalty=repetition_penalty, seed=seed)
        return cls(**{name: col(given[name], dtype) for name, dtype in COLUMN_DTYPES.items()})

    @classmethod
    def cat(cls, parts: Sequence[RowSampling]) -> RowSampling:
        """Stack several batches' options (e.g. one per request) into one batch."""
        return cls(**{name: torch.cat([getattr(p, name) for p in parts]) for name in _PER_ROW})

    def select(self, index: Tensor | Sequence[int]) -> RowSampling:
        """Some rows' options (e.g. per-slot options gathered into a decode batch)."""
        return RowSampling(**{name: getattr(self, name)[index] for name in _PER_ROW})

    def span(self, rows: slice) -> RowSampling:
        """Rows `rows`, as views: a decode batch over cache rows 0..n-1, or the rows just admitted."""
        return RowSampling(**{name: getattr(self, name)[rows] for name in _PER_ROW})


@dataclass(frozen=True)
class SamplingPlan:
    """The one host-side fact about a batch's options that changes the code: how many candidates the
    top-k/top-p filter sorts. Everything else (greedy or sampling, temperature, top_k, top_p per row) is
    data, so a batch's plan is one of `PLANS`: each is compiled and graphed at warm-up, and no client's
    options can make the engine compile or capture at request time.

    `candidates` 64: every sampling row keeps at most 64 tokens (upstream's default top_k is 50), so only
    the top 64 are sorted. 0: some row keeps more (top_k 0 or over 64), so the whole vocabulary is. Both
    give every row exactly its own top-k, top-p and draw (a token's noise does not depend on the
    candidate set); the narrow plan is only faster.
    """

    candidates: int = 0

    @classmethod
    def of(cls, do_sample: Sequence[bool], top_k: Sequence[int]) -> SamplingPlan:
        """The narrowest plan of `PLANS` that serves every sampling row."""
        wide = any(d and not 0 < k <= NARROW_CANDIDATES for d, k in zip(do_sample, top_k, strict=True))
        return cls(0 if wide else NARROW_CANDIDATES)


NARROW_CANDIDATES = 64
PLANS = (SamplingPlan(NARROW_CANDIDATES), SamplingPlan(0))
GENERIC_PLAN = SamplingPlan()


# ------------------------------------------------------------------ counter-based noise


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit xorshift-multiply finaliser (bijective on [0, 2**32)). Multipliers stay below
    2**31 so the int64 products never overflow; no unsigned dtypes needed."""
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _MASK32
    return h ^ (h >> 15)


def row_keys(seed: Tensor, step: Tensor, codebook: int | Tensor) -> Tensor:
    """One well-mixed 32-bit key [B] per (seed, step, codebook)."""
    seed = seed.to(torch.int64)
    key = _mix32((step.to(torch.int64) * 16 + codebook + 0x3C6EF372) & _MASK32)
    key = _mix32(key ^ ((seed >> 32) & _MASK32))
    return _mix32(key ^ (seed & _MASK32))


def uniform_noise(keys: Tensor, ids: Tensor) -> Tensor:
    """Uniform (0, 1) float32 [B, N] for vocab ids [B, N] (or [N]): a pure function of (key, id),
    so a token's draw is the same whether the candidate set is the top-k or the whole vocab."""
    h = _mix32(keys[:, None] ^ ((ids * 0x1B873593) & _MASK32))
    # 23 bits, not 24: (2**24 - 1) + 0.5 rounds to 2**24 in float32, a draw of exactly 1.0, whose
    # Gumbel noise is +inf, and -inf + inf is NaN, which argmax would pick (a filtered-out token).
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


# ------------------------------------------------------------------ HF-equivalent processors
# The public functions take RowSampling / SamplingPlan; the `_` versions take plain tensors and
# Python scalars, the shape torch.compile handles best (Sampler.enable_compile).


def apply_repetition_penalty(scores: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF RepetitionPenaltyLogitsProcessor with a per-row penalty over a [B, V] bool `seen` mask."""
    p = penalty[:, None].to(scores.dtype)
    penalised = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(seen, penalised, scores)


def top_k_top_p(scores: Tensor, params: RowSampling, plan: SamplingPlan = GENERIC_PLAN) -> tuple[Tensor, Tensor]:
    """HF TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1) with per-row k and p.

    Returns candidate scores and their vocab ids [B, N], N = `plan.candidates` (or V), with
    filtered entries at -inf. Rows with k=0 or p>=1.0 are not filtered by that warper, as HF adds
    none for them.
    """
    return _top_k_top_p(scores, params.top_k, params.top_p, plan.candidates)


def _top_k_top_p(scores: Tensor, top_k: Tensor, top_p: Tensor, candidates: int) -> tuple[Tensor, Tensor]:
    vocab = scores.shape[-1]
    n = vocab if candidates <= 0 else min(candidates, vocab)
    values, ids = top_candidates(scores, n)  # descending
    k = torch.where(top_k > 0, top_k.clamp(max=n), n)
    values = values.masked_fill(values < values.gather(1, (k - 1)[:, None]), _NEG_INF)
    # Top-p for every row (rows with p >= 1 remove nothing): HF sorts ascending and drops the low tail
    # whose cumulative mass is <= 1 - top_p.
    ascending = values.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = (cumulative <= (1 - top_p).to(cumulative.dtype)[:, None]) & (top_p < 1.0)[:, None]
    remove[:, -1] = False
    return values.masked_fill(remove.flip(-1), _NEG_INF), ids


SORT_CHUNK = 512  # torch.compile sorts rows of at most this many in registers: one Triton kernel, fused
# The sorts win only for a frame of few rows. H200, same call (bench.profile_step --kernels-only, 2026-12-06),
# kernel ms per frame with sorts against aten's topk: 5.21 vs 5.48 at one request (two rows), 6.21 vs 5.80 at
# 16 rows, 7.48 vs 7.03 at 64 rows, where the chunks' second sort alone takes 0.71 ms.
SORT_ROWS_MAX = 2


def top_candidates(scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The `n` largest scores of each row of [B, V], descending, and their ids: `scores.topk(n)`, computed for
    up to SORT_ROWS_MAX rows as two sorts of rows of at most SORT_CHUNK (each chunk of the vocabulary, then the
    chunks' `n` best), which torch.compile turns into Triton kernels fused with the sampler's elementwise work.
    aten's top-k is a radix select plus a sort, two launches of ~19 and ~5 us even for one row, 16 times a
    frame. Exact: each of a row's `n` largest is among the `n` largest of its own chunk (which of several equal
    scores is kept is unspecified, as for topk). More rows, or shapes the chunks do not fit (the whole
    vocabulary, a vocabulary that is not a multiple of the chunk), use topk. Compiled with a dynamic batch,
    the row count is a guard: the warm-up runs a batch on each side (`warmup._compile_everything`)."""
    rows, vocab = scores.shape
    chunks = vocab // SORT_CHUNK
    if rows > SORT_ROWS_MAX or chunks < 2 or vocab % SORT_CHUNK or chunks * n > SORT_CHUNK:
        return scores.topk(n, dim=-1)
    values, ids = scores.reshape(rows, chunks, SORT_CHUNK).sort(dim=-1, descending=True)
    offsets = torch.arange(0, vocab, SORT_CHUNK, device=scores.device)[:, None]
    values, ids = values[..., :n].reshape(rows, -1), (ids[..., :n] + offsets).reshape(rows, -1)
    values, order = values.sort(dim=-1, descending=True)
    return values[:, :n], ids.gather(1, order[:, :n])


def choose(
    scores: Tensor, params: RowSampling, step: Tensor, codebook: int | Tensor, plan: SamplingPlan = GENERIC_PLAN
) -> Tensor:
    """Greedy argmax for rows without sampling; Gumbel-max over the warped candidates otherwise."""
    return _choose(scores, *_columns(params), step, codebook, plan.candidates)


def _choose(
    scores: Tensor,
    do_sample: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    step: Tensor,
    codebook: int | Tensor,
    candidates: int,
) -> Tensor:
    greedy = scores.argmax(dim=-1)
    temperature = torch.where(do_sample, temperature, torch.ones_like(temperature))
    values, ids = _top_k_top_p(scores / temperature[:, None], top_k, top_p, candidates)
    gumbel = -torch.log(-torch.log(uniform_noise(row_keys(seed, step, codebook), ids)))
    sampled = ids.gather(1, (values + gumbel).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(do_sample, sampled, greedy)


def _talker_choose(
    logits: Tensor,
    seen: Tensor,
    penalty: Tensor,
    step: Tensor,
    floor: Tensor,
    suppress: Tensor,
    is_eos: Tensor,
    *choice: Any,
) -> Tensor:
    """Repetition penalty, suppressed ids, EOS blocked while `step` < `floor`, then `_choose`."""
    scores = apply_repetition_penalty(logits.float(), seen, penalty)
    block_eos = (step < floor)[:, None] & is_eos[None, :]
    scores = scores.masked_fill(suppress[None, :] | block_eos, _NEG_INF)
    return _choose(scores, *choice[:5], step, *choice[5:])


def _columns(params: RowSampling) -> tuple[Tensor, ...]:
    return params.do_sample, params.temperature, params.top_k, params.top_p, params.seed


class Sampler:
    """The talker's fixed logits rules (from the config) plus per-row choice.

    `step` [B] is each row's frame index (0 for the code sampled from the prefill logits); it gates
    EOS (`min_new_tokens`) and keys the row's random draws together with the codebook.
    """

    def __init__(
        self, vocab_size: int, eos_id: int, *, min_new_tokens: int = 2, device: torch.device | str = "cpu"
    ) -> None:
        self.vocab_size, self.eos_id, self.min_new_tokens = vocab_size, eos_id, min_new_tokens
        ids = torch.arange(vocab_size, device=device)
        self.suppress = (ids >= vocab_size - 1024) & (ids != eos_id)
        self.is_eos = ids == eos_id
        # Codebook numbers as device scalars: a compiled sampler then serves all 16 with one graph.
        self.codebooks = list(torch.arange(16, device=device))
        self._choose: Callable[..., Tensor] = _choose
        self._talker_choose: Callable[..., Tensor] = _talker_choose

    @classmethod
    def for_model(cls, tts: Any) -> Sampler:
        """Rules of a `qwen_tts.Qwen3TTSModel`, on its device."""
        tcfg = tts.model.config.talker_config
        return cls(tcfg.vocab_size, tcfg.codec_eos_token_id, device=tts.model.talker.codec_head.weight.device)

    def enable_compile(self) -> None:
        """Fuse the ~60 small kernels of each codebook's sampling (hashing, top-k mask, Gumbel-max)."""
        self._choose = torch.compile(_choose)
        self._talker_choose = torch.compile(_talker_choose)

    def disable_compile(self) -> None:
        self._choose, self._talker_choose = _choose, _talker_choose

    @property
    def compiled(self) -> bool:
        return self._choose is not _choose

    def talker(
        self,
        logits: Tensor,
        params: RowSampling,
        seen: Tensor,
        step: Tensor,
        plan: SamplingPlan = GENERIC_PLAN,
        min_frames: Tensor | None = None,
    ) -> Tensor:
        """Codebook 0 for B rows. `seen` [B, V] marks each row's previously generated codebook-0 ids.

        EOS is blocked while `step` < max(min_new_tokens, the row's `min_frames` [B]). Compiled, one graph
        serves every caller that passes the same kind of tensors: the engine passes views of its per-row
        tables (rows gathered by index inside inference mode are inference tensors, compiled apart).
        """
        floor = step.new_full(step.shape, self.min_new_tokens)
        if min_frames is not None:
            floor = torch.maximum(floor, min_frames)
        choice = (*_columns(params), self.codebooks[0], plan.candidates)
        penalty = params.repetition_penalty
        return self._talker_choose(logits, seen, penalty, step, floor, self.suppress, self.is_eos, *choice)

    def code_predictor(
        self, logits: Tensor, params: RowSampling, step: Tensor, codebook: int, plan: SamplingPlan = GENERIC_PLAN
    ) -> Tensor:
        """Codebook `codebook` (1..15) for B rows with the subtalker options, from logits [B, V]."""
        canonical = logits.dtype == torch.float32 and logits.stride() == (logits.shape[1], 1)
        if self.compiled and not canonical:
            # torch.compile compiles each layout apart. The runner's decode steps hand over new fp32 [B, V]
            # tensors; its prefill's [:, -1] slice of [B, S, V] logits keeps its strides through `.float()`,
            # even at one row: one copy makes it fp32 and contiguous.
            scores = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        else:
            scores = logits.float()
        return self._choose(scores, *_columns(params), step, self.codebooks[codebook], plan.candidates)


def mark_seen(seen: Tensor, tokens: Tensor) -> Tensor:
    """Record sampled codebook-0 tokens [B] in the [B, V] repetition mask (in place)."""
    return seen.scatter_(1, tokens[:, None], True)
