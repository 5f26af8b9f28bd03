"""Batch jobs through the API on the in-process backend (the default): submit, progress, events,
results, the archive, cancellation, ownership, and a restart that resumes unfinished items."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import zipfile

import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from qwen_tts_server.config import Settings
from qwen_tts_server.jobs.store import ItemState, JobStore, NewItem

from ..support import error_of, sine_wav, upload, wait_until_idle, words

HEADERS = {"Authorization": "Bearer key-a"}


def wait_for_end(client, job_id: str, timeout_s: float = 120.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        if view["status"] not in ("queued", "running"):
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s: {view['progress']}")


def test_a_mixed_job_runs_every_item_and_returns_its_audio(client):
    ref = upload(client, sine_wav(1.5))
    items = [
        {"mode": "custom_voice", "text": "One.", "speaker": "vivian", "custom_id": "a"},
        {"mode": "voice_design", "text": "Two.", "instruct": "A calm voice.", "custom_id": "b"},
        {"mode": "voice_clone", "text": "Three.", "ref_audio": ref, "ref_text": "A tone.", "custom_id": "c"},
        {"text": "Four.", "custom_id": "d", "response_format": "flac"},
    ]
    options = {"mode": "custom_voice", "speaker": "ryan", "seed": 7, "max_new_tokens": 20}
    response = client.post("/api/v1/jobs", json={"items": items, "options": options, "label": "mix"})
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] in ("queued", "running") and created["progress"]["total"] == 4
    view = wait_for_end(client, created["id"])
    assert view["status"] == "completed", view
    assert view["progress"]["done"] == 4 and view["progress"]["eta_s"] == 0
    assert [item["custom_id"] for item in view["items"]] == ["a", "b", "c", "d"]
    assert [item["mode"] for item in view["items"]] == ["custom_voice", "voice_design", "voice_clone", "custom_voice"]
    total = 0.0
    for item in view["items"]:
        audio = client.get(item["url"])
        assert audio.status_code == 200
        samples, rate = sf.read(io.BytesIO(audio.content))
        assert rate == 24000 and abs(len(samples) / rate - item["duration_s"]) < 1e-3
        total += item["duration_s"]
    assert view["items"][3]["url"] and client.get(view["items"][3]["url"]).headers["content-type"] == "audio/flac"
    assert abs(view["progress"]["audio_s"] - total) < 0.01


def test_items_of_a_job_run_together_in_the_engine(make_client):
    client = make_client(max_slots=8)
    items = [{"text": words(30), "custom_id": str(i)} for i in range(8)]
    job = client.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    ).json()
    view = wait_for_end(client, job["id"])
    assert view["status"] == "completed"
    # A job feeds the engine as many items as it has rows, not one request at a time.
    assert max(client.app.state.services.synthesizer.batch_sizes()) > 1


def test_a_bad_item_is_a_422_naming_it_and_nothing_is_queued(client):
    items = [{"mode": "custom_voice", "text": "Fine.", "speaker": "vivian"}, {"mode": "custom_voice", "text": " "}]
    response = client.post("/api/v1/jobs", json={"items": items})
    assert response.status_code == 422
    assert error_of(response)["field"].startswith("items[1]")
    bad_mode = client.post("/api/v1/jobs", json={"items": [{"mode": "sing", "text": "x"}]})
    assert bad_mode.status_code == 422 and "custom_voice" in error_of(bad_mode)["message"]
    no_mode = client.post("/api/v1/jobs", json={"items": [{"text": "x"}]})
    assert no_mode.status_code == 422 and error_of(no_mode)["field"] == "items[0].mode"
    missing_voice = client.post("/api/v1/jobs", json={"items": [{"mode": "voice_clone", "text": "x", "voice": "nope"}]})
    assert missing_voice.status_code == 404 and error_of(missing_voice)["field"].startswith("items[0]")
    empty = client.post("/api/v1/jobs", json={"items": []})
    assert empty.status_code == 422
    stream = client.post("/api/v1/jobs", json={"items": [{"mode": "custom_voice", "text": "x", "stream": True}]})
    assert stream.status_code == 422 and error_of(stream)["field"] == "items[0].stream"
    assert client.get("/api/v1/jobs").json() == []


def test_job_limits_and_unknown_jobs(make_client):
    client = make_client(max_job_items=2)
    items = [{"mode": "custom_voice", "text": "x", "speaker": "vivian"}] * 3
    response = client.post("/api/v1/jobs", json={"items": items})
    assert response.status_code == 422 and "limit of 2" in error_of(response)["message"]
    assert client.get("/api/v1/jobs/job-nope").status_code == 404
    assert client.delete("/api/v1/jobs/job-nope").status_code == 404
    private = client.post("/api/v1/jobs", json={"items": items[:1], "webhook_url": "http://127.0.0.1:9/hook"})
    assert private.status_code == 422 and error_of(private)["field"] == "webhook_url"


def test_events_report_progress_each_item_and_the_end(client):
    items = [{"text": f"Line {i}.", "custom_id": f"l{i}"} for i in range(3)]
    job = client.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    ).json()
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    kinds = [name for name, _ in events]
    assert kinds[-1] == "end" and kinds.count("item") == 3 and "progress" in kinds
    assert sorted(data["custom_id"] for name, data in events if name == "item") == ["l0", "l1", "l2"]
    assert events[-1][1]["status"] == "completed" and len(events[-1][1]["items"]) == 3
    progress = [data for name, data in events if name == "progress"]
    assert progress[-1]["done"] == 3 or events[-1][1]["progress"]["done"] == 3


def test_the_archive_holds_every_output_and_a_manifest(client):
    items = [{"text": "One.", "custom_id": "../../evil"}, {"text": "Two."}]
    job = client.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    ).json()
    wait_for_end(client, job["id"])
    response = client.get(f"/api/v1/jobs/{job['id']}/archive")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = archive.namelist()
    assert names == ["00000-______evil.wav", "00001-item.wav", "manifest.json"]
    manifest = json.loads(archive.read("manifest.json"))
    assert [entry["archive_name"] for entry in manifest["items"]] == names[:2]
    assert sf.read(io.BytesIO(archive.read(names[1])))[1] == 24000


def test_cancel_stops_queued_and_running_items(make_client):
    client = make_client(max_slots=1, job_concurrency=1)
    items = [{"text": words(200), "custom_id": str(i)} for i in range(4)]
    job = client.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    ).json()
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/jobs/{job['id']}").json()["progress"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = client.delete(f"/api/v1/jobs/{job['id']}")
    assert response.status_code == 200
    view = response.json()
    assert view["status"] == "cancelled"
    assert {item["status"] for item in view["items"]} <= {"cancelled", "done"}
    assert view["progress"]["cancelled"] >= 3
    # The engine stops the running item within a few steps, and nothing else starts.
    assert wait_until_idle(client.app, timeout_s=10) == {}, "the cancelled item kept running in the engine"
    time.sleep(1.0)
    assert wait_until_idle(client.app, timeout_s=0) == {}
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["progress"]["done"] == view["progress"]["done"]


def test_jobs_belong_to_their_api_key(make_client):
    client = make_client(api_keys=["key-a", "key-b"])
    other = {"Authorization": "Bearer key-b"}
    items = [{"mode": "custom_voice", "text": "Mine.", "speaker": "vivian"}]
    job = client.post("/api/v1/jobs", json={"items": items}, headers=HEADERS).json()
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert client.delete(f"/api/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert client.get("/api/v1/jobs", headers=other).json() == []
    assert [j["id"] for j in client.get("/api/v1/jobs", headers=HEADERS).json()] == [job["id"]]
    view = wait_for_end(client, job["id"], headers=HEADERS)
    # Results are signed download links: they open without a key header.
    assert client.get(view["items"][0]["url"]).status_code == 200


def test_a_restart_resumes_unfinished_items(make_client, tmp_path):
    data_dir = tmp_path / "shared-data"
    first = make_client(data_dir=data_dir, max_slots=1, job_concurrency=1)
    items = [{"text": words(40), "custom_id": str(i)} for i in range(4)]
    job = first.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    ).json()
    deadline = time.monotonic() + 60
    while first.get(f"/api/v1/jobs/{job['id']}").json()["progress"]["done"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.__exit__(None, None, None)  # the server stops mid-job
    store = first.app.state.services.jobs
    states = [item.state for item in store.items(job["id"])]
    assert ItemState.DONE in states and ItemState.QUEUED in states and ItemState.RUNNING not in states
    second = make_client(data_dir=data_dir, max_slots=1, job_concurrency=1)
    view = wait_for_end(second, job["id"])
    assert view["status"] == "completed"
    assert [item["custom_id"] for item in view["items"]] == ["0", "1", "2", "3"]
    assert all(item["attempts"] >= 1 for item in view["items"])


def test_items_a_killed_server_left_running_are_taken_up(make_client, tmp_path):
    """A server killed without its shutdown leaves its items running under its name; back under another
    name (a new container's host name, another port), the server takes them up once the lease is over."""
    data_dir = tmp_path / "shared-data"
    data_dir.mkdir()
    store = JobStore(Settings(data_dir=data_dir).metadata_url, clock=lambda: time.time() - 10)  # 10 s ago
    spec = {"text": "Hello there.", "speaker": "vivian", "max_new_tokens": 6}
    items = [NewItem("custom_voice", spec, str(i)) for i in range(3)]
    job = store.create(items, owner=None, label=None, webhook_url=None)
    store.beat("api:a-container-gone:8000")  # it was alive, and running two items, when it was killed
    assert len(store.claim(2, "api:a-container-gone:8000")) == 2
    client = make_client(data_dir=data_dir, job_runner_lease_s=2.0)
    view = wait_for_end(client, job.id, timeout_s=60)
    assert view["status"] == "completed"
    assert sorted(item["attempts"] for item in view["items"]) == [1, 2, 2]


def test_a_job_the_broker_cannot_take_is_a_503_and_leaves_nothing(make_client):
    with socket.socket() as s:  # a port nothing listens on: the broker is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_client(broker_url=f"redis://127.0.0.1:{port}/0")
    items = [{"text": "Hello there."}]
    response = client.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    )
    assert response.status_code == 503, response.text
    assert error_of(response)["type"] == "queue_unavailable" and response.headers["retry-after"] == "10"
    assert client.get("/api/v1/jobs").json() == []  # no job left behind that nothing would run


