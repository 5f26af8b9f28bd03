"""Admission, release and row compaction; KV length buckets. Pure host logic, no model."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwen_tts_server.engine.fast.engine import kv_buckets
from qwen_tts_server.engine.fast.scheduler import Scheduler
from qwen_tts_server.engine.fast.sequence import Sequence, SequenceSampling, SequenceStatus


def seq(prompt_len: int) -> Sequence:
    prompt = SimpleNamespace(embeds=torch.zeros(prompt_len, 2))
    return Sequence(prompt=prompt, sampling=SequenceSampling(), max_frames=10)  # type: ignore[arg-type]


def test_admission_fills_rows_in_order_within_the_prefill_budget() -> None:
    s = Scheduler(max_slots=3, max_prefill_tokens=10)
    a, b, c, d = seq(8), seq(4), seq(2), seq(1)
    for x in (a, b, c, d):
        s.add(x)
    assert s.admit() == [a]  # b would pass the budget
    assert s.admit() == [b, c]
    assert [x.slot for x in (a, b, c)] == [0, 1, 2]
    assert s.admit() == [] and s.free == 0  # d waits for a free row
    assert d.status is SequenceStatus.WAITING


def test_the_first_request_is_admitted_even_over_budget() -> None:
    s = Scheduler(max_slots=2, max_prefill_tokens=4)
    big = seq(50)
    s.add(big)
    assert s.admit() == [big]


def test_a_leaving_request_is_replaced_by_the_last_one() -> None:
    s = Scheduler(max_slots=4, max_prefill_tokens=100)
    rows = [seq(1) for _ in range(4)]
    for x in rows:
        s.add(x)
    s.admit()
    s.release(rows[1])
    s.release(rows[3])  # the last one: nothing moves for it
    assert s.running == [rows[0], rows[2]]
    assert s.compact() == [(rows[2], 2, 1)]
    assert [x.slot for x in s.running] == [0, 1]
    assert s.compact() == []
    newcomer = seq(1)
    s.add(newcomer)
    assert s.admit() == [newcomer] and newcomer.slot == 2
    assert rows[1].status is SequenceStatus.FINISHED and s.free == 1


def test_releasing_a_waiting_request_drops_it() -> None:
    s = Scheduler(max_slots=1, max_prefill_tokens=100)
    a, b = seq(1), seq(1)
    s.add(a)
    s.add(b)
    s.admit()
    s.release(b)
    assert not s.waiting and b.status is SequenceStatus.FINISHED


def test_kv_buckets_double_up_to_max_len() -> None:
    assert kv_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert kv_buckets(1000) == [256, 512, 1000]
    assert kv_buckets(100) == [100]


def test_while_others_run_newcomers_wait_to_be_prefilled_together() -> None:
    s = Scheduler(max_slots=8, max_prefill_tokens=100, admit_wait_s=0.04)
    first = seq(5)
    first.submitted_at = 0.0
    s.add(first)
    assert s.admit(now=0.0) == [first]  # nothing running: at once
    a, b = seq(5), seq(5)
    a.submitted_at, b.submitted_at = 1.0, 1.01
    s.add(a)
    s.add(b)
    assert s.admit(now=1.02) == []  # the oldest has waited 20 ms
    assert s.admit(now=1.04) == [a, b]  # 40 ms: both in one prefill
    big = seq(100)
    big.submitted_at = 2.0
    s.add(big)
    assert s.admit(now=2.0) == [big]  # a full prefill budget goes at once
    fill = [seq(1) for _ in range(s.free)]
    for x in fill:
        x.submitted_at = 3.0
        s.add(x)
    assert s.admit(now=3.0) == fill  # they take every free row: no reason to wait
