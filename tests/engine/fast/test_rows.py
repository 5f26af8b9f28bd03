"""RowState: per-row tensors move, snapshot and take new requests in place, in few tensor calls."""

from __future__ import annotations

import torch

from bench.profile_churn import Ledger
from qwen_tts_server.engine.fast.rows import RowState
from qwen_tts_server.engine.fast.sequence import SequenceSampling


def rows(n: int = 4) -> RowState:
    state = RowState(n, max_len=8, hidden_size=3, vocab=5, device=torch.device("cpu"), dtype=torch.float32)
    for i in range(n):  # row i holds the value i everywhere, so a move shows where each row went
        for tensor in (state.hidden, state.seen, state.trailing):
            tensor[i] = i
        for table in state.columns.tables.values():
            table[:, i] = i
    return state


def test_overlapping_moves_gather_before_they_write():
    state = rows()
    hidden = state.hidden  # a CUDA graph holds this tensor: it must be written in place, never replaced
    state.move(torch.tensor([2, 3]), torch.tensor([1, 2]), text_len=5)
    assert state.hidden is hidden
    for column in (state.code0, state.position, state.talker_params.seed, state.sub_params.top_p, state.hidden[:, 0]):
        assert column.tolist() == [0, 2, 3, 3]
    assert state.sub_params.do_sample.tolist() == [False, True, True, True]
    assert state.seen[:, 0].tolist() == [False, True, True, True]
    assert state.trailing[:, :5, 0].tolist() == [[0] * 5, [2] * 5, [3] * 5, [3] * 5]
    assert state.trailing[1, 5:, 0].tolist() == [1, 1, 1]  # text past `text_len` is not copied


def test_a_move_is_a_gather_and_a_scatter_per_table_not_per_value():
    state, src, dst = rows(), torch.tensor([2, 3]), torch.tensor([1, 2])
    with (ledger := Ledger()), ledger.part("move"):
        state.move(src, dst, text_len=5)
    tensors = len(state.columns.tables) + 3  # the tables, hidden, seen, the text
    assert ledger.calls["move"] == 2 * tensors, ledger.calls


def test_a_snapshot_restores_the_first_rows_only():
    state = rows()
    saved = state.snapshot(2)
    for tensor in (state.hidden, *state.columns.tables.values()):
        tensor.fill_(9)
    state.restore(2, saved)
    assert state.position.tolist() == [0, 1, 9, 9]
    assert state.talker_params.seed.tolist() == [0, 1, 9, 9]
    assert state.hidden[:, 0].tolist() == [0, 1, 9, 9]


def test_admitted_rows_take_their_options_positions_and_text():
    state = rows()
    first = SequenceSampling(temperature=0.5, top_k=7, top_p=0.8, repetition_penalty=1.2, seed=11, min_frames=3)
    second = SequenceSampling(do_sample=False, subtalker_do_sample=False, subtalker_top_k=9, seed=12)
    text = [torch.full((2, 3), 7.0), torch.full((5, 3), 8.0)]
    state.admit(slice(1, 3), [first, second], prompt_lens=[20, 30], trailing=text)

    assert state.position.tolist() == [0, 20, 30, 3] and state.frame_index.tolist() == [0, 0, 0, 3]
    assert state.min_frames.tolist() == [0, 3, 0, 3] and state.trailing_len.tolist() == [0, 2, 5, 3]
    talker, sub = state.talker_params, state.sub_params
    assert talker.do_sample.tolist() == [False, True, False, True]
    assert talker.temperature[1:3].tolist() == [0.5, 0.8999999761581421]
    assert talker.top_k[1:3].tolist() == [7, 50] and talker.top_p[1:3].tolist() == [0.8, 1.0]
    assert talker.repetition_penalty[1].item() == torch.tensor(1.2).item()
    assert sub.do_sample[1:3].tolist() == [True, False] and sub.top_k[1:3].tolist() == [50, 9]
    assert sub.repetition_penalty[1:3].tolist() == [1.0, 1.0]  # upstream applies none to codebooks 1-15
    assert talker.seed.tolist() == sub.seed.tolist() == [0, 11, 12, 3]
    assert not state.seen[1:3].any() and state.seen[3].all()
    assert state.trailing[1, :2].eq(7).all() and state.trailing[1, 2, 0] == 1
    assert state.trailing[2, :5].eq(8).all()


def test_admitting_is_one_copy_per_table_whatever_the_number_of_values():
    """Twelve sampling options and five counters a row: before, each was a copy of its own at admission."""
    state = rows(8)
    options, text = [SequenceSampling()] * 3, [torch.ones(2, 3)] * 3
    with (ledger := Ledger()), ledger.part("admit"):
        state.admit(slice(4, 7), options, prompt_lens=[5, 6, 7], trailing=text)
    # A copy into each table, one per request's text, clearing `seen` (on a GPU, and a staging copy per table).
    assert ledger.calls["admit"] == len(state.columns.tables) + len(text) + 1, ledger.calls


def test_every_column_starts_on_a_16_byte_boundary_whatever_the_number_of_rows():
    """Compiled code reading a column at an odd offset would lose its vectorized loads (inductor aligns to 16)."""
    for n in (1, 3, 5, 17):
        state = rows(n)
        columns = [state.code0, state.trailing_len, state.sub_params.seed, state.sub_params.do_sample]
        columns += [state.talker_params.temperature, state.talker_params.repetition_penalty, state.sub_params.top_p]
        for column in columns:
            assert column.shape == (n,) and column.is_contiguous() and column.data_ptr() % 16 == 0, (n, column)
