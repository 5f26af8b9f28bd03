"""The Celery application of the worker pool (QTTS_BROKER_URL, Redis).

One task per job item, carrying only the item's id: the item itself lives in the job store, which
every process shares. Late acknowledgement with `task_reject_on_worker_lost`: a task is acknowledged
when it ends, so the item of a worker killed mid-way is delivered again (after the broker's
visibility timeout) to another worker, which takes it over (store.start); the store records the
first result only (store.finish), so every item ends up in the results exactly once.
"""

from __future__ import annotations

from celery import Celery

from ..config import Settings

TASK_NAME = "qwen_tts_server.jobs.run_item"
QUEUE = "qwen-tts"


def restore_interval_s(settings: Settings) -> float:
    """How often workers look for unacknowledged tasks past the visibility timeout (and the API for
    lost ones, jobs/sweeper.py)."""
    return max(1.0, min(10.0, settings.job_visibility_timeout_s / 4))


def redelivery_grace_s(settings: Settings) -> float:
    """The longest a task in a worker's hands can take to be started: the visibility timeout, a
    restore interval to be noticed and one more to be taken, and a margin for a busy host."""
    return settings.job_visibility_timeout_s + 2 * restore_interval_s(settings) + 5.0


def make_celery(settings: Settings) -> Celery:
    if not settings.broker_url:
        raise ValueError("QTTS_BROKER_URL is not set: the worker pool needs a broker (redis://host:6379/0)")
    app = Celery("qwen_tts_server", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,  # a worker holds as many items as it has threads (engine rows)
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        # An item unacknowledged for this long is delivered again: a worker that died. It must exceed
        # the longest an item can take (generation of max_audio_seconds, plus the wait for a row).
        broker_transport_options={
            "visibility_timeout": settings.job_visibility_timeout_s,
            # How often workers look for such items: well within the timeout, one scan each time.
            "unacked_restore_interval": restore_interval_s(settings),
            "unacked_restore_throttle": 1,
        },
    )
    return app
