"""RowState: per-row tensors move, snapshot and take new requests' text in place."""

from __future__ import annotations

import torch

from qwen_tts_server.engine.fast.rows import RowState


def rows(n: int = 4) -> RowState:
    state = RowState(n, max_len=8, hidden_size=3, vocab=5, device=torch.device("cpu"), dtype=torch.float32)
    for i in range(n):  # row i holds the value i everywhere, so a move shows where each row went
        for tensor in state.tensors():
            tensor[i] = i
        state.trailing[i] = i
    return state


def test_overlapping_moves_gather_before_they_write():
    state = rows()
    hidden = state.hidden  # a CUDA graph holds this tensor: it must be written in place, never replaced
    state.move(torch.tensor([2, 3]), torch.tensor([1, 2]), text_len=5)
    assert state.hidden is hidden
    assert state.code0.tolist() == [0, 2, 3, 3]
    assert state.trailing[:, :5, 0].tolist() == [[0] * 5, [2] * 5, [3] * 5, [3] * 5]
    assert state.trailing[1, 5:, 0].tolist() == [1, 1, 1]  # text past `text_len` is not copied


def test_a_snapshot_restores_the_first_rows_only():
    state = rows()
    saved = state.snapshot(2)
    for tensor in state.tensors():
        tensor.fill_(9)
    state.restore(2, saved)
    assert state.position.tolist() == [0, 1, 9, 9]
    assert state.talker_params.seed.tolist() == [0, 1, 9, 9]


def test_new_rows_text_and_its_length():
    state = rows()
    state.set_text([3, 0], [torch.full((2, 3), 7.0), torch.full((5, 3), 8.0)])
    assert state.trailing_len.tolist() == [5, 1, 2, 2]
    assert state.trailing[3, :2].eq(7).all() and state.trailing[3, 2, 0] == 3
    assert state.trailing[0, :5].eq(8).all()
