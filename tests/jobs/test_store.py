"""The job store on SQLite and PostgreSQL: claims never overlap, a result is recorded once, cancel
and progress say what happened, and two stores on one database (two replicas) agree."""

from __future__ import annotations

import threading

from qwen_tts_server.jobs.store import ItemState, JobState, JobStore, NewItem


def new_items(n: int) -> list[NewItem]:
    return [
        NewItem(mode="custom_voice", spec={"text": f"t{i}", "speaker": "vivian"}, custom_id=f"c{i}") for i in range(n)
    ]


def test_a_job_moves_from_queued_to_completed(database_url):
    clock = [100.0]
    store = JobStore(database_url, clock=lambda: clock[0])
    job = store.create(new_items(3), owner=None, label="x", webhook_url=None)
    assert job.state is JobState.QUEUED and job.progress.queued == 3 and job.progress.eta_s is None
    claimed = store.claim(2, "w1")
    assert [item.idx for item in claimed] == [0, 1] and all(i.state is ItemState.RUNNING for i in claimed)
    assert store.get(job.id).state is JobState.RUNNING
    clock[0] = 110.0
    assert store.finish(claimed[0].id, file_id="file-a", duration_s=2.0, finish_reason="eos").recorded
    progress = store.get(job.id).progress
    assert progress.done == 1 and progress.audio_s == 2.0 and progress.eta_s == 20.0  # 10 s an item, 2 left
    assert store.finish(claimed[1].id, error="boom").recorded
    [last] = store.claim(5, "w1")
    finished = store.finish(last.id, file_id="file-c", duration_s=1.0, finish_reason="length")
    assert finished.recorded and finished.job_over
    job = store.get(job.id)
    assert job.state is JobState.PARTIAL and job.finished_at == 110.0 and job.progress.eta_s == 0.0
    assert [i.state for i in store.items(job.id)] == [ItemState.DONE, ItemState.FAILED, ItemState.DONE]


def test_a_result_is_recorded_once(database_url):
    store = JobStore(database_url)
    job = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    [item] = store.claim(1, "w1")
    again = store.start(item.id, "w2")  # redelivered to another worker: taken over
    assert again is not None and again.attempts == 2
    assert store.finish(item.id, file_id="file-1", duration_s=1.0, finish_reason="eos").recorded
    late = store.finish(item.id, file_id="file-2", duration_s=1.0, finish_reason="eos")
    assert not late.recorded and not late.job_over
    assert store.items(job.id)[0].file_id == "file-1"
    assert store.start(item.id, "w3") is None  # nothing left to run


def test_concurrent_claims_never_overlap(database_url):
    stores = [JobStore(database_url), JobStore(database_url)]  # two processes' stores, in effect
    stores[0].create(new_items(60), owner=None, label=None, webhook_url=None)
    taken: list[list[str]] = [[] for _ in range(4)]

    def claim(k: int) -> None:
        store = stores[k % 2]
        while batch := store.claim(3, f"w{k}"):
            taken[k] += [item.id for item in batch]

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [item_id for ids in taken for item_id in ids]
    assert len(every) == 60 and len(set(every)) == 60


def test_cancel_stops_open_items_and_keeps_done_ones(database_url):
    store = JobStore(database_url)
    job = store.create(new_items(4), owner="o", label=None, webhook_url="http://example.com/hook")
    first, second = store.claim(2, "w1")
    store.finish(first.id, file_id="file-1", duration_s=1.0, finish_reason="eos")
    assert store.cancel(job.id) == [second.id]  # the one still running, for its runner to stop
    job = store.get(job.id)
    assert job.state is JobState.CANCELLED and job.over
    assert (job.progress.done, job.progress.cancelled) == (1, 3)
    assert store.open_states([second.id]) == {second.id: ItemState.CANCELLED}
    assert not store.finish(second.id, file_id="file-2", duration_s=1.0, finish_reason="eos").recorded
    assert store.claim(10, "w1") == [] and store.get(job.id).progress.queued == 0
    assert store.claim_webhook(job.id, "a1b2c3d4") == "http://example.com/hook"
    assert store.claim_webhook(job.id, "e5f6a7b8") is None  # one sender per job
    assert store.claim_webhook(job.id, "a1b2c3d4") == "http://example.com/hook"  # its retry (a lost reply)


def test_a_finish_tried_again_after_a_lost_reply_is_recorded_once(database_url):
    store = JobStore(database_url)
    job = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    [item] = store.claim(1, "w1")
    first = store.finish(item.id, file_id="file-1", duration_s=1.0, finish_reason="eos")
    assert first.recorded and first.job_over
    again = store.finish(item.id, file_id="file-1", duration_s=1.0, finish_reason="eos")  # the same call again
    assert again.recorded and again.job_over  # so the caller keeps its file and sends the webhook
    other = store.finish(item.id, file_id="file-2", duration_s=1.0, finish_reason="eos")  # another run's
    assert not other.recorded and not other.job_over
    assert store.items(job.id)[0].file_id == "file-1"


