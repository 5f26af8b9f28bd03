"""The fast engine's per-row state: what each running request carries between frames, one row per cache row.

Allocated once for `max_slots` rows and only ever written in place (CUDA graphs hold these tensors'
addresses). Row b belongs to the request in KV-cache row b; the scheduler keeps running requests in rows
0..n-1, so a frame reads the first n rows of each tensor.

The small per-row values (positions, counters, both models' sampling options) are columns of a few tables,
one per dtype, so that admitting requests is one host-to-device copy per table and moving rows at compaction
one gather and one scatter per table, not one of each per value (each is a launch on the step thread, between
frames). A table is column-major ([columns, rows]): every column is a contiguous [rows] tensor, as the frame's
graphs and compiled code read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from .model_runner import to_device
from .sampler import COLUMN_DTYPES, RowSampling
from .sequence import SequenceSampling

# The engine's own per-row values, all int64: codebook 0 of the pending frame, the next cache position, frames
# so far, EOS blocked before this frame, trailing text hiddens still to feed.
STATE_COLUMNS = ("code0", "position", "frame_index", "min_frames", "trailing_len")
TALKER, PREDICTOR = "talker.", "predictor."  # prefixes of the two models' sampling columns
ALIGN_ROWS = 16  # a column of 16 one-byte rows is 16 bytes


class ColumnTables:
    """Named [rows] columns of any dtype, stored as one [columns, rows] tensor per dtype.

    Each column starts on a 16-byte boundary (a table's rows are padded to a multiple of ALIGN_ROWS): compiled
    code that reads a column assumes no more alignment than the view it was compiled with shows, and a column
    at an odd offset would cost vectorized loads (inductor aligns to 16 bytes)."""

    def __init__(self, rows: int, columns: Mapping[str, torch.dtype], device: torch.device) -> None:
        self.device = device
        self.rows = rows
        self.names: dict[torch.dtype, list[str]] = {}
        for name, dtype in columns.items():
            self.names.setdefault(dtype, []).append(name)
        padded = -(-rows // ALIGN_ROWS) * ALIGN_ROWS
        self.tables = {
            dtype: torch.zeros(len(names), padded, dtype=dtype, device=device) for dtype, names in self.names.items()
        }
        self._where = {name: (dtype, i) for dtype, names in self.names.items() for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> Tensor:
        dtype, i = self._where[name]
        return self.tables[dtype][i, : self.rows]

    def write(self, rows: slice, values: Seq[Mapping[str, float | int | bool]]) -> None:
        """Rows `rows` (one mapping of every column's value per row): one copy per table, queued without a
        wait (pinned staging, see `to_device`)."""
        for dtype, names in self.names.items():
            host = [[row[name] for row in values] for name in names]
            self.tables[dtype][:, rows] = to_device(host, self.device, dtype)

    def move(self, src: Tensor, dst: Tensor) -> None:
        """Rows `src` become rows `dst`; the right side is gathered first, so overlapping moves are safe."""
        for table in self.tables.values():
            table[:, dst] = table[:, src]

    def snapshot(self, size: int) -> list[Tensor]:
        return [table[:, :size].clone() for table in self.tables.values()]

    def restore(self, size: int, saved: list[Tensor]) -> None:
        for table, values in zip(self.tables.values(), saved, strict=True):
            table[:, :size] = values


class RowState:
    """`hidden` (the talker hidden that predicted `code0`), `seen` (codebook-0 ids generated, for the repetition
    penalty), `trailing` (the text hiddens still to feed, one per frame), the int64 columns of
    `STATE_COLUMNS` as attributes, and both models' sampling options per row (`talker_params`, `sub_params`)."""

    def __init__(
        self, rows: int, *, max_len: int, hidden_size: int, vocab: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.hidden = torch.zeros(rows, hidden_size, device=device, dtype=dtype)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.trailing = torch.zeros(rows, max_len, hidden_size, device=device, dtype=dtype)
        self.ids = torch.arange(rows, device=device)
        columns = dict.fromkeys(STATE_COLUMNS, torch.long)
        for prefix in (TALKER, PREDICTOR):
            columns.update({prefix + name: dtype for name, dtype in COLUMN_DTYPES.items()})
        self.columns = ColumnTables(rows, columns, device)
        self.code0, self.position, self.frame_index, self.min_frames, self.trailing_len = (
            self.columns[name] for name in STATE_COLUMNS
        )
        self.talker_params = RowSampling(**{name: self.columns[TALKER + name] for name in COLUMN_DTYPES})
        self.sub_params = RowSampling(**{name: self.columns[PREDICTOR + name] for name in COLUMN_DTYPES})

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.seen, self.trailing))

    def admit(self, span: slice, options: Seq[SequenceSampling], prompt_lens: Seq[int], trailing: Seq[Tensor]) -> None:
        """Set up rows `span` for requests just prefilled: their options, positions after their prompts, frame
        0, and their trailing text hiddens (each [T_i, hidden]). `code0` and `hidden` come from the prefill."""
        values = []
        for option, prompt_len, text in zip(options, prompt_lens, trailing, strict=True):
            row = {"code0": 0, "position": prompt_len, "frame_index": 0, "min_frames": option.min_frames}
            row["trailing_len"] = text.shape[0]
            row.update({TALKER + name: value for name, value in option.talker_columns().items()})
            row.update({PREDICTOR + name: value for name, value in option.predictor_columns().items()})
            values.append(row)
        self.columns.write(span, values)
        for slot, text in zip(range(span.start, span.stop), trailing, strict=True):
            self.trailing[slot, : text.shape[0]] = text
        self.seen[span].zero_()

    def move(self, src: Tensor, dst: Tensor, text_len: int) -> None:
        """Rows `src` become rows `dst` (requests changed rows at compaction), text up to `text_len`.
        The right side is gathered first, so overlapping moves are safe."""
        self.columns.move(src, dst)
        for tensor in (self.hidden, self.seen):
            tensor[dst] = tensor[src]
        self.trailing[dst, :text_len] = self.trailing[src, :text_len]

    def snapshot(self, size: int) -> list[Tensor]:
        """Rows 0..size-1 of every tensor but the text (which a frame only reads), to `restore` later."""
        return [self.hidden[:size].clone(), self.seen[:size].clone(), *self.columns.snapshot(size)]

    def restore(self, size: int, saved: list[Tensor]) -> None:
        hidden, seen, *tables = saved
        self.hidden[:size] = hidden
        self.seen[:size] = seen
        self.columns.restore(size, tables)

    def release(self) -> None:
        """Let go of the large tensors (the engine stopped)."""
        empty = self.hidden.new_empty(0)
        self.hidden = self.seen = self.trailing = empty
