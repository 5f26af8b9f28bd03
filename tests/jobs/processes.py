"""Real processes for the scale-out tests: `qwen-tts-server serve` and `qwen-tts-server worker` on the
tiny checkpoints, sharing a database, a broker and a data folder, each logging to a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """The environment every process of one test shares, and the processes it started."""

    models_dir: Path
    data_dir: Path
    logs: Path
    env: dict[str, str]
    started: list[subprocess.Popen] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        env = os.environ | self.env | (extra_env or {})
        command = [sys.executable, "-m", "qwen_tts_server.cli", *args]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        process.log_path = self.logs / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def serve(self, name: str = "api", extra_env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
        port = free_port()
        process = self._spawn(name, ["serve", "--port", str(port)], extra_env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, self.log(process)
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return base, process
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{name} did not start: {self.log(process)}"
            time.sleep(0.3)

    def worker(self, name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        return self._spawn(name, ["worker", "--device", "cpu"], extra_env)

    @staticmethod
    def log(process: subprocess.Popen) -> str:
        path: Path = process.log_path  # type: ignore[attr-defined]
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def close(self) -> None:
        for process in reversed(self.started):
            self.stop(process)


def make_cluster(tmp_path: Path, models_dir: Path, database_url: str, broker_url: str | None) -> Cluster:
    env = {
        "QTTS_MODELS_DIR": str(models_dir),
        "QTTS_DATA_DIR": str(tmp_path / "shared-data"),
        "QTTS_DATABASE_URL": database_url,
        "QTTS_DOWNLOAD_SOURCE": "none",
        "QTTS_DEVICE": "cpu",
        "QTTS_DTYPE": "float32",
        "QTTS_LOG_JSON": "false",
    }
    if broker_url:
        env["QTTS_BROKER_URL"] = broker_url
    logs = tmp_path / "logs"
    logs.mkdir()
    return Cluster(models_dir, tmp_path / "shared-data", logs, env)