def test_owners_and_restart_requeue(database_url):
    store = JobStore(database_url)
    mine = store.create(new_items(2), owner="a", label=None, webhook_url=None)
    store.create(new_items(1), owner="b", label=None, webhook_url=None)
    assert [j.id for j in store.list("a")] == [mine.id]
    assert store.get(mine.id, owner="a", check_owner=True).id == mine.id
    claimed = store.claim(2, "api:host:8000")
    assert claimed[0].owner == "a"
    assert store.requeue_worker("api:host:800") == 0  # another runner's name, however alike
    assert store.requeue_worker("api:host:8000") == 2
    assert store.get(mine.id).progress.queued == 2


def test_finished_jobs_are_forgotten_after_the_cutoff(database_url):
    clock = [10.0]
    store = JobStore(database_url, clock=lambda: clock[0])
    old = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    [item] = store.claim(1, "w")
    store.finish(item.id, error="x")
    running = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    assert store.delete_before(11.0) == 1
    assert [j.id for j in store.list(None)] == [running.id]
    assert store.items(old.id) == []


def finish_all_at_once(stores: list[JobStore], items: list) -> list[bool]:
    """Finish every item from its own thread, all released at the same moment; each call's job_over."""
    barrier = threading.Barrier(len(items))
    ended: list[bool] = []

    def finish(k: int) -> None:
        barrier.wait()
        ended.append(stores[k % len(stores)].finish(items[k].id, file_id=f"f{k}", duration_s=1.0).job_over)

    threads = [threading.Thread(target=finish, args=(k,)) for k in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ended


def test_exactly_one_of_many_concurrent_finishes_ends_the_job(database_url):
    # Workers finishing a job's last items at the same moment: one of them, and only one, ends the job
    # (and sends its webhook). Without the job's row lock, on PostgreSQL each saw the others' items still
    # open and none ended it.
    for _ in range(5):
        stores = [JobStore(database_url) for _ in range(2)]
        job = stores[0].create(new_items(8), owner=None, label=None, webhook_url=None)
        ended = finish_all_at_once(stores, stores[0].claim(8, "w"))
        assert sorted(ended) == [False] * 7 + [True]
        assert stores[1].get(job.id).finished_at is not None


def test_queued_ids_are_the_items_no_runner_has_started(database_url):
    clock = [100.0]
    store = JobStore(database_url, clock=lambda: clock[0])
    first = store.create(new_items(2), owner=None, label=None, webhook_url=None)
    clock[0] = 101.0
    second = store.create(new_items(2), owner=None, label=None, webhook_url=None)
    started = store.start(store.items(first.id)[0].id, "w1")
    assert started is not None
    store.cancel(second.id)
    third = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    expected = [store.items(first.id)[1].id, store.items(third.id)[0].id]  # oldest job first
    assert store.queued_ids(10) == expected
    assert store.queued_ids(1) == expected[:1]


def test_items_of_a_dead_runner_go_back_to_the_queue(database_url):
    clock = [1000.0]
    store = JobStore(database_url, clock=lambda: clock[0])
    store.create(new_items(5), owner=None, label=None, webhook_url=None)
    store.beat("api:host-a:8000")
    store.beat("api:host-b:8000")
    mine = store.claim(2, "api:host-a:8000")
    theirs = store.claim(1, "api:host-b:8000")
    older = store.claim(1, "api:old-version:8000")  # a runner that never beats (an older version)
    celery = store.claim(1, "worker:host-c:42:cuda:0")  # the broker redelivers those: not ours to take
    clock[0] += 30
    assert store.requeue_dead("api:", lease_s=60) == 0  # the older runner's item is younger than the lease
    clock[0] += 31
    store.beat("api:host-b:8000")  # b lives on, a died
    assert store.requeue_dead("api:", lease_s=60) == 3
    states = store.open_states([i.id for i in mine + theirs + older + celery])
    assert [states[i.id] for i in mine + older] == [ItemState.QUEUED] * 3
    assert states[theirs[0].id] is ItemState.RUNNING and states[celery[0].id] is ItemState.RUNNING
    store.requeue([theirs[0].id], "api:host-a:8000")  # a stopping runner puts back only its own items
    assert store.open_states([theirs[0].id])[theirs[0].id] is ItemState.RUNNING
    store.requeue([theirs[0].id], "api:host-b:8000")
    assert store.open_states([theirs[0].id])[theirs[0].id] is ItemState.QUEUED
