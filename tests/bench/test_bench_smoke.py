"""`python -m bench.bench_engines --tiny` end to end on the CPU: both engines, the parity check, the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_bench_runs_both_engines_and_writes_its_report(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.bench_engines", "--tiny", "--out", str(tmp_path)]
    command += ["--frames-single", "6", "--frames-min", "4", "--frames-max", "8", "--concurrency", "2,3"]
    command += ["--check-rows", "2", "--check-frames", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| fast | tiny-CustomVoice |" in done.stdout

    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".md").exists()
    report = json.loads(json_path.read_text())
    assert report["card"].startswith("cpu") and report["command"]
    for engine in ("reference", "fast"):
        result = report["results"][engine]["tiny-CustomVoice"]
        assert result["frames_exact"], result  # every request produced exactly its target frames
        assert result["xrt_single"] > 0 and result["ttff_ms_single"] > 0
        assert result["audio_s_per_s_c2"] > 0 and result["audio_s_per_s_c3"] > 0
        assert result["audio_s_per_s_c64"] is None and result["ttff_ms_p95_c64"] is None  # not run
        assert not result["skipped"] and not result["errors"]
    check = report["checks"]["tiny-CustomVoice"]
    assert check["rows"] == 2 and check["frames"] == 5
    # fp32 on the CPU the fast engine is exact against upstream: greedy codes equal, every frame.
    assert check["identical"] and check["cb0_equal_fraction"] == check["all_equal_fraction"] == 1.0


@pytest.mark.slow
def test_profile_step_smoke_run_on_the_cpu() -> None:
    """`bench.profile_step` reads the engine's per-row tables directly: a rename there must break a test, not
    the next GPU session."""
    command = [sys.executable, "-m", "bench.profile_step", "--size", "tiny", "--batches", "1,2", "--device", "cpu"]
    command += ["--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Self CPU time total" in done.stdout


@pytest.mark.slow
def test_codec_overlap_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    """`bench.codec_overlap` drives the engine and the streaming decoder from outside: an API it relies on that
    changes must break a test, not the next GPU session. On the CPU there is no green context (and no overlap)."""
    command = [sys.executable, "-m", "bench.codec_overlap", "--size", "tiny", "--device", "cpu", "--rows", "2"]
    command += ["--seconds", "1", "--max-len", "512", "--out", str(tmp_path)]  # windows of several decodes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("*-codec-overlap.json")
    rows = json.loads(report.read_text())["rows"]
    assert [r["codec stream"] for r in rows] == ["(none)", "default stream, alone", "default stream", "default stream"]
    assert rows[0]["frame ms"] > 0 and all(r["codec audio-s/s"] > 0 for r in rows[1:])
    assert rows[2]["codec held to"] == 320.0 and all(r["frame ms"] > 0 for r in rows[2:])
