"""torch.compile settings shared by the fast engine's compiled functions (ModelRunner's layers, the sampler,
the streaming codec decoder)."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import Tensor

RECOMPILE_LIMIT = 64  # compiles per function: batch-1 specializations, two plans, one decoder per engine


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function compile limit to at least `limit` (past it, a function silently runs
    uncompiled). Process-wide."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def mark_dynamic(t: Tensor, *dims: int, strict: bool = False) -> Tensor:
    """Have torch.compile compile `t`'s dimensions `dims` for any size at its first compile, instead of for
    this size and then again at the next (automatic dynamic shapes). Dimensions of size 1 are left alone:
    torch.compile always specializes them. Not `strict`, a hint: where the code specializes a size after all,
    that size gets a compile of its own. `strict`: that compile raises instead (the caller falls back)."""
    mark = torch._dynamo.mark_dynamic if strict else torch._dynamo.maybe_mark_dynamic
    for dim in dims:
        if t.shape[dim] > 1:
            mark(t, dim)
    return t
