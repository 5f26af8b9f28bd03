"""The API sends again what the broker lost: a real job store and a real Celery broker (the local
Redis), the tasks lost by never publishing them (as an API killed after storing a job would)."""

from __future__ import annotations

import pytest

from qwen_tts_server.config import Settings
from qwen_tts_server.jobs.backends import CeleryBackend
from qwen_tts_server.jobs.celery_app import QUEUE
from qwen_tts_server.jobs.store import JobStore, NewItem
from qwen_tts_server.jobs.sweeper import LostTaskSweeper

GRACE_S = 30.0


@pytest.fixture
def backend(postgres_url, redis_url, tmp_path):
    settings = Settings(broker_url=redis_url, database_url=postgres_url, data_dir=tmp_path)
    backend = CeleryBackend(JobStore(postgres_url), settings)
    yield backend
    backend.app.close()


def new_items(n: int) -> list[NewItem]:
    return [NewItem(mode="custom_voice", spec={"text": f"t{i}", "speaker": "vivian"}) for i in range(n)]


def published(backend: CeleryBackend) -> list[str]:
    """The item ids of the tasks waiting in the broker, taken off the queue."""
    ids = []
    with backend.app.connection_for_read() as conn, conn.SimpleQueue(QUEUE) as queue:
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                return ids
            args, _kwargs, _embed = message.payload
            ids += args
            message.ack()


def test_items_queued_in_the_store_but_not_in_the_broker_are_sent_again(backend):
    clock = [0.0]
    store = backend.store
    sweeper = LostTaskSweeper(
        store, waiting=backend.waiting, send=backend.publish, grace_s=GRACE_S, clock=lambda: clock[0]
    )
    lost = store.create(new_items(3), owner=None, label=None, webhook_url=None)  # never published
    ids = [item.id for item in store.items(lost.id)]
    assert backend.waiting() == 0
    assert sweeper.sweep() == []  # noted, not sent: they may be in a worker's hands
    assert store.start(ids[0], "worker-a") is not None  # one was: a worker started it
    cancelled = store.create(new_items(1), owner=None, label=None, webhook_url=None)
    store.cancel(cancelled.id)

    clock[0] = GRACE_S - 1
    assert sweeper.sweep() == []  # not yet
    clock[0] = GRACE_S
    assert sweeper.sweep() == ids[1:]  # the two nobody started, once
    assert backend.waiting() == 2
    clock[0] = 3 * GRACE_S
    assert sweeper.sweep() == []  # the queue holds them now: nothing is suspected
    assert sorted(published(backend)) == sorted(ids[1:])


def test_items_waiting_in_the_broker_are_not_suspected(backend):
    clock = [0.0]
    store = backend.store
    sweeper = LostTaskSweeper(
        store, waiting=backend.waiting, send=backend.publish, grace_s=GRACE_S, clock=lambda: clock[0]
    )
    job = store.create(new_items(2), owner=None, label=None, webhook_url=None)
    ids = [item.id for item in store.items(job.id)]
    backend.publish(ids)
    assert backend.waiting() == 2
    assert sweeper.sweep() == []
    clock[0] = 10 * GRACE_S
    assert sweeper.sweep() == []  # a long queue is not a lost one
    assert published(backend) == ids
