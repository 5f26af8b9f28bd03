"""The API sends again what the broker lost: a real job store and a real Celery broker (the local
Redis), the tasks lost by never publishing them (as an API killed after storing a job would)."""

from __future__ import annotations

import pytest

from qwen_tts_server.config import Settings
from qwen_tts_server.jobs.backends import CeleryBackend
from qwen_tts_server.jobs.celery_app import QUEUE
from qwen_tts_server.jobs.store import JobStore
from qwen_tts_server.jobs.sweeper import LostTaskSweeper

from .test_store import new_items

GRACE_S = 30.0


@pytest.fixture
def backend(postgres_url, redis_url, tmp_path):
    settings = Settings(broker_url=redis_url, database_url=postgres_url, data_dir=tmp_path)
    backend = CeleryBackend(JobStore(postgres_url), settings)
    yield backend
    backend.app.close()


def published(backend: CeleryBackend) -> list[list]:
    """The arguments of the tasks waiting in the broker, taken off the queue."""
    tasks = []
    with backend.app.connection_for_read() as conn, conn.SimpleQueue(QUEUE) as queue:
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                return tasks
            args, _kwargs, _embed = message.payload
            tasks.append(args)
            message.ack()


def sweeper_of(backend: CeleryBackend, clock: list[float]) -> LostTaskSweeper:
    return LostTaskSweeper(
        backend.store, waiting=backend.waiting, send=backend.resend, grace_s=GRACE_S, clock=lambda: clock[0]
    )


def test_items_queued_in_the_store_but_not_in_the_broker_are_sent_again(backend):
    clock = [0.0]
    store = backend.store
    sweeper = sweeper_of(backend, clock)
    lost = store.create(new_items(3), owner=None, label=None, webhook_url=None)  # never published
    ids = [item.id for item in store.items(lost.id)]
    cancelled = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    assert backend.waiting() == 0
    assert sweeper.sweep() == []  # noted, not sent: they may be in a worker's hands
    assert store.start(ids[0], "worker-a") is not None  # one was: a worker started it
    store.cancel(cancelled.id)  # and one job was cancelled meanwhile

    clock[0] = GRACE_S - 1
    assert sweeper.sweep() == []  # not yet
    clock[0] = GRACE_S
    assert sweeper.sweep() == ids[1:]  # the two nobody started, once
    assert backend.waiting() == 2
    clock[0] = 3 * GRACE_S
    assert sweeper.sweep() == []  # the queue holds them now: nothing is suspected
    assert sorted(published(backend)) == sorted([item_id, True] for item_id in ids[1:])


def test_a_task_published_after_the_look_is_not_sent_again_while_it_waits(backend):
    clock = [0.0]
    store = backend.store
    sweeper = sweeper_of(backend, clock)
    job = store.create(new_items(2), owner=None, label=None, webhook_url=None)
    ids = [item.id for item in store.items(job.id)]
    assert sweeper.sweep() == []  # between storing the job and publishing it: noted
    backend.publish(ids)
    clock[0] = 10 * GRACE_S
    assert sweeper.sweep() == []  # a long queue is not a lost one
    assert published(backend) == [[item_id] for item_id in ids]


def test_a_task_sent_again_runs_only_an_item_nobody_started(postgres_url):
    clock = [1000.0]
    store = JobStore(postgres_url, clock=lambda: clock[0])
    job = store.create(new_items(2), owner=None, label=None, webhook_url=None)
    first, second = (item.id for item in store.items(job.id))
    assert store.start(first, "worker-a") is not None
    assert store.start(first, "worker-b", take_over_after_s=None) is None  # a copy sent again: no second run
    clock[0] += 10
    assert store.start(first, "worker-c", take_over_after_s=450) is None  # a late task: the run is too young
    clock[0] += 450
    assert store.start(first, "worker-c", take_over_after_s=450) is not None  # delivered again: a-worker died
    assert store.start(second, "worker-b", take_over_after_s=None) is not None
