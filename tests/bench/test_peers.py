"""bench/peers.py: the peers' command, and a run that overstays its time is stopped with its children."""

from __future__ import annotations

import os
import sys
import time

from bench import peers


def test_the_command_runs_both_peers_on_cuda_and_only_upstream_on_the_cpu() -> None:
    on_gpu = peers.command("1.7B", frames=100, concurrency=64, budget_s=250, device="auto")
    assert "--device" not in on_gpu  # "auto" is not a torch device: bench_engines picks CUDA itself
    assert on_gpu[on_gpu.index("--engines") + 1] == "reference,faster-qwen3-tts"
    assert on_gpu[on_gpu.index("--budget-s") + 1] == str(int(250 - peers.STOP_S))
    assert on_gpu[on_gpu.index("--frames-max") + 1] == "100" and on_gpu[on_gpu.index("--concurrency") + 1] == "64"
    tiny = peers.command("tiny", frames=6, concurrency=2, budget_s=60, device="cpu")
    assert "--tiny" in tiny and tiny[tiny.index("--engines") + 1] == "reference"


def test_a_run_past_its_time_is_killed_with_the_processes_it_started(tmp_path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    t0 = time.monotonic()
    assert peers._run([sys.executable, "-c", script], 2.0, log=lambda _m: None) is None
    assert time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild), "the peer's own child outlived the stop"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a killed parent is reaped by init; until then it is a zombie, not running.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"
