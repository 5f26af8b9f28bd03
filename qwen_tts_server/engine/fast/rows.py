"""The fast engine's per-row state: what each running request carries between frames, one row per cache row.

Allocated once for `max_slots` rows and only ever written in place (CUDA graphs hold these tensors'
addresses). Row b belongs to the request in KV-cache row b; the scheduler keeps running requests in rows
0..n-1, so a frame reads the first n rows of each tensor.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from .model_runner import to_device
from .sampler import RowSampling
from .sequence import SequenceSampling


class RowState:
    """`hidden` (the talker hidden that predicted `code0`), `code0` (codebook 0 of the pending frame),
    `position` (next cache position), `frame_index` (frames so far), `min_frames` (EOS blocked before),
    `seen` (codebook-0 ids generated, for the repetition penalty), `trailing` / `trailing_len` (the text
    hiddens still to feed, one per frame), and both models' sampling options per row."""

    def __init__(
        self, rows: int, *, max_len: int, hidden_size: int, vocab: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        def longs() -> Tensor:
            return torch.zeros(rows, dtype=torch.long, device=device)

        self.device = device
        self.hidden = torch.zeros(rows, hidden_size, device=device, dtype=dtype)
        self.code0, self.position, self.frame_index, self.min_frames = longs(), longs(), longs(), longs()
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.trailing = torch.zeros(rows, max_len, hidden_size, device=device, dtype=dtype)
        self.trailing_len = longs()
        self.ids = torch.arange(rows, device=device)
        self.talker_params = RowSampling.make(rows, device=device)
        self.sub_params = RowSampling.make(rows, device=device)

    def tensors(self) -> list[Tensor]:
        """Every per-row tensor except the trailing text (moved only as far as it is written)."""
        state = [self.hidden, self.code0, self.position, self.frame_index, self.min_frames, self.seen]
        return state + [self.trailing_len, *self.talker_params.columns().values(), *self.sub_params.columns().values()]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.seen, self.trailing))

    def move(self, src: Tensor, dst: Tensor, text_len: int) -> None:
        """Rows `src` become rows `dst` (requests changed rows at compaction), text up to `text_len`.
        The right side is gathered first, so overlapping moves are safe."""
        for tensor in self.tensors():
            tensor[dst] = tensor[src]
        self.trailing[dst, :text_len] = self.trailing[src, :text_len]

    def snapshot(self, size: int) -> list[Tensor]:
        """Rows 0..size-1 of every tensor but the text (which a frame only reads), to `restore` later."""
        return [t[:size].clone() for t in self.tensors()]

    def restore(self, size: int, saved: list[Tensor]) -> None:
        for tensor, values in zip(self.tensors(), saved, strict=True):
            tensor[:size] = values

    def set_text(self, slots: Seq[int], trailing: Seq[Tensor]) -> None:
        """Newly admitted rows' trailing text hiddens, each [T_i, hidden] (host row numbers: no sync)."""
        for slot, text in zip(slots, trailing, strict=True):
            self.trailing[slot, : text.shape[0]] = text
        self.trailing_len[to_device(slots, self.device)] = to_device([t.shape[0] for t in trailing], self.device)

    def set_sampling(self, idx: Tensor | slice, options: list[SequenceSampling]) -> None:
        """Rows `idx`' options for the talker (codebook 0) and the code predictor (codebooks 1-15)."""
        talker = [o.talker_columns() for o in options]
        predictor = [o.predictor_columns() for o in options]
        for params, values in ((self.talker_params, talker), (self.sub_params, predictor)):
            for name, column in params.columns().items():
                column[idx] = to_device([v[name] for v in values], self.device, column.dtype)

    def release(self) -> None:
        """Let go of the large tensors (the engine stopped)."""
        empty = self.hidden.new_empty(0)
        self.hidden = self.seen = self.trailing = empty
