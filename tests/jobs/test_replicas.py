"""Two API replicas behind one (imaginary) load balancer: PostgreSQL for metadata, Redis for the
queue, one shared data folder. What is made through one is seen and used through the other."""

from __future__ import annotations

import time

import httpx
import pytest

from ..api.support import sine_wav
from .processes import make_cluster

pytestmark = pytest.mark.slow


def test_replicas_share_files_voices_and_jobs(tmp_path, tiny_models_dir, postgres_url, redis_url):
    cluster = make_cluster(tmp_path, tiny_models_dir, postgres_url, redis_url)
    try:
        one, _ = cluster.serve("api-1")
        two, _ = cluster.serve("api-2")
        cluster.worker("worker", {"QTTS_JOB_CONCURRENCY": "4"})

        uploaded = httpx.post(
            f"{one}/api/v1/files/upload", files={"file": ("ref.wav", sine_wav(1.5), "audio/wav")}, timeout=30
        )
        assert uploaded.status_code == 201, uploaded.text
        file_id = uploaded.json()["file_id"]
        metadata = httpx.get(f"{two}/api/v1/files/{file_id}", headers={"Accept": "application/json"}, timeout=10)
        assert metadata.json()["id"] == file_id

        # A clone on replica two from the file uploaded through replica one.
        cloned = httpx.post(
            f"{two}/api/v1/voice-clone",
            json={"text": "Shared.", "ref_audio": file_id, "x_vector_only": True, "max_new_tokens": 6},
            timeout=120,
        )
        assert cloned.status_code == 200, cloned.text
        output = cloned.json()["items"][0]["file_id"]
        assert httpx.get(f"{one}/api/v1/files/{output}/content", timeout=10).status_code == 200

        # A voice stored through one is used through two.
        voice = httpx.post(
            f"{one}/api/v1/voices",
            json={"name": "narrator", "ref_audio": file_id, "x_vector_only": True},
            timeout=120,
        )
        assert voice.status_code in (200, 201), voice.text
        names = [v["name"] for v in httpx.get(f"{two}/api/v1/voices", timeout=10).json()["voices"]]
        assert "narrator" in names

        # A job submitted to one is watched (and its items mix in the stored voice) through two.
        items = [{"mode": "voice_clone", "voice": "narrator", "text": f"Line {i}."} for i in range(6)]
        job = httpx.post(f"{one}/api/v1/jobs", json={"items": items, "options": {"max_new_tokens": 6}}, timeout=30)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        deadline = time.monotonic() + 180
        while (view := httpx.get(f"{two}/api/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, view["progress"]
            time.sleep(0.3)
        assert view["status"] == "completed", view
        assert httpx.get(view["items"][5]["url"], timeout=10).status_code == 200
    finally:
        cluster.close()
