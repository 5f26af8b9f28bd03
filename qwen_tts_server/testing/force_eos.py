"""Force exact per-row lengths out of a (tiny) Qwen3-TTS model, for tests.

A forward hook on the talker's `codec_head` overwrites the logits of batch row i from talker call
`eos_steps[i]` on (call 0 is the prefill): every logit becomes -1e4 and EOS +1e4, so greedy and
sampled decoding both pick EOS there and row i yields exactly `eos_steps[i]` frames (upstream's
`min_new_tokens=2` masks EOS on calls 0 and 1, so steps below 2 still give 2 frames). Earlier calls
keep every logit except EOS, which is masked (-1e4) until the row's step: the tiny checkpoints stop
on their own (`tiny_models`' weights-only EOS), and without the mask a row could end early.
`block_early_eos=False` leaves earlier calls entirely untouched.

The call counter restarts whenever `codec_head` sees more than one position (a prefill), so one
context can span several `generate` calls of the same batch size. It needs eager execution: a
CUDA-graph or compiled decode step does not run Python hooks. For an engine that prefills rows one
at a time or changes the batch between steps, drive `ForcedEos.calls` / `reset()` by hand or use
per-request lengths from the weights instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

FORCED_LOGIT = 1e4


def _talker(model: Any) -> Any:
    """Accept the `Qwen3TTSModel` wrapper, `Qwen3TTSForConditionalGeneration` or its talker."""
    for path in ("model.talker", "talker", ""):
        obj = model
        for attr in filter(None, path.split(".")):
            obj = getattr(obj, attr, None)
        if obj is not None and hasattr(obj, "codec_head"):
            return obj
    raise TypeError(f"no talker with a codec_head found on {type(model).__name__}")


class ForcedEos:
    """State of one `force_eos` context: which call comes next, and the steps per row."""

    def __init__(self, eos_steps: Sequence[int], eos_id: int, *, block_early_eos: bool) -> None:
        if any(s < 0 for s in eos_steps):
            raise ValueError(f"eos_steps must be >= 0, got {list(eos_steps)}")
        self.eos_steps = list(eos_steps)
        self.eos_id = eos_id
        self.block_early_eos = block_early_eos
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def __call__(self, _module: torch.nn.Module, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] > 1:
            self.reset()
        if logits.shape[0] != len(self.eos_steps):
            raise ValueError(f"force_eos got {len(self.eos_steps)} eos_steps for a batch of {logits.shape[0]}")
        due = torch.tensor([self.calls >= s for s in self.eos_steps], device=logits.device)
        self.calls += 1
        if not due.any() and not self.block_early_eos:
            return logits
        logits = logits.clone()
        last = logits[:, -1, :]
        if self.block_early_eos:
            last[~due, self.eos_id] = -FORCED_LOGIT
        last[due] = -FORCED_LOGIT
        last[due, self.eos_id] = FORCED_LOGIT
        return logits


@contextmanager
def force_eos(model: Any, eos_steps: Sequence[int], *, block_early_eos: bool = True) -> Iterator[ForcedEos]:
    """Within the block, batch row i of the model's talker ends after exactly `eos_steps[i]` frames."""
    talker = _talker(model)
    state = ForcedEos(eos_steps, int(talker.config.codec_eos_token_id), block_early_eos=block_early_eos)
    handle = talker.codec_head.register_forward_hook(state)
    try:
        yield state
    finally:
        handle.remove()
