"""`python -m bench.profile_churn`: the step's bookkeeping under churn, counted and timed per part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.profile_churn import Ledger

REPO = Path(__file__).resolve().parents[2]


def test_a_nested_part_is_booked_to_itself_not_to_its_parent():
    ledger = Ledger()
    x = torch.ones(3)
    with ledger, ledger.part("outer"):
        y = x + 1
        with ledger.part("inner"):
            y = y * 2
            time.sleep(0.05)
        y.view(3, 1)  # a view launches nothing
    assert ledger.calls == {"outer": 1, "inner": 1}
    assert ledger.seconds["inner"] >= 0.05 > ledger.seconds["outer"] > 0
    assert ledger.entered == {"outer": 1, "inner": 1}


@pytest.mark.slow
def test_the_churn_profile_runs_on_a_tiny_model_and_writes_its_report(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.profile_churn", "--size", "tiny", "--device", "cpu", "--rows", "8"]
    command += ["--churn", "0,2", "--steps", "3", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| compact | 8 | 2 |" in done.stdout

    (json_path,) = tmp_path.glob("*-churn-*.json")
    report = json.loads(json_path.read_text())
    assert report["card"].startswith("cpu") and report["command"] and report["commit"]
    results = {(r["part"], r["rows_turned_over"]): r for r in report["results"]}
    assert set(results) == {(part, churn) for part in ("compact", "admit", "launch", "read") for churn in (0, 2)}
    for part in ("launch", "read"):
        for churn in (0, 2):
            assert results[part, churn]["host_us_per_step"] > 0, results[part, churn]
    # Without turnover nothing moves and nobody is admitted; with it, both make tensor calls every step.
    assert results["compact", 0]["tensor_calls_per_step"] == results["admit", 0]["tensor_calls_per_step"] == 0
    assert results["compact", 2]["tensor_calls_per_step"] > 0 and results["admit", 2]["tensor_calls_per_step"] > 0
