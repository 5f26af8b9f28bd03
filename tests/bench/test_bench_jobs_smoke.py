"""`python -m bench.bench_jobs` end to end on the CPU: it writes a tiny checkpoint, starts the real server,
runs the synchronous loop, one job (following its server-sent events) and the unload/load memory stages,
and writes its JSON and docs section; and the pieces it computes them with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_http import DOCS_END, DOCS_START, update_docs
from bench.bench_jobs import DOCS_MARKERS, Event, JobRun, SseParser, markdown, summarize_job, targets

REPO = Path(__file__).resolve().parents[2]


def test_sse_parser_yields_each_event_at_its_blank_line() -> None:
    parser = SseParser()
    lines = ["event: progress", 'data: {"done":1}', "", ": comment", "event: end", "data: {", "data: }", ""]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [("progress", {"done": 1}), ("end", {})]


def _run(gaps: list[float], audio_s: float) -> JobRun:
    """A job run whose stream opened at t=1 and whose events came `gaps` apart (the last one: end)."""
    run = JobRun(items=2, submitted=0.0, accepted=0.5, opened=1.0, job_id="job-x")
    t = 1.0
    for i, gap in enumerate(gaps):
        t += gap
        if i == len(gaps) - 1:
            progress = {"done": 2, "failed": 0, "cancelled": 0, "audio_s": audio_s, "running": 0}
            run.events.append(Event(t, "end", {"status": "completed", "progress": progress}))
        elif i % 2:
            run.events.append(Event(t, "item", {"duration_s": audio_s / 2}))
        else:
            run.events.append(Event(t, "progress", {"status": "running", "running": 2, "done": 0}))
    return run


def test_job_summary_times_from_the_post_to_the_end_event() -> None:
    run = _run([0.1, 0.5, 1.2, 0.2], audio_s=0.96)  # end at t=3.0
    job = summarize_job(run, frames=6, sync_rate=0.4)
    assert job["wall_s"] == 3.0 and job["audio_s"] == 0.96 and job["audio_s_per_s"] == 0.32
    assert job["vs_sync"] == pytest.approx(0.8)
    assert job["event_gap_ms_max"] == 1200.0 and job["event_gaps_over_1s"] == 1
    assert job["submit_ms"] == 500.0 and job["done"] == 2 and job["running_max"] == 2 and job["ended"]
    assert job["exact_lengths"]  # two items of 0.48 s = 6 frames


def test_a_job_without_its_end_event_reports_no_rate() -> None:
    run = _run([0.1, 0.5], audio_s=0.96)
    run.events.pop()  # no end
    run.cut_short = True
    job = summarize_job(run, frames=6, sync_rate=1.0)
    assert not job["ended"] and job["cut_short"] and "audio_s_per_s" not in job


def _data(**metrics: float | None) -> dict:
    return {
        "card": "cpu-x86_64",
        "date": "2026-12-03",
        "commit": "abc1234",
        "command": "python -m bench.bench_jobs",
        "versions": {"torch": "2.9.1"},
        "settings": {
            "model": "m",
            "size": "tiny",
            "frames": 6,
            "audio_s_per_request": 0.48,
            "text_chars": 10,
            "items": 20,
            "job_format": "pcm",
            "headline_concurrency": 2,
            "memory_tolerance_mib": 1024.0,
            "growth_tolerance_mib": 256.0,
        },
        "server": {},
        "metrics": {"sync_audio_s_per_s_c2": 1.0, **metrics},
        "sections": {},
        "job": {},
        "memory": [{"stage": "before_load", "server_used_bytes": 0, "loaded": []}],
        "memory_source": "server",
    }


def test_targets_met_missed_and_not_measured() -> None:
    rows = targets(_data(job_vs_sync=0.95, job_event_gap_ms_max=1001.0, memory_unloaded_minus_before_mib=0.0))
    assert [r["status"] for r in rows] == ["met", "missed", "met", "not measured"]
    assert "90% of sync c2" in rows[0]["target"]


def test_docs_section_goes_between_its_own_markers(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n{DOCS_START}\nhttp section\n{DOCS_END}\n")
    data = _data()
    data["targets"] = targets(data)
    update_docs(docs, data, markdown, DOCS_MARKERS)
    update_docs(docs, data, markdown, DOCS_MARKERS)
    text = docs.read_text()
    assert text.count(DOCS_MARKERS[0]) == 1 and text.count(DOCS_MARKERS[1]) == 1
    assert "http section" in text and "| cpu-x86_64 | 2026-12-03 | abc1234 |" in text
    assert "GPU figures need CUDA" in text


@pytest.mark.slow
def test_jobs_bench_against_the_real_server_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    command = [sys.executable, "-m", "bench.bench_jobs", "--size", "tiny", "--models-dir", str(tmp_path / "models")]
    command += ["--device", "cpu", "--concurrency", "2", "--items", "8", "--frames", "6", "--loop-rounds", "2"]
    command += ["--warmup-rounds", "1", "--max-seconds", "150", "--targets"]
    command += ["--out", str(tmp_path / "results"), "--docs", str(docs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "| job of 8 items |" in done.stdout and "| target |" in done.stdout

    (json_path,) = (tmp_path / "results").glob("*-jobs.json")
    report = json.loads(json_path.read_text())
    assert report["card"].startswith("cpu") and report["command"].startswith("python -m bench.bench_jobs")
    assert not report["errors"], report["errors"]
    m = report["metrics"]
    assert m["sync_audio_s_per_s_c2"] > 0 and m["job_audio_s_per_s"] > 0 and m["job_vs_sync"] > 0
    assert m["job_items_failed"] == 0 and m["job_event_gap_ms_max"] > 0 and m["job_wall_s"] > 0
    job = report["job"]
    assert job["status"] == "completed" and job["done"] == 8 and job["item_events"] == 8 and job["exact_lengths"]
    assert job["audio_s"] == pytest.approx(8 * 0.48)
    stages = [s["stage"] for s in report["memory"]]
    assert stages == ["before_load", "loaded_warm", "after_job", "unloaded", "reloaded", "unloaded_again"]
    counted = {s["stage"]: s["server_used_bytes"] for s in report["memory"]}
    assert counted["before_load"] == counted["unloaded"] == counted["unloaded_again"] == 0
    assert counted["loaded_warm"] > 0 and counted["reloaded"] > 0
    assert m["memory_unloaded_minus_before_mib"] == 0 and m["memory_growth_mib"] == 0
    statuses = [t["status"] for t in report["targets"]]
    assert statuses[0] in ("met", "missed") and statuses[2] == statuses[3] == "met"

    text = docs.read_text()
    assert DOCS_MARKERS[0] in text and DOCS_MARKERS[1] in text and report["commit"] in text
