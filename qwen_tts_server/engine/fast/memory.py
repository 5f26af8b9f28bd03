"""How much GPU memory the fast engine needs per request row, and how many rows a budget allows.

A row is one running request: its talker KV cache for `max_len` positions (by far the largest
part: 28 layers x 8 KV heads x 128 x 2 x bf16 is ~115 KB per position, ~470 MB at 4096), its
trailing-text buffer and its small per-row state. Weights are counted by the model registry.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from .model_runner import CP_CACHE_LEN

MAX_AUTO_SLOTS = 128  # the largest batch bucket; beyond it a frame is long enough to hurt latency
GiB = 1024**3
# Memory beyond weights and per-row caches: codec decode batches (chunks; with the context decoder also whole
# utterances, bounded by codec_batch_frames), the activations of one packed prefill, CUDA graph pools and
# allocator slack.
WORKSPACE_BYTES = 8 * GiB


def row_bytes(tts: Any, max_len: int) -> int:
    """Bytes the engine allocates per row (`max_slots` x this is its total, give or take a few MB)."""
    talker = tts.model.talker
    cfg, cp_cfg = talker.config, talker.code_predictor.config
    item = talker.codec_head.weight.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * _head_dim(cfg) * max_len * item
    cp_kv = 2 * cp_cfg.num_hidden_layers * cp_cfg.num_key_value_heads * _head_dim(cp_cfg) * CP_CACHE_LEN * item
    trailing = max_len * cfg.hidden_size * item
    state = cfg.vocab_size + cfg.hidden_size * item + 16 * 8  # repetition mask, hidden, scalars
    return kv + cp_kv + trailing + state


def slots_for_budget(per_row: int, available: int, cap: int = MAX_AUTO_SLOTS) -> int:
    """Rows that fit in `available` bytes, at most `cap`; ValueError if not even one fits."""
    rows = min(cap, available // per_row)
    if rows < 1:
        raise ValueError(
            f"one request row needs {per_row / GiB:.2f} GiB but only {max(available, 0) / GiB:.2f} GiB "
            "of the memory budget is left for the engine"
        )
    return int(rows)


def auto_slots(per_row: int, budget: int, used: int) -> int:
    """Rows for a model's engine when QTTS_MAX_SLOTS is unset: half of what the budget has left
    after every loaded model and this engine's workspace, so a second model (each endpoint has its
    own default) still finds room; at most MAX_AUTO_SLOTS."""
    return slots_for_budget(per_row, (budget - used - WORKSPACE_BYTES) // 2)


def device_budget(device: torch.device, budget_gb: float | None) -> int:
    """The configured budget in bytes, or 90% of the card's memory when none is set."""
    if budget_gb is not None:
        return int(budget_gb * GiB)
    if device.type != "cuda":
        raise ValueError("no memory budget set for a CPU model")
    return int(0.9 * torch.cuda.get_device_properties(device).total_memory)


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


class CudaEngines:
    """The fast engines alive in this process on CUDA, so that the last one to go can hand back cuBLAS's
    workspaces: PyTorch keeps one (32 MiB) per (thread's cuBLAS handle, stream) for the life of the
    process, and a captured graph holds the address of the one it was captured with, so they may be
    freed only when no engine's graphs are left. Engines register before they capture anything."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, engine: Any) -> None:
        with self._lock:
            self._live.add(engine)

    def release(self, engine: Any) -> bool:
        """`engine` is gone; if it was the last, free the workspaces (True when they were)."""
        with self._lock:
            self._live.discard(engine)
            if self._live:
                return False
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # no public API for it
            if clear is None:
                return False
            clear()
            return True


CUDA_ENGINES = CudaEngines()
