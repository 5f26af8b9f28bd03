"""The worker pool for real: an API process and two `qwen-tts-server worker` processes on the CPU,
Celery on the local Redis, job state in a fresh PostgreSQL database. One worker is killed with
SIGKILL mid-job and the API restarted: the job still completes with every item exactly once."""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from qwen_tts_server.config import Settings
from qwen_tts_server.jobs.celery_app import make_celery

from .processes import make_cluster

pytestmark = pytest.mark.slow

OPTIONS = {"mode": "custom_voice", "speaker": "vivian", "max_new_tokens": 6, "seed": 1}
WORKER_ENV = {"QTTS_JOB_CONCURRENCY": "4"}


@pytest.fixture
def cluster(tmp_path, tiny_models_dir, postgres_url, redis_url):
    c = make_cluster(tmp_path, tiny_models_dir, postgres_url, redis_url)
    c.env["QTTS_ALLOW_PRIVATE_URLS"] = "true"  # the webhook receiver is on loopback: this test only
    c.env["QTTS_JOB_VISIBILITY_TIMEOUT_S"] = "8"  # workers redeliver, and the API sends lost tasks, soon
    yield c
    c.close()


class Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["content-length"]))
        Hooks.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        return None


@pytest.fixture
def webhook_receiver():
    Hooks.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Hooks.received
    server.shutdown()


def progress(base: str, job_id: str) -> dict:
    response = httpx.get(f"{base}/api/v1/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def running_on(database_url: str, pid: int) -> int:
    """Items the worker process `pid` is running now (its name in the store carries its pid)."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM job_items WHERE state = 'running' AND worker LIKE :name"),
                {"name": f"worker:%:{pid}:%"},
            ).scalar_one()
    finally:
        engine.dispose()


def test_a_killed_worker_and_a_restarted_api_lose_nothing(cluster, postgres_url, webhook_receiver):
    hook_url, hooks = webhook_receiver
    base, api = cluster.serve("api-1")
    doomed = cluster.worker("worker-1", WORKER_ENV)
    cluster.worker("worker-2", WORKER_ENV)
    items = [{"text": f"Line number {i}.", "custom_id": f"line-{i}"} for i in range(200)]
    response = httpx.post(
        f"{base}/api/v1/jobs", json={"items": items, "options": OPTIONS, "webhook_url": hook_url}, timeout=30
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    # Kill worker 1 while it is in the middle of items, once the job is well under way.
    deadline = time.monotonic() + 240
    while not (progress(base, job_id)["progress"]["done"] >= 20 and running_on(postgres_url, doomed.pid) > 0):
        assert time.monotonic() < deadline, cluster.log(doomed)
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)

    # Restart the API mid-job: the job's state lives in the database, not in the API process.
    cluster.stop(api)
    base, api = cluster.serve("api-2")
    deadline = time.monotonic() + 300
    while (view := progress(base, job_id))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"{view['progress']}\n{cluster.log(api)}"
        time.sleep(0.5)

    assert view["status"] == "completed", view["progress"]
    assert [item["custom_id"] for item in view["items"]] == [f"line-{i}" for i in range(200)]
    assert all(item["status"] == "done" and item["file_id"] for item in view["items"])
    assert len({item["file_id"] for item in view["items"]}) == 200  # one result each, none shared
    # The items worker 1 was running when it died ran again elsewhere (redelivered after the timeout).
    assert max(item["attempts"] for item in view["items"]) >= 2
    assert httpx.get(view["items"][0]["url"], timeout=10).status_code == 200

    deadline = time.monotonic() + 30
    while not hooks:
        assert time.monotonic() < deadline, "the webhook never arrived"
        time.sleep(0.2)
    time.sleep(1.0)
    assert len(hooks) == 1, "the webhook must be sent once"
    assert hooks[0]["event"] == "job.finished" and hooks[0]["job"]["id"] == job_id
    assert hooks[0]["job"]["status"] == "completed" and hooks[0]["job"]["progress"]["done"] == 200


def test_tasks_the_broker_lost_are_sent_again(cluster, redis_url):
    base, _ = cluster.serve("api")
    items = [{"text": f"Line {i}.", "custom_id": str(i)} for i in range(4)]
    job_id = httpx.post(f"{base}/api/v1/jobs", json={"items": items, "options": OPTIONS}, timeout=30).json()["id"]
    # The broker loses every task (as a Redis restart without persistence would), before any worker runs.
    broker = make_celery(Settings(broker_url=redis_url))
    assert broker.control.purge() == 4
    broker.close()
    cluster.worker("worker-1", WORKER_ENV)
    deadline = time.monotonic() + 120
    while (view := progress(base, job_id))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view["progress"]
        time.sleep(0.5)
    assert view["status"] == "completed", view["progress"]
    assert [item["attempts"] for item in view["items"]] == [1, 1, 1, 1]  # each sent again once, run once
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert "qtts_job_items_resent_total 4.0" in metrics


def test_cancel_reaches_the_workers(cluster):
    base, _ = cluster.serve("api")
    cluster.worker("worker-1", WORKER_ENV)
    long = {**OPTIONS, "max_new_tokens": 400}
    items = [{"text": "A long line that keeps going and going. " * 8, "custom_id": str(i)} for i in range(40)]
    job_id = httpx.post(f"{base}/api/v1/jobs", json={"items": items, "options": long}, timeout=30).json()["id"]
    deadline = time.monotonic() + 120
    while progress(base, job_id)["progress"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cancelled = httpx.delete(f"{base}/api/v1/jobs/{job_id}", timeout=10).json()
    assert cancelled["status"] == "cancelled"
    done_at_cancel = cancelled["progress"]["done"]
    time.sleep(5.0)  # queued tasks reach the worker and are dropped; running ones stop
    view = progress(base, job_id)
    assert view["progress"]["done"] == done_at_cancel
    assert view["progress"]["cancelled"] == 40 - done_at_cancel
    assert view["progress"]["running"] == 0 and view["progress"]["queued"] == 0