def test_a_database_outage_mid_job_delays_its_items_and_loses_none(postgres_relay, make_client, postgres_url, caplog):
    relay, through_relay = postgres_relay
    client = make_client(database_url=through_relay, max_slots=1, job_concurrency=1)
    items = [{"text": words(20), "custom_id": str(i)} for i in range(2)]
    options = {"mode": "custom_voice", "speaker": "vivian", "max_new_tokens": 60}
    job = client.post("/api/v1/jobs", json={"items": items, "options": options}).json()
    direct = JobStore(postgres_url)  # the test's own view, around the relay
    deadline = time.monotonic() + 60
    while direct.get(job["id"]).progress.running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    caplog.set_level(logging.WARNING, logger="qwen_tts_server.storage.database")
    relay.close()  # the database goes away while an item generates: its file and result cannot be written
    time.sleep(4.0)
    relay.open()
    view = wait_for_end(client, job["id"])
    assert view["status"] == "completed", view["progress"]
    assert all(item["status"] == "done" and item["file_id"] for item in view["items"])
    assert "the database is unavailable" in caplog.text  # the outage met a job item's writes: it waited


def test_items_wait_for_room_instead_of_failing_when_the_engine_is_full(make_client):
    # One row and no queue: of two items started at once, the second is refused by admission (429 for
    # a request) and must wait its turn rather than fail.
    client = make_client(max_slots=1, max_queue=0, job_concurrency=2)
    items = [{"text": words(20), "custom_id": str(i)} for i in range(3)]
    job = client.post(
        "/api/v1/jobs", json={"items": items, "options": {"mode": "custom_voice", "speaker": "vivian"}}
    ).json()
    view = wait_for_end(client, job["id"])
    assert view["status"] == "completed", [item.get("error") for item in view["items"]]


