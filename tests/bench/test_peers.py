"""bench/peers.py: the peers' command, and a run that overstays its time is stopped with its children."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

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


def test_peers_from_a_call_of_their_own_join_a_report_and_say_so(tmp_path) -> None:
    """On a fresh machine the server's load and the peers do not fit one device call: `python -m bench.peers`
    saves their rows, and `bench_http --update-docs REPORT --peers-from THAT` adds them, naming the file."""
    from bench import bench_http

    peers_file = tmp_path / "2026-12-06-NVIDIA-H100-peers.json"
    row = {"model": "m", "xrt_single": 3.8, "ttff_ms_single": 300.0, "concurrency": 64, "skipped": []}
    engines = {"reference": {**row, "xrt_single": 0.7}, "faster-qwen3-tts": row}
    peers_file.write_text(
        json.dumps(
            {
                "card": "NVIDIA H100",
                "command": "python -m bench.bench_engines",
                "frames": 100,
                "engines": {name: {**r, "audio_s_per_s": 25.0, "ttff_ms_p95": 1e4} for name, r in engines.items()},
            }
        )
    )
    report = tmp_path / "http.json"
    settings = {"model": "m", "size": "1.7B", "frames": 100, "audio_s_per_request": 8.0, "text_chars": 10}
    report.write_text(
        json.dumps(
            {
                "card": "NVIDIA H100",
                "date": "2026-12-06",
                "commit": "abc1234",
                "command": "python -m bench.bench_http",
                "versions": {},
                "settings": {**settings, "headline_concurrency": 64},
                "server": {},
                "api": {},
                "metrics": {},
                "sections": {},
                "targets": [],
            }
        )
    )
    docs = tmp_path / "benchmarks.md"
    argv = ["--update-docs", str(report), "--peers-from", str(peers_file), "--docs", str(docs)]
    assert bench_http.main(argv) == 0

    saved = json.loads(report.read_text())
    assert saved["peers"]["source"] == peers_file.name and saved["peers"]["engines"]["reference"]["xrt_single"] == 0.7
    target = next(t for t in saved["targets"] if "faster-qwen3-tts" in t["target"])
    assert (
        target["value"] == "reference, faster-qwen3-tts"
        and target["status"] == f"from another call (`{peers_file.name}`)"
    )
    text = docs.read_text()
    assert f"from another call (NVIDIA H100, date not recorded; `bench/peers.py`, `{peers_file.name}`" in text
    assert "| faster-qwen3-tts | m | 3.80 | 300 | 25.0 | 10,000 |" in text


def test_peers_from_their_own_call_on_the_reports_machine_meet_the_target(tmp_path) -> None:
    """The peers and the server's load do not fit one device call, so the peers run next to it on the same
    warm machine: their rows name the machine, and a report from that machine counts them as its run's."""
    from bench import bench_http

    row = {"model": "m", "xrt_single": 3.8, "ttff_ms_single": 300.0, "concurrency": 64, "skipped": []}
    rows = {"source": "p.json", "engines": {"reference": row, "faster-qwen3-tts": row}}
    here = peers.machine()
    assert here == peers.machine() and len(here.split()) == 2  # host name and boot id, stable between calls
    report = {"machine": here, "started_at": "2026-12-06T21:30:00+00:00"}
    theirs = {**rows, "machine": here, "started_at": "2026-12-06T21:20:00+00:00"}
    assert bench_http.peers_row(theirs, report)["status"] == "met: on this machine, in a call of their own (`p.json`)"
    other = "from another call (`p.json`)"
    assert bench_http.peers_row({**theirs, "machine": "other " + here}, report)["status"] == other
    assert bench_http.peers_row({**theirs, "started_at": "2026-12-06T19:20:00+00:00"}, report)["status"] == other
    assert bench_http.peers_row(rows, report)["status"] == other  # older files name neither
    one = {**theirs, "engines": {"reference": row}}
    assert bench_http.peers_row(one, report)["status"].startswith("missed: on this machine")
    assert bench_http.peers_row({"engines": rows["engines"]}, report)["status"] == "met"  # ran in the report's call


def test_a_file_without_peer_rows_or_of_another_request_length_is_refused(tmp_path) -> None:
    bad = tmp_path / "x.json"
    for data in ({"card": "NVIDIA H100", "sections": {}}, {"engines": {}, "frames": 100}):
        bad.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="no peer's rows"):
            peers.load(bad, frames=100)
    bad.write_text(json.dumps({"engines": {"reference": {}}, "frames": 50}))
    with pytest.raises(ValueError, match="50 frames long, this report's 100"):
        peers.load(bad, frames=100)


def test_the_peers_of_a_bench_http_report_keep_that_calls_card_date_and_length(tmp_path) -> None:
    report = tmp_path / "2026-12-06-NVIDIA-H100-http-e0cbd7b.json"
    peer_rows = {"engines": {"reference": {}}}
    data = {"card": "NVIDIA H100", "date": "2026-12-06", "settings": {"frames": 100}, "peers": peer_rows}
    report.write_text(json.dumps(data))
    loaded = peers.load(report, frames=100)
    assert (loaded["card"], loaded["date"], loaded["source"]) == ("NVIDIA H100", "2026-12-06", report.name)
    # Taken on again from a report they joined from elsewhere, they keep naming the file they came from.
    report.write_text(json.dumps({**data, "peers": {**peer_rows, "source": "first.json"}}))
    assert peers.load(report, frames=100)["source"] == "first.json"


def test_the_peers_come_from_one_place_at_a_time() -> None:
    from bench import bench_http

    with pytest.raises(SystemExit):
        bench_http.parse_args(["--peers-from", "x.json", "--peers-s", "100"])


def test_a_second_run_on_the_same_day_and_card_keeps_the_first_file(tmp_path) -> None:
    first = peers.unused_path(tmp_path / "results", "2026-12-06-NVIDIA-H100-peers")
    assert first.name == "2026-12-06-NVIDIA-H100-peers.json"
    first.write_text("{}")
    second = peers.unused_path(tmp_path / "results", "2026-12-06-NVIDIA-H100-peers")
    assert second.name == "2026-12-06-NVIDIA-H100-peers-2.json"
    second.write_text("{}")
    assert peers.unused_path(tmp_path / "results", "2026-12-06-NVIDIA-H100-peers").name.endswith("-peers-3.json")
