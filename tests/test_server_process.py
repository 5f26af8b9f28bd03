"""The real thing: `qwen-tts-server serve` in its own process on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_served_over_a_real_socket(tiny_models_dir, tmp_path):
    port = free_port()
    env = os.environ | {"QTTS_DOWNLOAD_SOURCE": "none", "QTTS_DEVICE": "cpu", "QTTS_API_KEYS": "secret"}
    command = [
        sys.executable,
        "-m",
        "qwen_tts_server.cli",
        "serve",
        "--port",
        str(port),
        "--models-dir",
        str(tiny_models_dir),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        headers = {"authorization": "Bearer secret"}
        assert httpx.get(f"{base}/api/v1/models", timeout=5).status_code == 401
        response = httpx.post(
            f"{base}/api/v1/custom-voice",
            json={"text": ["Over the wire.", "Twice."], "speaker": "vivian", "language": "en"},
            headers=headers,
            timeout=120,
        )
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert len(items) == 2 and items[0]["url"].startswith(base)
        audio = httpx.get(items[0]["url"], headers=headers, timeout=10)
        assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
        assert response.headers["x-request-id"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert server.returncode is not None