def test_a_job_past_the_open_items_limit_is_a_429(make_client):
    client = make_client(max_slots=1, job_concurrency=1, max_open_job_items=3)
    options = {"mode": "custom_voice", "speaker": "vivian"}
    first = client.post("/api/v1/jobs", json={"items": [{"text": words(200)}] * 3, "options": options})
    assert first.status_code == 202
    second = client.post("/api/v1/jobs", json={"items": [{"text": "One more."}], "options": options})
    assert second.status_code == 429 and "job queue is full" in error_of(second)["message"]
    assert int(second.headers["retry-after"]) >= 1
    client.delete(f"/api/v1/jobs/{first.json()['id']}")
    third = client.post("/api/v1/jobs", json={"items": [{"text": "One more."}], "options": options})
    assert third.status_code == 202  # cancelled items no longer count


def test_a_device_fault_delays_a_jobs_items_instead_of_failing_them(client, monkeypatch):
    """The engine fails its running items with 503 engine_failed and is rebuilt; the job's items wait for
    it and run again (the fault is injected into the real engine's talker step, once)."""
    from qwen_tts_server.errors import EngineFailed

    monkeypatch.setattr(EngineFailed, "retry_after_s", 0.2)  # the 30 s a client is told, shortened
    model = "Qwen3-TTS-12Hz-1.7B-CustomVoice"
    assert client.post(f"/api/v1/models/{model}/load").status_code == 200
    engine = client.app.state.services.synthesizer._fast[model].engine

    def fault(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.runner.decode = fault
    items = [{"text": f"Item {i}.", "custom_id": str(i)} for i in range(3)]
    options = {"mode": "custom_voice", "speaker": "ryan", "seed": 7, "max_new_tokens": 12, "model": model}
    created = client.post("/api/v1/jobs", json={"items": items, "options": options}).json()
    view = wait_for_end(client, created["id"])
    assert view["status"] == "completed" and view["progress"]["done"] == 3, view
    assert client.app.state.services.synthesizer._fast[model].engine is not engine  # it was rebuilt


def disk_full_retries(client) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qtts_outage_retries_total" and sample.labels["reason"] == "disk_full":
                return sample.value
    raise AssertionError("no qtts_outage_retries_total{reason=disk_full} in /metrics")


def test_a_full_disk_mid_job_delays_its_items_and_loses_none(make_client, small_disk, caplog):
    """The files folder on a real 1 MiB filesystem, filled but for 24 KiB: an item's audio cannot be stored, so
    it waits (its audio kept, not generated again) instead of failing; once space is freed the job completes."""
    data_dir = make_client.tmp / "data"
    files = small_disk(data_dir / "files", 1024)
    filler = files / "filler"
    filler.write_bytes(bytes(1000 * 1024))
    client = make_client(data_dir=data_dir, max_slots=1, job_concurrency=1)
    caplog.set_level(logging.WARNING, logger="qwen_tts_server.storage.database")
    retries_before = disk_full_retries(client)
    items = [{"text": words(20), "custom_id": str(i)} for i in range(2)]
    options = {"mode": "custom_voice", "speaker": "vivian", "max_new_tokens": 60, "response_format": "wav"}
    job = client.post("/api/v1/jobs", json={"items": items, "options": options}).json()
    deadline = time.monotonic() + 60
    while "a disk is full" not in caplog.text:  # an item's audio met the full disk, and waits
        status = client.get(f"/api/v1/jobs/{job['id']}").json()["status"]
        assert status in ("queued", "running"), f"the job ended ({status}) while its audio could not be stored"
        assert time.monotonic() < deadline, "no item met the full disk"
        time.sleep(0.05)
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "running"
    assert disk_full_retries(client) > retries_before  # what an operator's alert can watch
    filler.unlink()
    view = wait_for_end(client, job["id"])
    assert view["status"] == "completed", view["progress"]
    assert all(item["status"] == "done" and item["file_id"] for item in view["items"])
